"""What every searcher shares: the problem it solves, its budget, and the registry.

A discrete searcher is plain ask / tell over choice indices (one per space layer, as
`nas.search.encoding` maps them to plans): it knows nothing of Ray, which `nas.search.tune`
adds around it. The registry maps each `--method` to "module:Class", imported only when
chosen, so that `nas --help` loads no torch, ray or optuna.
"""

from __future__ import annotations

import importlib
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas.budget import ACCEPTED as TIME_ACCEPTED, Budget, parse_budget, recognised, shown_budget
from nas.errors import BudgetError, ConfigError

if TYPE_CHECKING:
    from nas.cost.base import CostTable
    from nas.cost.targets import Target
    from nas.spaces import SearchSpace

# --method -> (module:Class, one line of help). DNAS trains a supernet; the others are
# discrete searchers driven through Ray Tune.
SEARCHERS = {
    "dnas": ("nas.search.run_dnas:DnasSearch", "differentiable supernet search (Gumbel-softmax)"),
    "bayes": ("nas.search.bayes:BayesSearcher", "Optuna (TPE; NSGA-II for several objectives)"),
    "random": ("nas.search.random:RandomSearcher", "random plans within the target"),
    "uniform": ("nas.search.uniform:UniformSearcher", "every uniform plan within the target"),
    "rl": ("nas.search.rl:RLSearcher", "HAQ's DDPG agent, layer by layer, within the target"),
}
DISCRETE = ("bayes", "random", "uniform", "rl")
OBJECTIVE_COSTS = ("size", "bitops", "latency")
TRIALS_ACCEPTED = "'200trials' (trials) or " + TIME_ACCEPTED.replace(" or '3ep' / '3 epochs' (epochs)", "")
_TRIALS = re.compile(r"^\s*(\d+)\s*(?:trials?)\s*$")
MAX_TRIALS = 1_000_000  # beyond, a typo: no search evaluates a million plans


def searcher_class(method: str):
    """The class behind `--method`, imported now."""
    if method not in SEARCHERS:
        raise ConfigError(f"--method {method!r} is unknown; choose one of {', '.join(SEARCHERS)}")
    module, _, name = SEARCHERS[method][0].partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class SearchBudget:
    """A discrete search's limit: a number of evaluated trials, or seconds of wall time."""

    kind: str  # "trials" | "seconds"
    value: float

    def __str__(self) -> str:
        if self.kind == "trials":
            return f"{int(self.value)} trials"
        return f"{self.value:f}".rstrip("0").rstrip(".") + "s"  # read back by parse_budget


def parse_search_budget(text: str) -> SearchBudget:
    """'200trials', '1 trial', or a time ('5m'); epochs are the supernet's unit, not a
    discrete search's."""
    match = _TRIALS.match(str(text).lower())
    if match:
        count = int(match.group(1))
        if count < 1:
            raise BudgetError(f"budget {text!r}: a search needs at least 1 trial; use "
                              f"{TRIALS_ACCEPTED}")
        if count > MAX_TRIALS:
            raise BudgetError(f"budget {shown_budget(text)} is too large; give at most "
                              f"{MAX_TRIALS} trials")
        return SearchBudget("trials", count)
    if not recognised(text):
        raise BudgetError(f"budget {text!r} is not understood; use {TRIALS_ACCEPTED}")
    budget = parse_budget(text)
    if budget.kind != "seconds":
        raise BudgetError(f"budget {text!r}: epochs measure supernet training (--method dnas); "
                          f"a discrete search takes {TRIALS_ACCEPTED}")
    return SearchBudget("seconds", budget.value)


def as_time_budget(budget: SearchBudget) -> Budget:
    return Budget("seconds", budget.value)


@dataclass
class SearchProblem:
    """One search: the space, what each (layer, choice) costs, the target, the budget.

    `tables` holds a cost table for each cost an objective or the target names, and size,
    always; `cost` names the one the target constrains. Choice indices follow the space's
    layers and each layer's choices, as every table does.
    """

    space: "SearchSpace"
    tables: dict[str, "CostTable"]
    cost: str
    target: "Target | None"
    budget: SearchBudget
    seed: int = 0
    objectives: tuple[str, ...] = ("accuracy",)

    @property
    def table(self) -> "CostTable":
        return self.tables[self.cost]

    @property
    def choices(self) -> list[int]:
        """How many choices each layer has (fixed layers: 1)."""
        return [len(c) for c in self.table.choices]

    def costs(self, indices: list[int]) -> dict[str, float]:
        return {name: t.index_cost(indices) for name, t in self.tables.items()}

    def feasible(self, indices: list[int]) -> bool:
        return self.target is None or self.table.index_cost(indices) <= self.target.value * (1 + 1e-9)

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1


@dataclass
class Told:
    """What a searcher learns of one plan: its metrics and costs, or that it is over the
    target and was not evaluated (`metrics` then empty)."""

    indices: list[int]
    costs: dict[str, float]
    metrics: dict[str, float] = field(default_factory=dict)
    feasible: bool = True


class DiscreteSearcher(ABC):
    """Proposes plans as choice indices and learns from what they scored.

    `ask` returns the next plan, or None when the searcher has nothing left to propose. Plans
    over the target are told back unevaluated (`Told.feasible` False), so that a searcher
    that models the constraint learns it; `tell` also takes the history of a resumed search
    before any `ask`. Subclasses take (problem, options: dict) and say which options they
    accept in `OPTIONS`.
    """

    OPTIONS: dict[str, Any] = {}

    def __init__(self, problem: SearchProblem, options: dict[str, Any] | None = None):
        self.problem = problem
        self.options = {**self.OPTIONS, **(options or {})}

    @abstractmethod
    def ask(self) -> list[int] | None:
        """The next plan to evaluate."""

    def tell(self, told: Told) -> None:
        """Learn from one evaluated (or infeasible) plan; the default learns nothing."""

    def use_folder(self, folder: Path) -> None:
        """The run folder, once it exists and before a resumed history is told: where a
        searcher writes files of its own; the default writes none."""

    def repair(self, indices: list[int]) -> list[int]:
        """A plan within the target from one over it, by a rule that needs no search state:
        lower, one layer at a time, the choice whose step down saves the most cost."""
        from nas.search.derive import repair_by_cost

        return repair_by_cost(indices, self.problem.table, self.problem.target)
