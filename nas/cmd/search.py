"""`nas search --method dnas`: differentiable search for a per-layer precision plan."""

from __future__ import annotations

import argparse
import csv
import io
import time

from nas.cmd.checks import check_flags, checkpoint_space
from nas.cmd.common import (add_data_options, add_latency_options, load_space_data, now_iso,
                             remeasure_command, unnamed_note)
from nas.table import format_table

DEFAULT_BUDGET = "5m"
SUPERNET_FORMAT = "nas-supernet/1"
SEARCH_SHARE = 0.9  # of a time budget; the rest derives and evaluates the candidate plans


def add_parser(sub, parents) -> None:
    p = sub.add_parser("search", parents=parents, help="search a per-layer precision plan",
                       description="DNAS: a supernet with one branch per (w_bits, a_bits) per "
                                   "layer, Gumbel-softmax architecture parameters, a cost "
                                   "penalty against a target; ends with plan.yaml.")
    p.add_argument("--space", help="search space (default: the --checkpoint's, else the "
                                   "embedded default)")
    p.add_argument("--method", choices=("dnas",), default="dnas")
    p.add_argument("--budget", default=DEFAULT_BUDGET,
                   help=f"90s, 10m, 2h, 3ep or '3 epochs' (default {DEFAULT_BUDGET})")
    p.add_argument("--target", help="size=60KB, bitops=2.1G or latency=1.2ms (default: size at "
                                    "half of the space's uniform W8A8 size)")
    p.add_argument("--cost", choices=("size", "bitops", "latency"),
                   help="cost to penalise (default: the target's)")
    add_latency_options(p, "--latency-batch", "the resumed run")
    p.add_argument("--loss", choices=("additive", "multiplicative"), default="additive",
                   help="cost term: additive CE + penalty above the target, or FBNet's "
                        "multiplicative (default %(default)s)")
    p.add_argument("--checkpoint", help="start from the weights of a 'nas train' checkpoint")
    p.add_argument("--resume", metavar="RUN", help="continue the search of an earlier run folder "
                                                   "(--budget is then the total, done part included)")
    p.add_argument("--mode", choices=("hard", "soft"), default="hard",
                   help="forward of the weight step: one sampled branch per layer (hard) or "
                        "the weighted sum of all (soft); default hard")
    p.add_argument("--arch-mode", choices=("hard", "soft"), default="soft",
                   help="forward of the theta step: soft (default) is the exact gradient of "
                        "the relaxed mixture; hard is a cheaper first-order estimate")
    p.add_argument("--factored", action="store_true", help="separate weight and activation logits")
    p.add_argument("--samples", type=int, default=8,
                   help="plans sampled for one-shot evaluation (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="(default %(default)s)")
    p.add_argument("--tau0", type=float, default=5.0,
                   help="Gumbel-softmax temperature at the start (default %(default)s)")
    p.add_argument("--tau-min", type=float, default=0.2,
                   help="temperature at the end, reached geometrically (default %(default)s)")
    p.add_argument("--warmup", type=float, default=0.2,
                   help="share of the budget for weights only (default %(default)s)")
    p.add_argument("--no-progress", action="store_true")
    add_data_options(p)
    p.set_defaults(run=run)


def _settings(args):
    """Budget, target and cost from the command line, checked before anything is loaded."""
    from nas.budget import Budget, parse_budget
    from nas.cost.targets import parse_target
    from nas.errors import ConfigError

    budget = parse_budget(args.budget)
    target = parse_target(args.target) if args.target else None
    if target and args.cost and args.cost != target.cost:
        raise ConfigError(f"--cost {args.cost} but --target {target.text} is a {target.cost} target; "
                          f"give one of the same kind")
    check_flags(args, latency_batch="positive", samples="count", batch_size="positive",
                tau0="rate", tau_min="rate", warmup="fraction")
    if args.tau_min > args.tau0:
        raise ConfigError(f"--tau-min {args.tau_min} is above --tau0 {args.tau0}: the "
                          f"temperature anneals down, so give tau-min <= tau0")
    search_budget = budget if budget.kind == "epochs" else Budget("seconds", budget.value * SEARCH_SHARE)
    return budget, search_budget, target


def _resumed(args):
    """The supernet.pt of the run --resume names, and its space; the flags that would change
    what was searched are checked against the run (or, --factored, taken from it)."""
    from pathlib import Path

    from nas.errors import ConfigError
    from nas.runs import load_checkpoint
    from nas.spaces import SearchSpace, load_space

    folder, fix = Path(args.resume), "pass the run folder of an earlier 'nas search'"
    if not folder.is_dir():
        raise ConfigError(f"--resume {folder} " + ("is a file" if folder.exists() else
                                                   "does not exist") + f"; {fix}")
    if not (folder / "supernet.pt").exists():
        raise ConfigError(f"--resume {folder} holds no supernet.pt; {fix}")
    resumed = load_checkpoint(folder / "supernet.pt", ("supernet", "space"), fix,
                              expect={"format": SUPERNET_FORMAT})
    space = SearchSpace.from_dict(resumed["space"], source=f"run {folder}")
    if args.checkpoint:
        raise ConfigError(f"--checkpoint does not apply to --resume: run {folder} goes on from "
                          f"the weights in its supernet.pt; leave --checkpoint out")
    given = load_space(args.space) if args.space else None
    if given and given.name != space.name:
        raise ConfigError(f"--space {args.space} but run {folder} searched space {space.name}; "
                          f"leave --space out to resume it")
    if given and given.to_dict() != space.to_dict():
        raise ConfigError(f"--space {args.space} is not the space run {folder} searched: "
                          f"{space.name} has changed since; leave --space out to resume the "
                          f"run on the space it recorded")
    # Runs before the key was saved: a factored supernet has theta_w and theta_a per layer.
    factored = resumed.get("factored", any(k.endswith(".theta_w") for k in resumed["supernet"]))
    if args.factored and not factored:
        raise ConfigError(f"--factored but run {folder} searched with one logit per choice; "
                          f"leave --factored out to resume it")
    if factored and not args.factored:
        print(f"run {folder} searched with factored logits: resuming it factored", flush=True)
    args.factored = factored
    return resumed, space


def _spec_reference(device_spec: str | None) -> str | None:
    """A device spec as a plan records it: a name, or a .yaml file's absolute path (so that
    `nas cost --plan` finds it from any folder)."""
    from pathlib import Path

    if device_spec and Path(device_spec).suffix in (".yaml", ".yml"):
        return str(Path(device_spec).resolve())
    return device_spec


def run(args: argparse.Namespace) -> int:
    import torch

    from nas.cmd.evaluate import load_model
    from nas.cost import make_cost_model
    from nas.cost.targets import Target, format_cost
    from nas.device import resolve_device
    from nas.errors import ConfigError
    from nas.plan import Plan
    from nas.runs import RunDir, atomic_write_text, load_state
    from nas.search.derive import check_feasible
    from nas.search.dnas import DnasConfig, SearchState, derive, one_shot_accuracy, search
    from nas.spaces import load_space
    from nas.supernet import Supernet

    started = time.monotonic()
    budget, search_budget, target = _settings(args)
    resumed, model = None, None
    if args.resume:
        resumed, space = _resumed(args)
        args.seed = resumed.get("seed", args.seed)  # same splits and batch order as before
        target = target or (Target(**resumed["target"]) if resumed.get("target") else None)
        if target and args.cost and args.cost != target.cost:
            raise ConfigError(f"--cost {args.cost} but run {args.resume} searched for the "
                              f"{target.cost} target {target.text}; give a --target of the same "
                              f"kind")
    elif args.checkpoint:
        ck_space, model, _ = load_model(args.checkpoint)
        space = checkpoint_space(args.space, args.checkpoint, ck_space)
    else:
        space = load_space(args.space)
    cost_name = args.cost or (target.cost if target else "size")
    if cost_name != "latency" and (args.latency_batch or args.device_spec):
        raise ConfigError(f"--latency-batch and --device-spec apply to a latency cost only, and "
                          f"this search's cost is {cost_name}; give --cost latency or a "
                          f"latency=... target, or drop them")
    saved = (resumed or {}).get("latency") or {}
    latency = {"batch": args.latency_batch or saved.get("batch", 1),
               "device_spec": _spec_reference(args.device_spec) or saved.get("device_spec",
                                                                              "h200")}
    cost_model = make_cost_model(cost_name, device_spec=latency["device_spec"],
                                 batch=latency["batch"])
    if cost_name != "latency":
        latency = None  # what the latency cost would use: recorded only where it is used
    table = cost_model.table(space)
    if target is None:
        w8 = cost_model.plan_cost(Plan.uniform(space, 8, 8), space)
        target = Target("size", round(w8 / 2), f"size={w8 / 2 / 1e3:.1f}KB") if cost_name == "size" else None
    if args.loss == "additive" and target is None:
        raise ConfigError(f"the additive loss needs a --target for {cost_name}, for example "
                          f"{ {'bitops': 'bitops=2.1G', 'latency': 'latency=1.2ms'}[cost_name]}")
    if target:
        check_feasible(table, target)
    device = resolve_device(args.device)
    splits = load_space_data(space, args)
    if model is None:
        torch.manual_seed(args.seed)
        model = space.build_model()
    cfg = DnasConfig(budget=search_budget, target=target, loss=args.loss, tau0=args.tau0,
                     tau_min=args.tau_min, warmup=args.warmup, batch_size=args.batch_size,
                     arch_mode=args.arch_mode,
                     seed=args.seed, progress=not args.no_progress)
    supernet = Supernet(model, space, factored=args.factored, mode=args.mode, tau=args.tau0,
                        seed=args.seed)
    state, optim_state = None, None
    if resumed:
        load_state(supernet, resumed["supernet"], f"run {args.resume}'s supernet.pt",
                   "this search's supernet")
        supernet.generator.set_state(resumed["gumbel_state"])
        state = SearchState(**resumed["search_state"])
        optim_state = resumed["optimizers"]
    print(f"dnas on {space.name}: {len(supernet.names)} layers, "
          f"{sum(len(m.choices) > 1 for m in supernet.mixed())} searchable; cost {cost_name}"
          + (f" ({cost_model.spec.name}, batch {latency['batch']})" if latency else "")
          + (f", target {target.text} ({format_cost(target.cost, target.value)})" if target else "")
          + f"; budget {budget}; device {device}", flush=True)
    note = unnamed_note(space)
    if note:
        print(note, flush=True)
    if cost_name == "latency":
        note = cost_model.table_.stale_note(cost_model.sources(space),
                                            remeasure_command(space, cost_model.batch))
        if note:
            print(note, flush=True)
        if table.any_estimated:
            print(f"latency estimated where no table has the layer: {cost_model.estimate_method}",
                  flush=True)

    with RunDir(args.runs_dir, space.name, "search") as run_dir:
        run_dir.write_config({"command": "search", "method": "dnas", "space": space.to_dict(),
                              "budget": str(budget), "target": target.text if target else None,
                              "cost": cost_name, "latency": latency, "loss": args.loss,
                              "mode": args.mode,
                              "arch_mode": args.arch_mode,
                              "factored": args.factored, "checkpoint": args.checkpoint,
                              "resume": args.resume, "seed": args.seed, "samples": args.samples,
                              "tau0": args.tau0, "tau_min": args.tau_min, "warmup": args.warmup})
        print(f"run folder: {run_dir.path}", flush=True)

        def on_log(entry):
            with open(run_dir.file("theta.jsonl"), "a") as f:
                import json

                f.write(json.dumps(entry) + "\n")
            run_dir.log_metrics({k: v for k, v in entry.items() if k != "probs"})

        state, optim_state, interrupted = search(supernet, splits, table, cfg, device, state,
                                                 optim_state, on_log)
        if interrupted:
            print("interrupted: deriving the plan from the search so far", flush=True)
        run_dir.save_checkpoint("supernet.pt", {
            "format": SUPERNET_FORMAT, "space": space.to_dict(), "supernet": supernet.state_dict(),
            "gumbel_state": supernet.generator.get_state(), "optimizers": optim_state,
            "search_state": {"step": state.step, "elapsed": state.elapsed, "history": []},
            "target": target.__dict__ if target else None, "latency": latency,
            "factored": args.factored,
            "seed": args.seed, "created": now_iso()})

        deadline = started + budget.value if budget.kind == "seconds" else None
        cands, best = derive(supernet, table, target, splits, device, args.samples, args.seed,
                             deadline)
        test_acc = one_shot_accuracy(supernet, best.indices, splits, device, split="test")

        plan = supernet.plan_for(best.indices)
        plan.costs = {cost_name: best.cost, "unit": table.unit,
                      "target": target.value if target else None,
                      "estimated": table.any_estimated,
                      **({"latency_batch": latency["batch"],
                          "device_spec": latency["device_spec"]} if latency else {}),
                      **({"estimate": cost_model.estimate_method}
                         if latency and table.any_estimated else {}),
                      "one_shot_arch_accuracy": best.accuracy, "one_shot_test_accuracy": test_acc}
        if cost_name != "size":
            plan.costs["size"] = make_cost_model("size").plan_cost(plan, space)
        plan.provenance = {"method": "dnas", "run_id": run_dir.final.name, "seed": args.seed,
                           "date": now_iso(), "candidate": best.name, "steps": state.step,
                           "interrupted": interrupted}
        plan.save(run_dir.file("plan.yaml"))
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["candidate", cost_name, "meets_target", "one_shot_arch_accuracy", "bits"])
        for c in cands:
            bits = " ".join(str(m.choices[i]) for m, i in zip(supernet.mixed(), c.indices))
            writer.writerow([c.name, round(c.cost, 3), c.meets_target,
                             "" if c.accuracy != c.accuracy else round(c.accuracy, 3), bits])
        atomic_write_text(run_dir.file("candidates.csv"), buf.getvalue())
        seconds = time.monotonic() - started
        summary = {"command": "search", "method": "dnas", "space": space.name, "cost": cost_name,
                   "target": target.text if target else None, "plan_cost": best.cost,
                   "meets_target": best.meets_target, "candidate": best.name,
                   "one_shot_arch_accuracy": best.accuracy, "one_shot_test_accuracy": test_acc,
                   "steps": state.step, "search_seconds": round(state.elapsed, 2),
                   "seconds": round(seconds, 2), "budget": str(budget), "interrupted": interrupted}
        final = run_dir.finish(summary)

    probs = [p.detach() for p in supernet.probs()]
    rows = [[name, str(m.choices[i]), round(float(p[i]), 3)]
            for name, m, i, p in zip(supernet.names, supernet.mixed(), best.indices, probs)]
    print(format_table(["layer", "bits", "p(choice)"], rows))
    print(format_table(["candidate", cost_name, "meets target", "one-shot acc %"],
                       [[c.name, format_cost(cost_name, c.cost), "yes" if c.meets_target else "no",
                         "-" if c.accuracy != c.accuracy else round(c.accuracy, 2)] for c in cands]))
    print(f"plan: {best.name}, {format_cost(cost_name, best.cost)}"
          + (f" vs target {target.text}" if target else "")
          + f", one-shot accuracy {best.accuracy:.2f}% (arch split), {test_acc:.2f}% (test)"
          + (" [latency estimated]" if cost_name == "latency" and table.any_estimated else ""))
    print(f"run folder: {final}")
    print(f"plan file: {final / 'plan.yaml'}")
    return 0
