"""`nas search`: parse and check the flags, pick the searcher, hand over (nas.search)."""

from __future__ import annotations

import argparse

from nas.cmd.checks import check_flags
from nas.cmd.common import add_data_options, add_latency_options
from nas.search.base import DISCRETE, SEARCHERS

DEFAULT_BUDGET = "5m"
DNAS_ONLY = ("loss", "mode", "arch_mode", "factored", "samples", "batch_size", "tau0", "tau_min",
             "warmup", "cpus_per_worker", "gpus_per_worker")
DISCRETE_ONLY = ("evaluator", "supernet", "objectives", "cpus_per_trial", "gpus_per_trial",
                 "train_budget", "sampler", "eval_batches")
RAY = ("workers", "ray_address")  # every method: dnas's data-parallel workers, the others' trials
_DNAS_DEFAULTS = {"loss": "additive", "mode": "hard", "arch_mode": "soft", "factored": False,
                  "samples": 8, "batch_size": 128, "tau0": 5.0, "tau_min": 0.2, "warmup": 0.2}


def add_parser(sub, parents) -> None:
    methods = "; ".join(f"{name}: {help}" for name, (_, help) in SEARCHERS.items())
    p = sub.add_parser("search", parents=parents, help="search a per-layer precision plan",
                       description="Search a per-layer precision plan under a cost target; "
                                   f"ends with plan.yaml. Methods: {methods}.")
    p.add_argument("--space", help="search space (default: the --checkpoint's or --supernet's, "
                                   "else the embedded default)")
    p.add_argument("--method", choices=tuple(SEARCHERS),
                   help="searcher (default dnas; with --resume, the run's)")
    p.add_argument("--budget",
                   help=f"90s, 10m, 2h; dnas also 3ep, the others also 200trials (default "
                        f"{DEFAULT_BUDGET}; with --resume, the run's: the total, done part "
                        f"included)")
    p.add_argument("--target", help="size=60KB, bitops=2.1G or latency=1.2ms (default: size at "
                                    "half of the space's uniform W8A8 size; none with "
                                    "several --objectives)")
    p.add_argument("--cost", choices=("size", "bitops", "latency"),
                   help="cost to penalise (default: the target's)")
    add_latency_options(p, "--latency-batch", "the resumed run")
    p.add_argument("--checkpoint", help="start from the weights of a 'nas train' checkpoint "
                                        "(bayes/random/uniform/rl: the ptq evaluator's model)")
    p.add_argument("--resume", metavar="RUN", help="continue the search of an earlier run folder "
                                                   "(--budget is then the total, done part included)")
    p.add_argument("--no-progress", action="store_true")
    d = p.add_argument_group("dnas")
    d.add_argument("--loss", choices=("additive", "multiplicative"),
                   help="cost term: additive CE + penalty above the target, or FBNet's "
                        "multiplicative (default additive)")
    d.add_argument("--mode", choices=("hard", "soft"),
                   help="forward of the weight step: one sampled branch per layer (hard) or "
                        "the weighted sum of all (soft); default hard")
    d.add_argument("--arch-mode", choices=("hard", "soft"),
                   help="forward of the theta step: soft (default) is the exact gradient of "
                        "the relaxed mixture; hard is a cheaper first-order estimate")
    d.add_argument("--factored", action="store_true", default=None,
                   help="separate weight and activation logits")
    d.add_argument("--samples", type=int, help="plans sampled for one-shot evaluation (default 8)")
    d.add_argument("--batch-size", type=int, help="(default 128)")
    d.add_argument("--tau0", type=float,
                   help="Gumbel-softmax temperature at the start (default 5.0)")
    d.add_argument("--tau-min", type=float,
                   help="temperature at the end, reached geometrically (default 0.2)")
    d.add_argument("--warmup", type=float,
                   help="share of the budget for weights only (default 0.2)")
    d.add_argument("--cpus-per-worker", type=int,
                   help="with --workers 2 or more: CPUs (and torch threads) of each worker "
                        "(default 1)")
    d.add_argument("--gpus-per-worker", type=float,
                   help="with --workers 2 or more: GPUs of each worker (default 0: CPU workers, "
                        "gloo; with GPUs, nccl and SyncBatchNorm)")
    r = p.add_argument_group("bayes, random, uniform, rl (trials on Ray Tune)")
    r.add_argument("--evaluator", choices=("oneshot", "ptq"),
                   help="how a plan is scored: oneshot (a supernet's shared weights; default) "
                        "or ptq (a float checkpoint calibrated per plan; default with "
                        "--checkpoint)")
    r.add_argument("--supernet", metavar="RUN",
                   help="the oneshot evaluator's supernet: a 'nas search' run folder with "
                        "supernet.pt (default: train one first, within the budget)")
    r.add_argument("--objectives", help="accuracy,size (or bitops, latency, several): a "
                                        "multi-objective search with a Pareto front")
    r.add_argument("--sampler", choices=("auto", "tpe", "nsga2"),
                   help="bayes: Optuna's sampler (default auto: TPE, NSGA-II for several "
                        "objectives)")
    r.add_argument("--workers", type=int,
                   help="trials at once; dnas: data-parallel workers on Ray Train, the global "
                        "batch split among them (default 1: dnas in this process, no Ray)")
    r.add_argument("--cpus-per-trial", type=int,
                   help="CPUs (and torch threads) of each trial (default 1)")
    r.add_argument("--gpus-per-trial", type=float, help="GPUs of each trial (default 0)")
    r.add_argument("--ray-address",
                   help="Ray cluster: auto (the one running here), HOST:PORT, or none given: a "
                        "Ray started inside this process")
    r.add_argument("--train-budget",
                   help="training of the evaluator's weights when neither --supernet nor "
                        "--checkpoint gives them (default: half a time budget, else the "
                        "space's train.budget)")
    r.add_argument("--eval-batches", type=int,
                   help="arch-split batches of 256 images scored per plan (default 20)")
    add_data_options(p)
    p.set_defaults(run=run)


def _request(args: argparse.Namespace):
    """The checked request and the method's parsed budget and target."""
    from nas.budget import parse_budget
    from nas.cost.targets import parse_target
    from nas.errors import ConfigError
    from nas.search.request import SearchRequest

    recorded = _resumed_config(args.resume)
    method = args.method or recorded.get("method") or "dnas"
    args.budget = args.budget or recorded.get("budget") or DEFAULT_BUDGET
    given = lambda names: [n for n in names if getattr(args, n) is not None]  # noqa: E731
    if method == "dnas" and given(DISCRETE_ONLY):
        flag = "--" + given(DISCRETE_ONLY)[0].replace("_", "-")
        raise ConfigError(f"{flag} applies to --method {'/'.join(DISCRETE)}, not dnas; drop it "
                          f"or choose one of those methods")
    if method != "dnas" and given(DNAS_ONLY):
        flag = "--" + given(DNAS_ONLY)[0].replace("_", "-")
        raise ConfigError(f"{flag} applies to --method dnas only; drop it for --method {method}")
    target = parse_target(args.target) if args.target else None
    if target and args.cost and args.cost != target.cost:
        raise ConfigError(f"--cost {args.cost} but --target {target.text} is a {target.cost} "
                          f"target; give one of the same kind")
    if method == "dnas":
        budget = parse_budget(args.budget)
        for name, value in _DNAS_DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, recorded.get(name, value))
        check_flags(args, latency_batch="positive", samples="count", batch_size="positive",
                    tau0="rate", tau_min="rate", warmup="fraction")
        if args.tau_min > args.tau0:
            raise ConfigError(f"--tau-min {args.tau_min} is above --tau0 {args.tau0}: the "
                              f"temperature anneals down, so give tau-min <= tau0")
        _check_workers(args)
        options = {n: getattr(args, n) for n in DNAS_ONLY + RAY}
    else:
        from nas.search.base import parse_search_budget

        budget = parse_search_budget(args.budget)
        if args.train_budget:
            train = parse_budget(args.train_budget)
            if budget.kind == "seconds" and train.kind == "seconds" and train.value >= budget.value:
                raise ConfigError(f"--train-budget {args.train_budget} leaves no time of "
                                  f"--budget {args.budget} for trials; give a smaller "
                                  f"--train-budget or a larger --budget")
        args.workers = 1 if args.workers is None else args.workers
        args.cpus_per_trial = 1 if args.cpus_per_trial is None else args.cpus_per_trial
        check_flags(args, latency_batch="positive", workers="positive", cpus_per_trial="positive",
                    eval_batches="positive")
        if args.gpus_per_trial is not None and not args.gpus_per_trial >= 0:
            raise ConfigError(f"--gpus-per-trial {args.gpus_per_trial}: must be 0 or more")
        if args.sampler and method != "bayes":
            raise ConfigError(f"--sampler applies to --method bayes only; drop it for "
                              f"--method {method}")
        if args.objectives:
            from nas.search.run_discrete import parse_objectives

            parse_objectives(args.objectives)
        options = {n: getattr(args, n) for n in DISCRETE_ONLY + RAY}
        options["searcher_options"] = {"sampler": args.sampler} if args.sampler else {}
    request = SearchRequest(method=method, budget=args.budget, space=args.space,
                            target=args.target, cost=args.cost,
                            latency_batch=args.latency_batch, device_spec=args.device_spec,
                            checkpoint=args.checkpoint, resume=args.resume, seed=args.seed,
                            runs_dir=args.runs_dir, device=args.device, data_dir=args.data_dir,
                            train_subset=args.train_subset, test_subset=args.test_subset,
                            progress=not args.no_progress, options=options)
    return request, budget, target


def _check_workers(args: argparse.Namespace) -> None:
    """dnas's --workers and the flags that place them; one worker runs in this process."""
    from nas.errors import ConfigError

    check_flags(args, workers="positive", cpus_per_worker="positive")
    if args.gpus_per_worker is not None and not args.gpus_per_worker >= 0:
        raise ConfigError(f"--gpus-per-worker {args.gpus_per_worker}: must be 0 or more")
    args.workers = args.workers or 1
    if args.workers == 1:
        placed = [f for f in ("ray_address", "cpus_per_worker", "gpus_per_worker")
                  if getattr(args, f) is not None]
        if placed:
            raise ConfigError(f"--{placed[0].replace('_', '-')} places Ray workers, and one "
                              f"worker runs in this process without Ray; give --workers 2 or "
                              f"more, or drop it")
        return
    args.cpus_per_worker = args.cpus_per_worker or 1
    args.gpus_per_worker = args.gpus_per_worker or 0.0
    if args.batch_size % args.workers:
        raise ConfigError(f"--batch-size {args.batch_size} does not split evenly among "
                          f"{args.workers} workers; give a batch size that is a multiple of "
                          f"--workers")


def _resumed_config(resume: str | None) -> dict:
    """The config.yaml of the run --resume names ({} where unreadable: the method's own
    checks then say what is wrong)."""
    if not resume:
        return {}
    from pathlib import Path

    import yaml

    try:
        config = yaml.safe_load((Path(resume) / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    if not isinstance(config, dict) or config.get("method") not in SEARCHERS:
        return {}
    out = {k: config[k] for k in ("method", "budget") if isinstance(config.get(k), str)}
    if config.get("method") == "dnas":  # a resumed search goes on with the options it had
        kinds = {float: (float, int)}  # YAML writes 1.0 as 1.0, but a hand-edited file may not
        out.update({k: config[k] for k, default in _DNAS_DEFAULTS.items() if k != "factored"
                    and type(config.get(k)) in kinds.get(type(default), (type(default),))})
    return out


def run(args: argparse.Namespace) -> int:
    from nas.search.base import DiscreteSearcher, searcher_class

    request, budget, target = _request(args)
    cls = searcher_class(request.method)
    if issubclass(cls, DiscreteSearcher):
        from nas.search.run_discrete import DiscreteRun

        DiscreteRun(request, cls, budget, target).run()
    else:
        cls.run(request, budget, target)
    return 0
