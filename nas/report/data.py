"""The rows behind every figure of a report, one list of plain dicts per figure (what its
CSV holds)."""

from __future__ import annotations


from nas.report.collect import Point, Run
from nas.report.costs import ReportCosts

# What each cost's column is called, in the unit the cost models give.
COLUMNS = {"size": "size_bytes", "bitops": "bitops", "latency": "latency_us"}


def tradeoff_rows(runs: list[Run], costs: ReportCosts, cost: str) -> list[dict]:
    """Accuracy against one cost: every scored plan (on its run's Pareto front or not), then
    the space's uniform plans (run empty, cost only: no run scored them)."""
    column = COLUMNS[cost]
    rows = []
    for run in runs:
        front = _front_names(run.points, costs, cost)
        for p in run.points:
            plan = costs.plan(p.bits)
            row = {"run": run.name, "searcher": p.searcher, "point": p.name,
                   "accuracy_kind": p.accuracy_kind, "accuracy": p.accuracy,
                   column: _cost(p, plan, costs, cost), "pareto": p.name in front}
            if cost == "latency":
                row["latency"] = "estimated" if costs.latency_estimated(plan) else "measured"
            rows.append({**row, "plan": p.bits})
    for label, plan in costs.uniform_plans():
        row = {"run": "", "searcher": "", "point": label, "accuracy_kind": "not scored",
               "accuracy": "", column: costs.of(plan)[cost], "pareto": ""}
        if cost == "latency":
            row["latency"] = "estimated" if costs.latency_estimated(plan) else "measured"
        rows.append({**row, "plan": " ".join(str(p) for p in plan.layers.values())})
    return rows


def _cost(point: Point, plan, costs: ReportCosts, cost: str) -> float:
    """The cost the run recorded for the plan, else the cost model's."""
    return point.costs[cost] if cost in point.costs else costs.of(plan)[cost]


def _front_names(points: list[Point], costs: ReportCosts, cost: str) -> set[str]:
    """The points of one run on its accuracy-cost Pareto front, by the searches' own rule
    (nas.search.results.pareto_front), every point counted as within the target."""
    from nas.search.results import Trial, pareto_front

    trials = [Trial(i, [p.name], p.accuracy, {cost: _cost(p, costs.plan(p.bits), costs, cost)},
                    True) for i, p in enumerate(points)]
    return {t.indices[0] for t in pareto_front(trials, [cost])}


def layer_rows(run: Run, costs: ReportCosts) -> list[dict]:
    """A run's plan layer by layer: its bits and its share of the plan's size."""
    sizes = costs.layer_sizes(run.plan)
    total = sum(sizes.values())
    return [{"layer": name, "w_bits": p.w_bits, "a_bits": p.a_bits, "size_bytes": sizes[name],
             "size_share_percent": 100 * sizes[name] / total}
            for name, p in run.plan.layers.items()]


def summary_rows(runs: list[Run], costs: ReportCosts) -> list[dict]:
    """Per run: method, its plan's costs, its accuracy and what that accuracy is."""
    rows = []
    for run in runs:
        c = costs.of(run.plan)
        rows.append({"run": run.name, "method": run.method, "size_bytes": c["size"],
                     "bitops": c["bitops"], "latency_us": c["latency"],
                     "latency": ("estimated" if costs.latency_estimated(run.plan)
                                 else "measured"),
                     "accuracy": "" if run.accuracy is None else run.accuracy,
                     "accuracy_kind": run.accuracy_kind,
                     "trials": "" if run.trials is None else run.trials})
    return rows
