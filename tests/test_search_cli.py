"""`nas search` end to end on synthetic data, and its errors."""

import csv
import json
import math
import types

import pytest
import torch
import yaml

from nas.budget import Budget
from nas.cost import make_cost_model
from nas.plan import Plan
from nas.search import dnas
from nas.search.dnas import DnasConfig, SearchState, derive, search
from nas.spaces import load_space
from nas.supernet import Supernet


def _folder(runs, suffix="-search"):
    (folder,) = [p for p in runs.iterdir() if p.name.endswith(suffix)]
    return folder


@pytest.mark.slow
def test_search_writes_a_plan_that_meets_the_target(cli, trained, tmp_path):
    space_path, checkpoint = trained
    runs = tmp_path / "runs"
    result = cli("--runs-dir", str(runs), "search", "--space", str(space_path), "--budget",
                 "2ep", "--target", "size=9KB", "--checkpoint", str(checkpoint),
                 "--samples", "4", "--no-progress")
    assert result.returncode == 0, result.stderr
    folder = _folder(runs)
    assert {"plan.yaml", "candidates.csv", "theta.jsonl", "supernet.pt", "summary.json",
            "config.yaml", "metrics.jsonl", "log.txt"} <= {p.name for p in folder.iterdir()}
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["meets_target"] and summary["plan_cost"] <= 9000
    space = load_space(space_path)
    plan = Plan.load(folder / "plan.yaml").resolved(space)  # a valid plan of this space
    # Both are the chosen candidate's cost, the same float, and YAML and JSON write floats
    # with repr(): it comes back unchanged.
    assert plan.costs["size"] == summary["plan_cost"]
    assert plan.provenance["method"] == "dnas" and plan.provenance["run_id"] == folder.name
    rows = list(csv.DictReader(open(folder / "candidates.csv")))
    assert rows[0]["candidate"] == "argmax" and len(rows) >= 2
    history = [json.loads(x) for x in (folder / "theta.jsonl").read_text().splitlines()]
    assert history[-1]["phase"] == "search" and len(history[-1]["probs"]) == len(plan.layers)
    assert f"plan file: {folder / 'plan.yaml'}" in result.stdout

    # The plan goes straight into PTQ.
    ptq = cli("--runs-dir", str(runs), "ptq", "--checkpoint", str(checkpoint), "--plan",
              str(folder / "plan.yaml"), "--calib-batches", "2")
    assert ptq.returncode == 0, ptq.stderr

    # And the search can continue from its checkpoint (naming its unchanged space is allowed).
    resumed = cli("--runs-dir", str(tmp_path / "runs2"), "search", "--resume", str(folder),
                  "--space", str(space_path), "--budget", "3ep", "--samples", "0",
                  "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    summary2 = json.loads((_folder(tmp_path / "runs2") / "summary.json").read_text())
    assert summary2["steps"] == summary["steps"] * 3 // 2


def _scripted_clock(monkeypatch):
    """The search's clock, standing still until a test moves it: returns the list holding
    the time."""
    now = [1000.0]
    monkeypatch.setattr(dnas, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    return now


@pytest.fixture
def small_search(synthetic_space, synthetic_data):
    """A fresh supernet of the synthetic space, its data and its size table."""
    torch.manual_seed(0)
    net = Supernet(synthetic_space.build_model(), synthetic_space, seed=3)
    return net, synthetic_data, make_cost_model("size").table(synthetic_space)


@pytest.mark.parametrize("budget, resume_at, steps", [(5.5, 0, 6), (6.0, 0, 6), (5.5, 3, 6),
                                                      (2.5, 0, 3)])
def test_time_budget_stops_the_search_at_the_first_step_past_it(monkeypatch, small_search,
                                                                 budget, resume_at, steps):
    net, splits, table = small_search
    now = _scripted_clock(monkeypatch)
    draw = splits.train.batch

    def one_second_a_step(*args, **kwargs):  # one training batch a step
        now[0] += 1.0
        return draw(*args, **kwargs)

    monkeypatch.setattr(splits.train, "batch", one_second_a_step)
    cfg = DnasConfig(budget=Budget("seconds", budget), target=None, loss="multiplicative",
                     batch_size=64, warmup=0.2, log_every=1, progress=False)
    # A resumed run counts the time it had already spent against the budget.
    state = SearchState(step=resume_at, elapsed=float(resume_at))
    log = []
    state, _, interrupted = search(net, splits, table, cfg, "cpu", state, on_log=log.append)
    assert not interrupted and (state.step, state.elapsed) == (steps, float(steps))
    # Step k ends k s in: the clock is read before each step, and the first step that ends
    # at or past the budget is the last; weights only while under 20 % of it.
    assert [(e["step"], e["seconds"], e["phase"]) for e in log] == [
        (k, float(k), "warmup" if (k - 1) / budget < 0.2 else "search")
        for k in range(resume_at + 1, steps + 1)]


@pytest.mark.parametrize("deadline, evaluated", [(None, 4), (2.5, 3), (0.5, 1), (-1.0, 1)])
def test_derive_skips_sampled_plans_past_the_deadline(monkeypatch, small_search, deadline,
                                                      evaluated):
    net, splits, table = small_search
    now = _scripted_clock(monkeypatch)
    start = now[0]

    def one_second_each(*args, **kwargs):
        now[0] += 1.0
        return 50.0 + now[0]  # later plans score higher: a skipped one would have won

    monkeypatch.setattr(dnas, "one_shot_accuracy", one_second_each)
    cands, best = derive(net, table, None, splits, "cpu", samples=3, seed=0,
                         deadline=None if deadline is None else start + deadline)
    assert [c.name for c in cands] == ["argmax", "sample-1", "sample-2", "sample-3"]
    # Each evaluation takes 1 s; none starts past the deadline, but the argmax plan is
    # evaluated whatever the time.
    assert [not math.isnan(c.accuracy) for c in cands] == [True] * evaluated + [False] * (
        4 - evaluated)
    assert best is cands[evaluated - 1] and now[0] == start + evaluated


@pytest.mark.parametrize("budget, search_budget, deadline", [
    ("10s", Budget("seconds", 9.0), 10.0), ("2ep", Budget("epochs", 2), None)])
def test_a_time_budget_gives_the_search_90_percent_and_derivation_the_rest(
        monkeypatch, tmp_path, space_file, budget, search_budget, deadline):
    from nas.cli import main
    from nas.search import run_dnas

    now = _scripted_clock(monkeypatch)
    monkeypatch.setattr(run_dnas, "time", dnas.time)  # the command's clock is the same
    start, seen = now[0], {}

    def searched_for_its_budget(net, splits, table, cfg, *args):
        seen["budget"] = cfg.budget
        now[0] += 9.0
        return SearchState(step=1, elapsed=9.0), None, False

    def derive_by(*args):
        seen["deadline"] = args[-1]
        return derive(*args)

    monkeypatch.setattr(dnas, "search", searched_for_its_budget)
    monkeypatch.setattr(dnas, "derive", derive_by)
    assert main(["--runs-dir", str(tmp_path / "runs"), "search", "--space", str(space_file()),
                 "--budget", budget, "--no-progress", "--samples", "1"]) == 0
    # Seconds: the search gets 90 % of them, and derivation evaluates candidates until the
    # whole budget is spent, counted from the command's start. Epochs bound the search only.
    assert seen == {"budget": search_budget,
                    "deadline": None if deadline is None else start + deadline}


@pytest.mark.slow
def test_time_budget_ends_a_cli_search(cli, trained, tmp_path):
    space_path, _ = trained
    runs = tmp_path / "runs"
    result = cli("--runs-dir", str(runs), "search", "--space", str(space_path), "--budget",
                 "6s", "--no-progress", "--samples", "2")
    assert result.returncode == 0, result.stderr
    folder = _folder(runs)
    summary = json.loads((folder / "summary.json").read_text())
    history = [json.loads(x) for x in (folder / "theta.jsonl").read_text().splitlines()]
    assert summary["budget"] == "6s" and not summary["interrupted"]
    # The search ended on the clock: it had spent its 90 % share of the budget (5.4 s) when
    # it stopped (a slow machine only makes that later), and logged that last step.
    assert summary["search_seconds"] >= 5.4 and history[-1]["seconds"] >= 5.4
    assert history[-1]["step"] == summary["steps"] and history[-1]["phase"] == "search"
    assert summary["seconds"] >= summary["search_seconds"]


@pytest.mark.parametrize("args, message", [
    (["--target", "speed=3ms"], "target 'speed=3ms' is not understood"),
    (["--target", "size=10B"], "target size=10B is impossible: the cheapest plan"),
    (["--budget", "forever"], "budget 'forever' is not understood"),
    (["--cost", "latency", "--target", "size=9KB"], "--cost latency but --target size=9KB"),
    (["--cost", "bitops"], "the additive loss needs a --target for bitops"),
    (["--tau0", "0.1", "--tau-min", "1"], "--tau-min 1.0 is above --tau0 0.1: the temperature "
                                          "anneals down, so give tau-min <= tau0"),
    (["--tau0", "nan"], "--tau0 nan: must be a positive, finite number"),
    (["--tau-min", "inf"], "--tau-min inf: must be a positive, finite number"),
    (["--warmup", "nan"], "--warmup nan: must be at least 0 and below 1"),
    (["--warmup", "1"], "--warmup 1.0: must be at least 0 and below 1"),
    (["--samples", "-1"], "--samples -1: must be 0 or a positive whole number"),
    (["--batch-size", "0"], "--batch-size 0: must be a positive whole number"),
    (["--latency-batch", "0"], "--latency-batch 0: must be a positive whole number"),
    (["--latency-batch", "8"], "--latency-batch and --device-spec apply to a latency cost "
                               "only, and this search's cost is size"),
    (["--target", "latency=1ms", "--device-spec", "tpu9"], "device spec 'tpu9' not found"),
    (["--resume", "/nonexistent/run"], "--resume /nonexistent/run does not exist; pass the run "
                                       "folder of an earlier 'nas search'"),
    (["--resume", "{ck}"], "--resume {ck} is a file; pass the run folder of an earlier 'nas "
                           "search'"),
    (["--resume", "{ck_dir}"], "--resume {ck_dir} holds no supernet.pt; pass the run folder"),
    (["--resume", ""], "--resume is empty; give a value, or leave --resume out"),
    (["--target", ""], "--target is empty; give a value, or leave --target out"),
    (["--space", "fmnist_resnet8", "--checkpoint", "{ck}"],
     "checkpoint {ck} was trained for space synthetic_resnet8 (resnet8 {{'width': 8}}), but "
     "space fmnist_resnet8 uses resnet8; leave --space out to use synthetic_resnet8, or give a "
     "space of the same model"),
])
def test_bad_search_input(cli, trained, tmp_path, args, message):
    space_path, checkpoint = trained
    runs = tmp_path / "runs"
    paths = {"ck": checkpoint, "ck_dir": checkpoint.parent}
    result = cli("--runs-dir", str(runs), "search", "--space", str(space_path),
                 *[a.format(**paths) for a in args])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nas: error: "), result.stderr
    assert message.format(**paths) in lines[0]
    assert not runs.exists() or list(runs.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--factored"], "--factored but run {run} searched with one logit per choice; leave "
                     "--factored out to resume it"),
    (["--space", "fmnist_resnet8"], "--space fmnist_resnet8 but run {run} searched space "
                                    "synthetic_resnet8; leave --space out to resume it"),
    (["--checkpoint", "{ck}"], "--checkpoint does not apply to --resume: run {run} goes on from "
                               "the weights in its supernet.pt; leave --checkpoint out"),
    (["--space", "{changed}"], "--space {changed} is not the space run {run} searched: "
                               "synthetic_resnet8 has changed since; leave --space out to resume "
                               "the run on the space it recorded"),
])
def test_resume_refuses_flags_that_change_the_search(cli, trained, supernet_run, tmp_path, args,
                                                      message):
    searched = supernet_run[1]  # a search of the synthetic space, not factored
    # The same space name with other choices: resuming on it would mix two searches.
    changed = tmp_path / "changed.yaml"
    raw = yaml.safe_load(supernet_run[0].read_text())
    changed.write_text(yaml.safe_dump({**raw, "choices": {"w_bits": [4, 8], "a_bits": [8]}}))
    paths = {"run": searched, "ck": trained[1], "changed": changed}
    runs = tmp_path / "runs"
    result = cli("--runs-dir", str(runs), "search", "--resume", str(searched),
                 *[a.format(**paths) for a in args])
    assert result.returncode == 2
    assert result.stderr == f"nas: error: {message.format(**paths)}\n"
    assert not runs.exists()


@pytest.mark.slow
def test_a_factored_run_resumes_factored_without_the_flag(cli, trained, tmp_path):
    space_path, _ = trained
    first = cli("--runs-dir", str(tmp_path / "a"), "search", "--space", str(space_path),
                "--budget", "1ep", "--factored", "--samples", "0", "--no-progress")
    assert first.returncode == 0, first.stderr
    run = _folder(tmp_path / "a")
    resumed = cli("--runs-dir", str(tmp_path / "b"), "search", "--resume", str(run),
                  "--budget", "2ep", "--samples", "0", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert f"run {run} searched with factored logits: resuming it factored" in resumed.stdout
    config = yaml.safe_load((_folder(tmp_path / "b") / "config.yaml").read_text())
    assert config["factored"] is True


@pytest.mark.parametrize("space, message", [
    ("nosuch", "unknown search space 'nosuch'; choose one of"),
    ("fmnist_resnet8", "checkpoint {ck} was trained for space synthetic_resnet8 (resnet8 "
                       "{{'width': 8}}), but space fmnist_resnet8 uses resnet8; leave --space out"),
])
def test_bench_dnas_refuses_a_space_the_checkpoint_does_not_fit(cli, trained, tmp_path, space,
                                                                     message):
    runs = tmp_path / "runs"
    result = cli("--runs-dir", str(runs), "bench", "dnas", "--checkpoint", str(trained[1]),
                 "--space", space)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"nas: error: {message.format(ck=trained[1])}")
    assert not runs.exists()


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_with_a_plan(trained, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    space_path, _ = trained
    runs = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "nas", "--runs-dir", str(runs), "search",
                             "--space", str(space_path), "--budget", "10m", "--samples", "1",
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ},
                            # A test run started in the background (`make test &`) ignores
                            # SIGINT, and a child would inherit that: restore the default.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until the search loop is logging
        if any((p / "theta.jsonl").exists() for p in runs.glob("*.partial")):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "interrupted: deriving the plan" in out
    folder = _folder(runs)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["interrupted"] and summary["seconds"] < 120
    assert Plan.load(folder / "plan.yaml").provenance["interrupted"] is True
    assert (folder / "supernet.pt").is_file()


@pytest.mark.slow
def test_bench_dnas_small(cli, trained, tmp_path):
    _, checkpoint = trained
    runs = tmp_path / "runs"
    result = cli("--runs-dir", str(runs), "bench", "dnas", "--checkpoint", str(checkpoint),
                 "--budget", "3s", "--samples", "1", "--random-plans", "2",
                 "--batch-size", "32")
    assert result.returncode == 0, result.stderr
    data = json.loads((_folder(runs, "-bench-dnas") / "bench_dnas.json").read_text())
    rows = data["overhead"]["rows"]
    assert list(rows) == ["hard weight step", "hard theta step", "soft weight step",
                          "soft theta step"]
    # Memory (distinct saved tensors): hard mode keeps the float model's activations plus a
    # 1-byte clip mask per quantized layer, and soft mode one more conv per a_bits.
    assert 1.0 < rows["hard weight step"]["memory_ratio"] < rows["soft weight step"]["memory_ratio"]
    targets = data["targets"]
    assert [t["target_fraction"] for t in targets] == [0.35, 0.5, 0.7]
    assert all(t["meets_target"] and t["plan_size"] <= t["target"] for t in targets)
    held = data["random"]["held_out"]
    assert held["split"] == "test" and 0 <= held["dnas_accuracy"] <= 100
    for title in ("Supernet overhead", "Size targets", "DNAS vs random plans"):
        assert title in result.stdout


@pytest.mark.slow
def test_latency_search_says_how_its_latencies_were_estimated(cli, trained, tmp_path):
    space_path, checkpoint = trained
    runs = tmp_path / "runs"
    result = cli("--runs-dir", str(runs), "search", "--space", str(space_path), "--budget",
                 "1ep", "--target", "latency=1ms", "--latency-batch", "64", "--checkpoint",
                 str(checkpoint), "--samples", "2", "--no-progress")
    assert result.returncode == 0, result.stderr
    # The synthetic space's layers are in no table under cost_models/: every latency is the
    # roofline calibrated on the H200 tables, and the plan records that.
    plan = Plan.load(_folder(runs) / "plan.yaml")
    assert (plan.costs["latency_batch"], plan.costs["device_spec"]) == (64, "h200")
    assert "cost latency (h200, batch 64)" in result.stdout
    assert plan.costs["estimated"] is True
    assert plan.costs["estimate"].startswith("roofline from the device spec, calibrated on ")
    assert f"latency estimated where no table has the layer: {plan.costs['estimate']}" in result.stdout
    (summary,) = [line for line in result.stdout.splitlines() if line.startswith("plan: ")]
    assert summary.endswith("[latency estimated]")
    space = load_space(space_path)
    assert plan.costs["latency"] == pytest.approx(
        make_cost_model("latency", batch=64).plan_cost(plan.resolved(space), space))
    # (the synthetic layers are small: at batch 1 they cost little less, but not the same)
    assert plan.costs["latency"] != pytest.approx(make_cost_model("latency").plan_cost(plan, space))
    # `nas cost` of the plan costs it at the same batch unless told otherwise.
    for extra, batch in (([], 64), (["--batch", "2"], 2)):
        cost = cli("cost", "--space", str(space_path), "--plan",
                   str(_folder(runs) / "plan.yaml"), *extra)
        assert cost.returncode == 0, cost.stderr
        assert cost.stdout.startswith(f"space synthetic_resnet8, plan {_folder(runs) / 'plan.yaml'}"
                                      f", batch {batch}, device h200")
    # Resumed without the flags, the search keeps costing at the batch it was started with.
    resumed = cli("--runs-dir", str(tmp_path / "runs2"), "search", "--resume",
                  str(_folder(runs)), "--budget", "2ep", "--samples", "0", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    again = Plan.load(_folder(tmp_path / "runs2") / "plan.yaml")
    assert (again.costs["latency_batch"], again.costs["device_spec"]) == (64, "h200")
    assert again.costs["latency"] == pytest.approx(
        make_cost_model("latency", batch=64).plan_cost(again.resolved(space), space))
    # The resumed run searched for a latency target: another kind of cost does not fit it.
    wrong = cli("--runs-dir", str(tmp_path / "runs3"), "search", "--resume",
                str(_folder(runs)), "--cost", "size")
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert wrong.stderr.strip() == (
        f"nas: error: --cost size but run {_folder(runs)} searched for the latency target "
        f"latency=1ms; give a --target of the same kind")
