"""The roofline estimate calibrated on a device's measured latency tables.

The roofline (`roofline.roofline_us`) is what the hardware allows. How far our kernels are
from it depends on the layer and above all on the precision: packed 4-bit operands save bytes,
which the roofline counts, but the kernels unpack them in their main loop, so in the H200
tables they take more time than 8-bit ones, not less. Ranked by the bare roofline, a layer's
choices come out about backwards (`nas bench estimate` measures this).

Where a device has measured tables, an entry they lack is estimated as a roofline time times a
factor fitted to the tables by least squares on logarithms (with a little ridge, so that a
feature the tables never vary stays at 0):
- integer choices: log(measured / roofline at W8A8) against 1, log(roofline at W8A8),
  depthwise, activations packed, weights packed, and each packed flag times log(K) (K the
  reduction length: how much unpacking each output needs). The bits enter only through the
  packing, which is what the kernels see (`packed_operands`): depthwise layers and odd channel
  counts run unpacked whatever the bits.
- float choices: log(fp16 cuDNN / fp16 roofline), from the tables' baseline column (the
  median over a geometry's entries, which time it once per precision), against 1, log(fp16
  roofline) and depthwise. 32-bit layers get the same fit applied to their TF32 roofline (no
  table times them).
A feature is clipped to the range it spans in the tables where it is nonzero (a packed
operand's log K to the packed entries' range), and a predicted log-factor to the range the
tables show, so that a layer unlike any measured one (a larger batch, say) takes the factor of
the nearest measured ones rather than an extrapolation. A fit needs MIN_GEOMETRIES layer
geometries (and batches): 7 coefficients are not to be fitted to the precisions of a few.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from nas.cost.device_spec import DeviceSpec
from nas.cost.roofline import roofline_us
from nas.cost.tables import LatencyTable, layer_from_key
from nas.kernels.configs import packed_operands
from nas.spaces import FLOAT_BITS

MIN_GEOMETRIES = 10
RIDGE = 1e-2


def _depthwise(info) -> bool:
    return info.groups > 1 and info.groups == info.in_channels


def integer_features(info, w_bits: int, a_bits: int, base_us: float) -> list[float]:
    """The integer fit's features of one choice; base_us: the layer's W8A8 roofline time."""
    x_packed, w_packed = packed_operands(info, w_bits, a_bits)
    log_k = math.log(info.in_channels // info.groups * info.kernel[0] * info.kernel[1])
    return [1.0, math.log(base_us), float(_depthwise(info)), float(x_packed), float(w_packed),
            x_packed * log_k, w_packed * log_k]


def float_features(info, base_us: float) -> list[float]:
    """The float fit's features; base_us: the layer's roofline time at its float width."""
    return [1.0, math.log(base_us), float(_depthwise(info))]


@dataclass(frozen=True)
class Fit:
    """log(time / roofline) = coef . features, each nonzero feature clipped to
    [lows, highs] and the result to [low, high]."""

    coef: tuple[float, ...]
    lows: tuple[float, ...]
    highs: tuple[float, ...]
    low: float
    high: float
    entries: int

    @classmethod
    def least_squares(cls, features: list[list[float]], targets: list[float],
                      geometries: int) -> "Fit | None":
        if geometries < MIN_GEOMETRIES:
            return None
        import numpy as np

        x, y = np.asarray(features, dtype=np.float64), np.asarray(targets, dtype=np.float64)
        coef = np.linalg.solve(x.T @ x + RIDGE * np.eye(x.shape[1]), x.T @ y)
        on = x != 0
        lows = np.where(on, x, np.inf).min(axis=0)
        highs = np.where(on, x, -np.inf).max(axis=0)
        never = ~on.any(axis=0)  # a feature the tables never turn on: its range is {0}
        lows[never], highs[never] = 0.0, 0.0
        return cls(tuple(map(float, coef)), tuple(map(float, lows)), tuple(map(float, highs)),
                   float(y.min()), float(y.max()), len(targets))

    def factor(self, features: list[float]) -> float:
        log_factor = sum(c * (min(max(f, lo), hi) if f else 0.0)
                         for c, f, lo, hi in zip(self.coef, features, self.lows, self.highs))
        return math.exp(min(max(log_factor, self.low), self.high))


@dataclass(frozen=True)
class Calibration:
    """The integer and float fits of one device's tables (either may be missing)."""

    integer: Fit | None
    floating: Fit | None
    sources: tuple[str, ...]

    @classmethod
    def fit(cls, table: LatencyTable, spec: DeviceSpec) -> "Calibration | None":
        """Fitted to every entry of `table` whose key names its layer; None when neither fit
        has MIN_GEOMETRIES geometries. (Table entries are positive: `LatencyTable` checks.)"""
        int_x, int_y, baselines = [], [], {}
        for key, us in table.entries.items():
            parsed = layer_from_key(key)
            if parsed is None:
                continue
            info, batch, w_bits, a_bits = parsed
            if w_bits in FLOAT_BITS or a_bits in FLOAT_BITS:
                continue  # timed as torch convolutions: the baseline column covers floats
            base = roofline_us(info, 8, 8, batch, spec)
            int_x.append(integer_features(info, w_bits, a_bits, base))
            int_y.append(math.log(us / base))
            geometry = key.rsplit(":", 1)[0]  # the key less its bits: geometry and batch
            baselines.setdefault(geometry, (info, batch, []))[2].append(
                table.baselines.get(key))
        float_x, float_y = [], []
        for info, batch, times in baselines.values():
            times = [t for t in times if t is not None]
            if times:
                base16 = roofline_us(info, 16, 16, batch, spec)
                float_x.append(float_features(info, base16))
                float_y.append(math.log(statistics.median(times) / base16))
        integer = Fit.least_squares(int_x, int_y, len(baselines))
        floating = Fit.least_squares(float_x, float_y, len(float_y))
        if integer is None and floating is None:
            return None
        return cls(integer, floating, tuple(table.sources))

    def estimate_us(self, info, w_bits: int, a_bits: int, batch: int,
                    spec: DeviceSpec) -> float | None:
        """The calibrated estimate of one choice (None where no fit covers it)."""
        if w_bits in FLOAT_BITS or a_bits in FLOAT_BITS:
            if self.floating is None:
                return None
            base = roofline_us(info, w_bits, a_bits, batch, spec)
            return base * self.floating.factor(float_features(info, base))
        if self.integer is None:
            return None
        base = roofline_us(info, 8, 8, batch, spec)
        return base * self.integer.factor(integer_features(info, w_bits, a_bits, base))

    def describe(self) -> str:
        fits = (("integer", "integer", self.integer), ("fp16 cuDNN", "float", self.floating))
        parts = [f"{fit.entries} {data} entries" for data, _, fit in fits if fit is not None]
        n = len(self.sources)
        bare = [f"{choices} choices: the bare roofline" for _, choices, fit in fits if fit is None]
        return (f"{' and '.join(parts)} of {n} measured table{'s' if n > 1 else ''}"
                + (f" ({bare[0]})" if bare else ""))
