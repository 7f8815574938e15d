"""`nas bench qat`: the recovery arithmetic, the goals' verdicts, and bad input."""

import pytest

from nas.bench.qat import recovery, verdicts
from nas.cli import main


def test_recovery_is_the_share_of_the_ptq_loss_won_back():
    assert recovery(90.0, 80.0, 87.0) == 70.0
    assert recovery(90.0, 80.0, 92.5) == 125.0  # QAT past float
    assert recovery(90.0, 80.0, 78.0) == -20.0  # QAT below PTQ
    assert recovery(90.0, 90.0, 91.0) is None   # PTQ lost nothing: no share to speak of
    assert recovery(90.0, 90.5, 91.0) is None


def _row(plan, float_acc, ptq, qat, qat_distill):
    return {"plan": plan, "float": float_acc, "ptq": ptq, "qat": qat, "qat_distill": qat_distill,
            "recovery": recovery(float_acc, ptq, qat),
            "recovery_distill": recovery(float_acc, ptq, qat_distill)}


def test_verdicts_apply_each_goal_to_its_plan():
    rows = [_row("W8A8", 90.0, 89.5, 90.1, 90.2), _row("W4A4", 90.0, 80.0, 86.9, 87.0),
            _row("searched", 90.0, 50.0, 60.0, 61.0)]
    got = [(v["plan"], v["measured"], v["met"]) for v in verdicts(rows)]
    assert got == [("W8A8", "+0.50 points", True), ("W4A4", "69.0 %", False),
                   ("W4A4", "70.0 %", True)]
    assert verdicts([_row("W8A8", 90.0, 89.4, 90.0, 90.0)])[0]["met"] is False


@pytest.mark.parametrize("args, message", [
    (["--qat-budget", "soon"], "budget 'soon' is not understood"),
    (["--search-run", "nowhere"], "--search-run nowhere has no supernet.pt; pass the run folder "
                                  "of a finished DNAS 'nas search'"),
    (["--space", "no_such_space"], "no_such_space"),
])
def test_bad_input_is_one_line(tmp_path, capsys, args, message):
    runs = tmp_path / "runs"
    assert main(["--runs-dir", str(runs), "bench", "qat", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nas: error: ") and len(err.splitlines()) == 1 and message in err, err
    assert not runs.exists()
