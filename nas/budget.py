"""Budgets: how long a command may work, parsed strictly from the command line."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from nas.errors import BudgetError

ACCEPTED = "'90s', '5m', '2h' (time) or '3ep' / '3 epochs' (epochs)"

_UNITS = {
    "s": ("seconds", 1.0), "sec": ("seconds", 1.0), "secs": ("seconds", 1.0),
    "second": ("seconds", 1.0), "seconds": ("seconds", 1.0),
    "m": ("seconds", 60.0), "min": ("seconds", 60.0), "mins": ("seconds", 60.0),
    "minute": ("seconds", 60.0), "minutes": ("seconds", 60.0),
    "h": ("seconds", 3600.0), "hr": ("seconds", 3600.0), "hour": ("seconds", 3600.0),
    "hours": ("seconds", 3600.0),
    "ep": ("epochs", 1.0), "epoch": ("epochs", 1.0), "epochs": ("epochs", 1.0),
}
# Beyond these a budget is a typo, and arithmetic on it (steps, deadlines) overflows.
LIMITS = {"seconds": 366 * 24 * 3600.0, "epochs": 1_000_000.0}
LIMITS_SHOWN = {"seconds": "366 days (8784h)", "epochs": "1000000 epochs"}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*$")


@dataclass(frozen=True)
class Budget:
    """A limit in seconds or in epochs; `value` is in that unit."""

    kind: str  # "seconds" | "epochs"
    value: float

    def __str__(self) -> str:
        if self.kind == "epochs":
            n = int(self.value)
            return f"{n} epoch{'' if n == 1 else 's'}"
        return f"{self.value:g}s"


def recognised(text: str) -> bool:
    """Whether `text` is written as a time or epoch budget (its value still unchecked)."""
    match = _PATTERN.match(str(text).lower())
    return bool(match) and match.group(2) in _UNITS


def parse_budget(text: str) -> Budget:
    """Parse '90s', '5m', '2h', '3ep' or '3 epochs'; anything else is a BudgetError."""
    match = _PATTERN.match(str(text).lower())
    unit = _UNITS.get(match.group(2)) if match else None
    if unit is None:
        raise BudgetError(f"budget {text!r} is not understood; use {ACCEPTED}")
    kind, factor = unit
    value = float(match.group(1)) * factor
    if value <= 0:
        raise BudgetError(f"budget {text!r} must be positive; use {ACCEPTED}")
    if value > LIMITS[kind]:  # also a number too long for a float, which reads as inf
        raise BudgetError(f"budget {shown_budget(text)} is too large; give at most "
                          f"{LIMITS_SHOWN[kind]}")
    if kind == "epochs" and value != int(value):
        raise BudgetError(f"budget {text!r}: epochs must be a whole number; use {ACCEPTED}")
    return Budget(kind, value)


def shown_budget(text: str) -> str:
    """The budget as given, its middle elided when it is too long for a one-line message."""
    text = str(text)
    return repr(text if len(text) <= 40 else f"{text[:20]}...{text[-10:]}")


class BudgetClock:
    """Tracks progress against a budget as a fraction in [0, 1].

    Time budgets count wall time from construction; epoch budgets count finished epochs plus
    the fraction of the current one, so schedules (learning rate, temperature) can follow
    either kind the same way.
    """

    def __init__(self, budget: Budget, steps_per_epoch: int):
        self.budget = budget
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.start = time.monotonic()
        self.steps = 0

    def step(self) -> None:
        self.steps += 1

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    @property
    def epochs_done(self) -> float:
        return self.steps / self.steps_per_epoch

    def fraction(self) -> float:
        if self.budget.kind == "epochs":
            return min(1.0, self.epochs_done / self.budget.value)
        return min(1.0, self.elapsed / self.budget.value)

    def exhausted(self) -> bool:
        return self.fraction() >= 1.0
