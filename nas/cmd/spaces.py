"""`nas spaces` (list) and `nas spaces show NAME` (resolved space with layer geometry)."""

from __future__ import annotations

import argparse

from nas.table import format_table, human_count


def add_parser(sub, parents) -> None:
    p = sub.add_parser("spaces", parents=parents, help="list search spaces or show one",
                       description="List the shipped search spaces, or show one resolved.")
    p.add_argument("action", nargs="?", choices=("list", "show"), default="list")
    p.add_argument("name", nargs="?", metavar="NAME", help="space name or .yaml path (for 'show')")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from nas.errors import ConfigError
    from nas.spaces import DEFAULT_SPACE, list_spaces, load_space

    if args.action == "list" and args.name is not None:
        raise ConfigError(f"'nas spaces list' takes no space name; to see {args.name}, "
                          f"'nas spaces show {args.name}'")
    if args.action == "list":
        rows = []
        for name in list_spaces():
            space = load_space(name)
            mark = " (default)" if name == DEFAULT_SPACE else ""
            rows.append([name + mark, space.model, space.data, _choices_text(space)])
        print(format_table(["space", "model", "data", "choices"], rows))
        return 0
    if not args.name:
        raise ConfigError("'nas spaces show' needs a space name; 'nas spaces' lists them")
    show(load_space(args.name))
    return 0


def _choices_text(space) -> str:
    """'W{2,4,8} x A{4,8}' for a cross product; the pairs themselves where the space lists
    them (its w_bits and a_bits would suggest every combination)."""
    if space.pairs is not None:
        return ",".join(map(str, space.pairs))
    return (f"W{{{','.join(map(str, space.w_bits))}}} x "
            f"A{{{','.join(map(str, space.a_bits))}}}")


def show(space) -> None:
    layers = space.layers()  # a glob that matches no layer fails here, before any output
    print(f"space: {space.name}" + (f" - {space.description}" if space.description else ""))
    info = space.data_info()
    print(f"model: {space.model} {space.model_kwargs or ''}".rstrip())
    print(f"data:  {space.data} {space.data_kwargs or ''} -> input "
          f"{info.in_channels}x{info.image_size[0]}x{info.image_size[1]}, "
          f"{info.num_classes} classes".replace("  ", " "))
    listed = (", ".join(map(str, space.pairs)) if space.pairs is not None
              else f"w_bits {list(space.w_bits)} x a_bits {list(space.a_bits)}")
    print(f"choices: {listed} ({len(space.choices)} per searchable layer)")
    q = space.quantizer
    print(f"quantizer: weights {q['w_granularity']}, "
          f"{'symmetric' if q['w_symmetric'] else 'asymmetric'}; activations "
          f"{'symmetric' if q['a_symmetric'] else 'asymmetric'}")
    rows = []
    for layer in layers:
        i = layer.info
        choices = str(layer.choices[0]) + " (fixed)" if layer.fixed else f"{len(layer.choices)} choices"
        kernel = f"{i.kernel[0]}x{i.kernel[1]}" + (
            f" dilation {i.dilation[0]}x{i.dilation[1]}" if i.dilated else "")
        rows.append([i.name, i.type, i.in_channels, i.out_channels, kernel,
                     i.stride[0], i.groups, f"{i.in_hw[0]}x{i.in_hw[1]}", i.params, i.macs, choices])
    print(format_table(["layer", "type", "in", "out", "kernel", "stride", "groups", "in HxW",
                        "params", "MACs", "precision"], rows))
    searchable = sum(not layer.fixed for layer in layers)
    print(f"{len(layers)} layers ({searchable} searchable, {len(layers) - searchable} fixed); "
          f"{human_count(sum(x.info.params for x in layers))} params, "
          f"{human_count(sum(x.info.macs for x in layers))} MACs per image")
