"""`nas measure`: a latency table for a space, measured on a CUDA GPU with the Triton kernels."""

from __future__ import annotations

import argparse
import json

from nas.cmd.common import (add_compile_jobs_option, check_compile_jobs, check_output_file,
                            compile_ahead, refuse_dilated)


def add_parser(sub, parents) -> None:
    p = sub.add_parser("measure", parents=parents, help="measure a latency table on a CUDA GPU",
                       description="Time every (layer, choice) of a space with the Triton "
                                   "integer kernels (CUDA graphs, median of --reps replays) "
                                   "beside torch fp16 cuDNN, and write the latency table under "
                                   "cost_models/. --validate N then times N random plans end "
                                   "to end against the table's sums (MAPE, Kendall tau).")
    p.add_argument("--space", help="search space (default: the embedded default)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--reps", type=int, default=100, help="graph replays per case (default 100)")
    p.add_argument("--device-spec", default="h200",
                   help="device spec the table belongs to (default h200)")
    p.add_argument("--output", help="table path (default cost_models/<spec>-<space>-b<batch>.json)")
    p.add_argument("--validate", type=int, default=0, metavar="N",
                   help="also time N random plans end to end against the table (each layer "
                        "picks its precision with equal odds)")
    p.add_argument("--validate-mixed", type=int, default=0, metavar="N",
                   help="also time N random plans drawn with odds of their own (from mostly "
                        "one precision to mostly another, as a search's candidates are), "
                        "reported apart")
    p.add_argument("--timing", choices=("replay", "marginal"), default="replay",
                   help="time per call: a graph replay divided by its calls (default), or "
                        "the difference between graphs of 2N and N calls per call, which "
                        "leaves the graph's own launch out (both for the table and --validate)")
    add_compile_jobs_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nas.cost.device_spec import COST_MODELS_DIR, DeviceSpec
    from nas.cost.measure import layer_cases, measure, provenance, table_document, validations
    from nas.errors import ConfigError
    from nas.kernels.timing import CudaGraphTimer, require_cuda
    from nas.runs import atomic_write_text
    from nas.spaces import load_space
    from nas.table import format_table

    device_name = "cuda" if args.device in (None, "auto") else args.device
    # Everything a user can get wrong is refused here, before the GPU check and the
    # compiling and timing: a bad flag must not cost a measurement.
    for flag, n in (("--batch", args.batch), ("--reps", args.reps)):
        if n <= 0:
            raise ConfigError(f"{flag} {n}: must be a positive whole number")
    check_compile_jobs(args.compile_jobs)
    for flag, n in (("--validate", args.validate), ("--validate-mixed", args.validate_mixed)):
        if n < 0:
            raise ConfigError(f"{flag} {n}: give a number of plans, 0 or more")
        if n == 1:
            raise ConfigError(f"{flag} 1: give 2 or more plans (Kendall's tau ranks pairs), "
                              f"or 0 for none")
    space = load_space(args.space)
    refuse_dilated(space, "nas measure")
    spec = DeviceSpec.load(args.device_spec)
    output = Path(args.output or COST_MODELS_DIR / f"{spec.name}-{space.name}-b{args.batch}.json")
    check_output_file(output, "--output")
    device = require_cuda(device_name)
    compile_ahead(args.space, [args.batch], args.compile_jobs, device)
    import torch

    # The baseline is cuDNN at its best: let it pick the fastest algorithm per shape (its
    # search runs on each case's first call, outside the timed graph).
    torch.backends.cudnn.benchmark = True
    timer = CudaGraphTimer(reps=args.reps, marginal=args.timing == "marginal")

    cases = layer_cases(space, args.batch, device, seed=args.seed)
    print(f"measuring {len(cases)} (layer, precision) cases of {space.name} at batch "
          f"{args.batch} on {device}", flush=True)
    entries = measure(cases, args.batch, timer, spec, say=lambda s: print(s, flush=True))
    doc = table_document(entries, provenance(device, spec, args.batch, timer.method))
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output, json.dumps(doc, indent=1) + "\n")
    print(format_table(["layer geometry and precision", "us", "fp16 cuDNN us", "speed-up",
                        "of roofline", "of INT8 peak"],
                       [[e["key"], e["us"], e["fp16_cudnn_us"], e["speedup_vs_fp16"],
                         f"{e['roofline_fraction'] * 100:.1f} %",
                         f"{e['int8_peak_fraction'] * 100:.1f} %"] for e in entries]))
    print(f"latency table: {output}")
    table = {e["key"]: e["us"] for e in entries}
    recap = []
    for field, result in validations(space, table, args.batch, device, timer,
                                     {"uniform": args.validate, "mixed": args.validate_mixed},
                                     args.seed, say=lambda s: print(s, flush=True)):
        doc[field] = result
        atomic_write_text(output, json.dumps(doc, indent=1) + "\n")
        print(f"{len(result['plans'])} random plans ({result['plan_mix']}): MAPE "
              f"{result['mape_percent']:.2f} %, Kendall tau {result['kendall_tau']:.3f} (table "
              f"sum vs end to end)")
        print(f"end to end against itself (two passes): Kendall tau "
              f"{result['passes_kendall_tau']:.3f}, mean difference "
              f"{result['passes_difference_percent']:.2f} %; the plans span "
              f"{result['plans_range_percent']:.2f} %")
        recap.append(f"{result['plan_mix']} plans: MAPE {result['mape_percent']:.2f} %, tau "
                     f"{result['kendall_tau']:.3f} (end to end against itself: tau "
                     f"{result['passes_kendall_tau']:.3f}, plans span "
                     f"{result['plans_range_percent']:.2f} %)")
    if len(recap) > 1:  # each validation's lines scroll past the other's plans
        print("validations: " + "; ".join(recap))
    return 0
