"""`nas ptq`: post-training quantization of a trained checkpoint under a plan."""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

from nas.checkpoint import checkpoint_space
from nas.clock import now_iso
from nas.cmd.checks import check_flags
from nas.cmd.common import add_data_options
from nas.space_data import load_space_data
from nas.table import format_table


def add_parser(sub, parents) -> None:
    from nas.quant import METHODS

    p = sub.add_parser("ptq", parents=parents, help="post-training quantization of a checkpoint",
                       description="Fold BN, quantize by a plan, calibrate and evaluate.")
    p.add_argument("--checkpoint", required=True, help="best.pt of a 'nas train' run")
    p.add_argument("--space", help="search space (default: the checkpoint's)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--plan", help="plan.yaml / plan.json")
    group.add_argument("--uniform", help="one precision for every searchable layer, e.g. W8A8")
    p.add_argument("--calibration", choices=METHODS, default="mse",
                   help="activation range method (default mse)")
    p.add_argument("--calib-batches", type=int, default=8, help="calibration batches (default 8)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--w-granularity", choices=("per_channel", "per_tensor"),
                   help="override the plan's weight granularity")
    p.add_argument("--no-fold", action="store_true", help="do not fold BN before quantizing")
    p.add_argument("--per-layer", action="store_true",
                   help="per-layer SQNR of weights and outputs, per tensor vs per channel")
    add_data_options(p)
    p.set_defaults(run=run)


def resolve_plan(args: argparse.Namespace, space):
    from nas.plan import Plan, parse_uniform

    if args.plan:
        plan = Plan.load(args.plan).resolved(space)
    else:
        plan = Plan.uniform(space, *parse_uniform(args.uniform)).resolved(space, within_choices=False)
    if args.w_granularity:
        plan = plan.with_overrides(w_granularity=args.w_granularity)
    return plan


def run(args: argparse.Namespace) -> int:
    from nas.checkpoint import load_model
    from nas.cost.size import plan_size_bytes
    from nas.data import make_loader
    from nas.device import resolve_device
    from nas.plan import Plan
    from nas.quant.ptq import per_layer_sqnr, prepare_ptq
    from nas.runs import RunDir
    from nas.train import evaluate

    check_flags(args, calib_batches="positive", batch_size="positive")
    ck_space, model, _ = load_model(args.checkpoint)
    space = checkpoint_space(args.space, args.checkpoint, ck_space)
    plan = resolve_plan(args, space)
    device = resolve_device(args.device)
    splits = load_space_data(space, args)
    calib = make_loader(splits.train, args.batch_size, shuffle=True, seed=args.seed)
    test = make_loader(splits.test, 512, shuffle=False)
    fp_size = plan_size_bytes(Plan.uniform(space, 32, 32, include_fixed=True), space)
    size = plan_size_bytes(plan, space)
    plan.costs.pop("size_bytes", None)  # the key ptq wrote before it wrote `size`, as search does
    plan.costs["size"] = size  # bytes, the size of this plan as quantized here
    plan.provenance.update({"command": "ptq", "checkpoint": args.checkpoint, "seed": args.seed,
                            "calibration": args.calibration, "date": now_iso()})

    with RunDir(args.runs_dir, space.name, "ptq") as run_dir:
        run_dir.write_config({"command": "ptq", "space": space.to_dict(), "checkpoint": args.checkpoint,
                              "plan": args.plan, "uniform": args.uniform,
                              "calibration": args.calibration, "calib_batches": args.calib_batches,
                              "fold_bn": not args.no_fold, "seed": args.seed})
        fp = evaluate(model.to(device).eval(), test, device)
        print(f"float model: {fp['accuracy']:.2f}% on {fp['samples']} test images")
        qmodel = prepare_ptq(model, plan, calib, args.calib_batches, args.calibration,
                             fold=not args.no_fold, device=device)
        quant = evaluate(qmodel, test, device)
        plan.costs["ptq_accuracy"] = quant["accuracy"]
        plan.save(run_dir.file("plan.yaml"))
        summary = {"command": "ptq", "space": space.name, "plan": args.plan or args.uniform,
                   "calibration": args.calibration, "calib_batches": args.calib_batches,
                   "fp_accuracy": fp["accuracy"], "quant_accuracy": quant["accuracy"],
                   "accuracy_drop": fp["accuracy"] - quant["accuracy"],
                   "size_bytes": size, "fp32_size_bytes": fp_size,
                   "bits": plan.bits_histogram()}
        if args.per_layer:
            rows = per_layer_sqnr(model, plan, calib, args.calib_batches, args.calibration,
                                  fold=not args.no_fold, device=device)
            table = [[r.name, f"W{r.w_bits}A{r.a_bits}", round(r.weight_per_tensor, 2),
                      round(r.weight_per_channel, 2), round(r.output_per_tensor, 2),
                      round(r.output_per_channel, 2)] for r in rows]
            headers = ["layer", "bits", "weight SQNR per-tensor dB", "weight SQNR per-channel dB",
                       "output SQNR per-tensor dB", "output SQNR per-channel dB"]
            buf = io.StringIO()
            csv.writer(buf).writerows([headers] + table)
            from nas.runs import atomic_write_text

            atomic_write_text(run_dir.file("per_layer.csv"), buf.getvalue())
            print(format_table(headers, table))
            summary["per_layer_csv"] = "per_layer.csv"
        final = run_dir.finish(summary)

    print(format_table(["space", "plan", "calibration", "fp acc %", "quant acc %", "drop",
                        "size bytes", "fp32 bytes", "compression"],
                       [[space.name, Path(args.plan).name if args.plan else args.uniform,
                         args.calibration,
                         round(fp["accuracy"], 2), round(quant["accuracy"], 2),
                         round(fp["accuracy"] - quant["accuracy"], 2), int(size), int(fp_size),
                         f"{fp_size / size:.2f}x"]]))
    print(f"run folder: {final}")
    return 0
