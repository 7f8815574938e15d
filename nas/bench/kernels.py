"""`nas bench kernels`: the integer kernels' speed goals, measured in one run on a CUDA GPU.

Three ratios, each over the space's layer geometries (each geometry once), timed like
`nas measure` (CUDA graphs; the fp16 baseline is torch channels_last cuDNN):
- W8A8 speed-up over fp16 cuDNN on the dense 3x3 convolutions at the large batch;
- fraction of the INT8 roofline (the cost model's roofline time / measured time) on the
  largest layers (within 10 % of the most multiply-adds) at the large batch;
- W4A8 speed-up over W8A8 (W8A8 time / W4A8 time) on the dense 3x3 convolutions at the small
  batch.
Each is summarised by its geometric mean and its worst layer; a goal is met when the worst
layer meets it.

Beside the goals, what the padding costs: each padded layer at the large batch is timed again
on its input already bordered by the zero point (padding 0), as a producer writing inside a
border would leave it, back to back with the same layer padded by the kernel. The kernels read
padding as 0 and add the zero point's share of the padded taps back per border pixel
(`_padding_correction`, see `_conv_gemm_kernel`). Each form is autotuned on its own (tile and
launch variant), so the ratio is what such a layout would give the layer, not the correction's
cost within one tile. It leaves out the producer's strided stores (so it overstates the gain)
and keeps the bounds checks, since padding is not a compile-time constant (so it understates
what a kernel specialised for padding 0 could drop).
"""

from __future__ import annotations

import math
from typing import Any, Callable

from nas.cost.measure import Case, make_case, measure, ops
from nas.cost.tables import table_key
from nas.kernels.inputs import fp16_baseline, int_operands, pack_operands

GOALS = {"w8a8_vs_fp16": 1.5, "roofline_fraction": 0.6, "w4a8_vs_w8a8": 1.2}
LARGEST_WITHIN = 0.10


def _unique(infos, batch: int):
    seen, out = set(), []
    for info in infos:
        key = table_key(info, batch, 8, 8)
        if key not in seen:
            seen.add(key)
            out.append(info)
    return out


def goal_layers(space, batch: int) -> tuple[list, list]:
    """(dense 3x3 convolutions, largest dense convolutions), one per geometry."""
    convs = [layer.info for layer in space.layers()
             if layer.info.type == "Conv2d" and layer.info.groups == 1]
    three = _unique([i for i in convs if tuple(i.kernel) == (3, 3)], batch)
    most = max((ops(i, batch) for i in convs), default=0.0)
    largest = _unique([i for i in convs if ops(i, batch) >= (1 - LARGEST_WITHIN) * most], batch)
    return three, largest


def _timed_layers(space, large: int, small: int) -> tuple[list, list, list, list]:
    """(3x3 and largest layers at the large batch, both timed there at W8A8, one per
    geometry; the 3x3 at the small batch, timed at W8A8 and W4A8)."""
    three, largest = goal_layers(space, large)
    return three, largest, _unique(three + largest, large), goal_layers(space, small)[0]


def warm_targets(space, large: int, small: int) -> list[tuple[int, list[str], list[str], bool]]:
    """What `run_bench` times, as (batch, precisions, layer names, whether on a bordered
    input too) for compiling ahead: one layer per geometry (the kernels depend on nothing
    else)."""
    _, _, big, three_small = _timed_layers(space, large, small)
    return [(large, ["W8A8"], [i.name for i in big], True),
            (small, ["W8A8", "W4A8"], [i.name for i in three_small], False)]


def spread(values: list[float]) -> dict[str, Any]:
    """Geometric mean, smallest and largest of per-layer ratios."""
    if not values:
        return {"layers": 0}
    geomean = math.exp(sum(math.log(v) for v in values) / len(values))
    return {"layers": len(values), "geomean": round(geomean, 4), "min": round(min(values), 4),
            "max": round(max(values), 4)}


def summarize(values: list[float], goal: float) -> dict[str, Any]:
    """Geometric mean, worst (smallest) and best of per-layer ratios against a goal."""
    s = spread(values)
    worst = {"worst": s.pop("min"), "best": s.pop("max")} if values else {}
    return {**s, **worst, "goal": goal, "met": bool(values) and min(values) >= goal}


def padding_pair(info, batch: int, w_bits: int, a_bits: int, device,
                 gen) -> tuple[Case, Case]:
    """The layer twice on the same codes: padded by the kernel, and on its input bordered by
    the zero point with padding 0. Both are run once here and must agree bit for bit (the
    integer sums are exact either way, and the epilogue is the same)."""
    import torch
    import torch.nn.functional as F

    from nas.kernels.conv import prepare_conv

    baseline, _, _ = fp16_baseline(info, batch, device, gen)
    x, wt, epilogue = int_operands(info, batch, w_bits, a_bits, device, gen)
    (ph, pw), bordered = info.padding, info.prepadded()
    xb = F.pad(x, (0, 0, pw, pw, ph, ph), value=epilogue["x_zero_point"])  # NHWC: C, W, H
    conv = dict(stride=info.stride, groups=info.groups, **epilogue)
    in_kernel = prepare_conv(*pack_operands(info, w_bits, a_bits, x, wt), padding=info.padding,
                             **conv)
    in_layout = prepare_conv(*pack_operands(bordered, w_bits, a_bits, xb, wt), padding=0, **conv)
    if not torch.equal(in_kernel(), in_layout()):
        raise RuntimeError(f"{info.name}: the kernel's padding and a bordered input give "
                           f"different outputs; the padding correction is wrong")
    key = table_key(info, batch, w_bits, a_bits)
    return (Case(key, info, w_bits, a_bits, in_kernel, baseline),
            Case(table_key(bordered, batch, w_bits, a_bits), bordered, w_bits, a_bits, in_layout,
                 baseline))


def run_bench(space, device, timer, spec, large: int, small: int, seed: int = 0,
              say: Callable[[str], None] = print) -> dict[str, Any]:
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    three, largest, big, three_small = _timed_layers(space, large, small)
    if not three:
        from nas.errors import ConfigError

        raise ConfigError(f"space {space.name} has no dense 3x3 convolution to benchmark; "
                          f"choose a convolutional space such as imagenet_resnet18")
    say(f"{space.name}: {len(big)} layer geometries at batch {large} (W8A8), "
        f"{len(three_small)} at batch {small} (W8A8, W4A8)")
    pairs = {i.name: padding_pair(i, large, 8, 8, device, gen) for i in big if any(i.padding)}
    entries_large = measure([pairs[i.name][0] if i.name in pairs
                             else make_case(i, large, 8, 8, device, gen) for i in big],
                            large, timer, spec, say=say)
    small_cases = [make_case(i, small, w, 8, device, gen) for i in three_small for w in (8, 4)]
    entries_small = measure(small_cases, small, timer, spec, say=say)
    by_key = {e["key"]: e for e in entries_large + entries_small}
    speedup = [by_key[table_key(i, large, 8, 8)]["speedup_vs_fp16"] for i in three]
    roofline = [by_key[table_key(i, large, 8, 8)]["roofline_fraction"] for i in largest]
    w4 = [by_key[table_key(i, small, 8, 8)]["us"] / by_key[table_key(i, small, 4, 8)]["us"]
          for i in three_small]
    return {"space": space.name, "large_batch": large, "small_batch": small,
            "entries": entries_large + entries_small,
            "goals": {"w8a8_vs_fp16": summarize(speedup, GOALS["w8a8_vs_fp16"]),
                      "roofline_fraction": summarize(roofline, GOALS["roofline_fraction"]),
                      "w4a8_vs_w8a8": summarize(w4, GOALS["w4a8_vs_w8a8"])},
            "padding": padding_costs(pairs.values(), by_key, three, large, timer, say)}


def padding_costs(pairs, by_key: dict, three: list, batch: int, timer,
                  say: Callable[[str], None]) -> dict[str, Any]:
    """Times each pair back to back (padded by the kernel, then on the bordered input): per
    layer both times and their ratio; the ratios' spread; and the W8A8 speed-up over fp16 (its
    time in `by_key`) that the 3x3 layers would have on bordered inputs."""
    from nas.kernels.conv import tuned_config

    entries = []
    for i, (in_kernel, in_layout) in enumerate(pairs, 1):
        padded, bordered = timer(in_kernel.run), timer(in_layout.run)
        fp16 = by_key[in_kernel.key]["fp16_cudnn_us"]
        entries.append({"key": in_kernel.key, "us_padding_in_kernel": round(padded, 3),
                        "us_padding_in_layout": round(bordered, 3),
                        "in_kernel_over_in_layout": round(padded / bordered, 4),
                        "speedup_vs_fp16_in_layout": round(fp16 / bordered, 4),
                        "kernel_config_in_layout": tuned_config(in_layout.run) or "-"})
        say(f"[padding {i}/{len(pairs)}] {in_kernel.key}: {padded:.2f} us padded in the "
            f"kernel, {bordered:.2f} us on a bordered input")
    three_keys = {table_key(i, batch, 8, 8) for i in three}
    return {"entries": entries,
            "in_kernel_over_in_layout": spread([e["in_kernel_over_in_layout"] for e in entries]),
            "w8a8_vs_fp16_3x3_in_layout": summarize(
                [e["speedup_vs_fp16_in_layout"] for e in entries if e["key"] in three_keys],
                GOALS["w8a8_vs_fp16"])}


def tables(results: dict[str, Any]):
    large, small = results["large_batch"], results["small_batch"]
    rows = [[e["key"], e["us"], e["fp16_cudnn_us"], e["speedup_vs_fp16"],
             f"{e['roofline_fraction'] * 100:.1f} %", e.get("kernel_config", "-")]
            for e in results["entries"]]
    names = {"w8a8_vs_fp16": f"W8A8 speed-up over fp16 cuDNN, 3x3 convs, batch {large}",
             "roofline_fraction": f"fraction of INT8 roofline, largest layers, batch {large}",
             "w4a8_vs_w8a8": f"W4A8 speed-up over W8A8, 3x3 convs, batch {small}"}
    goals = [[names[k], g["layers"], g.get("geomean", "-"), g.get("worst", "-"),
              g.get("best", "-"), f">= {g['goal']}", "met" if g["met"] else "NOT met"]
             for k, g in results["goals"].items()]
    padding = results["padding"]
    pad_rows = [[e["key"], e["us_padding_in_kernel"], e["us_padding_in_layout"],
                 e["in_kernel_over_in_layout"], e["speedup_vs_fp16_in_layout"],
                 e["kernel_config_in_layout"]] for e in padding["entries"]]
    s, g = padding["in_kernel_over_in_layout"], padding["w8a8_vs_fp16_3x3_in_layout"]
    pad_summary = [["time padded in the kernel / on a bordered input", s["layers"],
                    s.get("geomean", "-"), s.get("min", "-"), s.get("max", "-"), "", ""],
                   [f"{names['w8a8_vs_fp16']}, on bordered inputs", g["layers"],
                    g.get("geomean", "-"), g.get("worst", "-"), g.get("best", "-"),
                    f">= {g['goal']}", "met" if g["met"] else "NOT met"]]
    return [("layers (measured)", ["layer geometry and precision", "us", "fp16 cuDNN us",
                                   "speed-up", "of roofline", "kernel"], rows),
            ("goals (ratio per layer; met when the worst layer meets it)",
             ["ratio", "layers", "geomean", "worst", "best", "goal", ""], goals),
            (f"padding: in the kernel (zero-point correction) vs a bordered input (padding 0), "
             f"W8A8, batch {large}", ["layer geometry and precision", "us in kernel",
                                      "us bordered", "ratio", "speed-up bordered", "kernel"],
             pad_rows),
            ("padding (a bordered input is a layout the kernels are not given today)",
             ["ratio", "layers", "geomean", "min", "max", "goal", ""], pad_summary)]
