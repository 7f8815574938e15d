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


ACCEPTED = "use '90s', '5m', '2h' (time) or '3ep' / '3 epochs' (epochs)"


@pytest.mark.parametrize("text, message", [
    ("", "budget '' is not understood"),
    ("5", "budget '5' is not understood"),
    ("ten minutes", "budget 'ten minutes' is not understood"),
    ("5 parsecs", "budget '5 parsecs' is not understood"),
    ("-3ep", "budget '-3ep' is not understood"),
    ("5m30s", "budget '5m30s' is not understood"),
    ("3 trials", "budget '3 trials' is not understood"),
    ("0s", "budget '0s' must be positive"),
    ("0.0h", "budget '0.0h' must be positive"),
    ("0ep", "budget '0ep' must be positive"),
    ("2.5ep", "budget '2.5ep': epochs must be a whole number"),
    ("0.5 epochs", "budget '0.5 epochs': epochs must be a whole number"),
])
def test_rejected_forms_say_why_and_list_what_is_accepted(text, message):
    with pytest.raises(BudgetError) as err:
        parse_budget(text)
    assert str(err.value) == f"{message}; {ACCEPTED}"


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
