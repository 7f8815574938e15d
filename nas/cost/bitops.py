"""BitOps: MACs x w_bits x a_bits (float layers count at 32 or 16 bits)."""

from __future__ import annotations

from nas.cost.base import CostModel


class BitOpsCost(CostModel):
    name, unit = "bitops", "BitOps"

    def layer_cost(self, info, prec) -> float:
        return float(info.macs) * prec.w_bits * prec.a_bits
