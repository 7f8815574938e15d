"""`nas cost`: per-layer and total size, BitOps and latency of a plan."""

from __future__ import annotations

import argparse

from nas.cmd.common import add_latency_options, recorded_space
from nas.table import format_table


def add_parser(sub, parents) -> None:
    p = sub.add_parser("cost", parents=parents, help="size, BitOps and latency of a plan",
                       description="Per-layer and total cost of a plan. Latency is measured "
                                   "where a table under cost_models/ has the layer, and "
                                   "estimated (labelled) elsewhere: the roofline, calibrated "
                                   "on the device's measured tables.")
    p.add_argument("--space", help="search space (default: the plan's, else the embedded "
                                   "default)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--plan", help="plan.yaml / plan.json")
    group.add_argument("--uniform", help="one precision for every searchable layer, e.g. W4A8")
    add_latency_options(p, "--batch", "the latency search that made the plan")
    p.add_argument("--estimate", choices=("calibrated", "roofline"), default="calibrated",
                   help="latency where no table has the layer: the roofline calibrated on the "
                        "device's measured tables (default), or the bare roofline (what the "
                        "hardware allows)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from nas.cost import format_cost, make_cost_model
    from nas.cost.notes import remeasure_command, unnamed_note
    from nas.errors import ConfigError
    from nas.plan import Plan, uniform_plan
    from nas.spaces import load_space

    if args.batch is not None and args.batch <= 0:
        raise ConfigError(f"--batch {args.batch}: must be a positive whole number")
    if args.plan:
        plan = Plan.load(args.plan)
        space = load_space(args.space or recorded_space(plan, args.plan))
        plan = plan.resolved(space)
    else:
        space = load_space(args.space)
        plan = uniform_plan(space, args.uniform)
    # A plan from a latency search records what it was costed for (`nas search`).
    batch = args.batch or _recorded(plan, "latency_batch", "--batch", args.plan) or 1
    device_spec = (args.device_spec or _recorded(plan, "device_spec", "--device-spec", args.plan)
                   or "h200")
    models = {name: make_cost_model(name, device_spec=device_spec, batch=batch,
                                    calibrate=args.estimate == "calibrated")
              for name in ("size", "bitops", "latency")}
    latency = models["latency"]
    infos = {x.name: x.info for x in space.layers()}
    rows, totals, estimated, used = [], {n: 0.0 for n in models}, 0, set()
    for name, prec in plan.layers.items():
        info = infos[name]
        costs = {n: m.layer_cost(info, prec) for n, m in models.items()}
        for n, v in costs.items():
            totals[n] += v
        est = latency.is_estimated(info, prec)
        estimated += est
        used.add(latency.source(info, prec))
        rows.append([name, str(prec), int(costs["size"]), f"{costs['bitops'] / 1e6:.2f}",
                     round(costs["latency"], 2), "estimated" if est else "measured"])
    rows.append(["total", "", int(totals["size"]), f"{totals['bitops'] / 1e6:.2f}",
                 round(totals["latency"], 2),
                 "estimated" if estimated == len(rows) else
                 ("measured" if estimated == 0 else f"{estimated} estimated")])
    print(f"space {space.name}, plan {args.plan or args.uniform}, batch {batch}, "
          f"device {latency.spec.name}")
    print(format_table(["layer", "bits", "size B", "MBitOps", "latency us", "latency source"], rows))
    used.discard(None)
    source = (f"measured table{'s' if len(used) > 1 else ''}: {', '.join(sorted(used))}" if used
              else f"no measured table for batch {batch}")
    print(f"size {format_cost('size', totals['size'])}, {format_cost('bitops', totals['bitops'])}, "
          f"latency {format_cost('latency', totals['latency'])}"
          + (f" (estimated: {latency.estimate_method}" if estimated else " (measured")
          + f"; {source})")
    notes = [latency.table_.stale_note(used, remeasure_command(space, batch)),
             unnamed_note(space)]
    for note in filter(None, notes):
        print(note)
    return 0


def _recorded(plan, key: str, flag: str, source: str):
    """The latency batch or device spec a plan's search recorded (None if none), checked:
    plan files are YAML that people edit."""
    from nas.errors import ConfigError
    from nas.values import is_whole

    value = plan.costs.get(key)
    if value is None:
        return None
    if key == "latency_batch":
        ok, kind = is_whole(value) and value > 0, "a positive whole number"
    else:
        ok, kind = isinstance(value, str) and bool(value), "a device spec name or .yaml path"
    if not ok:
        raise ConfigError(f"{source}: costs.{key} {value!r} is not {kind}; correct it or give "
                          f"{flag}")
    return value
