"""`nas bench estimate`: how well the latency estimates stand in for measurements.

For every search space with measured tables of the device, the estimates are made as if that
space had never been measured (the calibration fitted to the other spaces' tables only), then
compared with its tables, per batch:
- per entry: the median of |estimate - measured| / measured;
- per layer: Kendall's tau between the estimates and the measurements of a layer's integer
  choices (the ranking a searcher acts on), averaged over the layer geometries with three or
  more integer choices;
- per plan: MAPE and Kendall's tau of the plans' sums over random plans of the space, of
  both mixes (`nas.spaces.random_plans`: uniform, as `nas measure --validate` draws them, and
  mixed, as `--validate-mixed` does).
A tau is left out ("-") where the estimates all tie: the bare roofline at batch 1 is often the
launch overhead alone for every choice, and then ranks nothing.
Both estimates are shown: the bare roofline and the calibrated one. No GPU is needed: the
measurements are the committed tables.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Callable

from nas.cost.calibration import Calibration
from nas.cost.device_spec import COST_MODELS_DIR, DeviceSpec
from nas.cost.roofline import roofline_us
from nas.cost.tables import LatencyTable, distinct_choices, table_key
from nas.spaces import FLOAT_BITS, PLAN_MIXES, list_spaces, load_space, random_plans
from nas.stats import kendall_tau

MIN_CHOICES = 3


def table_spaces(spec: DeviceSpec, folder: Path = COST_MODELS_DIR,
                 say: Callable[[str], None] = print) -> list[tuple[Any, int, Path]]:
    """(space, batch, file) of each of the device's tables that holds every (layer, choice)
    of a built-in space at its batch."""
    files = []
    for path in sorted(folder.glob("*.json")):
        raw = LatencyTable.read_document(path)
        if raw["provenance"].get("device_spec") == spec.name:
            files.append((path, {e["key"] for e in raw["entries"]},
                          int(raw["provenance"].get("batch", 0))))
    found = []
    for name in list_spaces():
        space = load_space(name)
        for path, keys, batch in files:
            if batch > 0 and all(table_key(layer.info, batch, c.w_bits, c.a_bits) in keys
                                 for layer in space.layers() for c in layer.choices):
                found.append((space, batch, path))
                say(f"{path.name}: {name}, batch {batch}")
    return found


def _layer_tau(space, batch: int, measured: dict[str, float], estimate) -> float | None:
    """Mean Kendall tau of estimate against measured over the layers' integer choices (one
    layer per geometry; None where no geometry has MIN_CHOICES of them)."""
    taus, seen = [], set()
    for layer in space.layers():
        choices = [c for c in layer.choices
                   if c.w_bits not in FLOAT_BITS and c.a_bits not in FLOAT_BITS]
        geometry = table_key(layer.info, batch, 8, 8)
        if len(choices) < MIN_CHOICES or geometry in seen:
            continue
        seen.add(geometry)
        keys = [table_key(layer.info, batch, c.w_bits, c.a_bits) for c in choices]
        tau = _number(kendall_tau([estimate(layer.info, c) for c in choices],
                                  [measured[k] for k in keys]))
        if tau is not None:
            taus.append(tau)
    return statistics.fmean(taus) if taus else None


def _scores(space, batch: int, measured: dict[str, float], estimate,
            plans: dict[str, list]) -> dict[str, Any]:
    errors = [abs(estimate(info, c) - measured[key]) / measured[key]
              for key, info, c in distinct_choices(space, batch)]
    scores = {"entry_median_error": statistics.median(errors),
              "layer_choice_tau": _layer_tau(space, batch, measured, estimate)}
    for mix, drawn in plans.items():
        est = [sum(estimate(layer.info, c) for layer, c in plan) for plan in drawn]
        real = [sum(measured[table_key(layer.info, batch, c.w_bits, c.a_bits)]
                    for layer, c in plan) for plan in drawn]
        prefix = "" if mix == "uniform" else f"{mix}_"
        scores[f"{prefix}plan_mape"] = statistics.fmean(abs(e - r) / r for e, r in zip(est, real))
        scores[f"{prefix}plan_tau"] = _number(kendall_tau(est, real))
    return scores


def _number(tau: float) -> float | None:
    """None for nan: estimates that all tie rank nothing."""
    return None if tau != tau else tau


def run_bench(spec: DeviceSpec, tables: list[tuple[Any, int, Path]], n_plans: int, seed: int,
              say: Callable[[str], None] = print) -> dict[str, Any]:
    """Scores per table of `tables` (`table_spaces`)."""
    rows = []
    for space, batch, path in tables:
        others = [p for s, _, p in tables if s.name != space.name]
        calibration = Calibration.fit(LatencyTable.load_files(spec.name, others), spec)
        measured = LatencyTable.load_files(spec.name, [path]).entries
        layers = space.layers()
        plans = {mix: [[(layer, plan[layer.name]) for layer in layers]
                       for plan in random_plans(space, n_plans, seed, mix)]
                 for mix in PLAN_MIXES}

        def roofline(info, c):
            return roofline_us(info, c.w_bits, c.a_bits, batch, spec)

        def calibrated(info, c):
            us = calibration and calibration.estimate_us(info, c.w_bits, c.a_bits, batch, spec)
            return us if us is not None else roofline(info, c)

        row = {"space": space.name, "batch": batch, "table": path.name,
               "entries": len(distinct_choices(space, batch)),
               "calibrated_on": calibration.describe() if calibration else None,
               "roofline": _scores(space, batch, measured, roofline, plans),
               "calibrated": _scores(space, batch, measured, calibrated, plans)}
        say(f"{space.name} batch {batch}: plan tau {_fmt(row['roofline']['plan_tau'])} "
            f"(roofline) -> {_fmt(row['calibrated']['plan_tau'])} (calibrated on the other "
            f"spaces)")
        rows.append(row)
    return {"device_spec": spec.name, "plans": n_plans, "seed": seed, "rows": rows,
            "method": "each space's estimates calibrated on the other spaces' tables only "
                      "(held out), compared with its own tables"}


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x * 100:.1f} %" if pct else f"{x:.3f}"


def tables(results: dict[str, Any]) -> list[tuple[str, list[str], list[list]]]:
    rows = []
    for r in results["rows"]:
        for kind in ("roofline", "calibrated"):
            s = r[kind]
            rows.append([r["space"], r["batch"], kind, _fmt(s["entry_median_error"], True),
                         _fmt(s["layer_choice_tau"]), _fmt(s["plan_mape"], True),
                         _fmt(s["plan_tau"]), _fmt(s["mixed_plan_mape"], True),
                         _fmt(s["mixed_plan_tau"])])
    return [(f"latency estimates against the {results['device_spec']} tables, each space held "
             f"out of the calibration ({results['plans']} random plans of each mix per table)",
             ["space", "batch", "estimate", "entry median error", "layer choice tau",
              "plan MAPE", "plan tau", "mixed plan MAPE", "mixed plan tau"], rows)]
