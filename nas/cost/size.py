"""Model size of a plan, in bytes.

bytes = sum over layers of weights * w_bits / 8
        + quantization parameters (a float32 scale, plus a uint8 zero point when asymmetric,
          per output channel or per tensor)
        + float32 biases (one per output channel: after BN folding every conv has one).
Layers at 16 or 32 bits store their weights as float16 / float32 with no scale.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nas.cost.base import CostModel
from nas.spaces import FLOAT_BITS

if TYPE_CHECKING:
    from nas.plan import LayerPrecision, Plan
    from nas.spaces import LayerInfo, SearchSpace

SCALE_BYTES = 4
ZERO_POINT_BYTES = 1
BIAS_BYTES = 4


def weight_count(info: "LayerInfo") -> int:
    return info.out_channels * (info.in_channels // info.groups) * info.kernel[0] * info.kernel[1]


def layer_size_bytes(info: "LayerInfo", prec: "LayerPrecision") -> float:
    weights = weight_count(info) * prec.w_bits / 8
    qparams = 0
    if prec.w_bits not in FLOAT_BITS:
        per = info.out_channels if prec.w_granularity == "per_channel" else 1
        qparams = per * (SCALE_BYTES + (0 if prec.w_symmetric else ZERO_POINT_BYTES))
    return weights + qparams + info.out_channels * BIAS_BYTES


class SizeCost(CostModel):
    name, unit = "size", "bytes"

    def layer_cost(self, info, prec) -> float:
        return layer_size_bytes(info, prec)


def plan_size_bytes(plan: "Plan", space: "SearchSpace") -> float:
    return SizeCost().plan_cost(plan, space)
