"""Post-training quantization: fold BN, swap in quantized layers, calibrate, evaluate.
Plus the whitepaper's per-layer SQNR view of weights and layer outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from nas.quant.bn_fold import fold_bn
from nas.quant.fake import is_float, sqnr_db
from nas.quant.modules import calibrate, quant_layers, quantize_model
from nas.quant.quantizer import FakeQuantizer

if TYPE_CHECKING:
    from nas.plan import Plan


def prepare_ptq(model: nn.Module, plan: "Plan", calib_loader, batches: int,
                method: str = "mse", fold: bool = True,
                device: torch.device | str = "cpu") -> nn.Module:
    """The float model (eval mode), BN-folded, quantized by `plan` and calibrated."""
    model = model.eval()
    base = fold_bn(model) if fold else model
    qmodel = quantize_model(base, plan, calibration=method).to(device).eval()
    calibrate(qmodel, calib_loader, batches, device)
    return qmodel


@dataclass
class LayerSqnr:
    name: str
    w_bits: int
    a_bits: int
    weight_per_tensor: float
    weight_per_channel: float
    output_per_tensor: float
    output_per_channel: float


def weight_sqnr(weight: torch.Tensor, bits: int, symmetric: bool, per_channel: bool,
                method: str = "minmax") -> float:
    """SQNR (dB) of one weight tensor quantized per tensor or per output channel."""
    from nas.quant.observers import weight_method

    q = FakeQuantizer(bits, symmetric, axis=0 if per_channel else None, method=weight_method(method))
    q.observe_tensor(weight)
    with torch.no_grad():
        return sqnr_db(weight, q(weight))


@torch.no_grad()
def _outputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    modules, found, hooks = dict(model.named_modules()), {}, []
    for name in names:
        hooks.append(modules[name].register_forward_hook(
            lambda m, i, o, name=name: found.__setitem__(name, o.detach())))
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return found


def per_layer_sqnr(model: nn.Module, plan: "Plan", calib_loader, batches: int, method: str,
                   fold: bool = True, device: torch.device | str = "cpu") -> list[LayerSqnr]:
    """Weight SQNR and layer-output SQNR of every quantized layer, per tensor vs per channel.

    Output SQNR compares each layer's output in the whole quantized network with the float
    network's on one calibration batch, so it includes the error carried in from earlier
    layers - what the next layer actually sees.
    """
    model = model.eval()
    base = fold_bn(model) if fold else model
    per_channel = prepare_ptq(base, plan.with_overrides(w_granularity="per_channel"),
                              calib_loader, batches, method, fold=False, device=device)
    per_tensor = prepare_ptq(base, plan.with_overrides(w_granularity="per_tensor"),
                             calib_loader, batches, method, fold=False, device=device)
    names = list(quant_layers(per_channel))
    x, _ = next(iter(calib_loader))
    x = x.to(device)
    ref = _outputs(base.to(device), names, x)
    out_c, out_t = _outputs(per_channel, names, x), _outputs(per_tensor, names, x)
    modules = dict(base.named_modules())
    rows = []
    for name in names:
        prec = plan.layers[name]
        weight = modules[name].weight.detach()
        if is_float(prec.w_bits):
            w_t = w_c = float("inf")
        else:
            w_t = weight_sqnr(weight, prec.w_bits, prec.w_symmetric, False, method)
            w_c = weight_sqnr(weight, prec.w_bits, prec.w_symmetric, True, method)
        rows.append(LayerSqnr(name, prec.w_bits, prec.a_bits, w_t, w_c,
                              sqnr_db(ref[name], out_t[name]), sqnr_db(ref[name], out_c[name])))
    return rows
