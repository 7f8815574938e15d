"""Bayesian search with Optuna: TPE for accuracy alone, NSGA-II (or multi-objective TPE) when
costs are objectives too. One categorical parameter per searchable layer; fixed layers stay
at their one choice.

The cost target is a constraint that Optuna learns: each trial carries cost/target - 1
(feasible when <= 0, set with `Trial.set_constraint`), and the samplers prefer plans they
expect to meet it (c-TPE; constrained domination in NSGA-II). Costs are known before any
evaluation, so a proposal over the target is told back at once with a pessimistic score and
never returned for evaluation; nor is a plan evaluated (or in flight) before. After MAX_ASKS
such proposals in a row, the last one over the target is repaired down to it by the base
class's rule (`DiscreteSearcher.repair`).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from nas.errors import ConfigError
from nas.search.base import DiscreteSearcher, SearchProblem, Told

SAMPLERS = ("auto", "tpe", "nsga2")


@contextlib.contextmanager
def _quiet():
    """Optuna without its chatter: INFO lines per trial, experimental-feature warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


@dataclass(frozen=True)
class _Outcome:
    """What Optuna is told of one plan."""

    values: tuple[float, ...] | None  # None: the evaluation failed
    constraint: float | None          # cost/target - 1; None without a target

    @property
    def state(self) -> TrialState:
        return TrialState.FAIL if self.values is None else TrialState.COMPLETE


class BayesSearcher(DiscreteSearcher):
    """Optuna's ask / tell over choice indices, the cost target as a learned constraint."""

    OPTIONS = {"sampler": "auto"}
    MAX_ASKS = 200  # proposals in a row over the target (or seen before) before repairing

    def __init__(self, problem: SearchProblem, options: dict[str, Any] | None = None):
        super().__init__(problem, options)
        sampler = self.options["sampler"]
        if sampler not in SAMPLERS:
            raise ConfigError(f"bayes option sampler={sampler!r} is unknown; choose one of "
                              f"{', '.join(SAMPLERS)}")
        if sampler == "auto":
            sampler = "nsga2" if problem.multi_objective else "tpe"
        self.sampler_name = sampler
        optuna.logging.set_verbosity(optuna.logging.WARNING)

        layers = problem.space.layers()
        # (position in the indices, parameter name, choice strings) of each searchable layer
        self.params = [(i, x.name, tuple(str(c) for c in x.choices))
                       for i, x in enumerate(layers) if len(x.choices) > 1]
        self.width = len(layers)
        self.distributions = {name: CategoricalDistribution(choices)
                              for _, name, choices in self.params}
        self.directions = ["maximize" if o == "accuracy" else "minimize"
                           for o in problem.objectives]

        with _quiet():
            if sampler == "tpe":
                optuna_sampler = optuna.samplers.TPESampler(seed=problem.seed)
            else:
                optuna_sampler = optuna.samplers.NSGAIISampler(seed=problem.seed)
            self.study = optuna.create_study(directions=self.directions, sampler=optuna_sampler)

        self.pending: dict[tuple[int, ...], list[optuna.Trial]] = {}  # returned, not yet told
        self.known: dict[tuple[int, ...], _Outcome] = {}              # told (or over target)
        self.infeasible_asks = 0  # proposals over the target, told back unevaluated
        self.repeat_asks = 0      # proposals of a plan told or in flight before
        self.repairs = 0          # plans from the fallback rule

    # ------------------------------------------------------------------ ask / tell

    def ask(self) -> list[int] | None:
        over: list[list[int]] = []  # this call's proposals over the target, latest last
        with _quiet():
            for _ in range(self.MAX_ASKS):
                trial = self.study.ask(self.distributions)
                indices = self._indices(trial.params)
                key = tuple(indices)
                if key in self.known:
                    self.repeat_asks += 1
                    self._finish(trial, self.known[key])
                    continue
                if key in self.pending:
                    self.repeat_asks += 1
                    self.pending[key].append(trial)  # told with the first one's result
                    continue
                if not self.problem.feasible(indices):
                    self.infeasible_asks += 1
                    outcome = self._outcome(indices, self.problem.costs(indices), None)
                    self.known[key] = outcome
                    self._finish(trial, outcome)
                    over.append(indices)
                    continue
                self.pending[key] = [trial]
                return indices
        # Optuna keeps proposing what it may not: repair its latest plans over the target.
        for indices in reversed(over):
            plan = self.repair(indices)
            if tuple(plan) not in self.known and tuple(plan) not in self.pending:
                self.repairs += 1
                self.pending[tuple(plan)] = []  # no Optuna trial: added as one when told
                return plan
        return None

    def tell(self, told: Told) -> None:
        key = tuple(told.indices)
        costs = told.costs or self.problem.costs(told.indices)
        if not told.feasible:  # over the target: scored 0 unless it was evaluated anyway
            outcome = self._outcome(told.indices, costs, told.metrics.get("accuracy"),
                                    infeasible=True)
        elif "accuracy" in told.metrics:
            outcome = self._outcome(told.indices, costs, float(told.metrics["accuracy"]))
        else:
            outcome = _Outcome(None, self._constraint(told.indices, costs))  # evaluation failed
        trials = self.pending.pop(key, None)
        with _quiet():
            if trials is None:
                if key in self.known:
                    return  # told before (a replayed history may hold a plan twice)
                self.known[key] = outcome
                self._add(told.indices, outcome)
                return
            self.known[key] = outcome
            if not trials:  # a repaired plan: Optuna never proposed it
                self._add(told.indices, outcome)
            for trial in trials:
                self._finish(trial, outcome)

    # ------------------------------------------------------------------ helpers

    def _indices(self, params: dict[str, str]) -> list[int]:
        indices = [0] * self.width
        for position, name, choices in self.params:
            indices[position] = choices.index(params[name])
        return indices

    def _params(self, indices: list[int]) -> dict[str, str]:
        return {name: choices[indices[position]] for position, name, choices in self.params}

    def _constraint(self, indices: list[int], costs: dict[str, float]) -> float | None:
        target = self.problem.target
        if target is None:
            return None
        cost = costs.get(self.problem.cost, self.problem.table.index_cost(indices))
        value = cost / target.value - 1.0
        # problem.feasible allows a rounding tolerance; the sampler must agree with it.
        return min(value, 0.0) if self.problem.feasible(indices) else max(value, 1e-12)

    def _outcome(self, indices: list[int], costs: dict[str, float], accuracy: float | None,
                 infeasible: bool = False) -> _Outcome:
        """Values in the study's objective order; a plan over the target scores accuracy 0."""
        constraint = self._constraint(indices, costs)
        if infeasible and constraint is not None:
            constraint = max(constraint, 1e-12)  # told over the target: never feasible
        values = []
        for name in self.problem.objectives:
            if name == "accuracy":
                values.append(0.0 if accuracy is None else float(accuracy))
            else:
                values.append(float(costs[name]) if name in costs
                              else self.problem.tables[name].index_cost(indices))
        return _Outcome(tuple(values), constraint)

    def _finish(self, trial: optuna.Trial, outcome: _Outcome) -> None:
        if outcome.constraint is not None:
            trial.set_constraint(self.problem.cost, outcome.constraint)
        self.study.tell(trial, outcome.values, state=outcome.state)

    def _add(self, indices: list[int], outcome: _Outcome) -> None:
        constraints = (None if outcome.constraint is None
                       else {self.problem.cost: outcome.constraint})
        self.study.add_trial(optuna.trial.create_trial(
            state=outcome.state, values=outcome.values, params=self._params(indices),
            distributions=self.distributions, constraints=constraints))
