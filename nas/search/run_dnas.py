"""`nas search --method dnas`: train a supernet and derive its plan, one run folder."""

from __future__ import annotations

import csv
import io
import shlex
import time
from contextlib import contextmanager
from pathlib import Path

from nas.errors import ConfigError
from nas.search.request import SearchRequest

SEARCH_SHARE = 0.9  # of a time budget; the rest derives and evaluates the candidate plans


def _resumed(request: SearchRequest):
    """The supernet.pt of the run --resume names, and its space; the options that would
    change what was searched are checked against the run (or, factored, taken from it)."""
    from nas.runs import PARTIAL
    from nas.search import dnas
    from nas.search.supernet_file import is_factored, load_supernet_file, supernet_path
    from nas.spaces import SearchSpace, load_space

    folder = Path(request.resume)
    if folder.name.endswith(PARTIAL) and folder.is_dir() and not (folder / "supernet.pt").exists():
        raise ConfigError(f"--resume {folder}: the run stopped before it saved its first search "
                          f"state (one is saved every {dnas.SAVE_SECONDS:g} s or "
                          f"{dnas.SAVE_STEPS} steps); start the search again without --resume")
    resumed = load_supernet_file(supernet_path(folder, "--resume"))
    space = SearchSpace.from_dict(resumed["space"], source=f"run {folder}")
    if request.checkpoint:
        raise ConfigError(f"--checkpoint does not apply to --resume: run {folder} goes on from "
                          f"the weights in its supernet.pt; leave --checkpoint out")
    given = load_space(request.space) if request.space else None
    if given and given.name != space.name:
        raise ConfigError(f"--space {request.space} but run {folder} searched space {space.name}; "
                          f"leave --space out to resume it")
    if given and given.to_dict() != space.to_dict():
        raise ConfigError(f"--space {request.space} is not the space run {folder} searched: "
                          f"{space.name} has changed since; leave --space out to resume the "
                          f"run on the space it recorded")
    factored = is_factored(resumed)
    if request.options["factored"] and not factored:
        raise ConfigError(f"--factored but run {folder} searched with one logit per choice; "
                          f"leave --factored out to resume it")
    if factored and not request.options["factored"]:
        print(f"run {folder} searched with factored logits: resuming it factored", flush=True)
    request.options["factored"] = factored
    return resumed, space


def _say_if_spent(request: SearchRequest, budget, search_budget, state, per_epoch: int) -> bool:
    """A resumed run whose budget is spent makes no step: a finished run is refused (a larger
    --budget searches on), a stopped one (.partial) goes on to derive its plan, saying so."""
    from nas.runs import PARTIAL

    if search_budget.kind == "epochs":
        spent = state.step >= search_budget.value * per_epoch
    else:
        spent = state.elapsed >= search_budget.value
    if not spent:
        return False
    done = f"run {request.resume} already spent its budget {budget} ({state.step} steps)"
    if not Path(request.resume).name.endswith(PARTIAL):
        raise ConfigError(f"{done}; give a larger --budget (the total, done part included) to "
                          f"search on")
    print(f"{done}: no more steps, deriving its plan", flush=True)
    return True


@contextmanager
def _resume_hint(run_dir):
    """A search stopped by a second Ctrl-C or a failing disk says how to go on from its last
    saved state."""
    try:
        yield
    except (KeyboardInterrupt, OSError) as exc:
        if run_dir.file("supernet.pt").exists():
            folder = shlex.quote(str(run_dir.path))
            exc.add_note(f"the search so far is kept in {folder}: 'nas search --resume "
                         f"{folder}' goes on from its last saved state")
        raise


def _on_workers(request: SearchRequest, supernet, splits, table, cfg, state, optim_state,
                output, device):
    """The search on --workers data-parallel Ray Train workers (nas.search.dnas_train), from
    the supernet's state now to the final state rank 0 saved, loaded back into `supernet`.
    A Ctrl-C keeps the last state saved (none saved yet: it stops the command)."""
    import dataclasses

    import torch

    from nas.runs import load_state
    from nas.search import dnas
    from nas.search.dnas_train import DnasJob, run_workers
    from nas.search.supernet_file import load_supernet_file

    opts = request.options
    data_args = request.data_args
    if data_args.data_dir:  # a worker may start in another folder
        data_args.data_dir = str(Path(data_args.data_dir).absolute())
    state = state or dnas.SearchState()
    job = DnasJob(space=supernet.space, data_args=data_args, supernet=supernet.state_dict(),
                  gumbel_state=supernet.generator.get_state(), rng=torch.get_rng_state(),
                  factored=opts["factored"], mode=opts["mode"],
                  cfg=dataclasses.replace(cfg, progress=False), table=table, state=state,
                  optimizers=optim_state, output=output, cpus=opts["cpus_per_worker"],
                  gpu=opts["gpus_per_worker"] > 0)
    per_epoch = max(1, len(splits.train) // cfg.batch_size)
    interrupted = False
    try:
        run_workers(job, workers=opts["workers"], cpus_per_worker=opts["cpus_per_worker"],
                    gpus_per_worker=opts["gpus_per_worker"], address=opts["ray_address"],
                    folder=output.folder, progress=cfg.progress,
                    total_steps=(int(cfg.budget.value * per_epoch)
                                 if cfg.budget.kind == "epochs" else None))
    except KeyboardInterrupt:
        if not (output.folder / "supernet.pt").exists():
            raise
        interrupted = True
        print("interrupted: deriving the plan from the last saved state", flush=True)
    saved = load_supernet_file(output.folder / "supernet.pt")
    load_state(supernet, saved["supernet"], "rank 0's supernet.pt", "this search's supernet")
    supernet.generator.set_state(saved["gumbel_state"])
    torch.set_rng_state(saved["rng"])
    supernet.to(device, memory_format=torch.channels_last)
    return dnas.SearchState(**saved["search_state"]), saved["optimizers"], interrupted


class DnasSearch:
    """The supernet search (nas.search.dnas) from a request to a finished run folder."""

    @staticmethod
    def run(request: SearchRequest, budget, target) -> Path:
        import torch

        from nas.budget import Budget
        from nas.checkpoint import checkpoint_space, load_model
        from nas.clock import now_iso
        from nas.cost.targets import Target, format_cost
        from nas.device import resolve_device
        from nas.runs import RunDir, atomic_write_text, load_state
        from nas.search import dnas
        from nas.search.base import SearchBudget, SearchProblem
        from nas.search.encoding import PlanEncoding
        from nas.search.results import plan_costs
        from nas.search.setup import cost_setup, notes
        from nas.search.dnas_output import DnasOutput
        from nas.space_data import load_space_data
        from nas.spaces import load_space
        from nas.supernet import Supernet
        from nas.table import format_table

        opts = request.options
        if opts["samples"] > dnas.MAX_SAMPLES:
            raise ConfigError(f"--samples {opts['samples']} is more plans than can be evaluated; "
                              f"give at most {dnas.MAX_SAMPLES}")
        workers = opts.get("workers") or 1
        if workers > 1:
            from nas.search.ray_address import check_address

            check_address(opts.get("ray_address"))  # before ray is imported: it bounds the connect
        started = time.monotonic()
        search_budget = (budget if budget.kind == "epochs"
                         else Budget("seconds", budget.value * SEARCH_SHARE))
        resumed, model = None, None
        if request.resume:
            resumed, space = _resumed(request)
            request.seed = resumed.get("seed", request.seed)  # same splits and batch order
            target = target or (Target(**resumed["target"]) if resumed.get("target") else None)
            if target and request.cost and request.cost != target.cost:
                raise ConfigError(f"--cost {request.cost} but run {request.resume} searched for "
                                  f"the {target.cost} target {target.text}; give a --target of "
                                  f"the same kind")
        elif request.checkpoint:
            ck_space, model, _ = load_model(request.checkpoint)
            space = checkpoint_space(request.space, request.checkpoint, ck_space)
        else:
            space = load_space(request.space)
        setup = cost_setup(space, request, target, (resumed or {}).get("latency"))
        cost_name, target, latency, table = setup.cost, setup.target, setup.latency, setup.table
        if opts["loss"] == "additive" and target is None:
            raise ConfigError(f"the additive loss needs a --target for {cost_name}, for example "
                              f"{ {'bitops': 'bitops=2.1G', 'latency': 'latency=1.2ms'}[cost_name]}")
        device = resolve_device(request.device)
        splits = load_space_data(space, request.data_args)
        if model is None:
            torch.manual_seed(request.seed)
            model = space.build_model()
        cfg = dnas.DnasConfig(budget=search_budget, target=target, loss=opts["loss"],
                              tau0=opts["tau0"], tau_min=opts["tau_min"], warmup=opts["warmup"],
                              batch_size=opts["batch_size"], arch_mode=opts["arch_mode"],
                              seed=request.seed, progress=request.progress)
        supernet = Supernet(model, space, factored=opts["factored"], mode=opts["mode"],
                            tau=opts["tau0"], seed=request.seed)
        state, optim_state = None, None
        if resumed:
            load_state(supernet, resumed["supernet"], f"run {request.resume}'s supernet.pt",
                       "this search's supernet")
            supernet.generator.set_state(resumed["gumbel_state"])
            state = dnas.SearchState(**resumed["search_state"])
            optim_state = resumed["optimizers"]
            if resumed.get("rng") is not None:  # dropout and augmentation draw from it
                torch.set_rng_state(resumed["rng"])
            if not _say_if_spent(request, budget, search_budget, state,
                                 max(1, len(splits.train) // opts["batch_size"])):
                print(f"resuming run {request.resume} at step {state.step} "
                      f"({state.elapsed:.1f} s searched)", flush=True)
        print(f"dnas on {space.name}: {len(supernet.names)} layers, "
              f"{sum(len(m.choices) > 1 for m in supernet.mixed())} searchable; cost {cost_name}"
              + (f" ({setup.model.spec.name}, batch {latency['batch']})" if latency else "")
              + (f", target {target.text} ({format_cost(target.cost, target.value)})" if target else "")
              + f"; budget {budget}; device {device}", flush=True)
        for line in notes(space, setup):
            print(line, flush=True)

        with RunDir(request.runs_dir, space.name, "search") as run_dir, _resume_hint(run_dir):
            run_dir.write_config({"command": "search", "method": "dnas", "space": space.to_dict(),
                                  "budget": str(budget), "target": target.text if target else None,
                                  "cost": cost_name, "latency": latency, "loss": opts["loss"],
                                  "mode": opts["mode"], "arch_mode": opts["arch_mode"],
                                  "factored": opts["factored"], "checkpoint": request.checkpoint,
                                  "resume": request.resume, "seed": request.seed,
                                  "samples": opts["samples"],
                                  "batch_size": opts["batch_size"], "tau0": opts["tau0"],
                                  "tau_min": opts["tau_min"], "warmup": opts["warmup"],
                                  "workers": workers})
            print(f"run folder: {run_dir.path}", flush=True)
            output = DnasOutput(run_dir.path, space, request.seed, opts["factored"],
                                target.__dict__ if target else None, latency)
            if workers == 1:
                state, optim_state, interrupted = dnas.search(
                    supernet, splits, table, cfg, device, state, optim_state, output.log,
                    lambda s, o: output.save(supernet, s, o))
                if interrupted:
                    print("interrupted: deriving the plan from the search so far", flush=True)
                output.save(supernet, state, optim_state)
            else:
                state, optim_state, interrupted = _on_workers(
                    request, supernet, splits, table, cfg, state, optim_state, output, device)

            deadline = started + budget.value if budget.kind == "seconds" else None
            cands, best = dnas.derive(supernet, table, target, splits, device, opts["samples"],
                                      request.seed, deadline)
            test_acc = dnas.one_shot_accuracy(supernet, best.indices, splits, device, split="test")

            problem = SearchProblem(space, setup.tables, cost_name, target,
                                    SearchBudget("seconds", 0), request.seed)
            encoding = PlanEncoding(space)
            plan = encoding.plan(best.indices)
            plan.costs = plan_costs(problem, best.indices,
                                    {"one_shot_arch_accuracy": best.accuracy,
                                     "one_shot_test_accuracy": test_acc},
                                    latency, setup.estimate_method())
            plan.provenance = {"method": "dnas", "run_id": run_dir.final.name,
                               "seed": request.seed, "date": now_iso(), "candidate": best.name,
                               "steps": state.step, "interrupted": interrupted}
            plan.save(run_dir.file("plan.yaml"))
            buf = io.StringIO()
            writer = csv.writer(buf)
            writer.writerow(["candidate", cost_name, "meets_target", "one_shot_arch_accuracy",
                             "bits"])
            for c in cands:
                writer.writerow([c.name, round(c.cost, 3), c.meets_target,
                                 "" if c.accuracy != c.accuracy else round(c.accuracy, 3),
                                 encoding.bits(c.indices)])
            atomic_write_text(run_dir.file("candidates.csv"), buf.getvalue())
            from nas.search.honesty import dnas_warnings

            warnings = dnas_warnings(state.step, max(1, len(splits.train) // opts["batch_size"]),
                                     supernet, test_acc, splits.info.num_classes)
            summary = {"command": "search", "method": "dnas", "space": space.name,
                       "cost": cost_name, "target": target.text if target else None,
                       "plan_cost": best.cost, "meets_target": best.meets_target,
                       "candidate": best.name, "one_shot_arch_accuracy": best.accuracy,
                       "one_shot_test_accuracy": test_acc, "steps": state.step,
                       "search_seconds": round(state.elapsed, 2),
                       "seconds": round(time.monotonic() - started, 2), "budget": str(budget),
                       "interrupted": interrupted, "workers": workers, "warnings": warnings}
            final = run_dir.finish(summary)

        probs = [p.detach() for p in supernet.probs()]
        rows = [[name, str(m.choices[i]), round(float(p[i]), 3)]
                for name, m, i, p in zip(supernet.names, supernet.mixed(), best.indices, probs)]
        print(format_table(["layer", "bits", "p(choice)"], rows))
        print(format_table(["candidate", cost_name, "meets target", "one-shot acc %"],
                           [[c.name, format_cost(cost_name, c.cost),
                             "yes" if c.meets_target else "no",
                             "-" if c.accuracy != c.accuracy else round(c.accuracy, 2)]
                            for c in cands]))
        print(f"plan: {best.name}, {format_cost(cost_name, best.cost)}"
              + (f" vs target {target.text}" if target else "")
              + f", one-shot accuracy {best.accuracy:.2f}% (arch split), {test_acc:.2f}% (test)"
              + (" [latency estimated]" if cost_name == "latency" and table.any_estimated else ""))
        for w in warnings:
            print(f"warning: {w}")
        print(f"run folder: {final}")
        print(f"plan file: {final / 'plan.yaml'}")
        print(f"fine-tune it: nas qat --run {shlex.quote(str(final))}")
        return final
