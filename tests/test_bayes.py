"""BayesSearcher (Optuna TPE / NSGA-II over choice indices) on the synthetic space, scored by a
cheap synthetic objective: no Ray, no training."""

import itertools
import warnings

import optuna
import pytest
from optuna.trial import TrialState

from nas.cost import make_cost_model
from nas.cost.targets import Target
from nas.errors import ConfigError
from nas.search.base import SearchBudget, SearchProblem, Told
from nas.search.bayes import BayesSearcher
from nas.search.random import RandomSearcher
from nas.spaces import SearchSpace
from tests.conftest import SYNTHETIC_SPACE


@pytest.fixture(scope="module")
def table(synthetic_space):
    return make_cost_model("size").table(synthetic_space)


def target_at(table, fraction: float) -> Target:
    """A size target `fraction` of the way from the cheapest plan to the dearest. At 0.3 about
    32% of uniformly drawn plans of the synthetic space meet it."""
    low = sum(min(row) for row in table.values)
    high = sum(max(row) for row in table.values)
    value = low + fraction * (high - low)
    return Target("size", value, f"size={value:.0f}B")


def make_problem(space, table, fraction=0.3, seed=0, objectives=("accuracy",), trials=30):
    target = None if fraction is None else target_at(table, fraction)
    return SearchProblem(space, {"size": table}, "size", target, SearchBudget("trials", trials),
                         seed=seed, objectives=objectives)


def score(problem, indices) -> float:
    """Synthetic accuracy: more bits score higher, weights more than activations, and early
    layers (cheap in size) matter more than late ones (dear), so that the best plan within a
    target is not simply the dearest one; activation bits cost no size."""
    total = 0.0
    for position, (layer, i) in enumerate(zip(problem.space.layers(), indices)):
        choice = layer.choices[i]
        total += (choice.w_bits + 0.5 * choice.a_bits) / (1 + position)
    return total


def drive(searcher, asks: int) -> list[list[int]]:
    """Ask, score and tell `asks` times; the plans asked, in order."""
    problem, plans = searcher.problem, []
    for _ in range(asks):
        indices = searcher.ask()
        if indices is None:
            break
        plans.append(indices)
        searcher.tell(Told(indices, problem.costs(indices), {"accuracy": score(problem, indices)}))
    return plans


def best_score(searcher, asks: int) -> float:
    return max(score(searcher.problem, p) for p in drive(searcher, asks))


def test_asks_are_within_target_and_never_repeat(synthetic_space, table):
    problem = make_problem(synthetic_space, table)
    searcher = BayesSearcher(problem)
    plans = drive(searcher, 30)
    assert len(plans) == 30
    assert all(problem.feasible(p) for p in plans)
    assert len({tuple(p) for p in plans}) == 30
    fixed = [i for i, x in enumerate(synthetic_space.layers()) if x.fixed]
    assert fixed and all(p[i] == 0 for p in plans for i in fixed)
    # One Optuna parameter per searchable layer, named after it, over its choice strings.
    assert set(searcher.distributions) == {x.name for x in synthetic_space.layers() if not x.fixed}
    assert searcher.distributions["layer1.0.conv1"].choices[3] == "W4A8"
    # Over-target proposals are in the study (constraint > 0), never in the plans asked.
    study = searcher.study
    over = [t for t in study.trials if t.constraints["size"] > 0]
    assert len(over) == searcher.infeasible_asks > 0
    assert len(study.trials) == 30 + searcher.infeasible_asks + searcher.repeat_asks
    assert all(t.values == [0.0] for t in over)
    for t in study.trials:
        indices = searcher._indices(t.params)
        expected = table.index_cost(indices) / problem.target.value - 1
        assert t.constraints["size"] == pytest.approx(expected) or (
            problem.feasible(indices) and t.constraints["size"] <= 0)
    assert isinstance(study.sampler, optuna.samplers.TPESampler)


def test_same_seed_same_asks_other_seed_other_asks(synthetic_space, table):
    first = drive(BayesSearcher(make_problem(synthetic_space, table, seed=3)), 30)
    again = drive(BayesSearcher(make_problem(synthetic_space, table, seed=3)), 30)
    other = drive(BayesSearcher(make_problem(synthetic_space, table, seed=4)), 30)
    assert first == again
    assert first != other


def test_beats_random_search_at_equal_budget(synthetic_space, table):
    # Mean over 10 seeds of the best synthetic score after 50 asks. Measured over seeds 0-99:
    # bayes beats random by 1.39 per seed on average (sd 0.91), so a 10-seed mean sits at
    # 1.39 +- 0.29; random's best is ~30.5 and the optimum within the target 33.5, so bayes
    # closes ~45% of that gap. A margin of 0.5 is three standard deviations below the
    # expected lead; every disjoint 10-seed group in 0-99 led by >= 0.96. (At 30 asks the
    # lead is 0.80 +- 0.97 per seed: a 3-seed mean would be too noisy to assert.)
    seeds, asks = range(10), 50
    bayes = [best_score(BayesSearcher(make_problem(synthetic_space, table, seed=s)), asks)
             for s in seeds]
    rand = [best_score(RandomSearcher(make_problem(synthetic_space, table, seed=s)), asks)
            for s in seeds]
    assert sum(bayes) / len(bayes) > sum(rand) / len(rand) + 0.5


def test_learns_the_constraint(synthetic_space, table):
    # Proposals over the target (told back unevaluated, constraint > 0 and accuracy 0) become
    # rarer as the study learns: over 3 seeds, their share among all proposals of the second
    # 15 asks is below the first 15's (seeds 0-2: 53% -> 38%; uniform draws: 68%). Per seed it
    # drops in ~85% of seeds 0-39; summed over 3 seeds the drop is robust.
    halves = [[0, 0], [0, 0]]  # [over target, proposals] per half
    for seed in range(3):
        searcher = BayesSearcher(make_problem(synthetic_space, table, seed=seed))
        for n in range(30):
            before = searcher.infeasible_asks
            plan = drive(searcher, 1)
            over = searcher.infeasible_asks - before
            halves[n >= 15][0] += over
            halves[n >= 15][1] += over + len(plan)
    first, second = (over / total for over, total in halves)
    assert second < first


def test_resume_replays_history(synthetic_space, table):
    problem = make_problem(synthetic_space, table)
    history = drive(RandomSearcher(problem), 8)
    over = [5] * len(synthetic_space.layers())  # every searchable layer at W8A4: over the target
    over[0] = over[-1] = 0
    assert not problem.feasible(over)
    failed = next(p for p in drive(RandomSearcher(make_problem(synthetic_space, table, seed=9)), 20)
                  if p not in history)
    searcher = BayesSearcher(problem)
    for p in history:
        searcher.tell(Told(p, problem.costs(p), {"accuracy": score(problem, p)}))
    searcher.tell(Told(over, problem.costs(over), feasible=False))  # no metrics: over target
    searcher.tell(Told(failed, problem.costs(failed)))  # evaluated, but no accuracy: failed
    searcher.tell(Told(history[0], problem.costs(history[0]), {"accuracy": 1.0}))  # again: ignored

    trials = searcher.study.trials
    assert len(trials) == 10
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert [searcher._indices(t.params) for t in done[:8]] == history
    assert [t.values[0] for t in done[:8]] == [pytest.approx(score(problem, p)) for p in history]
    assert all(t.constraints["size"] <= 0 for t in done[:8])
    assert searcher._indices(done[8].params) == over and done[8].values == [0.0]
    assert done[8].constraints["size"] == pytest.approx(
        table.index_cost(over) / problem.target.value - 1) and done[8].constraints["size"] > 0
    (fail,) = [t for t in trials if t.state == TrialState.FAIL]
    assert searcher._indices(fail.params) == failed

    # A resumed run's row over the target keeps its accuracy, and is infeasible to Optuna.
    other = BayesSearcher(problem)
    other.tell(Told(over, problem.costs(over), {"accuracy": 0.7}, feasible=False))
    (row,) = other.study.trials
    assert row.values == [0.7] and row.constraints["size"] > 0

    plans = drive(searcher, 30)
    told = {tuple(p) for p in history} | {tuple(over), tuple(failed)}
    assert len(plans) == 30 and not told & {tuple(p) for p in plans}
    assert len({tuple(p) for p in plans}) == 30


def test_parallel_asks_stay_pending(synthetic_space, table):
    problem = make_problem(synthetic_space, table)
    searcher = BayesSearcher(problem)
    drive(searcher, 12)  # past TPE's random start-up trials
    plans = [searcher.ask() for _ in range(4)]
    assert len({tuple(p) for p in plans}) == 4 and all(problem.feasible(p) for p in plans)
    running = [t for t in searcher.study.trials if t.state == TrialState.RUNNING]
    assert sorted(searcher._indices(t.params) for t in running) == sorted(plans)
    for p in reversed(plans):
        searcher.tell(Told(p, problem.costs(p), {"accuracy": score(problem, p)}))
    assert all(t.state == TrialState.COMPLETE for t in searcher.study.trials)
    assert not searcher.pending


def test_small_space_every_feasible_plan_once_then_none():
    small = SearchSpace.from_dict({**SYNTHETIC_SPACE, "choices": ["W2A8", "W8A8"],
                                   "fixed": {**SYNTHETIC_SPACE["fixed"],
                                             "layer3.*": {"w_bits": 4, "a_bits": 4}}})
    table = make_cost_model("size").table(small)
    problem = make_problem(small, table, fraction=0.4)
    everything = itertools.product(*(range(len(x.choices)) for x in small.layers()))
    feasible = {p for p in everything if problem.feasible(list(p))}
    assert 5 < len(feasible) < 32
    searcher = BayesSearcher(problem)
    plans = drive(searcher, 100)
    assert len(plans) == len(feasible) and {tuple(p) for p in plans} == feasible
    assert searcher.ask() is None and searcher.repeat_asks > 0


def test_fallback_repairs_when_optuna_keeps_proposing_over_target(synthetic_space, table):
    problem = make_problem(synthetic_space, table, fraction=0.02)
    searcher = BayesSearcher(problem)
    searcher.MAX_ASKS = 1
    plans = []
    while searcher.repairs == 0 and len(plans) < 20:
        plans += drive(searcher, 1)
    assert searcher.repairs == 1
    repaired = plans[-1]
    assert problem.feasible(repaired) and len({tuple(p) for p in plans}) == len(plans)
    # Optuna never proposed it: telling it adds a completed trial with its values.
    last = searcher.study.trials[-1]
    assert searcher._indices(last.params) == repaired
    assert last.values == [pytest.approx(score(problem, repaired))]


def test_no_target_no_constraints(synthetic_space, table):
    searcher = BayesSearcher(make_problem(synthetic_space, table, fraction=None))
    assert len(drive(searcher, 12)) == 12 and searcher.infeasible_asks == 0
    assert all(t.constraints == {} for t in searcher.study.trials)


@pytest.mark.parametrize("sampler, kind", [("auto", optuna.samplers.NSGAIISampler),
                                           ("tpe", optuna.samplers.TPESampler)])
def test_multi_objective(synthetic_space, table, sampler, kind):
    problem = make_problem(synthetic_space, table, objectives=("accuracy", "size"))
    searcher = BayesSearcher(problem, {"sampler": sampler})
    study = searcher.study
    assert isinstance(study.sampler, kind)
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE,
                                optuna.study.StudyDirection.MINIMIZE]
    plans = drive(searcher, 30)
    assert len(plans) == 30 and all(problem.feasible(p) for p in plans)
    assert len({tuple(p) for p in plans}) == 30
    for t in study.trials:
        assert t.values[1] == pytest.approx(table.index_cost(searcher._indices(t.params)))

    def dominates(a, b):
        return (a.values[0] >= b.values[0] and a.values[1] <= b.values[1]
                and a.values != b.values)

    best = study.best_trials
    assert best and all(t.constraints["size"] <= 0 for t in best)
    assert not any(dominates(a, b) for a in best for b in best)
    feasible = [t for t in study.trials if t.constraints["size"] <= 0]
    front = {t.number for t in best}
    assert all(any(dominates(b, t) for b in best) for t in feasible if t.number not in front)


def test_quiet(synthetic_space, table, capfd):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        drive(BayesSearcher(make_problem(synthetic_space, table)), 12)
        drive(BayesSearcher(make_problem(synthetic_space, table,
                                         objectives=("accuracy", "size"))), 12)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_unknown_sampler(synthetic_space, table):
    with pytest.raises(ConfigError) as info:
        BayesSearcher(make_problem(synthetic_space, table), {"sampler": "cmaes"})
    assert str(info.value) == ("bayes option sampler='cmaes' is unknown; "
                               "choose one of auto, tpe, nsga2")
