"""BatchNorm folding (Krishnamoorthi 2018, section 2.3; Jacob et al. 2018, section 3.2).

Inference: W' = W * gamma / sigma, b' = beta + (b - mu) * gamma / sigma, sigma = sqrt(var + eps).
Training (QAT): `ConvBn2d` quantizes the *folded* weight, as the deployed layer will, yet
normalises with batch statistics early on (through the correction factor sigma / sigma_B) and
freezes the running statistics after a set number of steps.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from nas.errors import ModelError


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) module names where a Conv2d's output feeds only a BatchNorm2d.

    Found by tracing the model with torch.fx, so the pairing follows the real data flow,
    not the order in which the modules were declared.
    """
    from torch import fx

    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: cannot fold safely
        raise ModelError(f"cannot trace {type(model).__name__} with torch.fx to find conv+BN "
                         f"pairs ({type(exc).__name__}: {exc}); BN folding needs a traceable "
                         f"model") from exc
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.Conv2d):
            continue
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and isinstance(
                modules.get(users[0].target), nn.BatchNorm2d):
            pairs.append((node.target, users[0].target))
    return pairs


def folded_weight_bias(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The conv's weight and bias with the BN (in eval mode: running statistics) folded in."""
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    factor = gamma / std
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    weight = conv.weight * factor.reshape(-1, *([1] * (conv.weight.ndim - 1)))
    return weight, beta + (bias - bn.running_mean) * factor


@torch.no_grad()
def fold_bn(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every BN that directly follows a conv into it; the BN becomes Identity.

    The result computes what the model computes in eval mode.
    """
    model = model if inplace else copy.deepcopy(model)
    for conv_name, bn_name in conv_bn_pairs(model):
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        weight, bias = folded_weight_bias(conv, bn)
        conv.weight.copy_(weight)
        if conv.bias is None:
            conv.bias = nn.Parameter(bias.clone())
        else:
            conv.bias.copy_(bias)
        model.set_submodule(bn_name, nn.Identity())
    return model


class ConvBn2d(nn.Module):
    """Conv2d + BatchNorm2d for quantization-aware training, folded as it will be deployed.

    Forward (Jacob et al. 2018, fig. C.8): w_q = Q(W * gamma / sigma) with sigma from the
    running variance, y = conv(x, w_q). While the statistics are live (training, fewer than
    `freeze_bn_after` steps), y is rescaled by the correction c = sigma / sigma_B and shifted
    by beta - gamma * mu_B / sigma_B, which is exactly batch-statistics BN on conv(x, W) when
    Q is the identity; the running statistics update as BatchNorm2d's would. Afterwards (and
    in eval), y + beta - gamma * mu / sigma: the deployed folded layer.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, weight_quantizer: nn.Module | None = None,
                 input_quantizer: nn.Module | None = None, freeze_bn_after: int | None = None):
        super().__init__()
        self.conv, self.bn = conv, bn
        self.weight_quantizer = weight_quantizer or nn.Identity()
        self.input_quantizer = input_quantizer or nn.Identity()
        self.freeze_bn_after = freeze_bn_after
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @property
    def frozen(self) -> bool:
        return self.freeze_bn_after is not None and int(self.steps) >= self.freeze_bn_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self.conv, self.bn
        running_std = torch.sqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.affine else torch.ones_like(running_std)
        beta = bn.bias if bn.affine else torch.zeros_like(running_std)
        factor = gamma / running_std
        w_q = self.weight_quantizer(conv.weight * factor.reshape(-1, 1, 1, 1))
        x_q = self.input_quantizer(x)
        conv_bias = conv.bias if conv.bias is not None else torch.zeros_like(running_std)
        shape = (1, -1, 1, 1)
        if not self.training or self.frozen:
            # The bias inside the conv, as the deployed folded layer adds it (bit-exact).
            return conv._conv_forward(x_q, w_q, beta + (conv_bias - bn.running_mean) * factor)
        y = conv._conv_forward(x_q, w_q, None)
        self.steps += 1
        # Statistics of conv(x, W) + b: undo the folded factor to recover them.
        raw = y / factor.reshape(shape) + conv_bias.reshape(shape)
        mean = raw.mean(dim=(0, 2, 3))
        var = raw.var(dim=(0, 2, 3), unbiased=False)
        with torch.no_grad():
            n = raw.numel() / raw.shape[1]
            momentum = bn.momentum if bn.momentum is not None else 0.1
            bn.running_mean.mul_(1 - momentum).add_(momentum * mean)
            bn.running_var.mul_(1 - momentum).add_(momentum * var * n / max(1.0, n - 1))
            bn.num_batches_tracked += 1
        batch_std = torch.sqrt(var + bn.eps)
        correction = running_std / batch_std  # sigma read before this batch's update
        shift = beta + (conv_bias - mean) * gamma / batch_std
        return y * correction.reshape(shape) + shift.reshape(shape)

    @torch.no_grad()
    def to_folded(self) -> nn.Conv2d:
        """The plain Conv2d (float, folded) that this layer deploys as."""
        conv = copy.deepcopy(self.conv)
        weight, bias = folded_weight_bias(self.conv, self.bn)
        conv.weight.copy_(weight)
        conv.bias = nn.Parameter(bias.clone())
        return conv
