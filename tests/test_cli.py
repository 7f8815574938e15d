"""Bad input is one line, exit 2, nothing on disk: `nas.cli.main` in this process for each
case, and the real `nas` command in a subprocess for what only a process shows."""

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import SYNTHETIC_SPACE, run_nas


@pytest.fixture
def bad_files(tmp_path, synthetic_space):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"weights": torch.ones(1)}, tmp_path / "foreign.pt")
    model = synthetic_space.build_model().state_dict()
    good = {"format": "nas-checkpoint/1", "kind": "fp32", "space": SYNTHETIC_SPACE,
            "state_dict": model}
    for name, change in [("supernet", {"kind": "supernet"}),
                         ("future", {"format": "nas-checkpoint/9"}),
                         ("lacks", {"state_dict": {k: v for k, v in model.items()
                                                   if k != "layer1.0.conv1.weight"}}),
                         ("shape", {"state_dict": {**model, "fc.weight": torch.ones(3, 3)}})]:
        torch.save({**good, **change}, tmp_path / f"{name}.pt")
    (tmp_path / "broken.yaml").write_text("name: x\nmodel: {name: resnet8\n")
    (tmp_path / "bits.yaml").write_text(
        "name: bits\nmodel: {name: resnet8}\ndata: {name: synthetic}\nchoices: {w_bits: [4, 12]}\n")
    (tmp_path / "glob.yaml").write_text(
        "name: glob\nmodel: {name: resnet8}\ndata: {name: synthetic}\nsearchable: ['head.*']\n")
    return tmp_path


CASES = [
    (["train", "--budget", "5 parsecs"], "budget '5 parsecs' is not understood; use '90s', '5m'"),
    (["train", "--budget", "0s"], "must be positive"),
    (["train", "--space", "nope"], "unknown search space 'nope'; choose one of"),
    (["train", "--space", "{d}/broken.yaml"], "is not valid YAML at line 3"),
    (["train", "--space", "{d}/bits.yaml"], "choices.w_bits: 12 is not an allowed bit width"),
    (["spaces", "show", "{d}/glob.yaml"], "searchable[0] 'head.*' matches no Conv2d"),
    (["train", "--space", "fmnist_resnet8", "--budget", "1ep", "--data-dir", "{d}/nowhere"],
     "Fashion-MNIST folder {d}/nowhere does not exist; install it with"),
    (["train", "--batch-size", "0", "--budget", "1ep"], "--batch-size 0: must be a positive"),
    (["train", "--train-subset", "-5", "--budget", "1ep"], "train_subset: -5 must be a positive"),
    (["eval", "--checkpoint", "{d}/none.pt"], "checkpoint {d}/none.pt does not exist"),
    (["eval", "--checkpoint", "{d}/junk.pt"], "junk.pt is not a torch checkpoint (a zip file)"),
    (["eval", "--checkpoint", "{d}/foreign.pt"], "is not a nas checkpoint"),
    (["spaces", "show"], "'nas spaces show' needs a space name"),
    (["train", "--seed", "abc"], "argument --seed: invalid int value: 'abc'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["--device", "tpu", "spaces"], "argument --device: invalid choice: 'tpu'"),
    # Every command refuses a bad value up front, one line naming the flag.
    (["--seed", "99999999999999999999", "train"], "argument --seed: 99999999999999999999 is "
     "out of range; give a whole number from 0 to 4294967295 (see 'nas --help')"),
    (["eval", "--checkpoint", "x.pt", "--seed", "-1"], "argument --seed: -1 is out of range"),
    (["train", "--lr", "nan"], "nas: error: --lr nan: must be a positive, finite number"),
    (["train", "--lr", "inf"], "nas: error: --lr inf: must be a positive, finite number"),
    (["eval", "--checkpoint", "{d}/junk.pt", "--batch-size", "0"],
     "nas: error: --batch-size 0: must be a positive whole number"),
    (["ptq", "--checkpoint", "{d}/junk.pt", "--uniform", "W8A8", "--batch-size", "-3"],
     "nas: error: --batch-size -3: must be a positive whole number"),
    (["bench", "ptq", "--batch-size", "0"], "nas: error: --batch-size 0: must be a positive"),
    (["bench", "ptq", "--calib-batches", "0"],
     "nas: error: --calib-batches 0: must be a positive whole number"),
    (["bench", "dnas", "--batch-size", "0"], "nas: error: --batch-size 0: must be a positive"),
    (["bench", "dnas", "--random-plans", "-1"],
     "nas: error: --random-plans -1: must be 0 or a positive whole number"),
    (["train", "--space", ""], "nas: error: --space is empty; give a value, or leave --space out"),
    (["train", "--budget", ""], "nas: error: --budget is empty; give a value, or leave --budget"),
    (["spaces", "list", "fmnist_resnet8"], "nas: error: 'nas spaces list' takes no space name; "
                                           "to see fmnist_resnet8, 'nas spaces show fmnist_resnet8'"),
    (["train", "--runs-dir", "{d}/junk.pt"], "nas: error: --runs-dir {d}/junk.pt is a file, not "
                                             "a folder; give --runs-dir a folder you can write to"),
    (["train", "--runs-dir", "{d}/junk.pt/runs"], "nas: error: --runs-dir {d}/junk.pt/runs "
                                                  "cannot be made: {d}/junk.pt is a file"),
    (["train", "--runs-dir", "/proc/nas-runs"], "nas: error: --runs-dir /proc/nas-runs cannot "
                                                "be made in /proc ("),
    (["eval", "--checkpoint", "{d}"], "nas: error: checkpoint {d} is a directory, not a file; "
                                      "pass the best.pt of a 'nas train' run folder"),
    (["eval", "--checkpoint", "{d}/supernet.pt"], "nas: error: checkpoint {d}/supernet.pt has "
     "kind 'supernet' where 'fp32' is expected; pass the best.pt of a 'nas train' run folder"),
    (["eval", "--checkpoint", "{d}/future.pt"], "nas: error: checkpoint {d}/future.pt has format "
     "'nas-checkpoint/9' where 'nas-checkpoint/1' is expected"),
    (["eval", "--checkpoint", "{d}/lacks.pt"], "nas: error: checkpoint {d}/lacks.pt does not fit "
     "model resnet8: it lacks layer1.0.conv1.weight"),
    (["eval", "--checkpoint", "{d}/shape.pt"], "nas: error: checkpoint {d}/shape.pt does not fit "
     "model resnet8: fc.weight is (3, 3) in it but (10, 32) in the model"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(c[0])[:40] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(cli, bad_files, args, message):
    runs = bad_files / "runs"
    result = cli("--runs-dir", str(runs), *[a.format(d=bad_files) for a in args])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nas: error: "), result.stderr
    assert message.format(d=bad_files) in lines[0]
    assert "Traceback" not in result.stderr
    assert not runs.exists() or list(runs.iterdir()) == []  # nothing written


def test_commands_without_run_folders_ignore_the_runs_dir(cli, bad_files, no_cuda):
    # `nas spaces`, `cost` and `measure` write no run folder: a --runs-dir that is a file
    # (or a file named runs/ where one works) is none of their business.
    junk, runs = bad_files / "junk.pt", bad_files / "runs"
    for runs_dir in (junk, runs):
        result = cli("--runs-dir", str(runs_dir), "spaces", "list")
        assert result.returncode == 0, result.stderr
        assert "fmnist_resnet8" in result.stdout
        result = cli("--runs-dir", str(runs_dir), "cost", "--space", "fmnist_resnet8",
                     "--uniform", "W8A8")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("space fmnist_resnet8")
        # `measure` goes as far as its GPU check (CUDA hidden from it): no --runs-dir error.
        result = cli("--runs-dir", str(runs_dir), "measure", "--space", "fmnist_resnet8",
                     "--output", str(bad_files / "table.json"))
        assert result.returncode == 2
        assert result.stderr.startswith("nas: error: nas measure times kernels on a CUDA GPU "
                                         "and none is available here"), result.stderr
    assert not runs.exists() and junk.read_bytes() == b"not a checkpoint"


# The real command: its exit status, a usage error through argparse, no traceback.
@pytest.mark.parametrize("args, message", [
    (["train", "--budget", "5 parsecs"], "nas: error: budget '5 parsecs' is not understood"),
    (["frobnicate"], "nas: error: argument COMMAND: invalid choice: 'frobnicate'"),
])
def test_the_nas_command_refuses_bad_input_in_one_line(tmp_path, args, message):
    runs = tmp_path / "runs"
    result = run_nas("--runs-dir", str(runs), *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(message), result.stderr
    assert result.stdout == "" and not runs.exists()


def test_debug_shows_the_traceback():
    result = run_nas("--debug", "train", "--budget", "nonsense")
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "BudgetError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("nas: error: budget 'nonsense'")


def test_global_options_after_the_command(cli):
    result = cli("train", "--debug", "--budget", "nonsense")
    assert result.returncode == 2 and "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("nas: error: budget 'nonsense'")


def test_cuda_requested_without_cuda(cli, no_cuda):
    # CUDA hidden from the command: the same error on a machine with a GPU.
    result = cli("--device", "cuda", "train", "--budget", "1ep")
    assert result.returncode == 2
    assert "nas: error: --device cuda was asked for but no CUDA device is available" in result.stderr


def test_a_reader_that_leaves_ends_the_command_quietly():
    # `nas spaces show ... | head -1`: the pipe's reader is gone before a byte is written (its
    # end is closed before the command starts). Exit 141 as for SIGPIPE, and nothing on
    # stderr, from the command or from Python as it exits.
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "nas", "spaces", "show", "fmnist_resnet8"],
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=600)
    finally:
        os.close(write)
    assert proc.returncode == 141 and proc.stderr == ""


def test_spaces_list_and_show(cli):
    listing = cli("spaces")
    assert listing.returncode == 0
    assert "fmnist_resnet8 (default)" in listing.stdout and "imagenet_resnet18" in listing.stdout
    shown = cli("spaces", "show", "cifar10_resnet20")
    assert shown.returncode == 0
    assert "layer3.2.conv2" in shown.stdout and "W8A8 (fixed)" in shown.stdout
    assert "22 layers (20 searchable, 2 fixed)" in shown.stdout


def test_help_and_version(cli):
    version = run_nas("--version")
    assert version.returncode == 0 and version.stdout.startswith("nas ")
    out = cli("--help")
    assert out.returncode == 0
    assert all(cmd in out.stdout for cmd in ("train", "eval", "spaces"))
