"""Faults a user or the machine causes: a search killed with SIGKILL resumes from its last
saved state; broken files, full disks and odd paths give one `nas: error:` line, exit 2."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from nas.cli import main
from nas.runs import save_checkpoint
from nas.search.supernet_file import supernet_payload
from nas.spaces import SearchSpace
from nas.supernet import Supernet
from tests.conftest import SYNTHETIC_SPACE

# A search whose state is saved every 4 steps (nas.search.dnas.SAVE_STEPS is 1000), started
# as a user would start it, so that SIGKILL hits a real process.
_PATCHED_NAS = ("import sys; from nas.search import dnas; dnas.SAVE_STEPS = 4; "
                "from nas.cli import main; sys.exit(main(sys.argv[1:]))")
# 640 images less the arch split at batch 32: 16 steps an epoch; warm-up steps are cheap.
_SEARCH = ("--budget", "4ep", "--batch-size", "32", "--warmup", "0.5", "--samples", "0",
           "--no-progress")
STEPS = 64
# On a shared machine, torch's threads wait for each other: one thread is many times faster.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def _start(runs: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _PATCHED_NAS, "--runs-dir", str(runs),
                             "search", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **ONE_THREAD})


def _wait_for_state(runs: Path, proc: subprocess.Popen) -> Path:
    """The .partial folder of `proc`'s search, once it holds a saved state."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = list(runs.glob("*.partial/supernet.pt"))
        if found:
            return found[0].parent
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("no search state saved within 60 s")


def _saved_step(folder: Path) -> int:
    payload = torch.load(folder / "supernet.pt", map_location="cpu", weights_only=True)
    return payload["search_state"]["step"]


def test_a_killed_search_resumes_from_its_last_saved_state(space_file, tmp_path):
    """SIGKILL at three moments after a state was saved, each time resuming the last
    .partial folder; the last resume finishes the budget, with exactly its steps in all."""
    proc = _start(tmp_path / "runs0", "--space", str(space_file()), *_SEARCH)
    folder = _wait_for_state(tmp_path / "runs0", proc)
    resumed_at = None
    for k, delay in enumerate((0.0, 0.2, 0.5), start=1):
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        if resumed_at is not None:
            assert f"at step {resumed_at} " in out
        assert folder.name.endswith(".partial") and not (folder / "summary.json").exists()
        resumed_at = _saved_step(folder)
        assert 0 < resumed_at < STEPS
        proc = _start(tmp_path / f"runs{k}", "--resume", str(folder))
        if k < 3:
            folder = _wait_for_state(tmp_path / f"runs{k}", proc)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"resuming run {folder} at step {resumed_at} " in out
    (final,) = (tmp_path / "runs3").iterdir()
    assert not final.name.endswith(".partial")
    assert {"supernet.pt", "plan.yaml", "summary.json"} <= {p.name for p in final.iterdir()}
    assert json.loads((final / "summary.json").read_text())["steps"] == STEPS


# In-process cases: `nas.cli.main` as the command line calls it.

@pytest.fixture
def one_thread():
    """torch on one thread while a test runs a short search in this process (a shared
    machine's threads wait for each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _error(capsys, argv: list[str]) -> str:
    """What a failing command says: exit 2 and one `nas: error:` line on stderr."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nas: error: "), err
    return err[len("nas: error: "):-1]


def _saved_run(folder: Path, step: int, budget: str = "1ep") -> Path:
    """A DNAS run folder of the synthetic space with its state saved at `step` (batch 64:
    8 steps an epoch)."""
    space = SearchSpace.from_dict(SYNTHETIC_SPACE)
    torch.manual_seed(0)
    net = Supernet(space.build_model(), space, seed=0)
    folder.mkdir(parents=True)
    save_checkpoint(folder / "supernet.pt", supernet_payload(
        space, net, seed=0, factored=False, created="2026-01-01T00:00:00Z",
        search_state={"step": step, "elapsed": 1.0, "history": []}))
    (folder / "config.yaml").write_text(yaml.safe_dump(
        {"command": "search", "method": "dnas", "budget": budget, "batch_size": 64,
         "samples": 0}))
    return folder


FIX = "pass the run folder of an earlier 'nas search'"


def test_a_truncated_state_file_is_one_line(tmp_path, capsys):
    run = _saved_run(tmp_path / "run.partial", step=3)
    state = run / "supernet.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    assert _error(capsys, ["--runs-dir", str(tmp_path / "runs"), "search", "--resume",
                           str(run)]) == (
        f"checkpoint {state} is not a torch checkpoint (a zip file); it is corrupt or not a "
        f"nas checkpoint; {FIX}")
    assert not (tmp_path / "runs").exists()


def test_a_run_stopped_before_its_first_state_says_so(tmp_path, capsys):
    run = tmp_path / "run.partial"
    run.mkdir()
    assert _error(capsys, ["--runs-dir", str(tmp_path / "runs"), "search", "--resume",
                           str(run)]) == (
        f"--resume {run}: the run stopped before it saved its first search state (one is "
        f"saved every 60 s or 1000 steps); start the search again without --resume")


def test_an_unreadable_state_file_is_permission_denied(tmp_path, capsys, monkeypatch):
    import builtins

    import nas.runs

    run = _saved_run(tmp_path / "run", step=3)

    def denied(path, *args, **kwargs):  # what mode 000 does to a user who is not root
        if Path(path).name == "supernet.pt":
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(nas.runs, "open", denied, raising=False)
    assert _error(capsys, ["--runs-dir", str(tmp_path / "runs"), "search", "--resume",
                           str(run)]) == (
        f"checkpoint {run / 'supernet.pt'} cannot be read (Permission denied); check its "
        f"permissions, or {FIX}")


def test_a_finished_run_with_its_budget_spent_is_refused(tmp_path, capsys):
    run = _saved_run(tmp_path / "run", step=8)
    assert _error(capsys, ["--runs-dir", str(tmp_path / "runs"), "search", "--resume",
                           str(run)]) == (
        f"run {run} already spent its budget 1 epoch (8 steps); give a larger --budget (the "
        f"total, done part included) to search on")
    assert not (tmp_path / "runs").exists()


def test_a_stopped_run_with_its_budget_spent_derives_its_plan(tmp_path, capsys, one_thread):
    run = _saved_run(tmp_path / "run.partial", step=8)
    assert main(["--runs-dir", str(tmp_path / "runs"), "search", "--resume", str(run),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"run {run} already spent its budget 1 epoch (8 steps): no more steps, deriving " \
           f"its plan\n" in out
    (final,) = (tmp_path / "runs").iterdir()
    assert json.loads((final / "summary.json").read_text())["steps"] == 8


class _FullAfter:
    """A file open for writing on a disk that fills up: the first 100 bytes of a write land,
    then the write fails with `code` (ENOSPC, or EROFS for a file system remounted
    read-only)."""

    def __init__(self, f, code: int):
        self.f, self.code = f, code

    def write(self, data) -> int:
        self.f.write(bytes(data[:100]))
        raise OSError(self.code, os.strerror(self.code))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def __getattr__(self, name):
        return getattr(self.f, name)


@pytest.mark.parametrize("code, fix", [
    (28, "free some space, or give --runs-dir on another disk, and run it again"),
    (30, "give --runs-dir (or the output path) on a writable file system"),
    (13, "check the permissions of the file or folder")])  # the folder made read-only
def test_a_failing_disk_mid_search_keeps_the_last_state(tmp_path, capsys, monkeypatch,
                                                         one_thread, space_file, code, fix):
    import builtins

    import nas.runs
    from nas.search import dnas

    monkeypatch.setattr(dnas, "SAVE_STEPS", 2)
    saves = []

    def filling(path, mode="r", *args, **kwargs):
        if Path(path).name.startswith(".supernet.pt.tmp"):
            saves.append(path)
            if len(saves) == 2 and code == 13:  # a read-only folder: no file can be made
                raise PermissionError(code, os.strerror(code), str(path))
            if len(saves) == 2:  # the second periodic save finds the disk full
                return _FullAfter(builtins.open(path, mode, *args, **kwargs), code)
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(nas.runs, "open", filling, raising=False)
    runs = tmp_path / "runs"
    argv = ["--runs-dir", str(runs), "search", "--space", str(space_file()), "--budget", "1ep",
            "--batch-size", "64", "--samples", "0", "--no-progress"]
    message = _error(capsys, argv)
    (partial,) = runs.iterdir()
    assert message == (f"{partial / 'supernet.pt'}: {os.strerror(code)}; {fix} (the search "
                       f"so far is kept in {partial}: 'nas search --resume {partial}' goes on "
                       f"from its last saved state)")
    # No half-written file under any name; the first state is whole.
    assert sorted(p.name for p in partial.iterdir()) == ["config.yaml", "log.txt", "supernet.pt"]
    assert _saved_step(partial) == 2
    if code == 28:  # space freed: the search goes on from that state
        monkeypatch.setattr(nas.runs, "open", builtins.open, raising=False)
        assert main(["--runs-dir", str(tmp_path / "runs2"), "search", "--resume",
                     str(partial), "--no-progress"]) == 0
        assert f"resuming run {partial} at step 2 " in capsys.readouterr().out


def test_a_dangling_symlink_as_runs_dir(tmp_path, capsys, space_file):
    link = tmp_path / "runs"
    link.symlink_to(tmp_path / "gone")
    for runs in (link, link / "sub"):
        assert _error(capsys, ["--runs-dir", str(runs), "search", "--space",
                               str(space_file()), "--budget", "1ep"]) == (
            f"--runs-dir {runs}: {link} is a symbolic link to {tmp_path / 'gone'}, which does "
            f"not exist; create that folder or give --runs-dir a folder you can write to")
    assert not (tmp_path / "gone").exists()


def test_an_absurd_sample_count(tmp_path, capsys, space_file):
    assert _error(capsys, ["--runs-dir", str(tmp_path / "runs"), "search", "--space",
                           str(space_file()), "--samples", "99999999999999999999"]) == (
        "--samples 99999999999999999999 is more plans than can be evaluated; give at most 10000")
    assert not (tmp_path / "runs").exists()


def test_an_absurd_budget(tmp_path, capsys, space_file):
    assert _error(capsys, ["--runs-dir", str(tmp_path / "runs"), "train", "--space",
                           str(space_file()), "--budget", "1" + "0" * 400 + "ep"]) == (
        "budget '10000000000000000000...00000000ep' is too large; give at most 1000000 epochs")


@pytest.mark.parametrize("budget, message", [
    ("1" + "0" * 30 + "trials",
     "budget '1000000000000000000000000000000trials' is too large; give at most 1000000 trials"),
    ("1" + "0" * 400 + "s",
     "budget '10000000000000000000...000000000s' is too large; give at most 366 days (8784h)"),
])
def test_an_absurd_search_budget(tmp_path, capsys, space_file, budget, message):
    assert _error(capsys, ["--runs-dir", str(tmp_path / "runs"), "search", "--method", "random",
                           "--space", str(space_file()), "--budget", budget]) == message
    assert not (tmp_path / "runs").exists()


# Nine anchors, each a list of ten aliases to the one before: 10^9 values in 400 bytes.
LAUGHS = "{a: &a [x, x, x, x, x, x, x, x, x, x], " + ", ".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 10)}]" for p, c in zip("abcdefgh", "bcdefghi")) + "}"


@pytest.mark.parametrize("description, problem", [
    (LAUGHS, "the YAML aliases (*name) from line 1 expand to over 100000 values; write the "
             "values out instead of nesting aliases"),
    ("&self [1, *self]", "the YAML anchor at line 1 contains an alias to itself; write the "
                         "values out instead")])
def test_yaml_aliases_are_limited(tmp_path, capsys, space_file, description, problem):
    space = space_file()
    space.write_text(f"description: {description}\n" + space.read_text())
    assert _error(capsys, ["--runs-dir", str(tmp_path / "runs"), "train", "--space",
                           str(space)]) == f"search space {space}: {problem}"


def test_yaml_aliases_that_stay_small_are_read():
    from nas.textfiles import parse_yaml

    assert parse_yaml("a: &x {b: 1}\nc: [*x, *x]\n", "test") == {"a": {"b": 1},
                                                                 "c": [{"b": 1}, {"b": 1}]}


@pytest.mark.parametrize("argv, tried", [
    (["--runs-dir", "{long}", "train", "--space", "{space}"], "{long}"),
    (["train", "--space", "{long}"], "{long}"),
    (["cost", "--plan", "{long}"], "{long}"),
    (["search", "--resume", "{long}"], "{long}"),
    # A device spec is a name under cost_models/devices/ or a path: the path with .yaml.
    (["cost", "--uniform", "W8A8", "--space", "{space}", "--device-spec", "{long}"],
     "{long}.yaml")])
def test_a_path_too_long_for_the_file_system(tmp_path, capsys, space_file, argv, tried):
    long = str(tmp_path / ("a" * 300))  # the file system allows 255 characters a name
    argv = [a.format(long=long, space=space_file()) for a in argv]
    tried = tried.format(long=long)
    shown = f"{tried[:100]}...{tried[-40:]}"  # a message elides the middle of a long path
    assert _error(capsys, ["--runs-dir", str(tmp_path / "runs"), *argv]) == (
        f"{shown}: File name too long; give a shorter path")


@pytest.mark.parametrize("where, edit", [
    ("plan", lambda raw: raw["layers"]["fc"].update(w_bits=4.0)),
    ("space", lambda raw: raw.update(choices={"w_bits": [2, 4.0], "a_bits": [8]}))])
def test_bit_widths_written_as_floats_are_refused(tmp_path, capsys, space_file, where, edit):
    from nas.plan import Plan
    from nas.spaces import load_space

    space = space_file()
    plan = tmp_path / "plan.yaml"
    Plan.uniform(load_space(str(space)), 8, 8, include_fixed=True).save(plan)
    path = plan if where == "plan" else space
    raw = yaml.safe_load(path.read_text())
    edit(raw)
    path.write_text(yaml.safe_dump(raw))
    key = "layers.fc.w_bits" if where == "plan" else "choices.w_bits"
    assert _error(capsys, ["cost", "--plan", str(plan), "--space", str(space)]).endswith(
        f"{key}: 4.0 is not an allowed bit width: write it as a whole number, 4")


def test_a_closed_pipe_ends_quietly(capsys, monkeypatch, space_file):
    """`nas cost | head -1`: the reader leaves after one line."""
    class Closed:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", Closed())
    assert main(["cost", "--uniform", "W8A8", "--space", str(space_file())]) == 141
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file of mode 000")
def test_a_state_file_of_mode_000_is_permission_denied(tmp_path, capsys):
    run = _saved_run(tmp_path / "run", step=3)
    (run / "supernet.pt").chmod(0)
    assert _error(capsys, ["--runs-dir", str(tmp_path / "runs"), "search", "--resume",
                           str(run)]) == (
        f"checkpoint {run / 'supernet.pt'} cannot be read (Permission denied); check its "
        f"permissions, or {FIX}")


def test_a_second_ctrl_c_says_how_to_resume(tmp_path, capsys, monkeypatch, one_thread,
                                            space_file):
    """The first Ctrl-C ends the search loop; a second one, while the plan is derived,
    stops the command with the state saved."""
    from nas.search import dnas

    def second_ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dnas, "derive", second_ctrl_c)
    runs = tmp_path / "runs"
    assert main(["--runs-dir", str(runs), "search", "--space", str(space_file()), "--budget",
                 "1ep", "--batch-size", "64", "--no-progress"]) == 130
    (partial,) = runs.iterdir()
    assert capsys.readouterr().err == (
        f"nas: interrupted (the search so far is kept in {partial}: 'nas search --resume "
        f"{partial}' goes on from its last saved state)\n")
    assert _saved_step(partial) == 8


@pytest.mark.parametrize("name, problem", [
    ("n" * 300, "300 bytes is too long (it names run folders); give at most 100"),
    ("a\0b", "'a\\x00b' holds '\\x00', which a run folder's name cannot; use letters, digits, "
             "'-' and '_'"),
    ("a/b", "'a/b' holds '/', which a run folder's name cannot; use letters, digits, '-' and "
            "'_'")])
def test_a_space_name_that_cannot_name_a_run_folder(tmp_path, capsys, space_file, name,
                                                    problem):
    space = space_file({"name": name})
    assert _error(capsys, ["--runs-dir", str(tmp_path / "runs"), "train", "--space",
                           str(space)]) == f"search space {space}: name: {problem}"
    assert not (tmp_path / "runs").exists()


def test_nan_weights_are_refused_at_load(trained, tmp_path, capsys):
    """A diverged checkpoint is named at once, not met as a NaN deep in a calibration."""
    payload = torch.load(trained[1], weights_only=True)
    payload["state_dict"]["conv1.weight"][0, 0, 0, 0] = float("nan")
    bad = tmp_path / "nan.pt"
    save_checkpoint(bad, payload)
    assert _error(capsys, ["--runs-dir", str(tmp_path / "runs"), "ptq", "--checkpoint", str(bad),
                           "--uniform", "W4A8", "--calibration", "kl"]) == (
        f"checkpoint {bad}: conv1.weight holds NaN or infinite values (its training diverged); "
        f"retrain it, for example with a lower learning rate")
    assert not (tmp_path / "runs").exists()


def test_synthetic_data_too_large_for_memory_is_refused(tmp_path, capsys, space_file):
    data = {"name": "synthetic", "kwargs": {"train_size": 10**12, "image_size": 12}}
    space = space_file({"data": data})
    assert _error(capsys, ["--runs-dir", str(tmp_path / "runs"), "train", "--space",
                           str(space)]) == (
        f"search space {space}: data.kwargs: synthetic data of 1000000000000 + 512 images of 1x12x12 would take "
        "5.36e+05 GiB of memory (at most 8 GiB); give fewer or smaller images")
    assert not (tmp_path / "runs").exists()
