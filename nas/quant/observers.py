"""Observers: turn the values a tensor takes into a clipping range [lo, hi].

min-max, moving-average min-max, percentile, MSE (the range that minimises the whitepaper's
saturation-plus-rounding error |x - Q(x)|^2) and KL divergence over a histogram (entropy
calibration as in TensorRT). Per-channel observers (weights) reduce over every axis but
`axis`.
"""

from __future__ import annotations

import numpy as np
import torch

from nas.errors import ConfigError
from nas.quant.fake import qparams, quant_range, tensor_minmax

from nas.quant import METHODS  # noqa: E402  (one list for the CLI and the code)

_SAMPLE_PER_BATCH = 1 << 14  # activation values kept per batch for the MSE / KL searches
_SAMPLE_MAX = 1 << 17  # values per batch for the percentile (torch.quantile has a size limit)


def _reduce_dims(x: torch.Tensor, axis: int | None) -> tuple[int, ...] | None:
    return None if axis is None else tuple(d for d in range(x.ndim) if d != axis)


def _amin_amax(x: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if axis is None:
        return tensor_minmax(x)
    dims = _reduce_dims(x, axis)
    return x.amin(dim=dims), x.amax(dim=dims)


def _per_channel_rows(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """x as [channels, values] (one row when per tensor)."""
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


class Observer:
    """Accumulates statistics over calibration batches; `range()` gives (lo, hi)."""

    def __init__(self, bits: int, symmetric: bool, axis: int | None = None):
        self.bits, self.symmetric, self.axis = bits, symmetric, axis
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        # Sampled observers draw from their own stream, not torch's global one: the same
        # calibration batches give the same ranges in every run.
        self.generator = torch.Generator().manual_seed(0)

    def _sample(self, rows: torch.Tensor, keep: int) -> torch.Tensor:
        """`keep` columns of `rows` drawn at random without replacement."""
        return rows[:, torch.randperm(rows.shape[1], generator=self.generator)[:keep]]

    def update(self, x: torch.Tensor) -> None:
        lo, hi = _amin_amax(x.detach().float(), self.axis)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None:
            raise RuntimeError("observer saw no data: run calibration batches first")
        return self.lo, self.hi


class MinMaxObserver(Observer):
    pass


class EmaObserver(Observer):
    """Moving-average min-max (torch's averaging constant 0.01): less swayed by one batch."""

    def __init__(self, *args, momentum: float = 0.01, **kwargs):
        super().__init__(*args, **kwargs)
        self.momentum = momentum

    def update(self, x: torch.Tensor) -> None:
        lo, hi = _amin_amax(x.detach().float(), self.axis)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo = self.lo + self.momentum * (lo - self.lo)
            self.hi = self.hi + self.momentum * (hi - self.hi)


class PercentileObserver(Observer):
    """The p-th percentile of each batch (and 100 - p for the low end), averaged."""

    def __init__(self, *args, percentile: float = 99.99, **kwargs):
        super().__init__(*args, **kwargs)
        self.q = percentile / 100.0
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        rows = _per_channel_rows(x.detach().float(), self.axis)
        if rows.shape[1] > _SAMPLE_MAX:  # torch.quantile has a size limit; a sample suffices
            rows = self._sample(rows, _SAMPLE_MAX)
        lo, hi = torch.quantile(rows, 1.0 - self.q, dim=1), torch.quantile(rows, self.q, dim=1)
        if self.axis is None:
            lo, hi = lo[0], hi[0]
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo = (self.lo * self.count + lo) / (self.count + 1)
            self.hi = (self.hi * self.count + hi) / (self.count + 1)
        self.count += 1


class _SampleObserver(Observer):
    """Keeps the exact min/max plus a random sample of each batch's values (at most
    _SAMPLE_PER_BATCH of an activation) for a search at the end."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.samples: list[torch.Tensor] = []

    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        rows = _per_channel_rows(x.detach().float(), self.axis)
        if self.axis is None and rows.shape[1] > _SAMPLE_PER_BATCH:
            rows = self._sample(rows, _SAMPLE_PER_BATCH)
        self.samples.append(rows)

    def values(self) -> torch.Tensor:
        return torch.cat(self.samples, dim=1)


class MseObserver(_SampleObserver):
    """Grid search over clipping ranges shrunk from min-max: keep the one with least MSE."""

    def __init__(self, *args, steps: int = 100, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = steps

    @torch.no_grad()
    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = super().range()
        values = self.values()  # [C, N]
        lo_c, hi_c = lo.reshape(-1, 1).float(), hi.reshape(-1, 1).float()
        qmin, qmax = quant_range(self.bits, self.symmetric)
        # Linear steps, plus a log-spaced tail for heavy-tailed data whose best clip is a
        # tiny fraction of the maximum.
        ratios = torch.tensor(sorted(set([i / self.steps for i in range(1, self.steps + 1)]
                                         + [10 ** (-3 + 2 * i / 40) for i in range(40)])))
        errors = []
        chunk = max(1, (1 << 22) // max(1, values.numel()))  # bound the [R, C, N] temporary
        for part in ratios.split(chunk):
            r = part.view(-1, 1, 1)
            scale, zp = qparams(lo_c * r, hi_c * r, self.bits, self.symmetric)  # [R, C, 1]
            q = torch.clamp(torch.round(values * (1.0 / scale)) + zp, qmin, qmax)
            errors.append(((q - zp) * scale - values).pow(2).mean(dim=2))  # [R, C]
        best = torch.cat(errors).argmin(dim=0)  # per channel
        r = ratios[best]
        return (lo_c.flatten() * r).reshape(lo.shape), (hi_c.flatten() * r).reshape(hi.shape)


class KlObserver(_SampleObserver):
    """Entropy calibration: the threshold whose quantized histogram is closest in KL
    divergence to the observed one (2048 bins, as in TensorRT's calibrator)."""

    bins = 2048

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = super().range()
        if self.axis is not None:
            raise ConfigError("KL calibration is for activations (per tensor), not per channel")
        values = self.values().flatten()
        if self.symmetric:
            t = self._clip(values.abs(), float(torch.maximum(-lo, hi)), 2 ** (self.bits - 1))
            return torch.tensor(-t), torch.tensor(t)
        # Asymmetric: each side of zero gets its own search, over its share of the levels.
        span = float(hi - lo) or 1.0
        up = self._clip(values[values > 0], float(hi), max(2, round(2 ** self.bits * float(hi) / span)))
        down = self._clip(-values[values < 0], float(-lo), max(2, round(2 ** self.bits * float(-lo) / span)))
        return torch.tensor(-down), torch.tensor(up)

    def _clip(self, data: torch.Tensor, top: float, levels: int) -> float:
        """Clip point for non-negative data; zeros are left out, being exact in any range
        (a ReLU's spike there would swamp the histogram)."""
        data = data[data > 0]
        if top <= 0 or data.numel() == 0:
            return max(top, 0.0)
        hist = torch.histc(data, bins=self.bins, min=0.0, max=top).double().numpy()
        return _kl_threshold(hist, min(levels, self.bins)) * top / self.bins


def _kl_threshold(hist: np.ndarray, levels: int) -> int:
    """The number of histogram bins to keep (the clip point) with the least KL divergence.

    Every candidate clip point i (levels <= i <= bins) at once, from prefix sums:
    P is the kept histogram with the clipped mass piled into its last bin; Q merges the kept
    bins (without the clipped mass) into `levels` groups, each spread evenly over its
    non-empty bins - what quantization to `levels` keeps of P. Q is constant over a group's
    non-empty bins, so KL(P||Q) = sum P log P - sum over groups of P_g log Q_g.
    """
    n = len(hist)
    total = float(hist.sum())
    if total == 0:
        return n
    i = np.arange(levels, n + 1)  # candidate clip points
    kept_mass = np.concatenate([[0.0], np.cumsum(hist)])  # kept_mass[k] = hist[:k].sum()
    filled = np.concatenate([[0], np.cumsum(hist > 0)])  # non-empty bins among hist[:k]

    def p_log_p(mass):  # of P = mass / total, 0 where empty
        return np.where(mass > 0, mass / total * np.log(np.where(mass > 0, mass, 1) / total), 0.0)

    entropy_before = np.concatenate([[0.0], np.cumsum(p_log_p(hist))])
    tail = total - kept_mass[i]
    # sum P log P: the bins before the last as observed, the last with the clipped mass.
    p_log_p_sum = entropy_before[i - 1] + p_log_p(hist[i - 1] + tail)
    # Group g of candidate i spans bins [edges[g], edges[g+1]) (as np.linspace(0, i) cut).
    edges = (np.arange(levels + 1)[None, :] * (i[:, None] / levels)).astype(int)
    edges[:, -1] = i
    sums = kept_mass[edges[:, 1:]] - kept_mass[edges[:, :-1]]  # Q's mass per group
    counts = filled[edges[:, 1:]] - filled[edges[:, :-1]]
    counts[:, -1] += (hist[i - 1] == 0) & (tail > 0)  # the clipped mass makes the last bin non-empty
    p_mass = sums.copy()
    p_mass[:, -1] += tail
    per_bin = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    q_sum = kept_mass[i][:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q_n = np.where(per_bin > 0, per_bin / q_sum, 1e-8)  # smooth: no infinite divergence
        cross = np.where(counts > 0, p_mass / total * np.log(q_n), 0.0).sum(axis=1)
    kl = np.where(kept_mass[i] > 0, p_log_p_sum - cross, np.inf)
    if not np.isfinite(kl).any():
        return n
    return int(i[np.argmin(kl)])


_OBSERVERS = {"minmax": MinMaxObserver, "ema": EmaObserver, "percentile": PercentileObserver,
              "mse": MseObserver, "kl": KlObserver}


def make_observer(method: str, bits: int, symmetric: bool, axis: int | None = None) -> Observer:
    if method not in _OBSERVERS:
        raise ConfigError(f"calibration {method!r} is unknown; choose one of {', '.join(METHODS)}")
    return _OBSERVERS[method](bits, symmetric, axis=axis)


def weight_method(method: str) -> str:
    """The observer used for weights under an activation calibration method.

    min-max, percentile and MSE are computed per channel from the weight itself; the
    moving average and KL describe streams of activations, so weights use min-max there.
    """
    return method if method in ("minmax", "percentile", "mse") else "minmax"
