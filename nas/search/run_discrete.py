"""`nas search --method bayes|random|uniform`: a discrete searcher's trials on Ray Tune, one
run folder.

Before the trials, the evaluator's weights: a DNAS run's supernet (`--supernet RUN`), a float
checkpoint (`--checkpoint`, PTQ per plan), or, with neither, weights this run trains first
(a supernet with every branch sampled uniformly for `oneshot`, a float model for `ptq`),
within the same time budget. The chosen plan, the most accurate one within the target on
the arch split, is then scored once on the test split, which no searcher sees.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import yaml

from nas.errors import ConfigError, NasError
from nas.search.base import DISCRETE, OBJECTIVE_COSTS, SearchBudget, SearchProblem, Told
from nas.search.request import SearchRequest
from nas.search.weights import evaluator_kind, space_and_weights, train_weights

TRAIN_SHARE = 0.5  # of a time budget, when the evaluator's weights are trained first
TEST_RESERVE_S = 5.0  # of a time budget, kept for scoring the chosen plan on the test split


def parse_objectives(text: str | None) -> tuple[str, ...]:
    if not text:
        return ("accuracy",)
    names = tuple(n.strip() for n in text.split(","))
    allowed = ", ".join(f"accuracy,{c}" for c in OBJECTIVE_COSTS)
    if names[0] != "accuracy" or len(names) < 2 or len(set(names)) != len(names) or any(
            n not in OBJECTIVE_COSTS for n in names[1:]):
        raise ConfigError(f"--objectives {text!r}: give accuracy then one or more costs, for "
                          f"example {allowed}")
    return names


def _resumed(request: SearchRequest) -> dict[str, Any]:
    """The config of the discrete search --resume names, checked against the request."""
    folder = Path(request.resume)
    config = _read_config(folder)
    if config.get("method") not in DISCRETE:
        raise ConfigError(f"--resume {folder} is a {config.get('method')} run; resume it with "
                          f"--method {config.get('method')}")
    if request.method not in (None, config["method"]):
        raise ConfigError(f"--method {request.method} but run {folder} is a {config['method']} "
                          f"search; leave --method out to resume it")
    for flag, value in (("--space", request.space), ("--checkpoint", request.checkpoint),
                        ("--supernet", request.options.get("supernet")),
                        ("--evaluator", request.options.get("evaluator")),
                        ("--objectives", request.options.get("objectives")),
                        ("--target", request.target), ("--cost", request.cost),
                        ("--eval-batches", request.options.get("eval_batches")),
                        ("--sampler", request.options.get("sampler")),
                        ("--train-subset", request.train_subset),
                        ("--test-subset", request.test_subset)):
        if value:
            raise ConfigError(f"{flag} does not apply to --resume: run {folder} goes on with "
                              f"what it recorded; leave {flag} out")
    return config


def _read_config(folder: Path) -> dict[str, Any]:
    from nas.search.supernet_file import FIX

    if not folder.is_dir():
        raise ConfigError(f"--resume {folder} " + ("is a file" if folder.exists() else
                                                   "does not exist") + f"; {FIX}")
    path = folder / "config.yaml"
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        config = None
    if not isinstance(config, dict) or config.get("command") != "search":
        raise ConfigError(f"--resume {folder} holds no search config.yaml; {FIX}")
    return config


def qat_command(final: Path, kind: str, weights: Path | None) -> str:
    """The `nas qat` line that fine-tunes a finished search's plan from the weights its
    evaluator scored it on (`weights` None: trained in the run folder)."""
    from shlex import quote

    plan = quote(str(final / "plan.yaml"))
    if kind == "oneshot":
        return (f"nas qat --run {quote(str(final))}" if weights is None else
                f"nas qat --run {quote(str(weights.parent))} --plan {plan}")
    checkpoint = final / "best.pt" if weights is None else weights
    return f"nas qat --plan {plan} --checkpoint {quote(str(checkpoint))}"


class DiscreteRun:
    """One discrete search, from a request to a finished run folder."""

    def __init__(self, request: SearchRequest, searcher_cls, budget: SearchBudget, target):
        self.request, self.searcher_cls, self.budget, self.target = (request, searcher_cls,
                                                                     budget, target)

    def run(self) -> Path:
        from nas.budget import Budget, parse_budget
        from nas.clock import now_iso
        from nas.cost.targets import Target, format_cost
        from nas.device import resolve_device
        from nas.runs import RunDir
        from nas.search.encoding import PlanEncoding
        from nas.search.evaluate import EvaluatorSpec
        from nas.search.results import SearchResults
        from nas.search.ray_address import check_address
        from nas.search.setup import cost_setup, notes
        from nas.space_data import load_space_data
        from nas.spaces import SearchSpace

        request, opts = self.request, self.request.options
        started = time.monotonic()
        resumed = _resumed(request) if request.resume else None
        if resumed:
            request.method, request.seed = resumed["method"], int(resumed["seed"])
            opts["searcher_options"] = resumed.get("searcher_options") or {}
            space = SearchSpace.from_dict(resumed["space"], source=f"run {request.resume}")
            target = (Target(**resumed["target_value"]) if resumed.get("target_value") else None)
            request.cost = resumed["cost"]
            objectives = tuple(resumed["objectives"])
            ev = dict(resumed["evaluator"])
            kind, weights, weights_seed, model = ev["kind"], None, int(ev["seed"]), None
            if ev.pop("trained_here"):
                weights = (Path(request.resume) / Path(ev["path"]).name).resolve()
                if not weights.is_file():
                    raise ConfigError(f"run {request.resume} stopped before its evaluator's "
                                      f"{weights.name} was written; start a new search")
            else:
                weights = Path(ev["path"]).resolve()
            saved_latency = resumed.get("latency")
            print(f"resuming {resumed['method']} run {request.resume}", flush=True)
        else:
            objectives = parse_objectives(opts.get("objectives"))
            kind = evaluator_kind(request)
            space, weights, weights_seed, model = space_and_weights(request, kind)
            target, saved_latency = self.target, None
        self.weights = weights  # None: trained in this run's folder
        check_address(opts.get("ray_address"))  # before ray is imported: it bounds the connect
        from nas.search.tune import check_resources, ray_session
        setup = cost_setup(space, request, target, saved_latency,
                           extra_costs=tuple(o for o in objectives if o != "accuracy"),
                           default_target=len(objectives) == 1)
        problem = SearchProblem(space, setup.tables, setup.cost, setup.target, self.budget,
                                request.seed, objectives)
        searcher = self.searcher_cls(problem, opts.get("searcher_options") or {})
        encoding = PlanEncoding(space)
        splits = load_space_data(space, request.data_args)
        device = resolve_device(request.device)
        gpus = float(opts.get("gpus_per_trial") or 0)
        self._announce(problem, setup, kind, weights, format_cost)
        for line in notes(space, setup):
            print(line, flush=True)

        with RunDir(request.runs_dir, space.name, "search") as run_dir:
            with ray_session(opts.get("ray_address"), lambda: run_dir.file("ray.log")):
                note = check_resources(int(opts["workers"]), int(opts["cpus_per_trial"]), gpus)
                if note:
                    print(note, flush=True)
                # Scored as recorded on resume (the same arch-split images); where the trials
                # run and how many CPUs they take may change.
                scoring = ({k: v for k, v in resumed["evaluator"].items()
                            if k in ("bn_batches", "eval_batches", "calibration", "calib_batches")}
                           if resumed else {"eval_batches": int(opts.get("eval_batches") or 20)})
                spec = EvaluatorSpec(kind, str(weights) if weights else "", space.to_dict(),
                                     weights_seed,
                                     str(Path(request.data_dir).resolve()) if request.data_dir else None,
                                     "cuda" if gpus > 0 else "cpu", int(opts["cpus_per_trial"]),
                                     **scoring)
                config = self._config(problem, setup, spec, trained_here=weights is None)
                run_dir.write_config(config)
                print(f"run folder: {run_dir.path}", flush=True)
                results = SearchResults(run_dir.path, problem, encoding)
                searcher.use_folder(run_dir.path)
                done_seconds = 0.0
                if resumed:
                    old = Path(request.resume) / "trials.csv"
                    history = results.load(old) if old.is_file() else []
                    for t in history:
                        searcher.tell(Told(t.indices, t.costs, {"accuracy": t.accuracy},
                                           t.meets_target))
                    done_seconds = max([t.elapsed for t in history if t.elapsed == t.elapsed]
                                       + [float(resumed.get("train_seconds") or 0.0)])
                    print(f"{len(history)} trials of run {request.resume} kept", flush=True)
                warnings: list[str] = []
                if weights is None:
                    train_budget = (parse_budget(opts["train_budget"]) if opts.get("train_budget")
                                    else Budget("seconds", self.budget.value * TRAIN_SHARE)
                                    if self.budget.kind == "seconds"
                                    else parse_budget(str(space.train["budget"])))
                    path, warnings = train_weights(kind, space, splits, model, train_budget,
                                                    request, run_dir, device)
                    spec = EvaluatorSpec(**{**spec.to_dict(), "path": str(path.resolve())})
                    # Named inside the run folder: it is renamed when the run finishes.
                    config["evaluator"] = {**spec.to_dict(), "path": path.name, "trained_here": True}
                    config["train_seconds"] = round(time.monotonic() - started, 2)
                    run_dir.write_config(config)
                trials_left = seconds_left = None
                if self.budget.kind == "trials":
                    trials_left = int(self.budget.value) - len(results.trials)
                else:
                    seconds_left = (self.budget.value - done_seconds
                                    - (time.monotonic() - started) - TEST_RESERVE_S)
                outcome = self._trials(problem, searcher, spec, results, run_dir, trials_left,
                                       seconds_left, started - done_seconds)
                driver_spec = EvaluatorSpec(**{**spec.to_dict(), "device": str(device)})
                final, summary = self._finish(problem, setup, driver_spec, results, outcome,
                                              run_dir, splits, warnings, started, now_iso)
        self._report(problem, results, summary, final)
        return final

    # ------------------------------------------------------------ parts

    def _announce(self, problem, setup, kind, weights, format_cost) -> None:
        opts, t = self.request.options, problem.target
        print(f"{self.request.method} on {problem.space.name}: {len(problem.choices)} layers, "
              f"{sum(n > 1 for n in problem.choices)} searchable; cost {problem.cost}"
              + (f", target {t.text} ({format_cost(t.cost, t.value)})" if t else "")
              + (f"; objectives {','.join(problem.objectives)}" if problem.multi_objective else "")
              + f"; budget {self.budget}; evaluator {kind}"
              + (f" ({weights})" if weights else " (trained first)")
              + f"; {opts['workers']} worker{'s' if opts['workers'] > 1 else ''}", flush=True)

    def _config(self, problem, setup, spec, trained_here: bool) -> dict[str, Any]:
        r, opts = self.request, self.request.options
        return {"command": "search", "method": r.method, "space": problem.space.to_dict(),
                "budget": str(self.budget), "target": problem.target.text if problem.target else None,
                "target_value": problem.target.__dict__ if problem.target else None,
                "cost": problem.cost, "objectives": list(problem.objectives),
                "latency": setup.latency, "evaluator": {**spec.to_dict(), "trained_here": trained_here},
                "workers": opts["workers"], "cpus_per_trial": opts["cpus_per_trial"],
                "gpus_per_trial": opts.get("gpus_per_trial") or 0,
                "ray_address": opts.get("ray_address"), "searcher_options": opts.get("searcher_options"),
                "checkpoint": r.checkpoint, "supernet": opts.get("supernet"), "resume": r.resume,
                "seed": r.seed}

    def _trials(self, problem, searcher, spec, results, run_dir, trials_left, seconds_left,
                clock_start):
        from tqdm import tqdm

        from nas.search.tune import TuneOutcome, quiet_output, run_trials

        if (trials_left is not None and trials_left <= 0) or (
                seconds_left is not None and seconds_left <= 0):
            print("the budget is spent: no more trials (give a larger --budget to go on)",
                  flush=True)
            return TuneOutcome()
        opts = self.request.options
        with quiet_output(run_dir.file("ray.log")) as terminal:
            bar = tqdm(total=trials_left, desc=self.request.method, file=terminal, leave=False,
                       disable=not self.request.progress or None)
            best = [-math.inf]

            def on_trial(trial):
                if trial.meets_target and trial.accuracy > best[0]:
                    best[0] = trial.accuracy
                bar.update()
                if best[0] > -math.inf:
                    bar.set_postfix_str(f"best {best[0]:.2f}%")

            try:
                return run_trials(problem, searcher, spec, results, run_dir.path,
                                  workers=int(opts["workers"]),
                                  cpus_per_trial=int(opts["cpus_per_trial"]),
                                  gpus_per_trial=float(opts.get("gpus_per_trial") or 0),
                                  trials=trials_left, seconds=seconds_left,
                                  clock_start=clock_start, on_trial=on_trial)
            finally:
                bar.close()

    def _finish(self, problem, setup, spec, results, outcome, run_dir, splits, warnings,
                started, now_iso):
        from nas.search.encoding import PlanEncoding
        from nas.search.evaluate import evaluator_for
        from nas.search.honesty import accuracy_warnings
        from nas.search.results import plan_costs

        front = results.write_pareto()
        best = results.best()
        if best is None and outcome.interrupted:
            raise NasError(f"interrupted before any trial finished; to go on: nas search "
                           f"--resume {run_dir.path}")
        if best is None:
            raise NasError(f"no plan within the target was evaluated (trials completed: "
                           f"{len(results.trials)}, failed: {outcome.failed}); give a larger "
                           f"--budget" + (" or a higher --target" if problem.target else ""))
        evaluator = evaluator_for(spec)
        test_accuracy = evaluator.evaluate(best.indices, split="test")["accuracy"]
        prefix = "one_shot" if spec.kind == "oneshot" else "ptq"
        plan = PlanEncoding(problem.space).plan(best.indices)
        plan.costs = plan_costs(problem, best.indices,
                                {f"{prefix}_arch_accuracy": best.accuracy,
                                 f"{prefix}_test_accuracy": test_accuracy},
                                setup.latency, setup.estimate_method())
        plan.provenance = {"method": self.request.method, "run_id": run_dir.final.name,
                           "seed": self.request.seed, "date": now_iso(), "trial": best.number,
                           "trials": len(results.trials), "evaluator": spec.kind,
                           "interrupted": outcome.interrupted}
        plan.save(run_dir.file("plan.yaml"))
        warnings = warnings + accuracy_warnings(test_accuracy, splits.info.num_classes,
                                                "the chosen plan")
        overheads = [t.seconds - t.eval_seconds for t in results.trials
                     if t.seconds == t.seconds and t.eval_seconds == t.eval_seconds]
        summary = {"command": "search", "method": self.request.method,
                   "space": problem.space.name, "cost": problem.cost,
                   "target": problem.target.text if problem.target else None,
                   "objectives": list(problem.objectives), "evaluator": spec.kind,
                   "trials": len(results.trials), "best_trial": best.number,
                   "plan_cost": best.costs[problem.cost], "meets_target": best.meets_target,
                   "arch_accuracy": best.accuracy, "test_accuracy": test_accuracy,
                   "pareto_size": len(front), "over_target_unevaluated": outcome.over_target,
                   "repeats_answered": outcome.repeats, "failed_trials": outcome.failed,
                   "searcher_exhausted": outcome.exhausted, "interrupted": outcome.interrupted,
                   "workers": self.request.options["workers"],
                   "median_ray_overhead_s": round(statistics.median(overheads), 4)
                   if overheads else None,
                   "seconds": round(time.monotonic() - started, 2), "budget": str(self.budget),
                   "warnings": warnings}
        return run_dir.finish(summary), summary

    def _report(self, problem, results, summary, final) -> None:
        from nas.cost.targets import format_cost
        from nas.search.encoding import PlanEncoding
        from nas.table import format_table

        encoding = PlanEncoding(problem.space)
        costs = [c for c in problem.tables if c in (problem.cost, *problem.objectives)]
        top = sorted((t for t in results.trials if t.meets_target),
                     key=lambda t: -t.accuracy)[:5]
        print(format_table(["trial", "accuracy %", *costs, "plan"],
                           [[t.number, round(t.accuracy, 2),
                             *(format_cost(c, t.costs[c]) for c in costs),
                             encoding.bits(t.indices)] for t in top]))
        if problem.multi_objective:
            print(f"Pareto front: {summary['pareto_size']} plans (pareto.csv)")
        print(f"plan: trial {summary['best_trial']} of {summary['trials']}, "
              f"{format_cost(problem.cost, summary['plan_cost'])}"
              + (f" vs target {problem.target.text}" if problem.target else "")
              + f", accuracy {summary['arch_accuracy']:.2f}% (arch split, {summary['evaluator']}), "
              f"{summary['test_accuracy']:.2f}% (test)")
        if summary["over_target_unevaluated"]:
            print(f"{summary['over_target_unevaluated']} proposed plans were over the target "
                  f"and not evaluated")
        if summary["failed_trials"]:
            print(f"warning: {summary['failed_trials']} trials failed after their retries "
                  f"(see ray/ in the run folder)")
        for w in summary["warnings"]:
            print(f"warning: {w}")
        if summary["interrupted"]:
            print(f"interrupted: {summary['trials']} trials kept; to go on: "
                  f"nas search --resume {final}")
        print(f"run folder: {final}")
        print(f"plan file: {final / 'plan.yaml'}")
        print(f"fine-tune it: {qat_command(final, summary['evaluator'], self.weights)}")
