"""Real, short training runs through the CLI, as a user would start them."""

import json
import types

import pytest
import torch

from nas.budget import parse_budget
from nas.train import TrainConfig, lr_at, train
from tests.conftest import needs_fmnist


def test_lr_schedule():
    assert lr_at(0.0, 0.1, 0.1) == pytest.approx(1e-3)  # never exactly zero
    assert lr_at(0.1, 0.1, 0.1) == pytest.approx(0.1)
    assert lr_at(0.55, 0.1, 0.1) == pytest.approx(0.05)
    assert lr_at(1.0, 0.1, 0.1) == pytest.approx(0.0, abs=1e-12)


def _single_run(runs):
    (folder,) = runs.iterdir()
    return folder


@pytest.mark.slow
def test_train_then_eval_on_synthetic(cli, tmp_path, space_file):
    runs = tmp_path / "runs"
    result = cli("--runs-dir", str(runs), "--seed", "1", "train", "--space", str(space_file()),
                 "--budget", "3ep", "--no-progress")
    assert result.returncode == 0, result.stderr
    folder = _single_run(runs)
    assert folder.name.endswith("-synthetic_resnet8-train")
    assert sorted(p.name for p in folder.iterdir()) == [
        "best.pt", "config.yaml", "log.txt", "metrics.jsonl", "summary.json"]
    summary = json.loads((folder / "summary.json").read_text())
    metrics = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3] and summary["epochs"] == 3
    # Ten well-separated classes: far above the 10 % of chance after three epochs.
    assert summary["test_accuracy"] > 60
    assert f"test accuracy: {summary['test_accuracy']:.2f}%" in result.stdout
    assert f"run folder: {folder}" in result.stdout

    evaluated = cli("--runs-dir", str(runs), "--seed", "1", "eval", "--checkpoint",
                    str(folder / "best.pt"))
    assert evaluated.returncode == 0, evaluated.stderr
    # Same weights, same test split: the same accuracy to the last digit.
    assert f"test accuracy: {summary['test_accuracy']:.2f}%" in evaluated.stdout
    (eval_folder,) = [p for p in runs.iterdir() if p.name.endswith("-eval")]
    assert json.loads((eval_folder / "summary.json").read_text())["accuracy"] == pytest.approx(
        summary["test_accuracy"])
    # The arch split is the one training selected best.pt on: its best validation accuracy.
    arch = cli("--runs-dir", str(tmp_path / "runs_arch"), "--seed", "1", "eval",
               "--checkpoint", str(folder / "best.pt"), "--split", "arch")
    assert arch.returncode == 0, arch.stderr
    assert f"arch accuracy: {summary['val_accuracy']:.2f}%" in arch.stdout
    (arch_folder,) = (tmp_path / "runs_arch").iterdir()
    # 20 % of the 640 training images are held out as the arch split; the test split has 256.
    assert json.loads((arch_folder / "summary.json").read_text())["samples"] == 128


def ticking_clock(monkeypatch, dataset, seconds_per_batch=1.0):
    """A scripted clock for the budget: it stands still except that every training batch
    drawn from `dataset` takes `seconds_per_batch`. Returns the list holding the time."""
    now = [1000.0]
    monkeypatch.setattr("nas.budget.time", types.SimpleNamespace(monotonic=lambda: now[0]))
    draw = dataset.batch

    def slow_batch(*args, **kwargs):
        now[0] += seconds_per_batch
        return draw(*args, **kwargs)

    monkeypatch.setattr(dataset, "batch", slow_batch)
    return now


@pytest.mark.parametrize("budget, steps", [("2.5s", 3), ("3s", 3), ("10.5s", 11), ("16s", 16)])
def test_time_budget_stops_at_the_first_step_past_it(monkeypatch, synthetic_data, budget, steps):
    splits = synthetic_data
    per_epoch = len(splits.train) // 64
    assert per_epoch == 8  # so 10.5 s stops inside the second epoch, 16 s at its very end
    ticking_clock(monkeypatch, splits.train)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12 * 12, 10))
    records = []
    result = train(model, splits, TrainConfig(parse_budget(budget), batch_size=64, progress=False),
                   torch.device("cpu"), on_epoch=lambda record, improved: records.append(record))
    # One second a step: the clock reads k s after step k and the loop stops at the first
    # step that reaches the budget, even inside an epoch, and starts no other epoch.
    assert (result.steps, result.seconds) == (steps, float(steps))
    assert result.epochs == pytest.approx(steps / per_epoch)
    assert [(r["epoch"], r["steps"], r["seconds"]) for r in records] == [
        (e + 1, min(steps, (e + 1) * per_epoch), float(min(steps, (e + 1) * per_epoch)))
        for e in range(-(-steps // per_epoch))]


@pytest.mark.slow
def test_time_budget_ends_a_cli_run(cli, tmp_path, space_file):
    runs = tmp_path / "runs"
    result = cli("--runs-dir", str(runs), "train", "--space", str(space_file()),
                 "--budget", "3s", "--no-progress")
    assert result.returncode == 0, result.stderr
    folder = _single_run(runs)
    summary = json.loads((folder / "summary.json").read_text())
    metrics = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert summary["budget"] == "3s" and "budget 3s" in result.stdout
    # The run ended on the clock, not on a count of epochs: it had spent the budget when it
    # stopped (a slow machine only makes that later), and its last record is the end.
    assert summary["train_seconds"] >= 3.0 and metrics[-1]["seconds"] >= 3.0
    assert summary["steps"] == metrics[-1]["steps"] > 0
    assert [m["epoch"] for m in metrics] == list(range(1, len(metrics) + 1))


@pytest.mark.slow
@needs_fmnist
def test_short_train_on_fashion_mnist_subset(cli, tmp_path):
    runs = tmp_path / "runs"
    result = cli("--runs-dir", str(runs), "train", "--budget", "2ep", "--train-subset", "3000",
                 "--test-subset", "1000", "--no-progress")
    assert result.returncode == 0, result.stderr
    summary = json.loads((_single_run(runs) / "summary.json").read_text())
    # 3000 images, two epochs of ResNet-8: measured 63-72 % over seeds 0-3 and machines
    # (floating-point differences act like a new seed); chance is 10 %.
    assert summary["test_accuracy"] > 50
