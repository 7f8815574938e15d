"""Latency: a per-layer table measured on a device, or a labelled estimate.

Measured tables (`nas.cost.tables`) give a (layer, choice) its time where they have its
entry. Elsewhere an estimate stands in, and every output marks it "estimated": the roofline
(`nas.cost.roofline`) from the device spec (`nas.cost.device_spec`), times a factor fitted
to the device's measured tables where it has any (`nas.cost.calibration`).
"""

from __future__ import annotations

from nas.cost.base import CostModel
from nas.cost.calibration import Calibration
from nas.cost.device_spec import DeviceSpec
from nas.cost.roofline import roofline_us
from nas.cost.tables import LatencyTable, table_key


class LatencyCost(CostModel):
    """Measured latency where the table has the entry, an estimate elsewhere: the roofline,
    calibrated on the device's measured tables where it has any (`nas.cost.calibration`;
    `calibrate=False`: the bare roofline)."""

    name, unit = "latency", "us"

    def __init__(self, spec: DeviceSpec, batch: int = 1, table: LatencyTable | None = None,
                 calibrate: bool = True):
        self.spec, self.batch = spec, batch
        self.table_ = table if table is not None else LatencyTable(spec.name, {}, [])
        self.calibration = Calibration.fit(self.table_, spec) if calibrate else None

    def estimate(self, info, prec) -> float:
        """The estimate of one choice, whether or not a table has it."""
        if self.calibration is not None:
            us = self.calibration.estimate_us(info, prec.w_bits, prec.a_bits, self.batch,
                                              self.spec)
            if us is not None:
                return us
        return roofline_us(info, prec.w_bits, prec.a_bits, self.batch, self.spec)

    @property
    def estimate_method(self) -> str:
        """What the estimates are, in words, for labels."""
        if self.calibration is None:
            return "roofline from the device spec"
        stale = self.table_.stale(self.calibration.sources)
        return (f"roofline from the device spec, calibrated on {self.calibration.describe()}"
                + (f" ({len(stale)} measured with other kernel code)" if stale else ""))

    def _measured(self, info, prec) -> float | None:
        return self.table_.entries.get(table_key(info, self.batch, prec.w_bits, prec.a_bits))

    def layer_cost(self, info, prec) -> float:
        measured = self._measured(info, prec)
        return measured if measured is not None else self.estimate(info, prec)

    def is_estimated(self, info, prec) -> bool:
        return self._measured(info, prec) is None

    def source(self, info, prec) -> str | None:
        """The table file a measured latency came from (None where it is estimated)."""
        return self.table_.origin.get(table_key(info, self.batch, prec.w_bits, prec.a_bits))

    def sources(self, space) -> set[str]:
        """The table files the latencies of this space's choices come from."""
        return {self.source(layer.info, c) for layer in space.layers()
                for c in layer.choices} - {None}
