"""`nas export`: a quantized model as ONNX (QDQ), or its plan as JSON / YAML for other toolkits."""

from __future__ import annotations

import argparse
from pathlib import Path

from nas.checkpoint import checkpoint_space
from nas.clock import now_iso
from nas.cmd.checks import check_flags
from nas.cmd.common import add_data_options, check_output_file, recorded_space
from nas.errors import CheckpointError, ConfigError
from nas.table import format_table

FORMATS = ("onnx", "json", "yaml")
_FILES = {"onnx": "model.onnx", "json": "quant_plan.json", "yaml": "quant_plan.yaml"}
_RUN_FIX = "give the folder of a 'nas qat' run, which holds qat.pt"


def add_parser(sub, parents) -> None:
    from nas.quant import METHODS

    p = sub.add_parser("export", parents=parents, help="export a quantized model or its plan",
                       description="Export a float checkpoint quantized by a plan (BN folded "
                                   "and calibrated as 'nas ptq' does), or a 'nas qat' run, as "
                                   "ONNX with QuantizeLinear / DequantizeLinear pairs, checked "
                                   "in onnxruntime against the torch model; or the plan with "
                                   "each layer's quantizer settings (and, given a model, its "
                                   "scales and zero points) as JSON or YAML.")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="best.pt of a 'nas train' run (needs --plan)")
    source.add_argument("--run", dest="qat_run", metavar="RUN",
                        help="folder of a 'nas qat' run (holds qat.pt and its plan)")
    p.add_argument("--plan", help="plan.yaml / plan.json to quantize the checkpoint by; alone, "
                                  "with --format json or yaml, the plan without scales")
    p.add_argument("--space", help="search space (default: the checkpoint's, or the plan's)")
    p.add_argument("--format", choices=FORMATS, default="onnx",
                   help="onnx: the model, QDQ; json / yaml: the plan document (default onnx)")
    p.add_argument("--output", metavar="PATH",
                   help=f"file to write (default: {', '.join(_FILES.values())} in the run "
                        f"folder)")
    p.add_argument("--calibration", choices=METHODS, default="mse",
                   help="activation range method for --checkpoint (default mse)")
    p.add_argument("--calib-batches", type=int, default=8, help="calibration batches (default 8)")
    p.add_argument("--batch-size", type=int, default=128,
                   help="calibration batch size (default 128)")
    add_data_options(p)
    p.set_defaults(run=run)


def _qat_source(args: argparse.Namespace):
    """(space, plan, converted model) of a `nas qat` run folder."""
    for flag in ("plan", "space"):
        if getattr(args, flag):
            raise ConfigError(f"--run takes the plan and space of its QAT run; leave --{flag} "
                              f"out")
    folder = Path(args.qat_run)
    if not folder.is_dir():
        raise CheckpointError(f"--run {folder} is not a folder; {_RUN_FIX}")
    if not (folder / "qat.pt").is_file():
        raise CheckpointError(f"--run {folder} has no qat.pt; {_RUN_FIX}")
    try:
        from nas.quant.qat import load_qat
    except ImportError:
        raise ConfigError("--run needs QAT (nas.quant.qat), which this nas does not have; "
                          "export a checkpoint with --checkpoint and --plan") from None
    return load_qat(folder / "qat.pt")


def _sources(args: argparse.Namespace):
    """Everything read before the run folder is made: (space, plan, float model or None,
    converted model or None). Every bad input is refused here."""
    from nas.checkpoint import load_model
    from nas.plan import Plan

    if args.qat_run:
        space, plan, model = _qat_source(args)
        return space, plan, None, model
    if args.checkpoint:
        if not args.plan:
            raise ConfigError("--checkpoint needs --plan, the plan to quantize it by")
        ck_space, fp_model, _ = load_model(args.checkpoint)
        space = checkpoint_space(args.space, args.checkpoint, ck_space)
        return space, Plan.load(args.plan).resolved(space), fp_model, None
    if not args.plan:
        raise ConfigError("give --checkpoint and --plan, or --run, or (for --format json or "
                          "yaml) --plan alone")
    if args.format == "onnx":
        raise ConfigError("--format onnx needs a model: give --checkpoint (with --plan) or "
                          "--run; a plan alone exports as --format json or yaml")
    from nas.spaces import load_space

    plan = Plan.load(args.plan)
    space = load_space(args.space or recorded_space(plan, args.plan))
    return space, plan.resolved(space), None, None


def run(args: argparse.Namespace) -> int:
    import sys

    from nas.data import make_loader
    from nas.device import resolve_device
    from nas.runs import RunDir, atomic_write_bytes
    from nas.space_data import load_space_data

    check_flags(args, calib_batches="positive", batch_size="positive")
    if args.output:
        if Path(args.output).is_dir():
            raise ConfigError(f"--output {args.output} is a directory; give a file path, such "
                              f"as {Path(args.output) / _FILES[args.format]}")
        check_output_file(args.output, "--output")
    space, plan, fp_model, model = _sources(args)
    device = resolve_device(args.device)
    needs_data = fp_model is not None or args.format == "onnx"
    splits = load_space_data(space, args) if needs_data else None
    source = {"plan": args.plan, "checkpoint": args.checkpoint, "run": args.qat_run,
              "calibration": args.calibration if fp_model is not None else None,
              "calib_batches": args.calib_batches if fp_model is not None else None,
              "seed": args.seed}

    with RunDir(args.runs_dir, space.name, "export") as run_dir:
        run_dir.write_config({"command": "export", "space": space.to_dict(),
                              "format": args.format, "output": args.output, **source,
                              "date": now_iso()})
        if fp_model is not None:
            from nas.quant.ptq import prepare_ptq

            calib = make_loader(splits.train, args.batch_size, shuffle=True, seed=args.seed)
            model = prepare_ptq(fp_model, plan, calib, args.calib_batches, args.calibration,
                                device=device)
        path = Path(args.output) if args.output else run_dir.file(_FILES[args.format])
        summary = {"command": "export", "space": space.name, "format": args.format,
                   "output": str(path) if args.output else path.name, **source,
                   "bits": plan.bits_histogram()}
        if args.format == "onnx":
            from nas.export.spec import ONNX_OPSET

            data, check = _export_onnx(model, plan, space, source, splits, device)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
            summary.update({"opset": ONNX_OPSET, "bytes": len(data), "check": check})
        else:
            text = _plan_text(plan, space, model, source, args.format)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, text.encode())
            check = None
        final = run_dir.finish(summary)

    written = path if args.output else final / path.name
    if check is not None:
        bias = check["int32_bias"]
        print(f"onnxruntime {check['runtime'].split()[-1]} (CPU) vs the fake-quantized torch "
              f"model on {check['images']} test images (torch: "
              f"{check['torch_accuracy']:.2f}%)")
        print(format_table(
            ["onnxruntime session", "top-1 agreement %", "onnx acc %", "max |logit diff|",
             "check"],
            [["bias float, as the model", round(check["top1_agreement"], 2),
              round(check["onnx_accuracy"], 2), f"{check['max_logit_diff']:.3g}",
              "passed" if check["passed"] else "FAILED"],
             ["defaults: bias int32", round(bias["top1_agreement"], 2),
              round(bias["onnx_accuracy"], 2), f"{bias['max_logit_diff']:.3g}", "(info)"]]))
    print(f"wrote {written}")
    print(f"run folder: {final}")
    if check is not None and not check["passed"]:
        print(f"nas: export check failed: onnxruntime agrees with the torch model on "
              f"{check['top1_agreement']:.2f}% of top-1 classes (needs >= "
              f"{check['min_agreement']}%) and its accuracy differs by "
              f"{check['accuracy_gap']:+.2f} points (allowed {check['max_accuracy_gap']}); "
              f"{written} does not compute what the torch model does", file=sys.stderr)
        return 1
    return 0


def _export_onnx(model, plan, space, source, splits, device):
    """The ONNX file's bytes and the onnxruntime check on the test split."""
    from nas.data import make_loader
    from nas.export.check import check_onnx
    from nas.export.to_onnx import metadata, to_onnx

    proto = to_onnx(model, plan, space, metadata(space, plan, source))
    data = proto.SerializeToString()
    check = check_onnx(data, model.to(device), make_loader(splits.test, 256, shuffle=False),
                       device)
    return data, check


def _plan_text(plan, space, model, source, fmt: str) -> str:
    import json

    import yaml

    from nas.export.spec import plan_document

    doc = plan_document(plan, space, model, source)
    if fmt == "json":
        return json.dumps(doc, indent=2) + "\n"
    return yaml.safe_dump(doc, sort_keys=False)
