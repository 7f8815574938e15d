"""`nas bench league`: the hypervolume's arithmetic on hand-made fronts, and one tiny league
whose JSON and table agree with its own run folders."""

import csv
import json
import statistics
from pathlib import Path

import yaml

from nas.bench.league import hypervolume, tables
from nas.cli import main
from nas.table import format_table


def test_hypervolume_of_hand_made_fronts():
    # One plan: the rectangle from it to the reference point, (4 - 1) x (3 - 1).
    assert hypervolume([(1.0, 3.0)], 4.0, 1.0) == 6.0
    # A staircase: 2 points above the floor from size 1 to 2, then 4 from 2 to 4: 2 + 8.
    assert hypervolume([(1, 2), (2, 4)], 4, 0) == 10.0
    assert hypervolume([(2, 4), (1, 2)], 4, 0) == 10.0  # in any order
    # A dominated plan, a repeated one and one below another's accuracy at more size add
    # nothing.
    assert hypervolume([(1, 2), (2, 4), (3, 3), (2, 4), (1.5, 1.5)], 4, 0) == 10.0
    # Plans at or past the reference point in either coordinate add nothing.
    assert hypervolume([(4, 9), (5, 9), (1, 0), (2, -1)], 4, 0) == 0.0
    assert hypervolume([], 4, 0) == 0.0
    # A better plan at a smaller size swallows the later ones: (4 - 0.5) x (5 - 1).
    assert hypervolume([(0.5, 5), (1, 2), (2, 4)], 4, 1) == 14.0
    # Three steps: [1, 2) x 1 + [2, 3) x 2 + [3, 6) x 4.
    assert hypervolume([(1, 81), (2, 82), (3, 84), (2.5, 81.5)], 6, 80) == 15.0


def test_budget_must_be_a_time(tmp_path, capsys, trained):
    runs = tmp_path / "runs"
    assert main(["--runs-dir", str(runs), "bench", "league", "--checkpoint", str(trained[1]),
                 "--budget", "3ep"]) == 2
    err = capsys.readouterr().err
    assert err == ("nas: error: --budget 3ep: give a wall-clock time such as 90s or 2m (the "
                   "league compares methods at equal wall-clock budgets)\n")
    assert not runs.exists()


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_tiny_league_reports_what_its_run_folders_hold(ray_address, trained, space_file,
                                                         tmp_path, monkeypatch, capsys):
    from nas.search import run_discrete

    # Two searchable layers with two precisions each: 4 plans, 3 within the target, so every
    # discrete searcher runs out of plans after a few trials. Tune's time limit gets a minute
    # more than the budget (a negative reserve): on a busy machine its workers may take
    # longer to start than this tiny budget, and the searches end on their own long before.
    space = space_file({"choices": ["W8A8", "W2A8"],
                        "searchable": ["layer1.0.conv1", "layer1.0.conv2"]})
    monkeypatch.setattr(run_discrete, "TEST_RESERVE_S", -60.0)
    runs = tmp_path / "runs"
    code = main(["--runs-dir", str(runs), "bench", "league", "--checkpoint", str(trained[1]),
                 "--space", str(space), "--budget", "4s", "--targets", "0.9", "--seeds",
                 "2", "--workers", "1", "--eval-batches", "2", "--hv-floor", "0"])
    out = capsys.readouterr().out
    assert code == 0, out
    (league,) = runs.iterdir()
    results = json.loads((league / "bench_league.json").read_text())
    assert [t["fraction"] for t in results["targets"]] == [0.9]
    assert len(results["runs"]) == 5 * 2
    assert {(r["method"], r["seed"], r["target"]) for r in results["runs"]} == {
        (m, s, t["value"]) for m in ("dnas", "bayes", "rl", "random", "uniform")
        for s in (0, 1) for t in results["targets"]}
    for r in results["runs"]:
        folder = league / r["run"]
        summary = json.loads((folder / "summary.json").read_text())
        config = yaml.safe_load((folder / "config.yaml").read_text())
        assert (summary["method"], config["seed"], config["target"]) == (
            r["method"], r["seed"], r["target_text"])
        if r["method"] == "dnas":
            assert r["test_accuracy"] == summary["one_shot_test_accuracy"]
            assert r["steps"] == summary["steps"] and r["trials"] is None
            scored = [row for row in _rows(folder / "candidates.csv")
                      if row["one_shot_arch_accuracy"]]
            points = [[float(row["size"]), float(row["one_shot_arch_accuracy"])]
                      for row in scored]
            assert config["checkpoint"] == results["checkpoint"]
            assert summary["budget"] == "4s"
        else:
            assert r["test_accuracy"] == summary["test_accuracy"]
            assert r["trials"] == summary["trials"] == len(_rows(folder / "trials.csv"))
            points = [[float(row["size"]), float(row["accuracy"])]
                      for row in _rows(folder / "trials.csv")]
            shared = results["supernets"][r["seed"]]["run"]
            if r["run"] == shared:  # the seed's first uniform search trains the supernet
                assert r["method"] == "uniform" and config["checkpoint"] == results["checkpoint"]
                assert summary["budget"] == "4s"
            else:  # every other discrete search of the seed scores on it, for half the budget
                # (by its path while the league ran, in the league's .partial folder)
                assert Path(config["supernet"]).parts[-2:] == Path(shared).parts[-2:]
                assert summary["budget"] == "2s"
        assert r["points"] == points and r["plans_scored"] == len(points)
    # Each method's and seed's hypervolume: every plan its searches scored, against the
    # largest target and the floor.
    ref = results["hv_reference"]
    assert ref == {"size_bytes": results["targets"][0]["value"], "accuracy": 0.0}
    assert len(results["hypervolume"]) == 10
    for h in results["hypervolume"]:
        points = [(s / 1e3, a) for r in results["runs"] if (r["method"], r["seed"]) == (
            h["method"], h["seed"]) for s, a in r["points"]]
        assert h["hypervolume"] == hypervolume(points, ref["size_bytes"] / 1e3, 0.0) > 0
    # The uniform searches chose the one uniform plan within the target.
    assert {r["precision"] for r in results["runs"] if r["method"] == "uniform"} == {"W2A8"}
    # The printed tables are the JSON's: means with the seed-to-seed spread.
    printed = tables(results)
    for title, headers, rows in printed:
        assert f"{title}\n{format_table(headers, rows)}" in out
    league_rows = {row[0]: row for row in printed[0][2]}
    for method in ("dnas", "bayes", "rl", "random", "uniform"):
        hv = [h["hypervolume"] for h in results["hypervolume"] if h["method"] == method]
        tests = [r["test_accuracy"] for r in results["runs"]
                 if r["method"] == method and r["target"] == results["targets"][0]["value"]]
        assert league_rows[method][1] == f"{statistics.mean(hv):.1f} ± {statistics.stdev(hv):.1f}"
        assert league_rows[method][2] == (f"{statistics.mean(tests):.2f} ± "
                                          f"{statistics.stdev(tests):.2f}")
    assert [row[-1] for row in printed[-1][2]] == [r["run"] for r in results["runs"]]
    # The report of every run: figures and the data behind them, from the run folders.
    report = league / results["report"]
    assert (report / "accuracy-vs-size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plotted = [row for row in _rows(report / "accuracy-vs-size.csv") if row["run"]]
    assert len(plotted) == sum(len(r["points"]) for r in results["runs"])


def _record(method, seed, test, trials=None, steps=None, failed=None):
    return {"method": method, "seed": seed, "target": 24000.0, "target_text": "size=24KB",
            "run": f"runs/{method}-{seed}", "seconds": 50.0, "budget": "50s",
            "test_accuracy": test, "arch_accuracy": test, "plan_size": None if failed else 23000.0,
            "meets_target": None if failed else True, "trials": trials, "steps": steps,
            "plans_scored": 0 if failed else 1, "precision": "W2A8" if method == "uniform"
            else None if failed else "mixed", "points": [], **({"failed": failed} if failed else {})}


def test_a_search_without_a_plan_is_counted_and_left_out_of_the_means():
    runs = [_record("uniform", 0, 85.0, trials=2), _record("uniform", 1, 86.0, trials=2),
            _record("bayes", 0, 86.5, trials=4),
            _record("bayes", 1, None, trials=0, failed="no plan within the target was evaluated"),
            _record("dnas", 0, 87.0, steps=100), _record("dnas", 1, 88.0, steps=120),
            *(_record(m, s, 85.5, trials=3) for m in ("rl", "random") for s in (0, 1))]
    hv = [{"method": r["method"], "seed": r["seed"], "plans": 1, "hypervolume": 10.0 + r["seed"]}
          for r in runs]
    results = {"runs": runs, "hypervolume": hv, "float_test_accuracy": 89.0, "budget": "100s",
               "targets": [{"fraction": 0.3, "value": 24000.0, "text": "size=24KB"}],
               "hv_reference": {"size_bytes": 24000.0, "accuracy": 80.0}}
    league, margins, uniform, detail = (rows for _, _, rows in tables(results))
    by_method = {row[0]: row for row in league}
    # bayes: the seed with a plan only, its trials over both searches, one search of two failed.
    assert by_method["bayes"][2:5] == ["86.50", "2 ± 3", "1 of 2"]
    assert by_method["dnas"][2:5] == ["87.50 ± 0.71", "110 ± 14", "0 of 2"]
    margin = {row[0]: row for row in margins}
    assert margin["bayes"][2] == "+1.50"  # seed 0 only: 86.5 - 85.0
    assert margin["dnas"][2] == "+2.00 ± 0.00"
    assert uniform == [["size=24KB", "W2A8", "85.50 ± 0.71", "89.00%", "+3.50 ± 0.71", "yes"]]
    failed = next(row for row in detail if row[0] == "bayes" and row[1] == 1)
    assert failed[3:7] == ["-", "-", "-", "0 trials, no plan"]
