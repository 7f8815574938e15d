"""One plan, two views: a `Plan` (layer name -> precision) and choice indices (one per space
layer, into that layer's choices), as cost tables, the supernet and every searcher use them.
A Ray trial's config is the third, plain-data form: {layer: "W4A8"}."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from nas.errors import ConfigError

if TYPE_CHECKING:
    from nas.plan import Plan
    from nas.spaces import SearchSpace


class PlanEncoding:
    """Plan <-> choice indices <-> {layer: "W4A8"} on one space."""

    def __init__(self, space: "SearchSpace"):
        self.space = space
        self.layers = space.layers()
        self.names = [x.name for x in self.layers]

    def plan(self, indices: Sequence[int], **extra: Any) -> "Plan":
        """The Plan picking choice `indices[l]` for layer l, with the space's quantizer
        settings; `extra` sets costs / provenance."""
        from nas.plan import LayerPrecision, Plan, layer_hash

        self._check(indices)
        q = self.space.quantizer
        layers = {x.name: LayerPrecision(x.choices[i].w_bits, x.choices[i].a_bits,
                                         q["w_granularity"], q["w_symmetric"], q["a_symmetric"])
                  for x, i in zip(self.layers, indices)}
        return Plan(self.space.name, self.space.model, layer_hash(self.space), layers, **extra)

    def indices(self, plan: "Plan") -> list[int]:
        """The choice indices of a plan (resolved against the space first)."""
        plan = plan.resolved(self.space)
        out = []
        for x in self.layers:
            p = plan.layers[x.name]
            out.append(next(i for i, c in enumerate(x.choices)
                            if (c.w_bits, c.a_bits) == (p.w_bits, p.a_bits)))
        return out

    def config(self, indices: Sequence[int]) -> dict[str, str]:
        self._check(indices)
        return {x.name: str(x.choices[i]) for x, i in zip(self.layers, indices)}

    def from_config(self, config: dict[str, str]) -> list[int]:
        if set(config) != set(self.names):
            missing = sorted(set(self.names) - set(config)) or sorted(set(config) - set(self.names))
            raise ConfigError(f"plan config does not match space {self.space.name}: "
                              f"{', '.join(missing[:3])} differ")
        out = []
        for x in self.layers:
            text = config[x.name]
            match = [i for i, c in enumerate(x.choices) if str(c) == text]
            if not match:
                raise ConfigError(f"layer {x.name}: {text} is not a choice of space "
                                  f"{self.space.name}; allowed: "
                                  f"{', '.join(str(c) for c in x.choices)}")
            out.append(match[0])
        return out

    def bits(self, indices: Sequence[int]) -> str:
        """The plan in one short line: its precisions in layer order."""
        return " ".join(str(x.choices[i]) for x, i in zip(self.layers, indices))

    def _check(self, indices: Sequence[int]) -> None:
        if len(indices) != len(self.layers) or any(
                not 0 <= i < len(x.choices) for x, i in zip(self.layers, indices)):
            raise ValueError(f"{list(indices)} are not choice indices of space {self.space.name}")
