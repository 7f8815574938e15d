"""CostModel: what one layer at one precision costs, and the tables built from it.

The same numbers serve every searcher: a plan's cost is the sum over its layers; DNAS uses
the expectation under its choice probabilities, which is differentiable in them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from nas.plan import LayerPrecision

if TYPE_CHECKING:
    import torch

    from nas.plan import Plan
    from nas.spaces import Choice, LayerInfo, SearchSpace


class CostModel(ABC):
    """One cost (`name`, in `unit`) of a layer at a precision."""

    name: str
    unit: str

    @abstractmethod
    def layer_cost(self, info: "LayerInfo", prec: LayerPrecision) -> float:
        """Cost of one layer."""

    def is_estimated(self, info: "LayerInfo", prec: LayerPrecision) -> bool:
        """True where the number is a model's estimate rather than a measurement."""
        return False

    def plan_cost(self, plan: "Plan", space: "SearchSpace") -> float:
        infos = {x.name: x.info for x in space.layers()}
        return sum(self.layer_cost(infos[name], prec) for name, prec in plan.layers.items())

    def table(self, space: "SearchSpace") -> "CostTable":
        """Cost of every (layer, choice) of the space, with the space's quantizer settings."""
        q = space.quantizer
        values, estimated, layers, choices = [], [], [], []
        for layer in space.layers():
            precs = [LayerPrecision(c.w_bits, c.a_bits, q["w_granularity"], q["w_symmetric"],
                                    q["a_symmetric"]) for c in layer.choices]
            layers.append(layer.name)
            choices.append(layer.choices)
            values.append([self.layer_cost(layer.info, p) for p in precs])
            estimated.append([self.is_estimated(layer.info, p) for p in precs])
        return CostTable(self.name, self.unit, layers, choices, values, estimated)


@dataclass
class CostTable:
    """`values[l][c]`: the cost of layer `layers[l]` at `choices[l][c]`."""

    name: str
    unit: str
    layers: list[str]
    choices: list[tuple["Choice", ...]]
    values: list[list[float]]
    estimated: list[list[bool]]

    def tensors(self) -> list["torch.Tensor"]:
        import torch

        return [torch.tensor(row, dtype=torch.float64) for row in self.values]

    def expected(self, probs: Sequence["torch.Tensor"]) -> "torch.Tensor":
        """E[cost] = sum_l p_l . cost_l, differentiable in the probabilities."""
        rows = self.tensors()
        if len(probs) != len(rows):
            raise ValueError(f"{len(probs)} probability vectors for {len(rows)} layers")
        return sum((p.double() * r.to(p.device)).sum() for p, r in zip(probs, rows))

    def index_cost(self, indices: Sequence[int]) -> float:
        """Cost of the plan that picks choice `indices[l]` for layer l."""
        return sum(self.values[l][i] for l, i in enumerate(indices))

    @property
    def any_estimated(self) -> bool:
        return any(any(row) for row in self.estimated)
