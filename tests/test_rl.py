"""The HAQ-style RL searcher: its budget rule, its state and actions, its state saved and
rebuilt, and short searches on Ray Tune. The unit tests score plans with a cheap synthetic
objective (no Ray, no training)."""

import csv
import io
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from nas.cli import main
from nas.cost import make_cost_model
from nas.cost.targets import Target
from nas.errors import ConfigError
from nas.search.base import SearchBudget, SearchProblem, Told
from nas.search.rl import RLSearcher, choice_order, enforce, layer_kind
from nas.spaces import LayerInfo


@pytest.fixture(scope="module")
def tables(synthetic_space):
    return {name: make_cost_model(name).table(synthetic_space) for name in ("size", "bitops")}


def target_at(table, fraction: float) -> Target:
    """A target `fraction` of the way from the cheapest plan's cost to the dearest's."""
    low = sum(min(row) for row in table.values)
    high = sum(max(row) for row in table.values)
    value = low + fraction * (high - low)
    return Target(table.name, value, f"{table.name}={value:.0f}")


def make_problem(space, tables, fraction=0.3, seed=0, trials=16, cost="size",
                 objectives=("accuracy",)):
    target = target_at(tables[cost], fraction)
    return SearchProblem(space, dict(tables), cost, target, SearchBudget("trials", trials),
                         seed=seed, objectives=objectives)


def score(problem, indices) -> float:
    """Synthetic accuracy: more bits score higher, early layers more than late ones."""
    return sum((c.w_bits + 0.5 * c.a_bits) / (1 + p) for p, c in
               enumerate(x.choices[i] for x, i in zip(problem.space.layers(), indices)))


def told(problem, indices) -> Told:
    return Told(indices, problem.costs(indices), {"accuracy": score(problem, indices)})


def drive(searcher, asks: int) -> list[list[int]]:
    plans = []
    for _ in range(asks):
        indices = searcher.ask()
        plans.append(indices)
        searcher.tell(told(searcher.problem, indices))
    return plans


def actor_weights(searcher) -> list[torch.Tensor]:
    return [p.detach().clone() for p in searcher.agent.actor.parameters()]


# ---------------------------------------------------------------- the budget rule

@pytest.mark.parametrize("cost", ["size", "bitops"])
def test_enforcement_meets_the_target_lowering_the_most_costly_layer_first(synthetic_space, tables,
                                                                           cost):
    table, rng = tables[cost], random.Random(cost)
    lowered = 0
    for _ in range(300):
        target = target_at(table, rng.uniform(0.0, 0.6))
        plan = [rng.randrange(len(row)) for row in table.values]
        result, steps = enforce(plan, table, target)
        assert table.index_cost(result) <= target.value  # exactly: no tolerance
        if table.index_cost(plan) <= target.value:
            assert (result, steps) == (plan, [])
            continue
        lowered += 1
        current = list(plan)
        for layer in steps:
            now = [row[c] for row, c in zip(table.values, current)]
            lowerable = [l for l, row in enumerate(table.values) if min(row) < now[l]]
            # The layer that costs the most now, the later one on a tie...
            assert layer == max(lowerable, key=lambda l: (now[l], l))
            # ...steps down to its next cheaper choice, no further.
            order = choice_order(table.values[layer], table.choices[layer])
            last = (layer, current[layer])
            current[layer] = [c for c in order if table.values[layer][c] < now[layer]][-1]
        assert current == result
        # It stops as soon as the plan fits: one step fewer is over the target.
        current[last[0]] = last[1]
        assert table.index_cost(current) > target.value
    assert lowered > 150  # most random plans were over their target


def test_enforcement_of_a_plan_one_byte_over_lowers_the_largest_layer_once(synthetic_space, tables):
    table = tables["size"]
    w8a8 = [len(x.choices) - 1 for x in synthetic_space.layers()]  # W8A8: each layer's last choice
    assert all(str(x.choices[i]) == "W8A8" for x, i in zip(synthetic_space.layers(), w8a8))
    cost = table.index_cost(w8a8)
    result, steps = enforce(w8a8, table, Target("size", cost - 1, "size=-1B"))
    # layer3.0.conv2 (32x32x3x3) has the most weights: W8A8 -> W4A8, 9216 * 4 bits saved.
    assert steps == [7] and str(synthetic_space.layers()[7].choices[result[7]]) == "W4A8"
    assert cost - table.index_cost(result) == 9216 * 4 / 8
    assert result[:7] + result[8:] == w8a8[:7] + w8a8[8:]


def test_a_target_no_plan_meets_is_refused(synthetic_space, tables):
    problem = make_problem(synthetic_space, tables)
    problem.target = Target("size", 100.0, "size=100B")
    with pytest.raises(ConfigError, match=r"^target size=100B is impossible: the cheapest plan "
                                          r"in this space costs "):
        RLSearcher(problem)


# ---------------------------------------------------------------- state and actions

def test_state_is_haq_features_scaled_over_the_searchable_layers(synthetic_space, tables):
    searcher = RLSearcher(make_problem(synthetic_space, tables))
    layers = synthetic_space.layers()
    assert searcher.positions == [1, 2, 3, 4, 5, 6, 7, 8]  # conv1 and fc are fixed
    f = searcher.features
    assert f.shape == (8, 10) and float(f.min()) == 0.0 and float(f.max()) == 1.0
    columns = dict(zip(("index", "depthwise", "linear", "in", "out", "kernel", "stride", "map",
                        "params", "macs"), f.T.tolist()))
    approx = lambda values: pytest.approx(values, abs=1e-7)  # float32 features
    assert columns["index"] == approx([i / 7 for i in range(8)])
    assert columns["depthwise"] == columns["linear"] == [0.0] * 8  # every layer a conv
    assert columns["kernel"] == [1, 1, 1, 1, 0, 1, 1, 0]  # the 1x1 downsamples are 0
    assert columns["stride"] == [0, 0, 1, 0, 1, 1, 0, 1]
    assert columns["in"] == approx([0, 0, 0, 1 / 3, 0, 1 / 3, 1, 1 / 3])  # 8..32 channels
    assert columns["map"] == approx([1, 1, 1, 27 / 135, 1, 27 / 135, 0, 27 / 135])  # 144..9
    macs = [layers[p].info.macs for p in searcher.positions]
    assert columns["macs"] == approx([(m - 4608) / (82944 - 4608) for m in macs])
    state = searcher.state(3, 0.25)
    assert state.shape == (11,) and float(state[-1]) == 0.25  # then the previous action


def test_layer_kinds():
    def info(kind, cin, groups):
        return LayerInfo("x", kind, cin, cin, (3, 3), (1, 1), (1, 1), groups, (4, 4), (4, 4),
                         1, 1)

    assert [layer_kind(info("Conv2d", 8, 1)), layer_kind(info("Conv2d", 8, 8)),
            layer_kind(info("Conv2d", 8, 2)), layer_kind(info("Linear", 8, 1))] == [
        "conv", "depthwise", "conv", "linear"]


def test_actions_cut_cheapest_to_dearest_choices_into_equal_bins(synthetic_space, tables):
    searcher = RLSearcher(make_problem(synthetic_space, tables))
    names = [str(c) for c in synthetic_space.layers()[1].choices]
    # Size ignores activation bits: equal sizes go by weight bits, then activation bits.
    assert [names[c] for c in searcher.orders[0]] == ["W2A4", "W2A8", "W4A4", "W4A8", "W8A4",
                                                      "W8A8"]
    picks = {a: names[searcher.choice(0, a)] for a in (0.0, 0.16, 0.17, 0.5, 0.99, 1.0)}
    assert picks == {0.0: "W2A4", 0.16: "W2A4", 0.17: "W2A8", 0.5: "W4A8", 0.99: "W8A8",
                     1.0: "W8A8"}
    for c in range(6):
        assert searcher.action(0, c) == (searcher.orders[0].index(c) + 0.5) / 6
        assert searcher.choice(0, searcher.action(0, c)) == c


def test_bad_options_and_several_objectives_are_refused(synthetic_space, tables):
    with pytest.raises(ConfigError, match=r"^rl option noise=2: give the starting sigma, 0 to "
                                          r"1$"):
        RLSearcher(make_problem(synthetic_space, tables), {"noise": 2})
    with pytest.raises(ConfigError, match=r"^rl option warmup=-1: give a whole number"):
        RLSearcher(make_problem(synthetic_space, tables), {"warmup": -1})
    with pytest.raises(ConfigError, match=r"^--objectives accuracy,size: rl maximises accuracy "
                                          r"within a target; drop --objectives"):
        RLSearcher(make_problem(synthetic_space, tables, objectives=("accuracy", "size")))


# ---------------------------------------------------------------- learning

def test_warm_up_then_policy_episodes_within_the_target(synthetic_space, tables):
    problem = make_problem(synthetic_space, tables, trials=16)
    searcher = RLSearcher(problem)
    assert (searcher.warmup, searcher.noise) == (4, 0.5)  # min(20, 16 // 4)
    assert searcher.decay == pytest.approx((0.02 / 0.5) ** (1 / 12))  # 0.02 by the last one
    plans = drive(searcher, 16)
    assert all(problem.feasible(p) for p in plans) and len({tuple(p) for p in plans}) == 16
    curve = searcher.curve
    assert [r["episode"] for r in curve] == list(range(1, 17))
    assert [r["phase"] for r in curve] == ["warmup"] * 4 + ["policy"] * 12
    assert [r["noise"] for r in curve[4:6]] == [0.5, round(0.5 * searcher.decay, 6)]
    assert all(r["reward"] == round(0.1 * r["accuracy"], 6) for r in curve)
    assert searcher.agent.updates == 13 * 8  # from the warm-up's last episode, one per layer


def test_the_agent_learns_the_synthetic_objective(synthetic_space, tables):
    """Rewards after the warm-up beat the warm-up's random plans: for each of 3 seeds, the
    last 10 episodes' mean reward is above the 10 warm-up episodes' mean by more than 0.2,
    over twice the spread of a difference of two means of 10 random plans (0.08 here: one
    plan's reward varies by 0.18); the agent's margin is about 0.5."""
    for seed in range(3):
        searcher = RLSearcher(make_problem(synthetic_space, tables, seed=seed, trials=40))
        drive(searcher, 40)
        warm = [r["reward"] for r in searcher.curve if r["phase"] == "warmup"]
        last = [r["reward"] for r in searcher.curve[-10:]]
        assert sum(last) / 10 > sum(warm) / len(warm) + 0.2, seed


def test_a_seed_repeats_its_plans_and_another_does_not(synthetic_space, tables):
    first, again, other = (drive(RLSearcher(make_problem(synthetic_space, tables, seed=s)), 10)
                           for s in (5, 5, 6))
    assert first == again and first != other


def test_save_and_restore_give_the_same_next_suggestions(synthetic_space, tables):
    problem = make_problem(synthetic_space, tables)
    searcher = RLSearcher(problem)
    drive(searcher, 9)
    buffer = io.BytesIO()
    torch.save(searcher.state_dict(), buffer)
    restored = RLSearcher(problem)
    fresh = drive(RLSearcher(problem), 4)
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(actor_weights(restored),
                                                 actor_weights(searcher)))
    nxt = drive(searcher, 4)
    assert drive(restored, 4) == nxt and nxt != fresh
    assert restored.curve == searcher.curve


def test_replaying_the_told_plans_rebuilds_the_agent(synthetic_space, tables):
    """What --resume does: tell a new searcher the trials in order, then ask on."""
    problem = make_problem(synthetic_space, tables)
    searcher = RLSearcher(problem)
    plans = drive(searcher, 9)
    replayed = RLSearcher(problem)
    for p in plans:
        replayed.tell(told(problem, p))
    assert all(torch.equal(a, b) for a, b in zip(actor_weights(replayed),
                                                 actor_weights(searcher)))
    assert replayed.agent.baseline == searcher.agent.baseline
    assert replayed.curve == searcher.curve
    assert drive(replayed, 4) == drive(searcher, 4)


def test_a_plan_told_twice_or_failed_is_no_episode(synthetic_space, tables):
    problem = make_problem(synthetic_space, tables)
    searcher = RLSearcher(problem)
    plan = searcher.ask()
    searcher.tell(told(problem, plan))
    searcher.tell(told(problem, plan))
    failed = searcher.ask()
    searcher.tell(Told(failed, problem.costs(failed)))
    assert searcher.episodes == 1 and searcher.agent.buffer.size == 8
    assert searcher.known[tuple(failed)] is None
    assert all(tuple(searcher.ask()) not in (tuple(plan), tuple(failed)) for _ in range(20))


def test_the_curve_is_written_to_the_run_folder(synthetic_space, tables, tmp_path):
    searcher = RLSearcher(make_problem(synthetic_space, tables))
    searcher.use_folder(tmp_path)
    drive(searcher, 6)
    with open(tmp_path / "rl_curve.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["episode", "phase", "noise", "accuracy", "reward", "size"]
    assert [r["episode"] for r in rows] == [str(i) for i in range(1, 7)]
    assert [float(r["accuracy"]) for r in rows] == [r["accuracy"] for r in searcher.curve]


# ---------------------------------------------------------------- on Ray

def _folders(runs: Path) -> list[Path]:
    return sorted(runs.iterdir()) if runs.exists() else []


def _rows(folder: Path, name: str = "trials.csv") -> list[dict]:
    path = folder / name
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def _search(runs, *args) -> int:
    return main(["--runs-dir", str(runs), "search", "--no-progress", *args])


@pytest.mark.slow
def test_rl_search_on_ray_with_two_workers(ray_address, supernet_run, tmp_path):
    _, run = supernet_run
    runs = tmp_path / "runs"
    assert _search(runs, "--method", "rl", "--supernet", str(run), "--budget", "8trials",
                   "--target", "size=9.5KB", "--workers", "2") == 0
    (folder,) = _folders(runs)
    rows, curve = _rows(folder), _rows(folder, "rl_curve.csv")
    assert len(rows) == 8 and len({r["plan"] for r in rows}) == 8
    assert all(r["meets_target"] == "True" and float(r["size"]) <= 9500 for r in rows)
    assert [c["episode"] for c in curve] == [str(i) for i in range(1, 9)]
    assert [c["accuracy"] for c in curve] == [r["accuracy"] for r in rows]
    assert [c["size"] for c in curve] == [r["size"] for r in rows]
    assert {c["phase"] for c in curve} == {"warmup", "policy"}
    summary = json.loads((folder / "summary.json").read_text())
    assert (summary["method"], summary["trials"], summary["workers"]) == ("rl", 8, 2)


@pytest.mark.slow
def test_a_killed_rl_search_resumes_its_learning_curve(ray_address, supernet_run, tmp_path):
    """One worker and a seed: a run killed outright and resumed gives the plans, scores and
    learning curve of the same run left alone."""
    _, run = supernet_run
    args = ["--seed", "3", "--method", "rl", "--supernet", str(run), "--budget", "10trials",
            "--target", "size=9.5KB"]  # 2 warm-up episodes, then the policy's
    runs = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "nas", "--runs-dir", str(runs), "search",
                             "--no-progress", *args, "--ray-address", ray_address],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    ended = []  # how the run to kill ended: SIGKILL after 4 trials, or why not

    def kill_after_4_trials():
        deadline = time.monotonic() + 120
        while not any(len(_rows(f)) >= 4 for f in _folders(runs)):
            if proc.poll() is not None:
                ended.append(f"it ended before 4 trials: {proc.communicate()}")
                return
            if time.monotonic() > deadline:
                proc.kill()
                ended.append(f"no 4 trials within 120 s: {proc.communicate()}")
                return
            time.sleep(0.05)
        proc.kill()  # SIGKILL: nothing more is written
        proc.wait()
        ended.append("killed")

    # The run left alone goes on beside it (one trial of each at a time, on the 2 CPUs).
    killer = threading.Thread(target=kill_after_4_trials)
    killer.start()
    try:
        assert _search(tmp_path / "whole", *args) == 0
    finally:
        killer.join()
    assert ended == ["killed"]
    (whole,) = _folders(tmp_path / "whole")
    (killed,) = _folders(runs)
    assert killed.name.endswith(".partial") and 4 <= len(_rows(killed)) < 10
    assert _search(tmp_path / "resumed", "--resume", str(killed)) == 0
    (resumed,) = _folders(tmp_path / "resumed")
    key = lambda rows: [(r["plan"], r["accuracy"]) for r in rows]
    assert key(_rows(resumed)) == key(_rows(whole))
    assert _rows(resumed, "rl_curve.csv") == _rows(whole, "rl_curve.csv")
    assert len(_rows(whole, "rl_curve.csv")) == 10


@pytest.mark.slow
def test_rl_refuses_a_target_no_plan_meets(ray_address, supernet_run, tmp_path, capsys):
    _, run = supernet_run
    runs = tmp_path / "runs"
    assert _search(runs, "--method", "rl", "--supernet", str(run), "--budget", "4trials",
                   "--target", "size=1KB") == 2
    err = capsys.readouterr().err
    assert err.startswith("nas: error: target size=1KB is impossible: the cheapest plan in this "
                          "space costs ") and err.count("\n") == 1
    assert not _folders(runs)
