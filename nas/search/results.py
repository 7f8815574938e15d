"""The one writer of a search's outputs: trials.csv, pareto.csv, plan.yaml.

trials.csv gains a row as each trial completes, flushed to disk at once, so that a search
killed outright keeps every finished trial and `--resume` replays them into the searcher.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from nas.search.base import SearchProblem
from nas.search.encoding import PlanEncoding

TRIALS = "trials.csv"
PARETO = "pareto.csv"


@dataclass
class Trial:
    number: int
    indices: list[int]
    accuracy: float
    costs: dict[str, float]
    meets_target: bool
    seconds: float = math.nan        # the trial's wall time in the driver's view, Ray included
    eval_seconds: float = math.nan   # the evaluation alone, in the worker
    node: str = ""
    elapsed: float = math.nan        # since the search started (resumed: the first run's start)


def pareto_front(trials: Sequence[Trial], costs: Sequence[str]) -> list[Trial]:
    """The trials that no other beats on accuracy and on every one of `costs` at once, one
    per plan, cheapest in costs[0] first."""

    def dominates(a: Trial, b: Trial) -> bool:
        no_worse = a.accuracy >= b.accuracy and all(a.costs[c] <= b.costs[c] for c in costs)
        better = a.accuracy > b.accuracy or any(a.costs[c] < b.costs[c] for c in costs)
        return no_worse and better

    front = [t for t in trials if not any(dominates(o, t) for o in trials)]
    unique = {tuple(t.indices): t for t in front}
    return sorted(unique.values(), key=lambda t: (t.costs[costs[0]], -t.accuracy))


class SearchResults:
    """Trials of one search, on disk as they complete."""

    def __init__(self, folder: Path, problem: SearchProblem, encoding: PlanEncoding):
        self.folder, self.problem, self.encoding = folder, problem, encoding
        self.trials: list[Trial] = []
        self.columns = (["trial", "accuracy", *problem.tables, "meets_target", "seconds",
                         "eval_seconds", "node", "elapsed", "plan"])

    # ------------------------------------------------------------ trials.csv

    def add(self, trial: Trial) -> None:
        from nas.runs import append_csv_row

        append_csv_row(self.folder / TRIALS, self.columns, self._row(trial))
        self.trials.append(trial)

    def _row(self, t: Trial) -> list[Any]:
        return [t.number, _round(t.accuracy, 4), *(_round(t.costs[k], 3) for k in self.problem.tables),
                t.meets_target, _round(t.seconds, 3), _round(t.eval_seconds, 3), t.node,
                _round(t.elapsed, 2), self.encoding.bits(t.indices)]

    def load(self, path: Path) -> list[Trial]:
        """The trials an earlier run of this search wrote (`--resume`), costed anew on this
        problem's tables; they are written to this folder's trials.csv too."""
        from nas.errors import ConfigError

        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        out = []
        for row in rows:
            try:
                bits = row["plan"].split()
                indices = [next(i for i, c in enumerate(x.choices) if str(c) == b)
                           for x, b in zip(self.encoding.layers, bits, strict=True)]
                number, accuracy = int(row["trial"]), float(row["accuracy"])
            except (KeyError, ValueError, StopIteration, TypeError) as exc:
                raise ConfigError(f"{path}: row {len(out) + 2} is not a trial of space "
                                  f"{self.problem.space.name} ({exc.__class__.__name__}); "
                                  f"resume a run of this search") from None
            costs = self.problem.costs(indices)
            out.append(Trial(number, indices, accuracy, costs, self.problem.feasible(indices),
                             _float(row.get("seconds")), _float(row.get("eval_seconds")),
                             row.get("node", ""), _float(row.get("elapsed"))))
        for t in out:
            self.add(t)
        return out

    # ------------------------------------------------------------ the answer

    def best(self) -> Trial | None:
        """The most accurate trial within the target (ties: the cheaper)."""
        ok = [t for t in self.trials if t.meets_target]
        return max(ok, key=lambda t: (t.accuracy, -t.costs[self.problem.cost]), default=None)

    def pareto(self) -> list[Trial]:
        """Trials within the target that no other beats on accuracy and every objective cost
        at once, cheapest first."""
        costs = [o for o in self.problem.objectives if o != "accuracy"] or [self.problem.cost]
        return pareto_front([t for t in self.trials if t.meets_target], costs)

    def write_pareto(self) -> list[Trial]:
        from nas.runs import atomic_write_text

        front = self.pareto()
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(self.columns)
        writer.writerows(self._row(t) for t in front)
        atomic_write_text(self.folder / PARETO, buf.getvalue())
        return front


def plan_costs(problem: SearchProblem, indices: Sequence[int], scores: dict[str, float],
               latency: dict | None, estimate: str | None) -> dict[str, Any]:
    """A plan's `costs:` as every searcher writes it: the searched cost with its unit and
    target, size always, then the accuracies it scored (named by how)."""
    table = problem.table
    costs: dict[str, Any] = {problem.cost: table.index_cost(indices), "unit": table.unit,
                             "target": problem.target.value if problem.target else None,
                             "estimated": table.any_estimated}
    if latency:
        costs.update({"latency_batch": latency["batch"], "device_spec": latency["device_spec"]})
        if table.any_estimated and estimate:
            costs["estimate"] = estimate
    for name, t in problem.tables.items():
        costs.setdefault(name, t.index_cost(indices))
    costs.update(scores)
    return costs


def _round(value: float, digits: int):
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else round(value, digits)


def _float(text: str | None) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan
