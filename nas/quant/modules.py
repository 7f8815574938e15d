"""Quantized layers and `quantize_model(model, plan)`.

Where quantizers sit: every quantized Conv2d / Linear fake-quantizes its *input* activation
(at the layer's a_bits) and its *weight* (at w_bits); the bias stays float (on integer
hardware it is int32 at scale s_w * s_a, finer than any error here). Everything between
layers - BN (folded or not), ReLU, pooling, residual additions - runs in float on the
dequantized values, so a residual sum is quantized once, at the input of the next layer
that consumes it, at that layer's a_bits.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from nas.errors import ConfigError
from nas.quant.quantizer import FakeQuantizer

if TYPE_CHECKING:
    from nas.plan import LayerPrecision, Plan


class _Quantized:
    """Shared construction: copy the float layer, then attach the two quantizers."""

    @classmethod
    def from_float(cls, layer: nn.Module, prec: "LayerPrecision", method: str = "minmax",
                   learn: str | None = None, stochastic: bool = False):
        from nas.quant.observers import weight_method

        q = cls._empty_like(layer)
        q.load_state_dict(layer.state_dict())
        axis = 0 if prec.w_granularity == "per_channel" else None
        q.weight_quantizer = FakeQuantizer(prec.w_bits, prec.w_symmetric, axis=axis,
                                           method=weight_method(method),
                                           learn="lsq" if learn else None,
                                           stochastic=stochastic, dynamic=True)
        q.input_quantizer = FakeQuantizer(prec.a_bits, prec.a_symmetric, method=method, learn=learn)
        q.precision = prec
        return q


class QuantConv2d(_Quantized, nn.Conv2d):
    """Conv2d (grouped and depthwise included) with weight and input-activation quantizers."""

    @classmethod
    def _empty_like(cls, conv: nn.Conv2d) -> "QuantConv2d":
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                   conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                   conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight),
                                  self.bias)


class QuantLinear(_Quantized, nn.Linear):
    """Linear with weight and input-activation quantizers."""

    @classmethod
    def _empty_like(cls, linear: nn.Linear) -> "QuantLinear":
        return cls(linear.in_features, linear.out_features, linear.bias is not None,
                   device=linear.weight.device, dtype=linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


QUANT_TYPES = (QuantConv2d, QuantLinear)


def quantize_model(model: nn.Module, plan: "Plan", *, calibration: str = "minmax",
                   learn: str | None = None, stochastic: bool = False,
                   inplace: bool = False) -> nn.Module:
    """Swap the plan's layers (by fully-qualified name) for quantized ones.

    Layers at 16/32 bits for both weights and activations stay the float module. The weights
    get their ranges at once; activation ranges come from `calibrate()` (or, without it, from
    the first batch seen).
    """
    from nas.quant.fake import is_float

    model = model if inplace else copy.deepcopy(model)
    for name, prec, module in plan_layers(model, plan):
        if is_float(prec.w_bits) and is_float(prec.a_bits):
            continue
        cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
        quantized = cls.from_float(module, prec, calibration, learn, stochastic)
        quantized.weight_quantizer.observe_tensor(quantized.weight.detach())
        quantized.train(module.training)
        model.set_submodule(name, quantized)
    return model


def plan_layers(model: nn.Module, plan: "Plan") -> list[tuple[str, "LayerPrecision", nn.Module]]:
    """(name, precision, module) of each plan layer; a name that is no Conv2d or Linear of
    the model is a ConfigError naming it."""
    modules = dict(model.named_modules())
    out = []
    for name, prec in plan.layers.items():
        module = modules.get(name)
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            found = "no such module" if module is None else type(module).__name__
            raise ConfigError(f"plan layer {name!r}: {found}, expected Conv2d or Linear")
        out.append((name, prec, module))
    return out


def quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QUANT_TYPES)}


def input_quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every layer with an input FakeQuantizer: QuantConv2d, QuantLinear, quantized ConvBn2d."""
    return {n: m for n, m in model.named_modules()
            if isinstance(getattr(m, "input_quantizer", None), FakeQuantizer)}


@torch.no_grad()
def calibrate(model: nn.Module, loader, batches: int,
              device: torch.device | str | None = None) -> int:
    """Set every activation range (QuantConv2d, QuantLinear and a prepared model's ConvBn2d)
    from `batches` batches in eval mode; weights are already quantized while observing, so
    each range is that of the input the quantized network feeds the layer. Returns the
    batches used."""
    if device is None:  # where the model is
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    layers = input_quantized_layers(model)
    for layer in layers.values():
        layer.input_quantizer.start_observing()
    was_training = model.training
    model.eval()
    used = 0
    try:
        for x, _ in loader:
            if used >= batches:
                break
            model(x.to(device))
            used += 1
    finally:
        model.train(was_training)
    if used == 0:
        raise ConfigError("calibration saw no batches: the calibration split is empty")
    for layer in layers.values():
        layer.input_quantizer.finish_observing()
    return used
