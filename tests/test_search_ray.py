"""Discrete searches end to end on Ray Tune: outputs, reproducibility, bad input, a killed
driver resumed, a killed worker retried, Ctrl-C. One Ray instance serves the session
(`ray_address`); `nas` subprocesses attach to it."""

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from nas.cli import main
from nas.plan import Plan
from nas.spaces import load_space

pytestmark = pytest.mark.slow


def _folders(runs: Path) -> list[Path]:
    return sorted(runs.iterdir()) if runs.exists() else []


def _rows(folder: Path, name: str = "trials.csv") -> list[dict]:
    path = folder / name
    return list(csv.DictReader(open(path))) if path.exists() else []


def _search(runs, *args) -> int:
    return main(["--runs-dir", str(runs), "search", "--no-progress", *args])


def _searched(tmp_path, *args) -> Path:
    """Run a search that must succeed; its run folder."""
    runs = tmp_path / "runs"
    assert _search(runs, *args) == 0
    (folder,) = _folders(runs)
    return folder


def test_random_search_trains_its_supernet_runs_trials_and_resumes_from_a_relative_path(
        ray_address, space_file, tmp_path, capfd, monkeypatch):
    """What a search that trains its supernet writes, scores and prints; then the run goes
    on by a relative path, with the supernet it trained, scored as it scored."""
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    assert _search(runs, "--method", "random", "--space", str(space_file()), "--budget",
                   "5trials", "--train-budget", "1ep", "--eval-batches", "1") == 0
    (folder,) = _folders(runs)
    assert {"config.yaml", "log.txt", "summary.json", "plan.yaml", "trials.csv", "pareto.csv",
            "supernet.pt", "ray.log", "ray"} <= {p.name for p in folder.iterdir()}
    rows = _rows(folder)
    assert [r["trial"] for r in rows] == ["1", "2", "3", "4", "5"]
    assert all(r["meets_target"] == "True" for r in rows) and len({r["plan"] for r in rows}) == 5
    summary = json.loads((folder / "summary.json").read_text())
    assert (summary["trials"], summary["evaluator"], summary["failed_trials"]) == (5, "oneshot", 0)
    best = max(rows, key=lambda r: float(r["accuracy"]))
    plan = Plan.load(folder / "plan.yaml").resolved(load_space(space_file()))
    assert plan.costs["one_shot_arch_accuracy"] == summary["arch_accuracy"]
    assert round(summary["arch_accuracy"], 4) == float(best["accuracy"])
    assert plan.costs["size"] == float(best["size"]) <= plan.costs["target"]
    assert plan.provenance["trial"] == int(best["trial"]) == summary["best_trial"]
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["evaluator"]["kind"] == "oneshot" and config["evaluator"]["trained_here"]
    # Ray's experiment folder is in the run folder; Ray printed nothing to the terminal.
    assert list((folder / "ray").glob("experiment_state-*.json"))
    out = capfd.readouterr()
    assert "Trial" not in out.out + out.err and "ray" not in out.err.lower()
    assert out.out.splitlines()[-2:] == [f"plan file: {folder / 'plan.yaml'}",
                                         f"fine-tune it: nas qat --run {folder}"]

    relative = folder.relative_to(tmp_path)
    assert _search(tmp_path / "runs2", "--resume", str(relative), "--budget", "7trials") == 0
    (resumed,) = _folders(tmp_path / "runs2")
    rows = _rows(resumed)
    assert len(rows) == 7 and rows[:5] == _rows(folder) and len({r["plan"] for r in rows}) == 7
    config = yaml.safe_load((resumed / "config.yaml").read_text())
    # The supernet the first run trained, by its absolute path; scored as that run scored.
    assert config["evaluator"]["path"] == str(folder / "supernet.pt")
    assert config["evaluator"]["eval_batches"] == 1 and not config["evaluator"]["trained_here"]


def test_bayes_repeats_its_trials_for_a_seed(ray_address, supernet_run, tmp_path):
    space, run = supernet_run
    plans = {}
    for seed in (0, 0, 1):
        runs = tmp_path / f"runs-{len(plans)}"
        assert _search(runs, "--seed", str(seed), "--method", "bayes", "--supernet", str(run),
                       "--budget", "8trials", "--target", "size=9.5KB") == 0
        (folder,) = _folders(runs)
        rows = _rows(folder)
        assert len(rows) == 8 and all(float(r["size"]) <= 9500 for r in rows)
        plans[len(plans)] = [r["plan"] for r in rows]
    assert plans[0] == plans[1] and plans[0] != plans[2]


def test_several_objectives_give_a_pareto_front(ray_address, supernet_run, tmp_path):
    _, run = supernet_run
    folder = _searched(tmp_path, "--method", "bayes", "--supernet", str(run), "--budget",
                       "10trials", "--objectives", "accuracy,size,bitops")
    rows, front = _rows(folder), _rows(folder, "pareto.csv")
    assert yaml.safe_load((folder / "config.yaml").read_text())["target"] is None
    key = lambda r: (float(r["accuracy"]), -float(r["size"]), -float(r["bitops"]))  # noqa: E731

    def dominates(a, b):
        return all(x >= y for x, y in zip(key(a), key(b))) and key(a) != key(b)

    assert front and all(not any(dominates(r, f) for r in rows) for f in front)
    assert all(any(dominates(f, r) or key(f) == key(r) for f in front) for r in rows)


def test_uniform_search_scores_each_uniform_plan_once(ray_address, supernet_run, tmp_path):
    _, run = supernet_run
    folder = _searched(tmp_path, "--method", "uniform", "--supernet", str(run), "--budget",
                       "50trials", "--target", "size=13KB")
    summary = json.loads((folder / "summary.json").read_text())
    # Synthetic ResNet-8: W8A4 and W8A8 are over 13 KB, the four W2 and W4 plans within it.
    assert sorted(r["plan"].split()[1] for r in _rows(folder)) == ["W2A4", "W2A8", "W4A4", "W4A8"]
    assert summary["searcher_exhausted"] and summary["trials"] == 4


def test_ptq_evaluator_scores_plans_of_a_float_checkpoint(ray_address, trained, tmp_path,
                                                          capsys):
    _, checkpoint = trained
    folder = _searched(tmp_path, "--method", "random", "--checkpoint", str(checkpoint),
                       "--budget", "3trials")
    plan = yaml.safe_load((folder / "plan.yaml").read_text())
    assert {"ptq_arch_accuracy", "ptq_test_accuracy"} <= set(plan["costs"])
    assert json.loads((folder / "summary.json").read_text())["evaluator"] == "ptq"
    assert not (folder / "supernet.pt").exists() and not (folder / "best.pt").exists()
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"fine-tune it: nas qat --plan {folder / 'plan.yaml'} --checkpoint {checkpoint.resolve()}")


def test_a_time_budget_trains_the_float_model_then_spends_the_rest_on_trials(ray_address,
                                                                            space_file, tmp_path):
    started = time.monotonic()
    folder = _searched(tmp_path, "--method", "random", "--evaluator", "ptq", "--space",
                       str(space_file()), "--budget", "30s")
    summary = json.loads((folder / "summary.json").read_text())
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["evaluator"]["kind"] == "ptq" and config["evaluator"]["path"] == "best.pt"
    assert (folder / "best.pt").exists() and summary["trials"] == len(_rows(folder)) >= 1
    # Half the budget trains, the trials stop 5 s before the end to score the plan on the
    # test split (10 s of trials: a PTQ trial takes seconds, more on a loaded machine); Ray's
    # start and stop and that scoring may run over by a few seconds.
    assert summary["seconds"] < 30 + 15 and time.monotonic() - started < 30 + 30


@pytest.mark.parametrize("args, message", [
    (["--method", "bayes", "--objectives", "accuracy,speed"],
     "--objectives 'accuracy,speed': give accuracy then one or more costs, for example "
     "accuracy,size, accuracy,bitops, accuracy,latency"),
    (["--method", "bayes", "--workers", "0"], "--workers 0: must be a positive whole number"),
    (["--method", "random", "--budget", "0trials"],
     "budget '0trials': a search needs at least 1 trial; use '200trials' (trials) or '90s', "
     "'5m', '2h' (time)"),
    (["--method", "bayes", "--evaluator", "ptq", "--supernet", "RUN"],
     "--evaluator ptq calibrates a float model, and --supernet gives a supernet; give "
     "--checkpoint for ptq, or --evaluator oneshot"),
    (["--method", "random", "--supernet", "NOWHERE"],
     "--supernet NOWHERE does not exist; pass the run folder of an earlier 'nas search'"),
    (["--method", "random", "--samples", "3"],
     "--samples applies to --method dnas only; drop it for --method random"),
    (["--cpus-per-trial", "2"], "--cpus-per-trial applies to --method bayes/random/uniform/rl, "
                                "not dnas; drop it or choose one of those methods"),
    (["--method", "random", "--sampler", "tpe"],
     "--sampler applies to --method bayes only; drop it for --method random"),
    (["--method", "bayes", "--ray-address", "127.0.0.1:1"],
     "--ray-address 127.0.0.1:1: no Ray cluster answers there (Connection refused); start one "
     "with 'ray start --head', or leave --ray-address out to run Ray inside this process"),
    (["--method", "bayes", "--ray-address", "http://127.0.0.1:8265"],
     "--ray-address http://127.0.0.1:8265 (or RAY_ADDRESS) is a http URL, such as 'ray job "
     "submit' takes; give the cluster's address HOST:PORT (6379 by default), or auto"),
    (["--method", "random", "--budget", "5m", "--train-budget", "5m"],
     "--train-budget 5m leaves no time of --budget 5m for trials; give a smaller --train-budget "
     "or a larger --budget"),
    (["--method", "random", "--cpus-per-trial", "64"],
     "--cpus-per-trial 64: the Ray cluster has 2 CPUs; give at most 2"),
    (["--method", "bayes", "--ray-address", "nowhere"],
     "--ray-address 'nowhere' is not an address; give HOST:PORT of a cluster's head (as 'ray "
     "start --head' prints it), or auto"),
])
def test_bad_discrete_search_input(ray_address, supernet_run, tmp_path, capsys, args, message):
    space, run = supernet_run
    args = [str(run) if a == "RUN" else a for a in args]
    runs = tmp_path / "runs"
    started = time.monotonic()
    assert _search(runs, "--space", str(space), *args) == 2
    err = capsys.readouterr().err
    assert err == f"nas: error: {message}\n"
    assert time.monotonic() - started < 30 and not _folders(runs)


def test_an_address_where_something_else_listens_fails_within_seconds(supernet_run, tmp_path):
    import socket

    _, run = supernet_run
    with socket.socket() as listener:  # accepts connections, speaks no Ray
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        proc = _nas("--runs-dir", str(tmp_path / "runs"), "search", "--method", "random",
                    "--supernet", str(run), "--budget", "2trials", "--ray-address", address)
        out, err = proc.communicate(timeout=120)
    assert time.monotonic() - started < 30
    assert proc.returncode == 2 and err.startswith(f"nas: error: --ray-address {address}: Ray "
                                                   f"could not connect (")
    assert err.count("\n") == 1 and not _folders(tmp_path / "runs")


def test_a_supernet_of_another_space_is_refused(supernet_run, space_file, tmp_path, capsys):
    _, run = supernet_run
    other = space_file({"choices": ["W8A8", "W4A8"]}, name="other.yaml")
    assert _search(tmp_path / "runs", "--method", "bayes", "--supernet", str(run), "--space",
                   str(other)) == 2
    assert capsys.readouterr().err == (
        f"nas: error: --supernet {run} was trained on space synthetic_resnet8, not --space "
        f"{other}; leave --space out, or give a supernet of that space\n")


def _nas(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nas", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})


def _wait_for_rows(runs: Path, count: int, proc: subprocess.Popen, timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for folder in _folders(runs):
            if len(_rows(folder)) >= count:
                return folder
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"no {count} trials within {timeout} s")


def test_a_killed_search_resumes_without_losing_or_repeating_a_trial(ray_address, supernet_run,
                                                                      tmp_path):
    _, run = supernet_run
    runs = tmp_path / "runs"
    proc = _nas("--runs-dir", str(runs), "search", "--method", "random", "--supernet", str(run),
                "--budget", "1000trials", "--no-progress", "--ray-address", ray_address)
    folder = _wait_for_rows(runs, 4, proc)
    proc.kill()  # SIGKILL: no chance to write anything more
    proc.wait()
    assert folder.name.endswith(".partial")
    done = _rows(folder)
    total = len(done) + 6
    assert _search(tmp_path / "runs2", "--resume", str(folder), "--budget", f"{total}trials",
                   "--ray-address", ray_address) == 0
    (resumed,) = _folders(tmp_path / "runs2")
    rows = _rows(resumed)
    assert rows[:len(done)] == done  # every finished trial kept, as it was
    assert len(rows) == total and len({r["plan"] for r in rows}) == total  # none run twice
    assert json.loads((resumed / "summary.json").read_text())["trials"] == total


TRIALS = 50


def _trial_workers() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and p.info["cmdline"][0].startswith("ray::ImplicitFunc")]


def test_a_trial_whose_worker_dies_is_retried(ray_address, supernet_run, tmp_path):
    """A worker is killed once 3 trials are done; the rest of the TRIALS (each a fraction of
    a second) leave the killer time to find one."""
    _, run = supernet_run
    runs = tmp_path / "runs"
    killed = []

    def kill_a_worker():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            partial = [f for f in _folders(runs) if len(_rows(f)) >= 3]
            workers = _trial_workers()
            if partial and workers:
                workers[0].kill()
                killed.append(workers[0].pid)
            time.sleep(0.02)

    killer = threading.Thread(target=kill_a_worker)
    killer.start()
    try:
        assert _search(runs, "--method", "random", "--supernet", str(run), "--budget",
                       f"{TRIALS}trials") == 0
    finally:
        killer.join()
    assert killed
    (folder,) = _folders(runs)
    summary = json.loads((folder / "summary.json").read_text())
    assert (summary["trials"], summary["failed_trials"]) == (TRIALS, 0)
    assert len({r["plan"] for r in _rows(folder)}) == TRIALS
    assert not psutil.pid_exists(killed[0])


def test_ctrl_c_keeps_the_finished_trials_and_says_how_to_go_on(ray_address, supernet_run,
                                                                tmp_path):
    _, run = supernet_run
    runs = tmp_path / "runs"
    proc = _nas("--runs-dir", str(runs), "search", "--method", "random", "--supernet", str(run),
                "--budget", "1000trials", "--no-progress", "--ray-address", ray_address)
    _wait_for_rows(runs, 3, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    (folder,) = _folders(runs)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["interrupted"] and summary["trials"] == len(_rows(folder)) >= 3
    assert (f"interrupted: {summary['trials']} trials kept; to go on: nas search --resume "
            f"{folder}") in out
    assert (folder / "plan.yaml").exists()


def test_a_one_epoch_dnas_run_says_theta_is_still_near_uniform(supernet_run):
    _, run = supernet_run
    summary = json.loads((run / "summary.json").read_text())
    assert any(w.startswith("theta is still near uniform") for w in summary["warnings"])


def test_a_ctrl_c_while_a_trial_is_recorded_waits_until_it_is_whole(synthetic_space, tmp_path,
                                                                     monkeypatch):
    # Ctrl-C raises wherever the driver is; between the trials.csv row and the count that
    # summary.json reports, the two disagreed (3 rows, "trials": 2).
    import nas.runs
    from nas.cost import make_cost_model
    from nas.search.base import SearchBudget, SearchProblem
    from nas.search.encoding import PlanEncoding
    from nas.search.random import RandomSearcher
    from nas.search.results import SearchResults
    from nas.search.tune import AskTell, TuneOutcome

    problem = SearchProblem(synthetic_space, {"size": make_cost_model("size").table(
        synthetic_space)}, "size", None, SearchBudget("trials", 5), 0, ("accuracy",))
    results = SearchResults(tmp_path, problem, PlanEncoding(synthetic_space))
    algo = AskTell(RandomSearcher(problem), problem, results, TuneOutcome(), time.monotonic(),
                   lambda trial: None, trials=5)
    assert algo.suggest("t1") is not None
    write = nas.runs.append_csv_row

    def write_then_ctrl_c(*args):
        write(*args)
        os.kill(os.getpid(), signal.SIGINT)  # handled at the next bytecode, in this thread

    monkeypatch.setattr(nas.runs, "append_csv_row", write_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        algo.on_trial_complete("t1", {"accuracy": 50.0})
    assert len(results.trials) == len(_rows(tmp_path)) == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
