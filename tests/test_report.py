"""`nas report`: a report built from small real run folders (a DNAS search, a random search,
a ptq run): the figures open and are drawn, every CSV value is the runs' own number, and
runs that do not compare are refused with one line."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import nas_in_process

from nas.cli import main

FIGURES = ["accuracy-vs-size", "accuracy-vs-bitops", "accuracy-vs-latency",
           "layers-1-dnas", "layers-2-random", "layers-3-ptq"]


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def report(supernet_run, trained, ray_address, tmp_path_factory):
    """(dnas run, random run, ptq run, report folder)."""
    space, dnas = supernet_run
    _, checkpoint = trained
    root = tmp_path_factory.mktemp("report")
    made = []
    for command in (["search", "--method", "random", "--space", str(space), "--budget",
                     "4trials", "--supernet", str(dnas), "--ray-address", ray_address,
                     "--no-progress"],
                    ["ptq", "--checkpoint", str(checkpoint), "--plan", str(dnas / "plan.yaml"),
                     "--calib-batches", "1"]):
        runs = root / command[0]
        result = nas_in_process("--runs-dir", str(runs), *command)
        assert result.returncode == 0, result.stderr
        (folder,) = runs.iterdir()
        made.append(folder)
    out = root / "out"
    result = nas_in_process("report", str(dnas), *map(str, made), "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert f"report: {out / 'report.md'}" in result.stdout
    return dnas, made[0], made[1], out


def test_figures_open_and_are_drawn(report):
    import matplotlib.image

    out = report[-1]
    for stem in FIGURES:
        image = matplotlib.image.imread(out / f"{stem}.png")
        assert image.shape == (500, 800, 4), stem  # figures.SIZE at figures.DPI, RGBA
        drawn = (image[..., :3] < 0.9).any(axis=-1).mean()  # pixels not (near) white
        assert 0.01 < drawn < 0.6, (stem, drawn)


def test_report_md_shows_every_figure_and_its_data(report):
    out = report[-1]
    text = (out / "report.md").read_text()
    for stem in FIGURES:
        assert f"]({stem}.png)" in text and f"]({stem}.csv)" in text
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(FIGURES)
    assert not list(out.parent.glob("*.partial"))


def test_trade_off_csv_holds_the_runs_own_numbers(report):
    dnas, random, ptq, out = report
    table = rows(out / "accuracy-vs-size.csv")

    def by_run(run):
        return [r for r in table if r["run"] == run.name]

    trials = rows(random / "trials.csv")
    got = by_run(random)
    assert [(r["point"], float(r["accuracy"]), float(r["size_bytes"]), r["plan"]) for r in got] \
        == [(t["trial"], float(t["accuracy"]), float(t["size"]), t["plan"]) for t in trials]
    candidates = [c for c in rows(dnas / "candidates.csv") if c["one_shot_arch_accuracy"]]
    assert [(r["point"], float(r["accuracy"]), float(r["size_bytes"])) for r in by_run(dnas)] \
        == [(c["candidate"], float(c["one_shot_arch_accuracy"]), float(c["size"]))
            for c in candidates]
    summary = json.loads((ptq / "summary.json").read_text())
    (point,) = by_run(ptq)
    assert (float(point["accuracy"]), float(point["size_bytes"]), point["accuracy_kind"]) \
        == (summary["quant_accuracy"], summary["size_bytes"], "ptq test")
    # The front: the trials no other trial beats on accuracy and size at once.
    front = {t["trial"] for t in trials if not any(
        float(o["accuracy"]) >= float(t["accuracy"]) and float(o["size"]) <= float(t["size"])
        and (float(o["accuracy"]), float(o["size"])) != (float(t["accuracy"]), float(t["size"]))
        for o in trials)}
    assert {r["point"] for r in got if r["pareto"] == "True"} == front
    uniform = [r["point"] for r in table if r["run"] == ""]
    assert uniform == ["W2A4", "W2A8", "W4A4", "W4A8", "W8A4", "W8A8"]  # the space's choices


def test_summary_and_layer_csv_hold_each_plans_numbers(report):
    dnas, random, ptq, out = report
    summary = {r["run"]: r for r in rows(out / "summary.csv")}
    dnas_summary = json.loads((dnas / "summary.json").read_text())
    random_summary = json.loads((random / "summary.json").read_text())
    ptq_summary = json.loads((ptq / "summary.json").read_text())
    assert (float(summary[dnas.name]["size_bytes"]), float(summary[dnas.name]["accuracy"]),
            summary[dnas.name]["accuracy_kind"]) == (dnas_summary["plan_cost"],
                                                     dnas_summary["one_shot_test_accuracy"],
                                                     "one-shot test")
    assert (float(summary[random.name]["size_bytes"]), float(summary[random.name]["accuracy"]),
            int(summary[random.name]["trials"])) == (random_summary["plan_cost"],
                                                     random_summary["test_accuracy"], 4)
    assert float(summary[ptq.name]["size_bytes"]) == ptq_summary["size_bytes"]
    plan = yaml.safe_load((random / "plan.yaml").read_text())["layers"]
    layers = rows(out / "layers-2-random.csv")
    assert [(r["layer"], int(r["w_bits"]), int(r["a_bits"])) for r in layers] \
        == [(name, p["w_bits"], p["a_bits"]) for name, p in plan.items()]
    assert sum(float(r["size_bytes"]) for r in layers) == random_summary["plan_cost"]
    # Shares of a sum: exact up to float rounding of the divisions.
    assert sum(float(r["size_share_percent"]) for r in layers) == pytest.approx(100, abs=1e-9)


def _copy(run: Path, tmp_path: Path, edit_plan=None, edit_space=None) -> Path:
    folder = tmp_path / run.name
    shutil.copytree(run, folder, ignore=shutil.ignore_patterns("*.pt", "ray*"))
    for name, edit in (("plan.yaml", edit_plan), ("config.yaml", edit_space)):
        if edit:
            raw = yaml.safe_load((folder / name).read_text())
            edit(raw)
            (folder / name).write_text(yaml.safe_dump(raw, sort_keys=False))
    return folder


def _plan_of_other(raw):
    raw["model"]["space"] = "other"


def _space_named_other(raw):
    raw["space"]["name"] = "other"


def test_runs_that_do_not_compare_are_refused(report, trained, tmp_path, capsys):
    dnas, random, ptq, _ = report
    other = _copy(ptq, tmp_path, _plan_of_other, _space_named_other)
    batch8 = _copy(random, tmp_path / "b8", lambda p: p["costs"].update(latency_batch=8))
    partial = tmp_path / "x.partial"
    shutil.copytree(ptq, partial)
    empty = tmp_path / "empty"
    empty.mkdir()
    train_run = trained[1].parent
    runs_dir = tmp_path / "runs"
    layers = yaml.safe_load((dnas / "plan.yaml").read_text())["model"]["layer_hash"]
    fix = "give the folder of a finished nas search, ptq or qat run"
    cases = [
        ([dnas, other], f"runs are from different spaces: {dnas.name} is synthetic_resnet8 "
                        f"(layer_hash {layers}), {other.name} is other (layer_hash {layers}); "
                        f"report runs of one space together"),
        ([dnas, batch8], f"runs use different latency cost models: {dnas.name} is h200 batch "
                         f"1, {batch8.name} is h200 batch 8; report runs of one device and "
                         f"batch together"),
        ([partial], f"{partial} is an unfinished run (.partial: its command stopped before "
                    f"the end); {fix}"),
        ([empty], f"{empty} is not a run folder (no summary.json); {fix}"),
        ([tmp_path / "nowhere"], f"{tmp_path / 'nowhere'} is not a folder; {fix}"),
        ([train_run], f"{train_run} is a run of nas train, which scores no plan; {fix}"),
    ]
    for folders, message in cases:
        assert main(["--runs-dir", str(runs_dir), "report", *map(str, folders)]) == 2
        assert capsys.readouterr().err == f"nas: error: {message}\n"
    taken = tmp_path / "empty"
    assert main(["report", str(dnas), "--output", str(taken)]) == 2
    assert capsys.readouterr().err == (f"nas: error: --output {taken} already exists; give a "
                                       f"new folder, or leave --output out to write a run "
                                       f"folder under --runs-dir\n")
    assert not runs_dir.exists()  # nothing written


def test_default_output_is_a_run_folder(report, tmp_path, capsys):
    dnas = report[0]
    assert main(["--runs-dir", str(tmp_path), "report", str(dnas)]) == 0
    (folder,) = tmp_path.iterdir()
    assert folder.name.endswith("-synthetic_resnet8-report")
    assert {"report.md", "summary.json", "config.yaml", "layers-1-dnas.png"} \
        <= {p.name for p in folder.iterdir()}
    assert f"report: {folder / 'report.md'}" in capsys.readouterr().out
