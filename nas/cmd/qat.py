"""`nas qat`: quantization-aware fine-tuning of a plan, from a float checkpoint, from a
search's supernet, or from a float model it trains first."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nas.clock import now_iso
from nas.cmd.checks import check_flags
from nas.cmd.common import add_data_options, recorded_space
from nas.space_data import load_space_data
from nas.errors import ConfigError
from nas.table import format_table

FLOAT_SHARE = 0.5  # of the budget, to train the float model when no weights are given


def add_parser(sub, parents) -> None:
    from nas.quant import METHODS

    p = sub.add_parser(
        "qat", parents=parents, help="quantization-aware fine-tuning of a plan",
        description="Fine-tune a plan's quantized model: BN folded into the convolutions, "
                    "ranges calibrated then learned, the best state on the arch split kept. "
                    "Starts from a float checkpoint (--checkpoint), from a search's supernet "
                    "weights (--run), or trains the float model first in "
                    f"{FLOAT_SHARE:.0%} of the budget.")
    p.add_argument("--plan", help="plan.yaml / plan.json (with --run: default the run's plan.yaml)")
    p.add_argument("--checkpoint", help="best.pt of a 'nas train' run to start from")
    p.add_argument("--run", dest="search_run", metavar="SEARCH_RUN",
                   help="a 'nas search' run folder: start from its supernet.pt's weights, BN "
                        "statistics re-estimated for the plan as its one-shot evaluation did")
    p.add_argument("--space", help="search space (default: the checkpoint's, else the plan's)")
    p.add_argument("--budget", help="time or epochs: 90s, 10m, 3ep (default: the space's "
                                    "train.budget); without --checkpoint or --run, half of it "
                                    "trains the float model")
    p.add_argument("--learn", choices=("lsq", "pact", "none"), default="lsq",
                   help="learned ranges: lsq step sizes (default); pact clips of the "
                        "activations that start at 0 (other ranges lsq); none: the calibrated "
                        "activation ranges kept")
    p.add_argument("--distill", action="store_true",
                   help="loss 0.5 CE + 0.5 T^2 KL(float || quantized) on logits at temperature T")
    p.add_argument("--temperature", type=float, default=2.0,
                   help="distillation temperature T (default 2)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: a hundredth of "
                                            "the space's train.lr)")
    p.add_argument("--batch-size", type=int, help="default: the space's train.batch_size")
    p.add_argument("--freeze-bn", type=float, default=0.5, metavar="FRACTION",
                   help="freeze BN statistics after this fraction of the budget (default 0.5)")
    p.add_argument("--calibration", choices=METHODS, default="mse",
                   help="initial activation ranges (default mse; --run: the supernet's)")
    p.add_argument("--calib-batches", type=int, default=8, help="calibration batches (default 8)")
    p.add_argument("--eval-every", type=int, metavar="STEPS",
                   help="evaluate on the arch split every STEPS steps (default: each epoch)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_data_options(p)
    p.set_defaults(run=run)


@dataclass
class _Start:
    """Where the fine-tuning starts: weights, plan, and what they came from."""

    space: Any
    plan: Any
    plan_source: str
    data_seed: int
    model: Any = None            # float weights (None: train them first)
    supernet: Any = None         # --run: the rebuilt Supernet
    one_shot: float | None = None


def _resolve(args: argparse.Namespace) -> _Start:
    """Every input checked and loaded, before any work: one line for each user error."""
    from nas.checkpoint import checkpoint_space
    from nas.plan import Plan
    from nas.spaces import load_space

    if not args.plan and not args.search_run:
        raise ConfigError("give --plan PLAN (with --checkpoint FP, or alone to train the float "
                          "model first) or --run SEARCH_RUN")
    if args.search_run:
        from nas.search.supernet_file import load_supernet_file, rebuild_supernet, supernet_path

        folder = Path(args.search_run)
        if args.checkpoint:
            raise ConfigError(f"--checkpoint does not apply to --run: run {folder} starts from "
                              f"the weights in its supernet.pt; leave --checkpoint out")
        if args.space:
            raise ConfigError(f"--space does not apply to --run: run {folder}'s supernet.pt "
                              f"records its space; leave --space out")
        path = supernet_path(folder, "--run")
        plan_path = Path(args.plan) if args.plan else folder / "plan.yaml"
        if not args.plan and not plan_path.is_file():
            raise ConfigError(f"--run {folder} holds no plan.yaml; pass the folder of a finished "
                              f"'nas search' run, or give the plan with --plan")
        payload = load_supernet_file(path)
        space, supernet = rebuild_supernet(payload, f"run {folder}'s supernet.pt")
        plan = Plan.load(plan_path).resolved(space)
        one_shot = plan.costs.get("one_shot_test_accuracy") if not args.plan else None
        return _Start(space, plan, str(plan_path), int(payload.get("seed", 0)),
                      supernet=supernet, one_shot=one_shot)
    plan = Plan.load(args.plan)
    if args.checkpoint:
        from nas.checkpoint import load_model

        ck_space, model, payload = load_model(args.checkpoint)
        space = checkpoint_space(args.space, args.checkpoint, ck_space)
        # The weights' own seed: the same data and a held-out arch split.
        return _Start(space, plan.resolved(space), args.plan, int(payload.get("seed", args.seed)),
                      model=model)
    space = load_space(args.space or recorded_space(plan, args.plan))
    return _Start(space, plan.resolved(space), args.plan, args.seed)


def _costs(space, plan) -> dict[str, Any]:
    """Size, BitOps and latency of the plan; latency on the device and batch its search
    recorded (else h200, batch 1), labelled measured or estimated."""
    from nas.cost import make_cost_model
    from nas.cost.size import plan_size_bytes
    from nas.plan import Plan
    from nas.values import is_whole

    batch = plan.costs.get("latency_batch")
    batch = batch if is_whole(batch) and batch > 0 else 1
    spec = plan.costs.get("device_spec")
    spec = spec if isinstance(spec, str) and spec else "h200"
    latency = make_cost_model("latency", device_spec=spec, batch=batch)
    infos = {x.name: x.info for x in space.layers()}
    estimated = any(latency.is_estimated(infos[n], p) for n, p in plan.layers.items())
    return {"size_bytes": make_cost_model("size").plan_cost(plan, space),
            "fp32_size_bytes": plan_size_bytes(Plan.uniform(space, 32, 32, include_fixed=True),
                                               space),
            "bitops": make_cost_model("bitops").plan_cost(plan, space),
            "latency_us": latency.plan_cost(plan, space),
            "latency": "estimated" if estimated else "measured",
            "latency_device": latency.spec.name, "latency_batch": batch}


def _fmt(budget) -> str:
    if budget.kind == "epochs":
        return f"{budget.value:g} epoch" + ("" if budget.value == 1 else "s")
    return f"{budget.value:g}s"


def run(args: argparse.Namespace) -> int:
    import copy

    import torch

    from nas.budget import Budget, parse_budget
    from nas.cost import format_cost
    from nas.data import make_loader
    from nas.device import resolve_device
    from nas.quant.bn_fold import conv_bn_pairs
    from nas.quant.ptq import prepare_ptq
    from nas.quant.qat import (QatConfig, convert, finetune, prepare_qat, qat_payload)
    from nas.runs import RunDir
    from nas.search.supernet_file import BN_BATCHES, ONE_SHOT_BATCH, plan_model
    from nas.supernet import recalibrate_bn
    from nas.train import TrainConfig, evaluate, train

    check_flags(args, batch_size="positive", lr="rate", calib_batches="positive",
                temperature="rate", freeze_bn="fraction", eval_every="positive")
    budget = parse_budget(args.budget) if args.budget else None
    start = _resolve(args)
    space, plan = start.space, start.plan
    budget = budget or parse_budget(space.train["budget"])
    learn = None if args.learn == "none" else args.learn
    if learn == "pact":
        bad = [n for n, p in plan.layers.items() if p.a_symmetric and p.a_bits not in (16, 32)]
        if bad:
            raise ConfigError(f"--learn pact clips activations to [0, alpha]; plan layer "
                              f"{bad[0]!r} has symmetric activations; use --learn lsq")
    conv_bn_pairs(space.build_model())  # a model torch.fx cannot trace fails now
    costs = _costs(space, plan)
    batch_size = args.batch_size or int(space.train["batch_size"])
    # Fine-tuning a trained model: with BN frozen, a tenth of the training rate made
    # fmnist_resnet8 collapse within an epoch (docs/results.md); a hundredth does not.
    lr = args.lr or float(space.train["lr"]) / 100
    device = resolve_device(args.device)
    data_args = argparse.Namespace(**{**vars(args), "seed": start.data_seed})
    splits = load_space_data(space, data_args)
    test = make_loader(splits.test, 512, shuffle=False)

    def calib():  # a fresh loader each time: the same batches
        return make_loader(splits.train, batch_size, shuffle=True, seed=args.seed)

    source = "run" if args.search_run else "checkpoint" if args.checkpoint else "trained"
    float_budget = None
    if source == "trained":
        share = budget.value * FLOAT_SHARE
        float_budget = Budget(budget.kind, share)
        budget = Budget(budget.kind, budget.value - share)
    ranges = None
    if start.supernet is not None:
        base, ranges = plan_model(start.supernet, plan, space, splits, device)
        float_model = copy.deepcopy(base)
        recalibrate_bn(float_model, make_loader(splits.train, ONE_SHOT_BATCH, shuffle=True,
                                                seed=0), BN_BATCHES, device)
    else:
        base = float_model = start.model
    origin = (f"run {args.search_run}'s supernet" if source == "run" else
              f"checkpoint {args.checkpoint}" if source == "checkpoint" else
              f"a float model trained in {_fmt(float_budget)}")
    print(f"qat of {start.plan_source} on {space.name} ({plan.bits_histogram()}), from {origin}"
          + f"; learn {args.learn}{', distilled' if args.distill else ''}; budget {_fmt(budget)}; "
            f"device {device}", flush=True)

    with RunDir(args.runs_dir, space.name, "qat") as run_dir:
        run_dir.write_config({
            "command": "qat", "space": space.to_dict(), "plan": start.plan_source,
            "run": args.search_run, "checkpoint": args.checkpoint, "budget": _fmt(budget),
            "float_budget": _fmt(float_budget) if float_budget else None, "learn": args.learn,
            "distill": args.distill, "temperature": args.temperature, "lr": lr,
            "batch_size": batch_size, "freeze_bn": args.freeze_bn,
            "calibration": args.calibration, "calib_batches": args.calib_batches,
            "eval_every": args.eval_every, "seed": args.seed, "data_seed": start.data_seed,
            "device": str(device), "data_dir": args.data_dir})
        print(f"run folder: {run_dir.path}", flush=True)
        if source == "trained":
            torch.manual_seed(args.seed)
            float_model = space.build_model()

            def on_float_epoch(record, improved):
                run_dir.log_metrics({"phase": "float", **record})
                print(f"float epoch {record['epoch']:>3}  {record['seconds']:>7.1f}s  "
                      f"val {record['val_accuracy']:5.2f}%" + ("  *" if improved else ""),
                      flush=True)

            train(float_model, splits, TrainConfig(
                budget=float_budget, batch_size=batch_size, lr=float(space.train["lr"]),
                weight_decay=float(space.train["weight_decay"]), seed=args.seed,
                progress=not args.no_progress), device, on_epoch=on_float_epoch)
            base = float_model
        float_model.to(device).eval()
        fp = evaluate(float_model, test, device)["accuracy"]
        ptq = evaluate(prepare_ptq(float_model, plan, calib(), args.calib_batches,
                                   args.calibration, device=device), test, device)["accuracy"]
        print(f"float {fp:.2f}%, PTQ {ptq:.2f}% on {len(splits.test)} test images", flush=True)
        # --run: min-max weights and the ranges the one-shot evaluation used, so that the
        # model is the one the search scored.
        qmodel = prepare_qat(base.to(device), plan, calib_loader=calib(),
                             calib_batches=args.calib_batches,
                             calibration="minmax" if ranges is not None else args.calibration,
                             learn=learn, ranges=ranges).to(device)
        start_acc = evaluate(qmodel, test, device)["accuracy"]
        print(f"QAT start {start_acc:.2f}%"
              + (f" (search's one-shot {start.one_shot:.2f}%)" if start.one_shot is not None
                 else ""), flush=True)

        def on_eval(record, improved):
            run_dir.log_metrics({"phase": "qat", **record})
            run_dir.log("qat step %(step)d: %(val_accuracy).2f%% val", record)
            print(f"qat step {record['step']:>5}  {record['seconds']:>7.1f}s  "
                  f"val {record['val_accuracy']:5.2f}%" + ("  *" if improved else ""), flush=True)
            if improved:
                run_dir.save_checkpoint("qat.pt", qat_payload(
                    space, plan, convert(qmodel), learn=learn, seed=args.seed, created=now_iso(),
                    metrics={"val_accuracy": record["val_accuracy"], "step": record["step"]}))

        cfg = QatConfig(budget=budget, batch_size=batch_size, lr=lr,
                        weight_decay=float(space.train["weight_decay"]),
                        freeze_bn=args.freeze_bn, temperature=args.temperature,
                        eval_every=args.eval_every, seed=args.seed,
                        progress=not args.no_progress)
        result = finetune(qmodel, splits, cfg, device,
                          teacher=float_model if args.distill else None, on_eval=on_eval)
        converted = convert(qmodel)
        qat = evaluate(converted, test, device)["accuracy"]
        metrics = {"float_accuracy": fp, "ptq_accuracy": ptq, "qat_start_accuracy": start_acc,
                   "qat_accuracy": qat, "qat_val_accuracy": result.best_val_accuracy,
                   "start_val_accuracy": result.start_val_accuracy,
                   "best_step": result.best_step}
        run_dir.save_checkpoint("qat.pt", qat_payload(space, plan, converted, learn=learn,
                                                      seed=args.seed, created=now_iso(),
                                                      metrics=metrics))
        plan.costs["qat_test_accuracy"] = qat
        plan.save(run_dir.file("plan.yaml"))
        summary = {"command": "qat", "space": space.name, "model": space.model, "source": source,
                   "plan": start.plan_source, "run": args.search_run, "checkpoint": args.checkpoint,
                   "learn": args.learn, "distill": args.distill,
                   "temperature": args.temperature if args.distill else None,
                   "budget": _fmt(budget),
                   "float_budget": _fmt(float_budget) if float_budget else None,
                   "epochs": result.epochs, "steps": result.steps,
                   "train_seconds": round(result.seconds, 2), **metrics,
                   "one_shot_test_accuracy": start.one_shot, **costs,
                   "bits": plan.bits_histogram(), "qat_checkpoint": "qat.pt",
                   "plan_file": "plan.yaml"}
        final = run_dir.finish(summary)

    print(format_table(
        ["space", "plan", "float %", "PTQ %", "QAT start %", "QAT %", "size", "BitOps",
         f"latency ({costs['latency_device']}, b{costs['latency_batch']})"],
        [[space.name, Path(start.plan_source).name, round(fp, 2), round(ptq, 2),
          round(start_acc, 2), round(qat, 2), format_cost("size", costs["size_bytes"]),
          format_cost("bitops", costs["bitops"]),
          format_cost("latency", costs["latency_us"]) + f" ({costs['latency']})"]]))
    print(f"QAT test accuracy: {qat:.2f}% (best arch-split state at step {result.best_step})")
    print(f"run folder: {final}")
    print(f"checkpoint: {final / 'qat.pt'}")
    return 0
