"""Uniform affine fake quantization (Krishnamoorthi 2018, section 2) with a straight-through
estimator.

    q = clamp(round(x / s) + z, qmin, qmax),   x_hat = (q - z) * s

The arithmetic follows torch's reference kernels step for step (x times 1/s, round half to
even, zero point added after rounding) so that 8-bit results equal
`torch.fake_quantize_per_tensor_affine` / `..._per_channel_affine` bit for bit.
"""

from __future__ import annotations

import torch

FLOAT_BITS = (16, 32)


def is_float(bits: int) -> bool:
    return bits in FLOAT_BITS


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range: signed [-2^(b-1), 2^(b-1) - 1] or unsigned [0, 2^b - 1]."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def broadcast_along(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Broadcast a per-channel vector along `axis` of x (a scalar tensor passes as is)."""
    if axis is None or t.ndim == 0:
        return t
    shape = [1] * x.ndim
    shape[axis] = -1
    return t.view(shape)


def tensor_minmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum and maximum of all of x. A channels_last tensor is read through its dense
    1-D view: torch.aminmax on the 4-D tensor itself is about 9x slower on the CPU."""
    if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        x = x.permute(0, 2, 3, 1)
    return torch.aminmax(x.reshape(-1))


def quantize_with_mask(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                       qmin: int, qmax: int, noise: torch.Tensor | None = None,
                       want_mask: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fake-quantized x, and (if wanted) the boolean mask of values inside the range.

    clamp(round(x / s) + z, qmin, qmax) - z == clamp(round(x / s), qmin - z, qmax - z)
    exactly, since z is an integer: two passes fewer. The rest runs in place on two float
    temporaries, and the mask comes from float arithmetic (|q - clamp(q)| is 0 or >= 1):
    comparisons that write booleans are several times slower on the CPU.
    """
    q = x * (1.0 / scale)
    if noise is not None:
        q.add_(noise)
    q.round_()
    lo, hi = qmin - zero_point, qmax - zero_point
    if lo.ndim == 0 and lo.device.type == "cpu":
        lo, hi = float(lo), float(hi)  # clamp to tensor bounds is about 5x slower on the CPU
    if not want_mask:
        return q.clamp_(lo, hi).mul_(scale), None
    out = torch.clamp(q, lo, hi)
    inside = q.sub_(out).abs_().clamp_(max=1.0).neg_().add_(1.0).bool()
    return out.mul_(scale), inside


def mask_as(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as 0 / 1 in `dtype`. Read as uint8 first: the same bytes, and on the
    CPU converting uint8 is about 5x faster than converting bool."""
    return mask.view(torch.uint8).to(dtype)


class _FakeQuantSTE(torch.autograd.Function):
    """Round-to-nearest (or stochastic) fake quantization; the gradient passes straight
    through inside the clipping range and is zero outside it."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, noise):
        out, inside = quantize_with_mask(x, scale, zero_point, qmin, qmax, noise)
        ctx.save_for_backward(inside)
        return out

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * mask_as(inside, grad.dtype), None, None, None, None, None


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                  qmax: int, axis: int | None = None, stochastic: bool = False) -> torch.Tensor:
    """Fake-quantize `x` with fixed scale and zero point (per tensor, or per channel on `axis`).

    Stochastic rounding adds w ~ U(-s/2, s/2) before rounding (the whitepaper's
    Q(x) = clamp(round((x + w) / s))), so E[Q(x)] = x inside the range.
    """
    scale = broadcast_along(scale.to(x.dtype), x, axis)
    zero_point = broadcast_along(zero_point.to(x.dtype), x, axis)
    noise = torch.rand_like(x) - 0.5 if stochastic else None
    return _FakeQuantSTE.apply(x, scale, zero_point, qmin, qmax, noise)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() in the forward pass, identity in the backward pass."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Value of x, gradient of x times `factor` (LSQ's step-size gradient scale)."""
    return (x - x * factor).detach() + x * factor


def qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool,
            eps: float = torch.finfo(torch.float32).eps) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point from a clipping range [lo, hi] (per tensor or per channel).

    The range is widened to contain zero, so zero (padding, ReLU output) is exact. Symmetric:
    signed, zero point 0, scale = max(|lo|, |hi|) / ((qmax - qmin) / 2), as torch's observers
    do. Asymmetric: unsigned, scale = (hi - lo) / (qmax - qmin), integer zero point.
    """
    lo = torch.clamp(lo.float(), max=0.0)
    hi = torch.clamp(hi.float(), min=0.0)
    qmin, qmax = quant_range(bits, signed=symmetric)
    if symmetric:
        amax = torch.maximum(-lo, hi)
        scale = torch.clamp(amax / ((qmax - qmin) / 2), min=eps)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = torch.clamp((hi - lo) / (qmax - qmin), min=eps)
    zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).to(torch.int32)
    return scale, zero_point


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio, 10 log10(|x|^2 / |x - x_hat|^2), in dB."""
    noise = (x.double() - x_hat.double()).pow(2).sum()
    signal = x.double().pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))
