"""Size, BitOps and latency of the plans in a report, from the cost models every command
uses, and the space's uniform plans as reference points."""

from __future__ import annotations

from nas.cost import COSTS, make_cost_model


class ReportCosts:
    """The three cost models on one space, latency on one device and batch."""

    def __init__(self, space, device_spec: str, batch: int):
        from nas.search.encoding import PlanEncoding

        self.space = space
        self.encoding = PlanEncoding(space)
        self.models = {n: make_cost_model(n, device_spec=device_spec, batch=batch)
                       for n in COSTS}
        self.infos = {x.name: x.info for x in space.layers()}
        self.device, self.batch = self.models["latency"].spec.name, batch

    def plan(self, bits: str):
        """The plan of a "W8A8 W4A8 ..." line (trials.csv, candidates.csv)."""
        return self.encoding.plan(self.encoding.from_config(
            dict(zip(self.encoding.names, bits.split(), strict=True))))

    def of(self, plan) -> dict[str, float]:
        return {n: m.plan_cost(plan, self.space) for n, m in self.models.items()}

    def latency_estimated(self, plan) -> bool:
        """True where any layer's latency is the model's estimate, not a measured table's."""
        latency = self.models["latency"]
        return any(latency.is_estimated(self.infos[n], p) for n, p in plan.layers.items())

    @property
    def estimate_method(self) -> str:
        return self.models["latency"].estimate_method

    def layer_sizes(self, plan) -> dict[str, float]:
        size = self.models["size"]
        return {n: size.layer_cost(self.infos[n], p) for n, p in plan.layers.items()}

    def uniform_plans(self) -> list[tuple[str, object]]:
        """("W4A8", plan) for every precision all searchable layers may take."""
        from nas.plan import Plan

        searchable = [x for x in self.space.layers() if not x.fixed]
        if not searchable:
            return []
        common = [c for c in searchable[0].choices
                  if all(c in x.choices for x in searchable[1:])]
        return [(str(c), Plan.uniform(self.space, c.w_bits, c.a_bits).resolved(self.space))
                for c in common]
