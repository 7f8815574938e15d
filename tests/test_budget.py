import pytest

from nas.budget import Budget, BudgetClock, parse_budget
from nas.errors import BudgetError


@pytest.mark.parametrize("text, kind, value", [
    ("90s", "seconds", 90), ("5m", "seconds", 300), ("2h", "seconds", 7200),
    ("1.5h", "seconds", 5400), ("3ep", "epochs", 3), ("3 epochs", "epochs", 3),
    ("1 epoch", "epochs", 1), (" 10 MIN ", "seconds", 600),
])
def test_accepted_forms(text, kind, value):
    assert parse_budget(text) == Budget(kind, value)


@pytest.mark.parametrize("text", ["", "5", "ten minutes", "5 parsecs", "-3ep", "0s", "2.5ep",
                                  "5m30s", "3 trials"])
def test_rejected_forms_list_what_is_accepted(text):
    with pytest.raises(BudgetError) as err:
        parse_budget(text)
    assert "'90s', '5m', '2h'" in str(err.value) and "'3 epochs'" in str(err.value)


def test_epoch_clock_counts_steps():
    clock = BudgetClock(Budget("epochs", 2), steps_per_epoch=10)
    for _ in range(5):
        clock.step()
    assert clock.fraction() == pytest.approx(0.25)
    for _ in range(15):
        clock.step()
    assert clock.exhausted()


def test_time_clock_follows_wall_time(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("nas.budget.time.monotonic", lambda: now[0])
    clock = BudgetClock(Budget("seconds", 60), steps_per_epoch=10)
    now[0] = 130.0
    assert clock.fraction() == pytest.approx(0.5) and not clock.exhausted()
    now[0] = 161.0
    assert clock.exhausted()
