"""FakeQuantizer: one tensor's quantizer, composed of a range source and fake quantization.

The range comes from an observer (calibration), from the tensor itself on every call
(weights during training), or is learned: LSQ's step size (Esser et al. 2020) for weights
and activations, or PACT's clip (Choi et al. 2018) for activations. 16 and 32 bits pass
the tensor through as float.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nas.errors import ConfigError
from nas.quant.fake import broadcast_along, fake_quantize, grad_scale, is_float, qparams, quant_range, round_ste
from nas.quant.observers import Observer, make_observer

LEARN = (None, "lsq", "pact")


class FakeQuantizer(nn.Module):
    """Fake-quantizes one tensor.

    Args:
        bits: 2-8, or 16/32 for float (identity).
        symmetric: signed with zero point 0, or unsigned with a zero point.
        axis: channel axis for per-channel quantization (weights: 0), None for per tensor.
        method: observer for the range (see nas.quant.observers.METHODS).
        learn: None, "lsq" (learned step size) or "pact" (learned clip, activations only).
        stochastic: stochastic rounding while training.
        dynamic: take the range from the tensor on every training call (weights in QAT).
    """

    def __init__(self, bits: int, symmetric: bool, axis: int | None = None,
                 method: str = "minmax", learn: str | None = None, stochastic: bool = False,
                 dynamic: bool = False):
        super().__init__()
        if learn not in LEARN:
            raise ConfigError(f"learned range {learn!r} is unknown; use lsq or pact")
        if learn == "pact" and axis is not None:
            raise ConfigError("PACT learns one clip per tensor; it is for activations")
        self.bits, self.symmetric, self.axis = bits, symmetric, axis
        self.method, self.learn, self.stochastic, self.dynamic = method, learn, stochastic, dynamic
        self.qmin, self.qmax = quant_range(bits, symmetric) if not is_float(bits) else (0, 0)
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.observer: Observer | None = None
        self.observing = False
        self.step = nn.Parameter(torch.ones(())) if learn == "lsq" else None
        self.alpha = nn.Parameter(torch.ones(())) if learn == "pact" else None

    @property
    def enabled(self) -> bool:
        return not is_float(self.bits)

    def extra_repr(self) -> str:
        if not self.enabled:
            return f"bits={self.bits} (float)"
        where = "per_tensor" if self.axis is None else f"per_channel(axis={self.axis})"
        kind = "symmetric" if self.symmetric else "asymmetric"
        return f"bits={self.bits}, {kind}, {where}, method={self.method}, learn={self.learn}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Per-channel ranges are vectors; a fresh quantizer holds scalars until calibrated.
        for name in ("scale", "zero_point", "step", "alpha"):
            incoming, own = state_dict.get(prefix + name), getattr(self, name)
            if incoming is not None and own is not None and incoming.shape != own.shape:
                own.data = torch.empty_like(incoming, device=own.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------ calibration

    def start_observing(self) -> None:
        """Collect statistics on the next calls (which pass x through unchanged)."""
        if self.enabled:
            self.observer = make_observer(self.method, self.bits, self.symmetric, self.axis)
            self.observing = True

    def finish_observing(self) -> None:
        if self.observing:
            self.set_range(*self.observer.range())
        self.observer, self.observing = None, False

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Fix scale and zero point from a clipping range; seeds learned parameters too."""
        scale, zero_point = qparams(lo, hi, self.bits, self.symmetric)
        self.scale = scale.to(self.scale.device)
        self.zero_point = zero_point.to(self.scale.device)
        self.initialized.fill_(True)
        with torch.no_grad():
            if self.step is not None:
                self.step.data = scale.clone().to(self.step.device)
            if self.alpha is not None:
                clip = hi if not self.symmetric else torch.maximum(-lo, hi)
                self.alpha.data = clip.float().clamp(min=1e-4).to(self.alpha.device)

    def observe_tensor(self, x: torch.Tensor) -> None:
        """Calibrate from one tensor at once (weights)."""
        self.start_observing()
        if self.observer is not None:
            self.observer.update(x)
        self.finish_observing()

    # ------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.observing:
            self.observer.update(x)
            return x
        if not bool(self.initialized) or (self.dynamic and self.training and self.learn is None):
            self.observe_tensor(x)
        if self.training and self.learn == "lsq":
            return self._lsq(x)
        if self.training and self.learn == "pact":
            return self._pact(x)
        # In eval a learned range computes with its fixed scale and zero point, exactly as the
        # converted (deployed) quantizer does and as PTQ does from the same range.
        scale, zero_point = self.fixed_qparams()
        return fake_quantize(x, scale, zero_point, self.qmin, self.qmax, self.axis,
                             stochastic=self.stochastic and self.training)

    def fixed_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The scale and zero point this quantizer computes with (a learned step or clip
        made into one), detached."""
        if self.learn == "lsq":  # _lsq's scale: |step|, kept above 0
            return self.step.detach().abs().clamp(min=1e-12), self.zero_point
        if self.learn == "pact":  # _pact's clip [0, alpha] in qmax steps: zero point 0
            return (self.alpha.detach().abs().clamp(min=1e-6) / self.qmax,
                    torch.zeros_like(self.zero_point))
        return self.scale, self.zero_point

    def _lsq(self, x: torch.Tensor) -> torch.Tensor:
        """LSQ: x_hat = round(clamp(x / s + z, qmin, qmax)) - z) * s, with the step size's
        gradient scaled by 1 / sqrt(N * qmax), N the elements per step size."""
        per_step = x.numel() // max(1, self.step.numel())
        g = 1.0 / math.sqrt(per_step * max(1, self.qmax))
        s = broadcast_along(grad_scale(self.step.abs().clamp(min=1e-12), g), x, self.axis)
        z = broadcast_along(self.zero_point.to(x.dtype), x, self.axis)
        q = round_ste(torch.clamp(x / s + z, self.qmin, self.qmax))
        return (q - z) * s

    def _pact(self, x: torch.Tensor) -> torch.Tensor:
        """PACT: clip to [0, alpha] (or [-alpha, alpha]) and quantize; alpha gets the
        gradient of the clipped values, the rounding passes straight through."""
        alpha = self.alpha.abs().clamp(min=1e-6)
        lo = -alpha if self.symmetric else torch.zeros_like(alpha)
        y = torch.minimum(torch.maximum(x, lo), alpha)
        s = alpha / self.qmax
        y_q = torch.clamp(torch.round(y / s), self.qmin, self.qmax) * s
        return y + (y_q - y).detach()
