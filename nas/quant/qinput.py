"""A conv or linear layer on its fake-quantized input, Q(x), that keeps x (not Q(x)) for the
backward pass, and can report how the loss would see other input and weight precisions.

Memory: the float layer saves its input x for the weight gradient, and x is usually alive
anyway (a ReLU keeps its output). Autograd through fake_quantize + conv would also keep Q(x),
one more activation-sized tensor per layer. Here Q(x) is recomputed from x in the backward
pass (four in-place passes), so the extra memory is only the 1-byte clip mask (plus, for
a conv with an uneven 'same' border or a padding_mode other than zeros, the padded copy of
x that the op keeps instead of x).

Probes (for DNAS): with candidate input quantizers Q_i and candidate weights W_j, the op
returns zero-valued gates whose gradients are <dL/dQ(x), Q_i(x)> and <dL/dW, W_j>, i.e.
<dL/dy, conv(Q_i(x), W)> and <dL/dy, conv(Q(x), W_j)> by bilinearity: what the loss would
see of each alternative branch, from the one branch computed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from nas.quant.fake import mask_as, quantize_with_mask


def padded_input(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
    """(x, conv) for `quant_input_op`: conv is (stride, padding, dilation, groups) with
    padding as symmetric numbers, which convolution_backward needs (None for a Linear).

    'valid', and zero 'same' with an even border, become numbers. An uneven 'same' border
    (torch puts the odd pixel right / bottom) or a padding_mode other than zeros is applied
    to x here with F.pad, a copy: call this once per input, not once per branch. Padding x
    before Q(x) is exact: quantization is elementwise, the border copies values (or is zero,
    which quantizes to zero)."""
    if not isinstance(layer, nn.Conv2d):
        return x, None
    if layer.padding == "valid":
        pads = [(0, 0), (0, 0)]
    elif layer.padding == "same":
        totals = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
        pads = [(t // 2, t - t // 2) for t in totals]
    else:
        pads = [(p, p) for p in layer.padding]
    if layer.padding_mode == "zeros" and all(a == b for a, b in pads):
        return x, (layer.stride, tuple(a for a, _ in pads), layer.dilation, layer.groups)
    (top, bottom), (left, right) = pads
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    return F.pad(x, [left, right, top, bottom], mode=mode), (layer.stride, (0, 0),
                                                             layer.dilation, layer.groups)


def qparams_row(qparams: tuple | None, like: torch.Tensor) -> torch.Tensor | None:
    """(scale, zero_point, qmin, qmax) as one float row; None (a float input) stays None."""
    if qparams is None:
        return None
    return torch.stack([torch.as_tensor(v, dtype=like.dtype, device=like.device).reshape(())
                        for v in qparams])


def _quantize(x: torch.Tensor, qp: torch.Tensor | None) -> torch.Tensor:
    return x if qp is None else quantize_with_mask(x, *qp.unbind(), want_mask=False)[0]


class _QuantInputOp(torch.autograd.Function):
    # Inputs: x, qp, weight, bias, conv, a_gates, a_qps, w_gates, w_alts. a_qps is a tuple of
    # rows (None: float input), w_alts a tuple of weights; neither carries gradients.
    @staticmethod
    def forward(ctx, x, qp, weight, bias, conv, a_gates, a_qps, w_gates, w_alts):
        xq, inside = quantize_with_mask(x, *qp.unbind()) if qp is not None else (x, None)
        ctx.conv, ctx.has_bias, ctx.a_qps, ctx.w_alts = conv, bias is not None, a_qps, w_alts
        ctx.save_for_backward(x, qp, inside, weight)
        if conv is None:
            return F.linear(xq, weight, bias)
        stride, padding, dilation, groups = conv
        return F.conv2d(xq, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, qp, inside, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        probe_a, probe_w = needs[5], needs[7]
        need_x, need_w, need_b = needs[0] or probe_a, needs[2] or probe_w, needs[3] and ctx.has_bias
        with torch.no_grad():
            xq = _quantize(x, qp)
            if ctx.conv is None:
                gxq = grad @ weight if need_x else None
                flat = grad.reshape(-1, grad.shape[-1])
                gw = flat.t() @ xq.reshape(-1, xq.shape[-1]) if need_w else None
                gb = flat.sum(0) if need_b else None
            else:
                stride, padding, dilation, groups = ctx.conv
                gxq, gw, gb = torch.ops.aten.convolution_backward(
                    grad, xq, weight, [weight.shape[0]] if ctx.has_bias else None, stride,
                    padding, dilation, False, [0] * len(stride), groups, [need_x, need_w, need_b])
            g_a = g_w = gx = None
            if probe_a:
                g_a = torch.stack([(gxq * (xq if row is qp else _quantize(x, row))).sum()
                                   for row in ctx.a_qps])
            if probe_w:
                g_w = torch.stack([(gw * alt).sum() for alt in ctx.w_alts])
            if needs[0]:
                gx = gxq.mul_(mask_as(inside, gxq.dtype)) if inside is not None else gxq
        return gx, None, gw if needs[2] else None, gb, None, g_a, None, g_w, None


def quant_input_layer(layer: nn.Module, x: torch.Tensor, qparams: tuple | None,
                      weight: torch.Tensor, bias: torch.Tensor | None,
                      probes: tuple | None = None) -> torch.Tensor:
    """layer's op on the fake-quantized x, with `weight` and `bias`: the same values and
    gradients as autograd through fake_quantize and the layer, with less memory.
    `quant_input_op(*padded_input(layer, x), ...)`; see there.
    """
    return quant_input_op(*padded_input(layer, x), qparams, weight, bias, probes)


def quant_input_op(x: torch.Tensor, conv: tuple | None, qparams: tuple | None,
                   weight: torch.Tensor, bias: torch.Tensor | None,
                   probes: tuple | None = None) -> torch.Tensor:
    """The op of `quant_input_layer` on x as `padded_input` returned it, with its conv.

    qparams: (scale, zero_point, qmin, qmax) per tensor, or None for a float input.
    probes: (a_gates, a_candidates, w_gates, w_candidates) - zero-valued gate vectors, the
    qparams of every input candidate (the chosen one being the `qparams` object itself) and
    the weight of every weight candidate; the gates receive the gradients described above.
    """
    qp = qparams_row(qparams, x)
    a_gates = a_rows = w_gates = w_alts = None
    if probes is not None:
        a_gates, a_candidates, w_gates, w_alts = probes
        a_rows = tuple(qp if q is qparams else qparams_row(q, x) for q in a_candidates)
        w_alts = tuple(w.detach() for w in w_alts)
    return _QuantInputOp.apply(x, qp, weight, bias, conv, a_gates, a_rows, w_gates, w_alts)
