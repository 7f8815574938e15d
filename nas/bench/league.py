"""`nas bench league`: dnas, bayes, rl, random and uniform at equal wall-clock budgets.

The accounting. Every method starts from one float checkpoint and is charged the same T
seconds per search, spent as `nas search --budget T` spends them:

- dnas: `nas search --checkpoint CK --budget T --target t`. The supernet it trains from the
  checkpoint is its search; the last tenth of T derives and scores its candidates.
- bayes, rl, random, uniform: `nas search --method M --checkpoint CK --evaluator oneshot
  --budget T` gives half of T to training a one-shot supernet from the checkpoint (every
  branch sampled uniformly) and the rest to trials. The league trains that supernet once per
  seed, in the seed's first uniform search (that very command), and runs every other
  discrete search of the seed on it with `--supernet RUN --budget T/2`. So the discrete
  methods of a seed share one evaluator, and each is charged the supernet's training in full.
- Ray starts once for the league, as a running cluster does for `--ray-address auto`: its
  start-up is in no budget. Loading the data and the supernet in each search's workers is.

Each search is the `nas search` a user types, run in this process by the function that
command runs (`search`, given by `nas bench league`), into a run folder that `nas report`
reads.

Measured per method and seed: the hypervolume of the accuracy-size front of every plan its
searches scored (arch split, on the evaluator it searched with), against the reference point
(the largest target's size, `floor` accuracy); per target, the chosen plan's test-split
accuracy, and the trials (discrete) or supernet steps (dnas) it used.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Callable, Iterable

from nas.errors import NasError
from nas.search.run_discrete import TRAIN_SHARE

METHODS = ("dnas", "bayes", "rl", "random", "uniform")
# Runs `nas search ARGV` with a seed: its run folder, wall seconds, and the error of a search
# that ended without a plan (None when it found one; its folder is then the `.partial` one).
Search = Callable[[list[str], int], tuple[Path, float, "str | None"]]


def hypervolume(points: Iterable[tuple[float, float]], ref_size: float,
                ref_accuracy: float) -> float:
    """The area of (size, accuracy) space that the points dominate (smaller size and higher
    accuracy are better), bounded by the reference point; a point at or past the reference
    in either coordinate adds nothing."""
    inside = sorted((s, a) for s, a in points if s < ref_size and a > ref_accuracy)
    area, best = 0.0, ref_accuracy
    for i, (size, accuracy) in enumerate(inside):
        best = max(best, accuracy)  # the front's accuracy from this size to the next point's
        end = inside[i + 1][0] if i + 1 < len(inside) else ref_size
        area += (end - size) * (best - ref_accuracy)
    return area


def failed_record(folder: Path, root: Path, method: str, seed: int, target, seconds: float,
                  budget: str, error: str) -> dict[str, Any]:
    """A search that ended without a plan (on a busy machine a time budget can end before
    any trial does): no accuracy, no plans scored."""
    trials = folder / "trials.csv"
    done = len(trials.read_text().splitlines()) - 1 if trials.is_file() else 0
    return {"method": method, "seed": seed, "target": target.value, "target_text": target.text,
            "run": str(folder.relative_to(root)), "seconds": round(seconds, 1),
            "budget": budget, "test_accuracy": None, "arch_accuracy": None, "plan_size": None,
            "meets_target": None, "trials": None if method == "dnas" else done, "steps": None,
            "plans_scored": 0, "precision": None, "points": [], "failed": error}


def run_record(folder: Path, root: Path, method: str, seed: int, target, seconds: float
               ) -> dict[str, Any]:
    """One search's numbers, read back from its run folder as `nas report` reads it."""
    from nas.report.collect import read_run

    summary = json.loads((folder / "summary.json").read_text())
    run = read_run(folder)
    dnas = method == "dnas"
    return {"method": method, "seed": seed, "target": target.value, "target_text": target.text,
            "run": str(folder.relative_to(root)), "seconds": round(seconds, 1),
            "budget": summary["budget"], "test_accuracy": run.accuracy,
            "arch_accuracy": summary["one_shot_arch_accuracy" if dnas else "arch_accuracy"],
            "plan_size": summary["plan_cost"], "meets_target": summary["meets_target"],
            "trials": None if dnas else summary["trials"],
            "steps": summary["steps"] if dnas else None, "plans_scored": len(run.points),
            "precision": _precision(run),
            "points": [[p.costs["size"], p.accuracy] for p in run.points]}


def run_league(search: Search, checkpoint: str, space: str | None, targets: list,
               seconds: float, seeds: int, workers: int, eval_batches: int, floor: float,
               data: list[str], root: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """Every method under every target for every seed, each search run by `search` into a
    run folder under root/runs; the per-run records, each seed's shared supernet and the
    hypervolumes. `space` (None: the checkpoint's) goes to the searches that start from the
    checkpoint."""
    start = ["--checkpoint", checkpoint, *(["--space", space] if space else [])]
    half = f"{seconds * TRAIN_SHARE:g}s"
    discrete = ["--workers", str(workers), "--eval-batches", str(eval_batches), "--no-progress",
                *data]
    records, supernets = [], []
    for seed in range(seeds):
        supernet = None
        for target in targets:
            for method in ("uniform", "bayes", "rl", "random", "dnas"):
                if method == "dnas":
                    argv = [*start, "--budget", f"{seconds:g}s", "--target", target.text,
                            "--no-progress", *data]
                elif supernet is None:  # the seed's first uniform search trains the supernet
                    argv = [*discrete, "--method", method, *start, "--evaluator", "oneshot",
                            "--budget", f"{seconds:g}s", "--target", target.text]
                else:
                    argv = [*discrete, "--method", method, "--supernet", str(supernet),
                            "--budget", half, "--target", target.text]
                folder, took, error = search(argv, seed)
                if supernet is None and method != "dnas":
                    if not (folder / "supernet.pt").is_file():
                        raise NasError(f"the supernet of seed {seed} was not trained: {error}; "
                                       f"see {folder / 'log.txt'}")
                    supernet = folder
                    config = _yaml(folder / "config.yaml")
                    supernets.append({"seed": seed, "run": str(folder.relative_to(root)),
                                      "train_seconds": config.get("train_seconds")})
                record = (run_record(folder, root, method, seed, target, took) if error is None
                          else failed_record(folder, root, method, seed, target, took,
                                             argv[argv.index("--budget") + 1], error))
                records.append(record)
                say(f"seed {seed}, target {target.text}, {method}: test "
                    f"{_pct(record['test_accuracy'])}, {_used(record)}, {took:.0f} s "
                    f"({record['run']})" + (f": {error}" if error else ""))
    ref_size = max(t.value for t in targets)
    return {"runs": records, "supernets": supernets,
            "hypervolume": hypervolumes(records, ref_size, floor),
            "hv_reference": {"size_bytes": ref_size, "accuracy": floor}}


def hypervolumes(records: list[dict], ref_size: float, floor: float) -> list[dict[str, Any]]:
    """Per method and seed: the hypervolume of every plan its searches scored, in KB x
    accuracy points."""
    out = []
    for method in METHODS:
        for seed in sorted({r["seed"] for r in records}):
            mine = [r for r in records if r["method"] == method and r["seed"] == seed]
            if not mine:
                continue
            points = [(s / 1e3, a) for r in mine for s, a in r["points"]]
            out.append({"method": method, "seed": seed, "plans": len(points),
                        "hypervolume": hypervolume(points, ref_size / 1e3, floor)})
    return out


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def _pct(value) -> str:
    return "-" if value is None else f"{value:.2f}%"


def _used(record: dict) -> str:
    used = (f"{record['steps']} steps" if record["method"] == "dnas" and record["steps"] is not None
            else "-" if record["method"] == "dnas" else f"{record['trials']} trials")
    return used + (", no plan" if record.get("failed") else "")


def _found(records: list[dict]) -> list[float]:
    return [r["test_accuracy"] for r in records if r["test_accuracy"] is not None]


def _spread(values: list[float], digits: int = 2) -> str:
    """Mean and seed-to-seed standard deviation, as `mean ± sd` (no sd from one seed)."""
    if not values:
        return "-"
    mean = f"{statistics.mean(values):.{digits}f}"
    return mean if len(values) < 2 else f"{mean} ± {statistics.stdev(values):.{digits}f}"


def _signed(values: list[float]) -> str:
    if not values:
        return "-"
    mean = f"{statistics.mean(values):+.2f}"
    return mean if len(values) < 2 else f"{mean} ± {statistics.stdev(values):.2f}"


def tables(results: dict[str, Any]) -> list[tuple[str, list[str], list[list[Any]]]]:
    runs, targets = results["runs"], results["targets"]
    by = {(r["method"], r["seed"], r["target"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    ref = results["hv_reference"]
    league, margins = [], []
    for method in METHODS:
        hv = [h["hypervolume"] for h in results["hypervolume"] if h["method"] == method]
        row: list[Any] = [method, _spread(hv, 1)]
        for t in targets:
            mine = [by[(method, s, t["value"])] for s in seeds]
            used = [r["steps"] if method == "dnas" else r["trials"] for r in mine]
            row += [_spread(_found(mine)), _spread([u for u in used if u is not None], 0)]
        mine = [r for r in runs if r["method"] == method]
        row += [f"{sum(1 for r in mine if r.get('failed'))} of {len(mine)}",
                _spread([r["seconds"] for r in mine], 0)]
        league.append(row)
        if method != "uniform":
            margins.append([method, _signed([
                h["hypervolume"] - u["hypervolume"] for h in results["hypervolume"]
                for u in results["hypervolume"] if h["method"] == method
                and u["method"] == "uniform" and u["seed"] == h["seed"]])] + [_signed([
                    by[(method, s, t["value"])]["test_accuracy"]
                    - by[("uniform", s, t["value"])]["test_accuracy"] for s in seeds
                    if None not in (by[(method, s, t["value"])]["test_accuracy"],
                                    by[("uniform", s, t["value"])]["test_accuracy"])])
                    for t in targets])
    float_acc = results["float_test_accuracy"]
    uniform = []
    for t in targets:
        mine = [by[("uniform", s, t["value"])] for s in seeds]
        loss = [float_acc - a for a in _found(mine)] if float_acc is not None else []
        uniform.append([t["text"], " / ".join(sorted({r["precision"] for r in mine
                                                      if r["precision"]})) or "-",
                        _spread(_found(mine)), _pct(float_acc),
                        _signed(loss) if loss else "-",
                        "-" if not loss else "yes" if statistics.mean(loss) >= 2 else "NO"])
    detail = [[r["method"], r["seed"], r["target_text"], _pct(r["test_accuracy"]),
               _pct(r["arch_accuracy"]),
               "-" if r["plan_size"] is None else round(r["plan_size"] / 1e3, 1), _used(r),
               r["plans_scored"], r["seconds"], r["run"]] for r in runs]
    t_heads = [h for t in targets for h in (f"test % at {t['text']}", "trials or steps")]
    n = len(seeds)
    return [
        (f"League at {results['budget']} of wall clock per search from one float checkpoint "
         f"({_pct(float_acc)} test), {n} seed{'s' if n > 1 else ''} (mean ± seed-to-seed "
         f"stdev): hypervolume of each method's accuracy-size front (arch split, KB x points, "
         f"reference {ref['size_bytes'] / 1e3:.1f} KB and {ref['accuracy']:g} %), its chosen "
         f"plans' test accuracy, trials (dnas: supernet steps), wall seconds per search (a "
         f"seed's shared supernet counted once, in its first uniform search), and the "
         f"searches that ended without a plan (a time budget spent before any trial finished)",
         ["method", "hypervolume", *t_heads, "no plan", "seconds"], league),
        ("Margins over uniform, per seed then mean ± seed-to-seed stdev: hypervolume, and test "
         "accuracy (points) at each target",
         ["method", "hypervolume", *(f"test at {t['text']}" for t in targets)], margins),
        ("The targets: the best uniform plan (uniform's choice) against the float checkpoint "
         "(a target separates searchers where uniform loses >= 2 points)",
         ["target", "uniform plan", "uniform test %", "float test %", "float - uniform",
          ">= 2 points"], uniform),
        ("Every search", ["method", "seed", "target", "test %", "arch %", "plan KB", "used",
                          "plans scored", "seconds", "run folder"], detail),
    ]


def _precision(run) -> str:
    """The searchable layers' one precision ("W2A8"), or "mixed"."""
    searched = {str(run.plan.layers[x.name]) for x in run.space.layers() if not x.fixed}
    return searched.pop() if len(searched) == 1 else "mixed"


def report(records: list[dict], root: Path) -> Path:
    """`nas report` of every league run, into root/report: the figures and their data."""
    from nas.report.build import build
    from nas.report.collect import check_comparable, read_run
    from nas.report.costs import ReportCosts

    runs = [read_run(root / r["run"]) for r in records if not r.get("failed")]
    check_comparable(runs)
    folder = root / "report"
    folder.mkdir()
    build(runs, ReportCosts(runs[0].space, *runs[0].latency), folder)
    return folder
