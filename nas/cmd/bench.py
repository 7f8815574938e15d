"""`nas bench ...`: benchmarks that print a table and write JSON into a run folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from nas.checkpoint import checkpoint_space
from nas.clock import now_iso
from nas.cmd.checks import check_flags
from nas.cmd.common import (add_compile_jobs_option, add_data_options, check_compile_jobs,
                             compile_ahead, refuse_dilated)
from nas.quant import METHODS
from nas.table import format_table


def add_parser(sub, parents) -> None:
    p = sub.add_parser("bench", parents=parents, help="run a benchmark",
                       description="Benchmarks: each prints tables and writes JSON.")
    benches = p.add_subparsers(dest="bench", metavar="BENCH", required=True,
                               parser_class=type(p))
    ptq = benches.add_parser("ptq", parents=parents, help="PTQ accuracy and SQNR on Fashion-MNIST",
                             description="W8A8 vs float; weight-only per-tensor vs per-channel on "
                                         "BN-folded MobileNetV2 (accuracy, and each layer's "
                                         "weight and output SQNR, by layer kind); W4A8 under "
                                         "every calibration method; W4A8 vs W8A4 (which 4 bits "
                                         "hurt more); for fmnist_resnet8 and fmnist_mobilenetv2.")
    ptq.add_argument("--checkpoint", action="append", default=[], metavar="SPACE=PATH",
                     help="a trained checkpoint per space; spaces without one are trained first")
    ptq.add_argument("--train-budget", help="budget for models trained here "
                                            "(default: each space's train.budget)")
    ptq.add_argument("--calib-batches", type=int, default=8)
    ptq.add_argument("--batch-size", type=int, default=128)
    ptq.add_argument("--calibration", action="append", choices=METHODS, metavar="METHOD",
                     help="calibration methods of the W4A8 table (repeatable; default: all of "
                          f"{', '.join(METHODS)})")
    add_data_options(ptq)
    ptq.set_defaults(run=run_ptq)

    dnas = benches.add_parser("dnas", parents=parents, help="supernet overhead and search quality",
                              description="Supernet step time and memory over the float model; "
                                          "DNAS at three size targets beside uniform plans; DNAS "
                                          "against random plans of equal size.")
    dnas.add_argument("--space", help="search space (default: the --checkpoint's, else the "
                                      "embedded default)")
    dnas.add_argument("--checkpoint", help="trained float checkpoint to start every search from "
                                           "(default: train one first)")
    dnas.add_argument("--train-budget", help="budget for the float model trained here "
                                             "(default: the space's train.budget)")
    dnas.add_argument("--budget", default="2m", help="budget of each search (default 2m)")
    dnas.add_argument("--targets", default="0.35,0.5,0.7",
                      help="size targets as fractions of the uniform W8A8 size")
    dnas.add_argument("--samples", type=int, default=8)
    dnas.add_argument("--random-plans", type=int, default=20)
    dnas.add_argument("--batch-size", type=int, default=128)
    dnas.add_argument("--workers", type=int, default=0,
                      help="add the data-parallel scaling table: 1 worker vs this many Ray "
                           "Train workers, e.g. 2 (default 0: no table, no Ray)")
    dnas.add_argument("--scaling-steps", type=int, default=40,
                      help="search steps timed for each scaling row (default 40)")
    dnas.add_argument("--scaling-only", action="store_true",
                      help="measure the data-parallel scaling table only")
    add_data_options(dnas)
    dnas.set_defaults(run=run_dnas)

    search = benches.add_parser(
        "search", parents=parents, help="bayes vs random vs uniform vs rl; Ray's scaling",
        description="On one supernet (one-shot evaluator): bayes, random, uniform and rl at equal "
                    "trial budgets under each size target and seed, the trials bayes needs to "
                    "reach random's best, each chosen plan on the test split; then random search "
                    "with 2 workers against 1, and Ray's time per trial beyond the evaluation.")
    search.add_argument("--space", help="search space (default: the --supernet's, else the "
                                        "embedded default)")
    search.add_argument("--supernet", metavar="RUN",
                        help="a 'nas search' run folder with supernet.pt (default: train one)")
    search.add_argument("--train-budget", help="training of the supernet made here (default: "
                                               "the space's train.budget)")
    search.add_argument("--targets", default="0.3,0.4",
                        help="size targets as fractions of the uniform W8A8 size (default "
                             "%(default)s)")
    search.add_argument("--trials", type=int, default=60, help="trials per search (default 60)")
    search.add_argument("--seeds", type=int, default=3, help="seeds per target (default 3)")
    search.add_argument("--workers", type=int, default=2,
                        help="trials at once in the quality searches (default 2)")
    search.add_argument("--scaling-trials", type=int, default=40,
                        help="trials of each scaling run (default 40)")
    search.add_argument("--eval-batches", type=int, default=20,
                        help="arch-split batches of 256 images per plan (default 20)")
    add_data_options(search)
    search.set_defaults(run=run_search)

    league = benches.add_parser(
        "league", parents=parents,
        help="dnas vs bayes vs rl vs random vs uniform at equal wall-clock budgets",
        description="From one float checkpoint, every method searches under each size target "
                    "for the same wall-clock budget per search, for each seed, each search a "
                    "'nas search' run folder: the hypervolume of each method's accuracy-size "
                    "front, its chosen plans' test accuracy, the trials or steps it used; a "
                    "table, JSON, and the 'nas report' of every run. The discrete searches of "
                    "a seed share one one-shot supernet, trained in the first half of its "
                    "first search's budget and charged to each of them.")
    league.add_argument("--checkpoint", required=True,
                        help="trained float checkpoint every search starts from")
    league.add_argument("--space", help="search space (default: the --checkpoint's)")
    league.add_argument("--budget", default="90s",
                        help="wall-clock budget of each search (default %(default)s)")
    league.add_argument("--targets", default="0.3,0.4",
                        help="size targets as fractions of the uniform W8A8 size (default "
                             "%(default)s)")
    league.add_argument("--seeds", type=int, default=3, help="seeds (default 3)")
    league.add_argument("--workers", type=int, default=2,
                        help="trials at once in the discrete searches (default 2)")
    league.add_argument("--eval-batches", type=int, default=10,
                        help="arch-split batches of 256 images per plan (default 10)")
    league.add_argument("--hv-floor", type=float, default=80.0,
                        help="accuracy (%%) of the hypervolume's reference point, whose size "
                             "is the largest target (default %(default)s)")
    add_data_options(league)
    league.set_defaults(run=run_league)

    qat = benches.add_parser(
        "qat", parents=parents, help="float vs PTQ vs QAT (+ distillation); export parity",
        description="Uniform W8A8, uniform W4A4 and a searched mixed plan on one float "
                    "checkpoint: float, PTQ, QAT and QAT + distillation test accuracy, each QAT "
                    "run a 'nas qat' run; the searched plan also from its search's supernet; "
                    "each QAT model exported to ONNX and checked in onnxruntime.")
    qat.add_argument("--space", default="fmnist_resnet8",
                     help="search space (default %(default)s; the --checkpoint's if given)")
    qat.add_argument("--checkpoint", help="trained float checkpoint (default: train one)")
    qat.add_argument("--search-run", metavar="RUN",
                     help="a DNAS 'nas search' run whose plan is the mixed plan (default: search "
                          "here at the uniform W4A8 size)")
    qat.add_argument("--train-budget", help="float training made here (default: the space's "
                                            "train.budget)")
    qat.add_argument("--search-budget", help="DNAS search made here (default: the space's "
                                             "train.budget)")
    qat.add_argument("--qat-budget", default="1ep",
                     help="budget of each QAT run (default %(default)s)")
    qat.set_defaults(run=run_qat)

    kernels = benches.add_parser("kernels", parents=parents,
                                 help="integer kernels vs fp16 cuDNN and the roofline (CUDA GPU)",
                                 description="On a CUDA GPU: W8A8 vs torch fp16 cuDNN on the "
                                             "space's 3x3 convolutions and the fraction of the "
                                             "INT8 roofline on its largest layers at the large "
                                             "batch, W4A8 vs W8A8 at the small batch; each "
                                             "against its goal. Then what the padding costs: "
                                             "each padded layer at the large batch again on "
                                             "its input bordered by the zero point.")
    kernels.add_argument("--space", default="imagenet_resnet18",
                         help="search space whose layer geometries are timed "
                              "(default imagenet_resnet18)")
    kernels.add_argument("--large-batch", type=int, default=64)
    kernels.add_argument("--small-batch", type=int, default=1)
    kernels.add_argument("--reps", type=int, default=100, help="graph replays per case")
    kernels.add_argument("--device-spec", default="h200", help="device spec for the roofline")
    add_compile_jobs_option(kernels)
    kernels.set_defaults(run=run_kernels)

    estimate = benches.add_parser(
        "estimate", parents=parents, help="latency estimates against the measured tables",
        description="For each space with measured latency tables, the latency estimates (the "
                    "bare roofline, and the roofline calibrated on the other spaces' tables) "
                    "against its tables: per entry, per layer's choices and over random plans. "
                    "No GPU needed.")
    estimate.add_argument("--device-spec", default="h200",
                          help="device whose tables are compared (default h200)")
    estimate.add_argument("--plans", type=int, default=200,
                          help="random plans of each mix per table (default 200)")
    estimate.set_defaults(run=run_estimate)

    compiled = benches.add_parser(
        "compile", parents=parents, help="the kernels compiled for the H200 without a GPU",
        description="Compiles every kernel a GPU would try for the space's layers (each "
                    "autotuning tile and launch variant) for the H200 (sm_90), on this machine, "
                    "and prints what the machine code says: registers, spills, shared memory, "
                    "thread blocks per SM, tensor-core instruction, whether it runs "
                    "asynchronously, instructions per main-loop iteration and outside the loop "
                    "(once per tile). Static facts, not "
                    "timings; no GPU needed.")
    compiled.add_argument("--space", default="imagenet_resnet18",
                          help="search space whose layers are compiled (default "
                               "imagenet_resnet18)")
    compiled.add_argument("--batch", type=int, default=64,
                          help="batch the autotuning tiles are chosen for (default 64)")
    compiled.add_argument("--precision", action="append", default=[], metavar="WxAy",
                          help="only these precisions, e.g. W8A8 (repeatable; default: all the "
                               "space's integer choices)")
    compiled.set_defaults(run=run_compile)


def _finish(run_dir, bench: str, results: dict):
    """Write the bench's JSON and close its run folder."""
    run_dir.write_json(f"bench_{bench}.json", results)
    return run_dir.finish({"command": f"bench {bench}", "json": f"bench_{bench}.json",
                           "seconds": results["seconds"]})


def _report(tables, final) -> int:
    for title, headers, rows in tables:
        print(f"\n{title}")
        print(format_table(headers, rows))
    print(f"\nrun folder: {final}")
    return 0


def _checkpoints(items: list[str]) -> dict[str, str]:
    from nas.bench.ptq import SPACES
    from nas.errors import ConfigError

    out = {}
    for item in items:
        space, sep, path = item.partition("=")
        if not sep or space not in SPACES:
            raise ConfigError(f"--checkpoint {item!r}: write SPACE=PATH with SPACE one of "
                              f"{', '.join(SPACES)}")
        out[space] = path
    return out


def run_ptq(args: argparse.Namespace) -> int:
    from nas.bench.ptq import SPACES, run_bench, subject_from, tables
    from nas.budget import parse_budget
    from nas.checkpoint import CHECKPOINT_FORMAT, load_model
    from nas.device import resolve_device
    from nas.runs import RunDir
    from nas.space_data import load_space_data
    from nas.spaces import load_space
    from nas.train import TrainConfig, train

    check_flags(args, calib_batches="positive", batch_size="positive")
    given = _checkpoints(args.checkpoint)
    device = resolve_device(args.device)
    budget = parse_budget(args.train_budget) if args.train_budget else None
    prepared = []
    for name in SPACES:  # load everything (and fail on bad input) before the run folder exists
        if name in given:
            space, model, _ = load_model(given[name])
            if space.name != name:
                from nas.errors import CheckpointError

                raise CheckpointError(f"--checkpoint {name}={given[name]} holds a model of space "
                                      f"{space.name}")
        else:
            space, model = load_space(name), None
        prepared.append((space, model, load_space_data(space, args)))

    with RunDir(args.runs_dir, "fmnist", "bench-ptq") as run_dir:
        subjects, sources = [], {}
        for space, model, splits in prepared:
            if model is None:
                model = space.build_model(seed=args.seed)
                b = budget or parse_budget(space.train["budget"])
                print(f"training {space.name} for {b} (no --checkpoint given)", flush=True)
                cfg = TrainConfig(budget=b, batch_size=int(space.train["batch_size"]),
                                  lr=float(space.train["lr"]),
                                  weight_decay=float(space.train["weight_decay"]), seed=args.seed,
                                  progress=False)
                result = train(model, splits, cfg, device)
                path = run_dir.save_checkpoint(f"{space.name}.pt", {
                    "format": CHECKPOINT_FORMAT, "kind": "fp32", "space": space.to_dict(),
                    "state_dict": result.best_state, "seed": args.seed, "created": now_iso(),
                    "metrics": {"test_accuracy": result.test_accuracy}})
                sources[space.name] = f"trained here for {b}: {path.name}"
            else:
                sources[space.name] = given[space.name]
            subjects.append(subject_from(space, model, splits, args.batch_size, args.seed))
        run_dir.write_config({"command": "bench ptq", "checkpoints": sources,
                              "calib_batches": args.calib_batches, "seed": args.seed,
                              "test_subset": args.test_subset, "train_subset": args.train_subset})
        methods = tuple(dict.fromkeys(args.calibration or METHODS))
        results = run_bench(subjects, args.calib_batches, device,
                            say=lambda line: (print(line, flush=True), run_dir.log(line)),
                            methods=methods)
        results.update({"checkpoints": sources, "calib_batches": args.calib_batches,
                        "calibrations": list(methods), "test_subset": args.test_subset,
                        "seed": args.seed, "device": str(device), "date": now_iso()})
        final = _finish(run_dir, "ptq", results)
    return _report(tables(results), final)


def run_dnas(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path
    from types import SimpleNamespace

    from nas.bench.dnas import run_bench, scaling, tables
    from nas.budget import parse_budget
    from nas.checkpoint import load_model
    from nas.device import resolve_device
    from nas.errors import ConfigError
    from nas.runs import RunDir
    from nas.space_data import load_space_data
    from nas.spaces import load_space
    from nas.train import TrainConfig, train

    check_flags(args, samples="count", random_plans="count", batch_size="positive",
                workers="count", scaling_steps="positive")
    if args.scaling_only and args.workers < 2:
        raise ConfigError(f"--scaling-only compares 1 worker with --workers; give --workers 2 "
                          f"or more, not {args.workers}")
    if args.workers > 1 and args.batch_size % args.workers:
        raise ConfigError(f"--batch-size {args.batch_size} does not split evenly among "
                          f"{args.workers} workers; give a multiple of --workers")
    budget = parse_budget(args.budget)
    try:
        fractions = tuple(float(f) for f in args.targets.split(","))
    except ValueError:
        fractions = ()
    if len(fractions) != 3 or not all(0 < f <= 1 for f in fractions):
        raise ConfigError(f"--targets {args.targets!r}: give three fractions in (0, 1], e.g. 0.35,0.5,0.7")
    device = resolve_device(args.device)
    if args.checkpoint:
        ck_space, model, _ = load_model(args.checkpoint)
        space = checkpoint_space(args.space, args.checkpoint, ck_space)
    else:
        space, model = load_space(args.space), None
    splits = load_space_data(space, args)
    say = lambda line: (print(line, flush=True), run_dir.log(line))  # noqa: E731
    data_args = SimpleNamespace(  # for the workers, which may start in another folder
        data_dir=str(Path(args.data_dir).absolute()) if args.data_dir else None,
        train_subset=args.train_subset, test_subset=args.test_subset, seed=args.seed)
    with RunDir(args.runs_dir, space.name, "bench-dnas") as run_dir:
        if args.scaling_only:
            started = time.monotonic()
            run_dir.write_config({"command": "bench dnas", "space": space.to_dict(),
                                  "scaling_only": True, "workers": args.workers,
                                  "scaling_steps": args.scaling_steps,
                                  "batch_size": args.batch_size, "seed": args.seed})
            model = model if model is not None else space.build_model()
            results = {"scaling": scaling(space, model, splits, data_args,
                                          args.workers, args.scaling_steps, args.batch_size,
                                          args.seed, say)}
            results.update({"space": space.name, "device": "cpu", "seed": args.seed,
                            "date": now_iso(),
                            "seconds": round(time.monotonic() - started, 1)})
            return _report(tables(results), _finish(run_dir, "dnas", results))
        if model is None:
            model = space.build_model(seed=args.seed)
            b = parse_budget(args.train_budget or space.train["budget"])
            print(f"training {space.name} for {b} (no --checkpoint given)", flush=True)
            train(model, splits, TrainConfig(budget=b, batch_size=int(space.train["batch_size"]),
                                             lr=float(space.train["lr"]), seed=args.seed,
                                             progress=False), device)
        run_dir.write_config({"command": "bench dnas", "space": space.to_dict(),
                              "checkpoint": args.checkpoint, "budget": str(budget),
                              "targets": list(fractions), "seed": args.seed,
                              "workers": args.workers, "scaling_steps": args.scaling_steps})
        results = run_bench(space, model, splits, device, fractions, budget, args.samples,
                            args.random_plans, args.seed, args.batch_size, say=say)
        if args.workers > 1:
            results["scaling"] = scaling(space, model, splits, data_args, args.workers,
                                         args.scaling_steps, args.batch_size, args.seed, say)
        results.update({"space": space.name, "budget": str(budget), "device": str(device),
                        "seed": args.seed, "date": now_iso()})
        final = _finish(run_dir, "dnas", results)
    return _report(tables(results), final)


def run_kernels(args: argparse.Namespace) -> int:
    import time

    from nas.bench.kernels import run_bench, tables, warm_targets
    from nas.cost.device_spec import DeviceSpec
    from nas.cost.measure import provenance
    from nas.kernels.timing import CudaGraphTimer, require_cuda
    from nas.runs import RunDir
    from nas.spaces import load_space

    check_flags(args, large_batch="positive", small_batch="positive", reps="positive")
    check_compile_jobs(args.compile_jobs)
    space = load_space(args.space)
    refuse_dilated(space, "nas bench kernels")
    spec = DeviceSpec.load(args.device_spec)
    device = require_cuda("cuda" if args.device in (None, "auto") else args.device,
                          "nas bench kernels")
    for batch, precisions, names, prepadded in warm_targets(space, args.large_batch,
                                                            args.small_batch):
        compile_ahead(args.space, [batch], args.compile_jobs, device, precisions, names,
                      prepadded)
    import torch

    torch.backends.cudnn.benchmark = True  # cuDNN at its best, as in `nas measure`
    timer = CudaGraphTimer(reps=args.reps)
    started = time.monotonic()
    with RunDir(args.runs_dir, space.name, "bench-kernels") as run_dir:
        run_dir.write_config({"command": "bench kernels", "space": space.name,
                              "large_batch": args.large_batch, "small_batch": args.small_batch,
                              "reps": args.reps, "device_spec": spec.name, "seed": args.seed})
        results = run_bench(space, device, timer, spec, args.large_batch, args.small_batch,
                            args.seed, say=lambda line: (print(line, flush=True), run_dir.log(line)))
        results["provenance"] = provenance(device, spec, args.large_batch, timer.method)
        del results["provenance"]["batch"]  # two batches: see large_batch and small_batch
        results["seconds"] = round(time.monotonic() - started, 1)
        final = _finish(run_dir, "kernels", results)
    return _report(tables(results), final)


def run_compile(args: argparse.Namespace) -> int:
    import time

    import triton

    from nas.bench.compile import parse_precisions, summarize, tables
    from nas.cost.tables import kernel_fingerprint
    from nas.kernels.aot import ARCH, compile_report
    from nas.runs import RunDir
    from nas.spaces import load_space

    check_flags(args, batch="positive")
    space = load_space(args.space)
    refuse_dilated(space, "nas bench compile")
    precisions = parse_precisions(args.precision, space)
    started = time.monotonic()
    with RunDir(args.runs_dir, space.name, "bench-compile") as run_dir:
        run_dir.write_config({"command": "bench compile", "space": space.name,
                              "batch": args.batch, "precisions": precisions})
        # The space itself, not its name: a .yaml's space may share a shipped one's name.
        kernels = compile_report(space.to_dict(), args.batch, precisions)
        results = {"space": space.name, "batch": args.batch, "arch": ARCH,
                   "precisions": precisions, "triton": triton.__version__,
                   "kernel_source": kernel_fingerprint(), "date": now_iso(),
                   "method": "compiled ahead of time with Triton for sm_90; registers and "
                             "spills from cuobjdump --dump-resource-usage, instructions per "
                             "iteration counted in the SASS of the innermost loop that issues "
                             "MMAs; static facts, not timings",
                   "summary": summarize(kernels), "kernels": kernels,
                   "seconds": round(time.monotonic() - started, 1)}
        final = _finish(run_dir, "compile", results)
    return _report(tables(results), final)


def run_estimate(args: argparse.Namespace) -> int:
    import time

    from nas.bench.estimate import run_bench, table_spaces, tables
    from nas.cost.device_spec import DeviceSpec
    from nas.errors import ConfigError
    from nas.runs import RunDir

    if args.plans < 2:
        raise ConfigError(f"--plans {args.plans}: give 2 or more (Kendall's tau ranks pairs)")
    spec = DeviceSpec.load(args.device_spec)
    started = time.monotonic()
    found = table_spaces(spec)
    if not found:
        raise ConfigError(f"no latency table under cost_models/ for device {spec.name} holds a "
                          f"built-in search space; measure one on a GPU with `nas measure "
                          f"--space S --batch B`")
    with RunDir(args.runs_dir, spec.name, "bench-estimate") as run_dir:
        run_dir.write_config({"command": "bench estimate", "device_spec": spec.name,
                              "plans": args.plans, "seed": args.seed})
        results = run_bench(spec, found, args.plans, args.seed,
                            say=lambda line: (print(line, flush=True), run_dir.log(line)))
        results.update({"date": now_iso(), "seconds": round(time.monotonic() - started, 1)})
        final = _finish(run_dir, "estimate", results)
    return _report(tables(results), final)


def run_qat(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    import yaml

    from nas.bench.qat import nas_run, run_plan, tables, verdicts
    from nas.budget import parse_budget
    from nas.checkpoint import load_model
    from nas.cost import make_cost_model
    from nas.errors import ConfigError
    from nas.plan import Plan
    from nas.runs import RunDir
    from nas.spaces import load_space

    for flag in ("train_budget", "search_budget", "qat_budget"):
        if getattr(args, flag):
            parse_budget(getattr(args, flag))
    space = load_model(args.checkpoint)[0] if args.checkpoint else load_space(args.space)
    if args.search_run and not (Path(args.search_run) / "supernet.pt").is_file():
        raise ConfigError(f"--search-run {args.search_run} has no supernet.pt; pass the run "
                          f"folder of a finished DNAS 'nas search'")
    common = ["--device", args.device, "--seed", str(args.seed)]
    with RunDir(args.runs_dir, space.name, "bench-qat") as run_dir:
        started = time.monotonic()
        folder, runs = run_dir.path, str(run_dir.path / "runs")
        log = folder / "commands.log"
        space_file = str(folder / "space.yaml")
        (folder / "space.yaml").write_text(yaml.safe_dump(space.to_dict(), sort_keys=False))
        say = lambda line: (print(line, flush=True), run_dir.log(line))  # noqa: E731
        checkpoint = args.checkpoint
        if checkpoint is None:
            say("training the float model (no --checkpoint given)")
            budget = ["--budget", args.train_budget] if args.train_budget else []
            checkpoint = str(nas_run([*common, "--runs-dir", runs, "train", "--space", space_file,
                                   *budget, "--no-progress"], log) / "best.pt")
        search = args.search_run
        if search is None:
            w4a8 = make_cost_model("size").plan_cost(Plan.uniform(space, 4, 8), space)
            say(f"DNAS search at the uniform W4A8 size, {w4a8:.0f} bytes (no --search-run given)")
            budget = ["--budget", args.search_budget] if args.search_budget else []
            search = str(nas_run([*common, "--runs-dir", runs, "search", "--space", space_file,
                               *budget, "--target", f"size={w4a8 / 1000:.3f}KB",
                               "--no-progress"], log))
        plans = {}
        for w, a in ((8, 8), (4, 4)):
            path = folder / f"W{w}A{a}.yaml"
            Plan.uniform(space, w, a).resolved(space).save(path)
            plans[f"W{w}A{a}"] = ["--plan", str(path), "--checkpoint", checkpoint]
        plans["searched"] = ["--plan", str(Path(search) / "plan.yaml"), "--checkpoint", checkpoint]
        plans["searched (supernet)"] = ["--run", search]
        rows = [run_plan(name, plan_args, common, args.qat_budget, folder, say)
                for name, plan_args in plans.items()]
        results = {"space": space.name, "checkpoint": checkpoint, "search_run": search,
                   "qat_budget": args.qat_budget, "rows": rows, "verdicts": verdicts(rows),
                   "date": now_iso(), "seconds": round(time.monotonic() - started, 1)}
        final = _finish(run_dir, "qat", results)
    return _report(tables(results), final)


def run_search(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from nas.bench.search import quality, scaling, tables
    from nas.budget import parse_budget
    from nas.cost import make_cost_model
    from nas.cost.targets import Target
    from nas.device import resolve_device
    from nas.plan import Plan
    from nas.runs import RunDir
    from nas.search.derive import check_feasible
    from nas.search.evaluate import EvaluatorSpec
    from nas.search.request import SearchRequest
    from nas.search.weights import space_and_weights, train_weights
    from nas.search.tune import quiet_output, ray_session
    from nas.space_data import load_space_data

    check_flags(args, trials="positive", seeds="positive", workers="positive",
                scaling_trials="positive", eval_batches="positive")
    fractions = _fractions(args.targets)
    train_budget = parse_budget(args.train_budget) if args.train_budget else None
    request = SearchRequest(method="bench", budget="", space=args.space, seed=args.seed,
                            runs_dir=args.runs_dir, device=args.device, data_dir=args.data_dir,
                            train_subset=args.train_subset, test_subset=args.test_subset,
                            progress=False, options={"supernet": args.supernet})
    space, weights, weights_seed, _ = space_and_weights(request, "oneshot")
    splits = load_space_data(space, request.data_args)
    table = make_cost_model("size").table(space)
    w8a8 = make_cost_model("size").plan_cost(Plan.uniform(space, 8, 8), space)
    for f in fractions:
        check_feasible(table, Target("size", w8a8 * f, f"{f} of the W8A8 size"))
    with RunDir(args.runs_dir, space.name, "bench-search") as run_dir:
        run_dir.write_config({"command": "bench search", "space": space.to_dict(),
                              "supernet": args.supernet, "targets": list(fractions),
                              "trials": args.trials, "seeds": args.seeds, "workers": args.workers,
                              "scaling_trials": args.scaling_trials, "seed": args.seed})
        if weights is None:
            budget = train_budget or parse_budget(str(space.train["budget"]))
            weights, _ = train_weights("oneshot", space, splits, None, budget, request, run_dir,
                                        resolve_device(args.device))
            weights_seed = args.seed
        spec = EvaluatorSpec("oneshot", str(Path(weights).resolve()), space.to_dict(),
                             weights_seed, str(Path(args.data_dir).resolve())
                             if args.data_dir else None, eval_batches=args.eval_batches)
        started = time.monotonic()
        log = run_dir.file("ray.log")
        with ray_session(None, lambda: log), quiet_output(log) as terminal:
            say = lambda line: (print(line, file=terminal, flush=True), run_dir.log(line))  # noqa: E731
            results = {"quality": quality(space, table, w8a8, fractions, args.trials, args.seeds,
                                          spec, run_dir.path / "searches", args.workers, say),
                       "scaling": scaling(space, table, Target("size", w8a8 * fractions[-1], ""),
                                          args.scaling_trials, spec, run_dir.path / "searches",
                                          say)}
        results.update({"space": space.name, "supernet": args.supernet or "trained here",
                        "trials": args.trials, "seeds": args.seeds, "w8a8_size": w8a8,
                        "date": now_iso(), "seconds": round(time.monotonic() - started, 1)})
        final = _finish(run_dir, "search", results)
    return _report(tables(results), final)


def _fractions(text: str) -> tuple[float, ...]:
    from nas.errors import ConfigError

    try:
        fractions = tuple(float(f) for f in text.split(","))
    except ValueError:
        fractions = ()
    if not fractions or not all(0 < f <= 1 for f in fractions):
        raise ConfigError(f"--targets {text!r}: give fractions in (0, 1] of the uniform W8A8 "
                          f"size, e.g. 0.3,0.4")
    return fractions


def run_league(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from nas.bench.league import TRAIN_SHARE, report, run_league as league, tables
    from nas.budget import parse_budget
    from nas.checkpoint import load_model
    from nas.cost import make_cost_model
    from nas.cost.targets import parse_target
    from nas.errors import ConfigError
    from nas.plan import Plan
    from nas.runs import RunDir
    from nas.search.derive import check_feasible
    from nas.search.run_discrete import TEST_RESERVE_S
    from nas.search.tune import ray_session

    check_flags(args, seeds="positive", workers="positive", eval_batches="positive")
    budget = parse_budget(args.budget)
    if budget.kind != "seconds":
        raise ConfigError(f"--budget {args.budget}: give a wall-clock time such as 90s or 2m "
                          f"(the league compares methods at equal wall-clock budgets)")
    if budget.value * TRAIN_SHARE <= TEST_RESERVE_S:
        raise ConfigError(f"--budget {args.budget} leaves no time for trials after the "
                          f"supernet's half; give more than {2 * TEST_RESERVE_S:g}s")
    if not 0 <= args.hv_floor < 100:
        raise ConfigError(f"--hv-floor {args.hv_floor}: give an accuracy in [0, 100) percent")
    fractions = _fractions(args.targets)
    ck_space, _, payload = load_model(args.checkpoint)
    space = checkpoint_space(args.space, args.checkpoint, ck_space)
    checkpoint = str(Path(args.checkpoint).resolve())
    size = make_cost_model("size")
    w8a8 = size.plan_cost(Plan.uniform(space, 8, 8), space)
    targets = [parse_target(f"size={w8a8 * f / 1e3:.3f}KB") for f in fractions]
    for t in targets:
        check_feasible(size.table(space), t)
    float_acc = (payload.get("metrics") or {}).get("test_accuracy")
    data = [x for flag, v in (("--data-dir", args.data_dir), ("--train-subset", args.train_subset),
                              ("--test-subset", args.test_subset)) if v is not None
            for x in (flag, str(Path(v).resolve()) if flag == "--data-dir" else str(v))]
    with RunDir(args.runs_dir, space.name, "bench-league") as run_dir:
        started = time.monotonic()
        config = {"command": "bench league", "space": space.to_dict(), "checkpoint": checkpoint,
                  "budget": str(budget), "targets": list(fractions), "seeds": args.seeds,
                  "workers": args.workers, "eval_batches": args.eval_batches,
                  "hv_floor": args.hv_floor, "seed": args.seed}
        run_dir.write_config(config)
        log = run_dir.file("commands.log")
        say = lambda line: (print(line, flush=True), run_dir.log(line))  # noqa: E731
        with ray_session(None, lambda: log):
            search = lambda argv, seed: _league_search(  # noqa: E731
                argv, seed, args.device, run_dir.path / "runs", log)
            results = league(search, checkpoint, args.space, targets, budget.value, args.seeds,
                             args.workers, args.eval_batches, args.hv_floor, data,
                             run_dir.path, say)
        say("drawing the report of every run")
        results.update({
            "space": space.name, "checkpoint": checkpoint, "float_test_accuracy": float_acc,
            "budget": str(budget), "seeds": args.seeds, "workers": args.workers,
            "eval_batches": args.eval_batches, "w8a8_size": w8a8,
            "targets": [{"fraction": f, "value": t.value, "text": t.text}
                        for f, t in zip(fractions, targets)],
            "report": str(report(results["runs"], run_dir.path).relative_to(run_dir.path)),
            "date": now_iso(), "seconds": round(time.monotonic() - started, 1)})
        final = _finish(run_dir, "league", results)
    return _report(tables(results), final)


def _league_search(argv: list[str], seed: int, device: str, runs: Path, log: Path
                   ) -> tuple[Path, float, str | None]:
    """Run `nas --seed SEED --device DEVICE --runs-dir RUNS search ARGV` in this process
    (the function `nas search` runs), its output appended to `log`: its run folder, wall
    seconds, and the error of a search that ended without a plan (None when it found one);
    its folder is then the `.partial` one it left."""
    import shlex
    import time

    from nas.cmd import search
    from nas.errors import NasError
    from nas.search.tune import quiet_output

    parser = argparse.ArgumentParser(prog="nas", add_help=False)
    search.add_parser(parser.add_subparsers(dest="command"), [])
    args = parser.parse_args(["search", *argv])
    args.seed, args.device, args.runs_dir, args.debug = seed, device, str(runs), False
    runs.mkdir(parents=True, exist_ok=True)
    before = set(runs.iterdir())
    line = shlex.join(["nas", "--seed", str(seed), "--device", device, "--runs-dir", str(runs),
                       "search", *argv])
    with open(log, "a") as out:
        print(f"$ {line}", file=out, flush=True)
    started, error = time.monotonic(), None
    with quiet_output(log):
        try:
            args.run(args)
        except NasError as exc:
            error = str(exc)
            print(f"nas: error: {error}", flush=True)
    seconds = time.monotonic() - started
    new = set(runs.iterdir()) - before
    if len(new) != 1:  # the search failed before its run folder: the league's own mistake
        raise NasError(f"league step '{line}' failed: {error}; its output is in {log}")
    (folder,) = new
    return folder, seconds, error
