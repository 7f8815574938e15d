"""Cost models: what a plan costs in bytes, BitOps or latency (no torch needed)."""

from __future__ import annotations

from nas.cost.base import CostModel, CostTable
from nas.cost.targets import Target, format_cost, parse_target

COSTS = ("size", "bitops", "latency")


def make_cost_model(name: str, *, device_spec: str = "h200", batch: int = 1,
                    calibrate: bool = True) -> CostModel:
    """The cost model for `name`; latency loads the device spec and any measured tables
    (and estimates what they lack by the roofline, calibrated on them unless `calibrate` is
    False)."""
    from nas.errors import ConfigError

    if name == "size":
        from nas.cost.size import SizeCost

        return SizeCost()
    if name == "bitops":
        from nas.cost.bitops import BitOpsCost

        return BitOpsCost()
    if name == "latency":
        from nas.cost.device_spec import DeviceSpec
        from nas.cost.latency import LatencyCost
        from nas.cost.tables import LatencyTable

        spec = DeviceSpec.load(device_spec)
        return LatencyCost(spec, batch, LatencyTable.load_dir(spec.name), calibrate)
    raise ConfigError(f"cost {name!r} is unknown; choose one of {', '.join(COSTS)}")


__all__ = ["COSTS", "CostModel", "CostTable", "Target", "format_cost", "make_cost_model",
           "parse_target"]
