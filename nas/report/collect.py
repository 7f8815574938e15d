"""Run folders of `nas search`, `ptq` and `qat` read into plain rows: each run's chosen plan
with its accuracy (named by how it was scored), and every plan it scored on the way."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nas.errors import ConfigError
from nas.runs import PARTIAL

_FIX = "give the folder of a finished nas search, ptq or qat run"
_COSTS = ("size", "bitops", "latency")


@dataclass
class Point:
    """One scored plan: a trial, a DNAS candidate, or a ptq/qat run's plan."""

    searcher: str
    name: str            # trial number, candidate name, or "plan"
    accuracy: float
    accuracy_kind: str   # "one-shot arch", "ptq test", ...
    bits: str            # "W8A8 W4A8 ..." in the space's layer order
    costs: dict[str, float] = field(default_factory=dict)  # what the run itself recorded


@dataclass
class Run:
    folder: Path
    command: str
    method: str          # the searcher, or ptq / qat
    space: Any           # SearchSpace
    plan: Any            # Plan, resolved on `space`
    accuracy: float | None
    accuracy_kind: str
    points: list[Point]
    trials: int | None
    latency: tuple[str, int]  # device spec and batch of the latency cost model

    @property
    def name(self) -> str:
        return self.folder.name


def read_run(folder: str | Path) -> Run:
    """One run folder, refused with one line if it is not a finished search, ptq or qat run."""
    from nas.plan import Plan
    from nas.spaces import SearchSpace

    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder; {_FIX}")
    if folder.name.endswith(PARTIAL):
        raise ConfigError(f"{folder} is an unfinished run ({PARTIAL}: its command stopped "
                          f"before the end); {_FIX}")
    if not (folder / "summary.json").is_file():
        raise ConfigError(f"{folder} is not a run folder (no summary.json); {_FIX}")
    summary = _load(folder / "summary.json", json.loads)
    command = summary.get("command") if isinstance(summary, dict) else None
    if command not in ("search", "ptq", "qat"):
        raise ConfigError(f"{folder} is a run of nas {command}, which scores no plan; {_FIX}")
    for name in ("plan.yaml", "config.yaml"):
        if not (folder / name).is_file():
            raise ConfigError(f"{folder} has no {name} (a search that found no plan within "
                              f"its target writes none); {_FIX}")
    config = _load(folder / "config.yaml", yaml.safe_load)
    space = SearchSpace.from_dict(config.get("space"), source=f"{folder / 'config.yaml'} space")
    plan = Plan.load(folder / "plan.yaml").resolved(space)
    bits = " ".join(str(plan.layers[x.name]) for x in space.layers())
    method = summary.get("method", command) if command == "search" else command
    accuracy, kind = _accuracy(summary, command)
    if command == "search" and method == "dnas":
        points = _candidates(folder, method)
    elif command == "search":
        points = _trials(folder, method, summary.get("evaluator", "oneshot"))
    else:
        points = [Point(method, "plan", accuracy, kind, bits)] if accuracy is not None else []
    trials = summary.get("trials", summary.get("steps")) if command == "search" else None
    return Run(folder, command, method, space, plan, accuracy, kind, points, trials,
               _latency(plan, summary))


def _accuracy(summary: dict, command: str) -> tuple[float | None, str]:
    """The accuracy a run reports for its plan, and what it is."""
    if command == "ptq":
        return summary.get("quant_accuracy"), "ptq test"
    if command == "qat":
        return summary.get("qat_accuracy"), "qat test"
    if summary.get("method") == "dnas":
        return summary.get("one_shot_test_accuracy"), "one-shot test"
    evaluator = summary.get("evaluator", "oneshot")
    return summary.get("test_accuracy"), f"{_evaluator(evaluator)} test"


def _evaluator(kind: str) -> str:
    return "one-shot" if kind == "oneshot" else kind


def _trials(folder: Path, method: str, evaluator: str) -> list[Point]:
    """trials.csv: accuracy on the arch split, and the costs the search recorded."""
    path = folder / "trials.csv"
    if not path.is_file():
        return []
    out = []
    for row in _rows(path):
        costs = {c: float(row[c]) for c in _COSTS if row.get(c) not in (None, "")}
        out.append(Point(method, row["trial"], float(row["accuracy"]),
                         f"{_evaluator(evaluator)} arch", row["plan"], costs))
    return out


def _candidates(folder: Path, method: str) -> list[Point]:
    """candidates.csv of a DNAS run: the plans it derived, scored one-shot on the arch split."""
    path = folder / "candidates.csv"
    if not path.is_file():
        return []
    out = []
    for row in _rows(path):
        if row.get("one_shot_arch_accuracy") in (None, ""):
            continue
        costs = {c: float(row[c]) for c in _COSTS if row.get(c) not in (None, "")}
        out.append(Point(method, row["candidate"], float(row["one_shot_arch_accuracy"]),
                         "one-shot arch", row["bits"], costs))
    return out


def _latency(plan, summary: dict) -> tuple[str, int]:
    """The latency cost model a run used: what its plan (a latency search) or summary (qat)
    recorded, else h200 at batch 1, as `nas cost` and `nas qat` assume."""
    device = plan.costs.get("device_spec") or summary.get("latency_device") or "h200"
    batch = plan.costs.get("latency_batch") or summary.get("latency_batch") or 1
    return str(device), int(batch)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _load(path: Path, parse) -> Any:
    try:
        return parse(path.read_text())
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path} cannot be read ({type(exc).__name__}); it is corrupt; "
                          f"{_FIX}") from None


def check_comparable(runs: list[Run]) -> None:
    """Refuse runs of different spaces or latency cost models: their costs do not compare."""
    first = runs[0]
    for run in runs[1:]:
        if (run.space.name, run.plan.layer_hash) != (first.space.name, first.plan.layer_hash):
            raise ConfigError(f"runs are from different spaces: {first.name} is "
                              f"{first.space.name} (layer_hash {first.plan.layer_hash}), "
                              f"{run.name} is {run.space.name} (layer_hash "
                              f"{run.plan.layer_hash}); report runs of one space together")
        if run.latency != first.latency:
            raise ConfigError(f"runs use different latency cost models: {first.name} is "
                              f"{first.latency[0]} batch {first.latency[1]}, {run.name} is "
                              f"{run.latency[0]} batch {run.latency[1]}; report runs of one "
                              f"device and batch together")
