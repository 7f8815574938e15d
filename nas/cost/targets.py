"""Cost targets from the command line: `size=60KB`, `bitops=2.1G`, `latency=1.2ms`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from nas.errors import ConfigError

ACCEPTED = "size=60KB (B, KB, MB, KiB, MiB), bitops=2.1G (K, M, G, T) or latency=1.2ms (us, ms, s)"
UNITS = {"size": "bytes", "bitops": "BitOps", "latency": "us"}
_SCALE = {
    "size": {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024 ** 2,
             "gib": 1024 ** 3},
    "bitops": {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12},
    "latency": {"us": 1, "ms": 1e3, "s": 1e6},
}
_PATTERN = re.compile(r"^\s*([a-z]+)\s*=\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$")


@dataclass(frozen=True)
class Target:
    """A cost budget: `value` is in the cost's base unit (bytes, BitOps, microseconds)."""

    cost: str
    value: float
    text: str

    @property
    def unit(self) -> str:
        return UNITS[self.cost]


def parse_target(text: str) -> Target:
    match = _PATTERN.match(str(text).lower())
    if not match or match.group(1) not in _SCALE or match.group(3) not in _SCALE[match.group(1)]:
        raise ConfigError(f"target {text!r} is not understood; use {ACCEPTED}")
    cost, number, suffix = match.groups()
    value = float(number) * _SCALE[cost][suffix]
    if value <= 0:
        raise ConfigError(f"target {text!r} must be positive; use {ACCEPTED}")
    return Target(cost, value, text.strip())


def format_cost(cost: str, value: float) -> str:
    """Human-readable cost: 61.4 KB, 2.10 GBitOps, 1.234 ms."""
    if cost == "size":
        for unit, scale in (("MB", 1e6), ("KB", 1e3)):
            if value >= scale:
                return f"{value / scale:.3g} {unit}"
        return f"{value:.0f} B"
    if cost == "bitops":
        for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
            if value >= scale:
                return f"{value / scale:.3g} {unit}BitOps"
        return f"{value:.0f} BitOps"
    return f"{value / 1e3:.3f} ms" if value >= 1000 else f"{value:.2f} us"
