"""What every search settles before it starts: the cost it searches under, the target, the
cost tables, and the notes the user should see about them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nas.errors import ConfigError
from nas.search.request import SearchRequest


@dataclass
class CostSetup:
    cost: str
    target: Any                  # Target | None
    latency: dict | None         # {"batch", "device_spec"} where the cost is latency
    model: Any                   # the searched cost's CostModel
    tables: dict[str, Any] = field(default_factory=dict)  # cost name -> CostTable; size always

    @property
    def table(self):
        return self.tables[self.cost]

    def estimate_method(self) -> str | None:
        return getattr(self.model, "estimate_method", None)


def spec_reference(device_spec: str | None) -> str | None:
    """A device spec as a plan records it: a name, or a .yaml file's absolute path (so that
    `nas cost --plan` finds it from any folder)."""
    if device_spec and Path(device_spec).suffix in (".yaml", ".yml"):
        return str(Path(device_spec).resolve())
    return device_spec


def cost_setup(space, request: SearchRequest, target, saved_latency: dict | None = None,
               extra_costs: tuple[str, ...] = (), default_target: bool = True) -> CostSetup:
    """The searched cost (the target's, else --cost, else size), its table and the target:
    by default half the space's uniform W8A8 size when the cost is size. `extra_costs` (an
    objective's) get tables too."""
    from nas.cost import make_cost_model
    from nas.cost.targets import Target
    from nas.plan import Plan
    from nas.search.derive import check_feasible

    cost = request.cost or (target.cost if target else "size")
    if cost != "latency" and (request.latency_batch or request.device_spec):
        raise ConfigError(f"--latency-batch and --device-spec apply to a latency cost only, and "
                          f"this search's cost is {cost}; give --cost latency or a "
                          f"latency=... target, or drop them")
    saved = saved_latency or {}
    latency = {"batch": request.latency_batch or saved.get("batch", 1),
               "device_spec": spec_reference(request.device_spec) or saved.get("device_spec",
                                                                                 "h200")}
    models = {name: make_cost_model(name, device_spec=latency["device_spec"],
                                    batch=latency["batch"])
              for name in dict.fromkeys((cost, "size", *extra_costs))}
    if "latency" not in models:
        latency = None  # recorded only where a latency cost is used
    tables = {name: m.table(space) for name, m in models.items()}
    if target is None and default_target and cost == "size":
        w8 = models["size"].plan_cost(Plan.uniform(space, 8, 8), space)
        target = Target("size", round(w8 / 2), f"size={w8 / 2 / 1e3:.1f}KB")
    if target:
        check_feasible(tables[cost], target)
    return CostSetup(cost, target, latency, models[cost], tables)


def notes(space, setup: CostSetup) -> list[str]:
    """Lines to show before a search: layers left out of the costs, stale or estimated
    latency tables."""
    from nas.cost.notes import remeasure_command, unnamed_note

    out = [n for n in (unnamed_note(space),) if n]
    if "latency" in setup.tables:
        model = setup.model if setup.cost == "latency" else None
        if model is not None:
            stale = model.table_.stale_note(model.sources(space),
                                            remeasure_command(space, model.batch))
            if stale:
                out.append(stale)
            if setup.tables["latency"].any_estimated:
                out.append(f"latency estimated where no table has the layer: "
                           f"{model.estimate_method}")
    return out
