"""What a value read from YAML or JSON is: bool is an int subclass in Python, and a file's
`true` must not pass for a count or a rate."""

from __future__ import annotations

import math
from typing import Any


def is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float (nan and infinities included), not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)
