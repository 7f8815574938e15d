"""The searcher interface without Ray: budgets, objectives, the plan encoding, the random and
uniform searchers, the repair rule, the results writer and the short-run warnings."""

import csv
import math

import pytest

from nas.cost import make_cost_model
from nas.cost.base import CostTable
from nas.cost.targets import Target
from nas.errors import BudgetError, ConfigError
from nas.search.base import SearchBudget, SearchProblem, Told, parse_search_budget, searcher_class
from nas.search.derive import repair_by_cost
from nas.search.encoding import PlanEncoding
from nas.search.honesty import accuracy_warnings, training_warnings
from nas.search.random import RandomSearcher
from nas.search.results import SearchResults, Trial
from nas.search.run_discrete import parse_objectives
from nas.search.uniform import UniformSearcher, uniform_plans
from nas.spaces import Choice


def problem(space, target_bytes=None, objectives=("accuracy",), seed=0, trials=10):
    table = make_cost_model("size").table(space)
    target = Target("size", target_bytes, f"size={target_bytes}B") if target_bytes else None
    return SearchProblem(space, {"size": table}, "size", target, SearchBudget("trials", trials),
                         seed, objectives)


def uniform_cost(p, w, a):
    return p.table.index_cost([0 if x.fixed else x.choices.index(Choice(w, a))
                               for x in p.space.layers()])


@pytest.mark.parametrize("text, budget", [("200trials", SearchBudget("trials", 200)),
                                          ("1 trial", SearchBudget("trials", 1)),
                                          ("5m", SearchBudget("seconds", 300.0)),
                                          ("90s", SearchBudget("seconds", 90.0))])
def test_search_budgets(text, budget):
    assert parse_search_budget(text) == budget


@pytest.mark.parametrize("budget", [SearchBudget("trials", 200), SearchBudget("seconds", 90.0),
                                    SearchBudget("seconds", 2.5e6), SearchBudget("seconds", 0.5)])
def test_a_search_budget_reads_back_as_written(budget):
    assert parse_search_budget(str(budget)) == budget


@pytest.mark.parametrize("text, message", [
    ("0trials", "budget '0trials': a search needs at least 1 trial; use '200trials' (trials) "
                "or '90s', '5m', '2h' (time)"),
    ("3ep", "budget '3ep': epochs measure supernet training (--method dnas); a discrete search "
            "takes '200trials' (trials) or '90s', '5m', '2h' (time)"),
    ("lots", "budget 'lots' is not understood; use '200trials' (trials) or '90s', '5m', '2h' "
             "(time)")])
def test_bad_search_budgets(text, message):
    with pytest.raises(BudgetError) as err:
        parse_search_budget(text)
    assert str(err.value) == message


def test_objectives():
    assert parse_objectives(None) == ("accuracy",)
    assert parse_objectives("accuracy,size,latency") == ("accuracy", "size", "latency")
    for bad in ("size", "accuracy", "accuracy,size,size", "accuracy,speed"):
        with pytest.raises(ConfigError) as err:
            parse_objectives(bad)
        assert str(err.value) == (f"--objectives {bad!r}: give accuracy then one or more costs, "
                                  f"for example accuracy,size, accuracy,bitops, accuracy,latency")


def test_registry_imports_the_chosen_searcher_only():
    assert searcher_class("random") is RandomSearcher
    with pytest.raises(ConfigError) as err:
        searcher_class("annealing")
    assert str(err.value) == ("--method 'annealing' is unknown; choose one of dnas, bayes, "
                              "random, uniform, rl")


def test_plan_encoding_round_trips(synthetic_space):
    enc = PlanEncoding(synthetic_space)
    layers = synthetic_space.layers()
    indices = [0 if x.fixed else (k % len(x.choices)) for k, x in enumerate(layers)]
    plan = enc.plan(indices)
    assert enc.indices(plan) == indices
    config = enc.config(indices)
    assert config == {x.name: str(x.choices[i]) for x, i in zip(layers, indices)}
    assert enc.from_config(config) == indices
    assert plan.layers["layer1.0.conv1"].w_bits == layers[1].choices[indices[1]].w_bits
    with pytest.raises(ConfigError) as err:
        enc.from_config({**config, "layer1.0.conv1": "W3A3"})
    assert str(err.value) == ("layer layer1.0.conv1: W3A3 is not a choice of space "
                              "synthetic_resnet8; allowed: W2A4, W2A8, W4A4, W4A8, W8A4, W8A8")
    with pytest.raises(ValueError):
        enc.plan(indices[:-1])


def test_repair_by_cost_steps_down_where_a_step_saves_most():
    table = CostTable("size", "bytes", ["a", "b"], [(), ()], [[10.0, 20.0, 40.0],
                                                             [5.0, 30.0, 31.0]], [[False] * 3] * 2)
    # 71: a's next step down (40 -> 20) saves 20, b's (31 -> 30) saves 1: a (51). Then a's
    # 20 -> 10 saves 10: a again (41). b's big step (30 -> 5) is never next in line.
    assert repair_by_cost([2, 2], table, Target("size", 50.0, "50B")) == [0, 2]
    assert repair_by_cost([2, 2], table, Target("size", 70.0, "70B")) == [1, 2]
    assert repair_by_cost([2, 2], table, None) == [2, 2]


def test_random_searcher_proposes_new_plans_within_the_target_reproducibly(synthetic_space):
    p = problem(synthetic_space, target_bytes=uniform_cost(problem(synthetic_space), 4, 8))
    first = RandomSearcher(p)
    plans = [first.ask() for _ in range(30)]
    assert all(p.feasible(x) for x in plans) and len({tuple(x) for x in plans}) == 30
    again = RandomSearcher(p)
    assert [again.ask() for _ in range(30)] == plans
    other_seed = RandomSearcher(problem(synthetic_space, p.target.value, seed=1))
    assert [other_seed.ask() for _ in range(30)] != plans
    # A resumed searcher told the history proposes none of it again.
    resumed = RandomSearcher(p)
    for x in plans[:10]:
        resumed.tell(Told(x, p.costs(x), {"accuracy": 50.0}))
    assert not {tuple(resumed.ask()) for _ in range(30)} & {tuple(x) for x in plans[:10]}


def test_uniform_searcher_walks_the_uniform_plans_within_the_target_dearest_first(synthetic_space):
    p = problem(synthetic_space, target_bytes=uniform_cost(problem(synthetic_space), 4, 8))
    expected = sorted((c for c in synthetic_space.choices if uniform_cost(p, c.w_bits, c.a_bits)
                       <= p.target.value), key=lambda c: -uniform_cost(p, c.w_bits, c.a_bits))
    searcher = UniformSearcher(p)
    got = []
    while (x := searcher.ask()) is not None:
        got.append(x)
    assert got == uniform_plans(p)
    layer = next(i for i, x in enumerate(synthetic_space.layers()) if not x.fixed)
    layers = synthetic_space.layers()
    assert [str(layers[layer].choices[x[layer]]) for x in got] == [str(c) for c in expected]
    # W8A8 and W8A4 cost more than W4A8: left out. W4A8 and W4A4 cost the same bytes.
    assert {str(c) for c in expected} == {"W4A8", "W4A4", "W2A8", "W2A4"}


def _trial(p, n, indices, accuracy):
    return Trial(n, indices, accuracy, p.costs(indices), p.feasible(indices), 1.5, 1.0, "node",
                 float(n))


def test_results_keep_each_trial_on_disk_and_pick_within_the_target(synthetic_space, tmp_path):
    p = problem(synthetic_space, target_bytes=uniform_cost(problem(synthetic_space), 4, 8),
                objectives=("accuracy", "size"))
    enc = PlanEncoding(synthetic_space)
    cheap, mid = uniform_plans(p)[-1], uniform_plans(p)[0]
    dear = [0 if x.fixed else x.choices.index(Choice(8, 8)) for x in synthetic_space.layers()]
    results = SearchResults(tmp_path, p, enc)
    results.add(_trial(p, 1, dear, 90.0))    # best, but over the target
    results.add(_trial(p, 2, mid, 80.0))
    results.add(_trial(p, 3, cheap, 70.0))
    results.add(_trial(p, 4, mid, 60.0))     # dominated by trial 2
    rows = list(csv.DictReader(open(tmp_path / "trials.csv")))
    assert [r["trial"] for r in rows] == ["1", "2", "3", "4"]
    assert rows[0]["meets_target"] == "False" and rows[1]["plan"] == enc.bits(mid)
    assert float(rows[1]["size"]) == p.table.index_cost(mid)
    assert results.best().number == 2
    assert [t.number for t in results.write_pareto()] == [3, 2]
    assert [r["trial"] for r in csv.DictReader(open(tmp_path / "pareto.csv"))] == ["3", "2"]
    # A resumed search reads the trials back, costed anew, and writes them to its own folder.
    other = tmp_path / "resumed"
    other.mkdir()
    again = SearchResults(other, p, enc)
    loaded = again.load(tmp_path / "trials.csv")
    assert [(t.number, t.indices, t.accuracy, t.meets_target) for t in loaded] == [
        (1, dear, 90.0, False), (2, mid, 80.0, True), (3, cheap, 70.0, True), (4, mid, 60.0, True)]
    assert (other / "trials.csv").read_text() == (tmp_path / "trials.csv").read_text()


def test_results_refuse_a_trials_file_of_another_space(synthetic_space, tmp_path):
    p = problem(synthetic_space)
    (tmp_path / "trials.csv").write_text("trial,accuracy,plan\n1,50.0,W8A8 W9A9\n")
    with pytest.raises(ConfigError) as err:
        SearchResults(tmp_path / "x", p, PlanEncoding(synthetic_space)).load(
            tmp_path / "trials.csv")
    assert str(err.value).startswith(f"{tmp_path / 'trials.csv'}: row 2 is not a trial of space "
                                     f"synthetic_resnet8")


def test_short_run_warnings():
    assert training_warnings(5, 8, "supernet") == [
        "the supernet trained for 5 steps, less than one epoch (8): its weights are barely "
        "trained; give a larger budget"]
    assert training_warnings(8, 8, "supernet") == []
    assert accuracy_warnings(14.9, 10, "the chosen plan") == [
        "the chosen plan scored 14.9%, near chance (10.0% for 10 classes): the ranking of plans "
        "means little; give a larger budget"]
    assert accuracy_warnings(15.0, 10, "the chosen plan") == []
    assert accuracy_warnings(math.nan, 10, "x") == []
