"""`nas bench search`: the discrete searchers against each other, and what Ray costs them.

1. Quality. On one supernet (the one-shot evaluator), bayes, random, uniform and rl at the
   same trial budget, under each size target, for each seed: the best arch-split accuracy
   after each trial, the trials bayes needs to reach random's best (goal: at most half of
   random's), each method's chosen plan scored on the test split, which no search saw, and
   rl's mean reward over its random warm-up episodes against its last ones (its learning
   curve).
2. Scaling. Random search with 2 workers against 1, trials completed per hour.
3. Overhead. Each trial's wall time in the driver (from its proposal to its result) minus
   its evaluation's time in the worker: what Ray Tune adds per trial.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable

from nas.cost.targets import Target
from nas.search.base import SearchBudget, SearchProblem, searcher_class
from nas.search.encoding import PlanEncoding
from nas.search.evaluate import EvaluatorSpec, evaluator_for
from nas.search.results import SearchResults
from nas.search.tune import run_trials

METHODS = ("bayes", "random", "uniform", "rl")
LAST_EPISODES = 10  # rl's late episodes, whose mean reward is set against the warm-up's


def _search(space, table, target, method: str, trials: int, seed: int, spec: EvaluatorSpec,
            folder: Path, workers: int) -> tuple[SearchResults, float, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    problem = SearchProblem(space, {"size": table}, "size", target,
                            SearchBudget("trials", trials), seed)
    results = SearchResults(folder, problem, PlanEncoding(space))
    searcher = searcher_class(method)(problem)
    searcher.use_folder(folder)
    started = time.monotonic()
    run_trials(problem, searcher, spec, results, folder,
               workers=workers, cpus_per_trial=1, gpus_per_trial=0, trials=trials,
               seconds=None, clock_start=started, on_trial=lambda t: None)
    return results, time.monotonic() - started, searcher


def reward_means(curve: list[dict[str, Any]]) -> dict[str, float | None]:
    """rl's mean reward over its warm-up episodes and over its last ones."""
    def mean(rows):
        return statistics.mean(r["reward"] for r in rows) if rows else None

    policy = [r for r in curve if r["phase"] == "policy"]
    return {"warmup_reward": mean([r for r in curve if r["phase"] == "warmup"]),
            "last_reward": mean(policy[-LAST_EPISODES:])}


def best_so_far(results: SearchResults) -> list[float]:
    curve, best = [], float("-inf")
    for t in results.trials:
        best = max(best, t.accuracy) if t.meets_target else best
        curve.append(best)
    return curve


def trials_to_reach(curve: list[float], value: float) -> int | None:
    return next((i + 1 for i, v in enumerate(curve) if v >= value), None)


def quality(space, table, w8a8: float, fractions, trials: int, seeds: int, spec, folder: Path,
            workers: int, say: Callable[[str], None]) -> list[dict[str, Any]]:
    evaluator = evaluator_for(spec)
    rows = []
    for fraction in fractions:
        target = Target("size", w8a8 * fraction, f"size={w8a8 * fraction / 1e3:.1f}KB")
        for seed in range(seeds):
            row: dict[str, Any] = {"target_fraction": fraction, "target": target.value,
                                   "seed": seed}
            for method in METHODS:
                results, seconds, searcher = _search(space, table, target, method, trials,
                                                     seed, spec,
                                                     folder / f"{method}-{fraction}-s{seed}",
                                                     workers)
                best = results.best()
                row[method] = {
                    "trials": len(results.trials), "seconds": round(seconds, 1),
                    "curve": best_so_far(results),
                    "best_arch": best.accuracy if best else None,
                    "best_size": best.costs["size"] if best else None,
                    "best_plan": PlanEncoding(space).bits(best.indices) if best else None,
                    "best_test": evaluator.evaluate(best.indices, "test")["accuracy"]
                    if best else None}
                if method == "rl":
                    row[method].update(reward_means(searcher.curve))
            random_best = row["random"]["best_arch"]
            needed = trials_to_reach(row["bayes"]["curve"], random_best)
            row["bayes_trials_to_random_best"] = needed
            row["ratio"] = needed / row["random"]["trials"] if needed else None
            say(f"target {target.text} seed {seed}: best arch accuracy bayes "
                f"{row['bayes']['best_arch']:.2f}%, random {random_best:.2f}%, uniform "
                f"{_fmt(row['uniform']['best_arch'])}, rl {_fmt(row['rl']['best_arch'])}; bayes "
                f"reached random's best in {needed or 'more than ' + str(trials)} of "
                f"{row['random']['trials']} trials; rl's mean reward "
                f"{_num(row['rl']['warmup_reward'])} over its warm-up, "
                f"{_num(row['rl']['last_reward'])} over its last {LAST_EPISODES} episodes")
            rows.append(row)
    return rows


def scaling(space, table, target, trials: int, spec, folder: Path,
            say: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {"trials": trials}
    overheads, evals = [], []
    for workers in (1, 2):
        results, seconds, _ = _search(space, table, target, "random", trials, 100 + workers,
                                      spec, folder / f"scaling-w{workers}", workers)
        done = len(results.trials)
        # Steady state: from the first result of the last worker to start to the last result
        # (each worker's first trial starts Ray's worker and loads the supernet and the data).
        span = results.trials[-1].elapsed - results.trials[workers - 1].elapsed
        out[f"workers_{workers}"] = {"trials": done, "seconds": round(seconds, 2),
                                     "trials_per_hour": round(done / seconds * 3600, 1),
                                     "steady_trials_per_hour": round((done - workers) / span
                                                                     * 3600, 1)}
        # The first trial of each worker loads the supernet and the data: not Ray's cost.
        steady = results.trials[workers:]
        overheads += [t.seconds - t.eval_seconds for t in steady]
        evals += [t.eval_seconds for t in steady]
        say(f"{workers} worker(s): {done} trials in {seconds:.1f} s")
    out["speedup"] = (out["workers_2"]["steady_trials_per_hour"]
                      / out["workers_1"]["steady_trials_per_hour"])
    out["speedup_whole_runs"] = (out["workers_2"]["trials_per_hour"]
                                 / out["workers_1"]["trials_per_hour"])
    out["median_overhead_s"] = statistics.median(overheads)
    out["max_overhead_s"] = max(overheads)
    out["median_eval_s"] = statistics.median(evals)
    return out


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}%"


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def tables(results: dict[str, Any]) -> list[tuple[str, list[str], list[list[Any]]]]:
    rows = []
    for r in results["quality"]:
        rows.append([round(r["target"] / 1e3, 1), r["seed"], *(
            "-" if r[m]["best_arch"] is None else round(r[m]["best_arch"], 2) for m in METHODS),
            *("-" if r[m]["best_test"] is None else round(r[m]["best_test"], 2) for m in METHODS),
            r["uniform"]["trials"],
            f"{r['bayes_trials_to_random_best'] or '>' + str(r['bayes']['trials'])}/"
            f"{r['random']['trials']}", _num(r["rl"]["warmup_reward"]),
            _num(r["rl"]["last_reward"])])
    out = [(f"Searchers at {results['trials']} trials on one supernet ({results['supernet']}): "
            f"best arch-split accuracy, its plan on the test split, and the trials bayes needed "
            f"to reach random's best (goal: at most half); rl's mean reward (0.1 x accuracy) "
            f"over its random warm-up episodes and over its last {LAST_EPISODES}",
            ["target KB", "seed", *(f"{m} %" for m in METHODS),
             *(f"test: {m} %" for m in METHODS), "uniform plans", "bayes to random's best",
             "rl warm-up reward", f"rl last {LAST_EPISODES} reward"],
            rows)]
    per_target = {}
    for r in results["quality"]:
        per_target.setdefault(r["target"], []).append(r)
    summary = []
    for target, group in per_target.items():
        margins = [r["bayes"]["best_test"] - r["random"]["best_test"] for r in group]
        rl_margins = [r["rl"]["best_test"] - r["random"]["best_test"] for r in group]
        ratios = [r["ratio"] for r in group]
        summary.append([round(target / 1e3, 1), len(group),
                        "-" if None in ratios else round(statistics.mean(ratios), 2),
                        round(statistics.mean(margins), 2),
                        round(statistics.stdev(margins), 2) if len(margins) > 1 else "-",
                        round(statistics.mean(rl_margins), 2),
                        round(statistics.stdev(rl_margins), 2) if len(rl_margins) > 1 else "-"])
    out.append(("Per target over seeds: bayes's trials to random's best as a share of random's "
                "(goal <= 0.5), and bayes minus random, rl minus random, on the test split "
                "(mean, seed-to-seed spread)",
                ["target KB", "seeds", "trials share", "test margin", "margin stdev",
                 "rl test margin", "rl margin stdev"], summary))
    s = results["scaling"]
    out.append(("Ray on this machine: random search, trials per hour (whole run, and steady "
                "state: after each worker's first trial, which starts it and loads the supernet "
                "and data), and Ray's time per trial beyond the evaluation (median over trials; "
                "goal <= 0.5 s)",
                ["workers", "trials", "seconds", "trials/h", "steady trials/h",
                 "steady speed-up (goal >= 1.8)", "median overhead s", "median evaluation s"],
                [[1, s["workers_1"]["trials"], s["workers_1"]["seconds"],
                  s["workers_1"]["trials_per_hour"], s["workers_1"]["steady_trials_per_hour"],
                  1.0, round(s["median_overhead_s"], 3), round(s["median_eval_s"], 3)],
                 [2, s["workers_2"]["trials"], s["workers_2"]["seconds"],
                  s["workers_2"]["trials_per_hour"], s["workers_2"]["steady_trials_per_hour"],
                  round(s["speedup"], 2), "", ""]]))
    return out
