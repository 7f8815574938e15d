"""Latency: a per-layer table measured on a device, or a labelled estimate.

Measured tables are JSON files under `cost_models/` (written by `nas measure`), keyed by
layer geometry, batch, w_bits and a_bits, each with its provenance. Where a table has no
entry, an estimate stands in, and every output marks it "estimated": the roofline from the
device spec (`cost_models/devices/<name>.yaml`), times a factor fitted to the device's
measured tables where it has any (`nas.cost.calibration`).

The roofline: time = max(compute, memory) + launch overhead, where
- compute runs the implicit GEMM (M = batch * Ho * Wo, N = Cout / groups, K = Cin / groups *
  kh * kw) in tiles of tile_m x tile_n spread over the SMs in waves, so a layer too small to
  fill the last wave pays for it (wave quantisation). Quantized layers (both bits <= 8) run
  at the INT8 tensor-core rate: Hopper has no int4 MMA, so 4-bit operands are unpacked to
  int8 and 4 bits save bytes, not MMA time. Float layers run at the FP16 (16 bits) or TF32
  (32 bits) rate; depthwise convolutions run on CUDA cores.
- memory moves the input activations (a_bits each), the weights (w_bits each) and an fp16
  output through HBM once.
- split-K: like the integer kernels, a quantized layer too small to fill the GPU is also
  estimated with its reduction split as `nas.kernels.configs.propose_split_k` proposes
  (each split a tile's share of K; every split's int32 partial sums written and read back
  through HBM; two launches: GEMM and epilogue), and the faster of the two stands, as timing
  chooses on a GPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from nas.cost.base import CostModel
from nas.errors import ConfigError
from nas.textfiles import parse_yaml, read_text
from nas.values import is_finite, is_number, is_whole
from nas.kernels.configs import propose_split_k
from nas.spaces import ALLOWED_BITS, FLOAT_BITS, LayerInfo

COST_MODELS_DIR = Path(__file__).resolve().parents[2] / "cost_models"
# The code a measured latency describes: tables record its fingerprint, so that a table
# measured before the kernels changed is reported as such.
KERNEL_SOURCES = [Path(__file__).resolve().parents[1] / "kernels" / name
                  for name in ("conv_kernels.py", "conv.py", "configs.py")]
TABLE_FORMAT = "nas-latency/1"
OUTPUT_BYTES = 2  # fp16 output of the fused epilogue


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    sms: int
    int8_tops: float
    fp16_tflops: float
    tf32_tflops: float
    cuda_core_tops: float
    hbm_tb_s: float
    launch_overhead_us: float
    tile_m: int = 128
    tile_n: int = 128
    int4_mma: bool = False
    description: str = ""

    @classmethod
    def load(cls, name_or_path: str) -> "DeviceSpec":
        path = Path(name_or_path)
        if path.suffix not in (".yaml", ".yml"):
            path = COST_MODELS_DIR / "devices" / f"{name_or_path}.yaml"
        if not path.is_file() and not path.is_dir():
            known = sorted(p.stem for p in (COST_MODELS_DIR / "devices").glob("*.yaml"))
            raise ConfigError(f"device spec {name_or_path!r} not found; choose one of "
                              f"{', '.join(known)} or give a .yaml path")
        what = f"device spec {path}"
        raw = parse_yaml(read_text(path, what, "give a .yaml file", "save it as UTF-8 YAML"),
                         what)
        return cls(**_checked_spec(raw, path))


# Every field's kind, as the spec file must give it: the roofline divides by the rates and
# the SM count, so a zero or a string there would fail (or mislead) deep in an estimate.
_SPEC_FIELDS = {
    "name": "text", "sms": "count", "int8_tops": "rate", "fp16_tflops": "rate",
    "tf32_tflops": "rate", "cuda_core_tops": "rate", "hbm_tb_s": "rate",
    "launch_overhead_us": "time", "tile_m": "count", "tile_n": "count", "int4_mma": "flag",
    "description": "note",
}
_SPEC_EXPECTED = {"text": "a non-empty string", "note": "a string",
                  "count": "a positive whole number", "rate": "a positive number",
                  "time": "a number of microseconds, 0 or more", "flag": "true or false"}


def _spec_value_ok(kind: str, value: Any) -> bool:
    if kind == "text":
        return isinstance(value, str) and bool(value.strip())
    if kind == "note":
        return isinstance(value, str)
    if kind == "flag":
        return isinstance(value, bool)
    if kind == "count":
        return is_whole(value) and value > 0
    if not is_finite(value):
        return False
    return value > 0 if kind == "rate" else value >= 0


def _checked_spec(raw: Any, path: Path) -> dict[str, Any]:
    """The fields of a device spec file, each checked (one-line ConfigError otherwise)."""
    known = ", ".join(_SPEC_FIELDS)
    if not isinstance(raw, dict):
        raise ConfigError(f"device spec {path} must be a YAML mapping of the fields {known}; "
                          f"see cost_models/devices/h200.yaml")
    for key in raw:
        if key not in _SPEC_FIELDS:
            raise ConfigError(f"device spec {path}: unknown field {key!r}; known fields: {known}")
    required = [f.name for f in fields(DeviceSpec) if f.default is MISSING]
    missing = [name for name in required if name not in raw]
    if missing:
        raise ConfigError(f"device spec {path}: missing {', '.join(missing)}; see "
                          f"cost_models/devices/h200.yaml")
    for key, value in raw.items():
        kind = _SPEC_FIELDS[key]
        if not _spec_value_ok(kind, value):
            raise ConfigError(f"device spec {path}: {key} {value!r} must be "
                              f"{_SPEC_EXPECTED[kind]}")
    return raw


def kernel_fingerprint() -> str:
    """First 12 hex digits of the SHA-256 of the kernel sources, in KERNEL_SOURCES order."""
    digest = hashlib.sha256()
    for path in KERNEL_SOURCES:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def table_key(info, batch: int, w_bits: int, a_bits: int) -> str:
    """The geometry a latency depends on, as one string. A dilated layer's key names its
    dilation, so that no table (the kernels have none) gives it an undilated layer's time."""
    dilation = f":d{info.dilation[0]}x{info.dilation[1]}" if info.dilated else ""
    return (f"{info.type}:{info.in_channels}x{info.out_channels}:k{info.kernel[0]}x{info.kernel[1]}"
            f":s{info.stride[0]}x{info.stride[1]}:p{info.padding[0]}x{info.padding[1]}"
            f"{dilation}:g{info.groups}:{info.in_hw[0]}x{info.in_hw[1]}:b{batch}"
            f":w{w_bits}a{a_bits}")


def distinct_choices(space, batch: int) -> list[tuple[str, LayerInfo, Any]]:
    """(key, layer geometry, choice) of every (layer, choice) of the space, once per key:
    layers of one geometry share their entries."""
    out, seen = [], set()
    for layer in space.layers():
        for choice in layer.choices:
            key = table_key(layer.info, batch, choice.w_bits, choice.a_bits)
            if key not in seen:
                seen.add(key)
                out.append((key, layer.info, choice))
    return out


_N = r"(\d{1,7})"  # a whole number of sane size
_KEY = re.compile(rf"(Conv2d|Linear):{_N}x{_N}:k{_N}x{_N}:s{_N}x{_N}:p{_N}x{_N}:g{_N}"
                  rf":{_N}x{_N}:b{_N}:w{_N}a{_N}")


def layer_from_key(key: str) -> tuple[LayerInfo, int, int, int] | None:
    """(geometry, batch, w_bits, a_bits) of a `table_key` string (None if it is not one):
    a table's entries describe their layers completely (undilated convolutions)."""
    m = _KEY.fullmatch(key) if isinstance(key, str) else None
    if m is None:
        return None
    kind, (ci, co, kh, kw, sh, sw, ph, pw, g, h, w, batch, w_bits, a_bits) = (
        m.group(1), map(int, m.groups()[1:]))
    if (min(ci, co, kh, kw, sh, sw, g, h, w, batch) <= 0 or ci % g or co % g
            or w_bits not in ALLOWED_BITS or a_bits not in ALLOWED_BITS):
        return None
    out_hw = ((h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1)
    if min(out_hw) <= 0:
        return None
    params = co * (ci // g) * kh * kw
    info = LayerInfo(key, kind, ci, co, (kh, kw), (sh, sw), (ph, pw), g, (h, w), out_hw, params,
                     params * out_hw[0] * out_hw[1])
    return info, batch, w_bits, a_bits


def packed_operands(info, w_bits: int, a_bits: int) -> tuple[bool, bool]:
    """Whether a layer's activations and weights go to the kernel packed two per byte: at 4
    bits or fewer, where the packed axis (channels per group) is even."""
    ci = info.in_channels // info.groups
    return (a_bits <= 4 and ci % 2 == 0 and info.groups == 1), (w_bits <= 4 and ci % 2 == 0)


@dataclass
class LatencyTable:
    """Measured microseconds by key, from one or more JSON files of one device."""

    device: str
    entries: dict[str, float]
    sources: list[str]
    origin: dict[str, str] = field(default_factory=dict)  # key -> the file it came from
    kernels: dict[str, str | None] = field(default_factory=dict)  # file -> kernel fingerprint
    # key -> the same layer in fp16 cuDNN (the tables' baseline column), where recorded
    baselines: dict[str, float] = field(default_factory=dict)

    @classmethod
    def load_dir(cls, device: str, folder: Path = COST_MODELS_DIR) -> "LatencyTable":
        return cls.load_files(device, sorted(folder.glob("*.json")))

    @classmethod
    def load_files(cls, device: str, paths) -> "LatencyTable":
        """The entries of those of the files measured for `device` (a later file's entry
        wins over an earlier one's)."""
        entries, sources, origin, kernels, baselines = {}, [], {}, {}, {}
        for path in paths:
            raw = cls.read_document(path)
            if raw["provenance"].get("device_spec") != device:
                continue
            entries.update({e["key"]: float(e["us"]) for e in raw["entries"]})
            origin.update({e["key"]: path.name for e in raw["entries"]})
            baselines.update({e["key"]: float(e["fp16_cudnn_us"]) for e in raw["entries"]
                              if "fp16_cudnn_us" in e})
            sources.append(path.name)
            kernels[path.name] = raw["provenance"].get("kernel_source")
        return cls(device, entries, sources, origin, kernels, baselines)

    def stale(self, names) -> list[str]:
        """Those of the named files measured with other kernel code than this checkout's
        (or with no fingerprint recorded)."""
        current = kernel_fingerprint()
        return sorted(n for n in names if n in self.kernels and self.kernels[n] != current)

    def stale_note(self, names, remeasure: str) -> str | None:
        """One line naming the stale tables among `names` and the command that re-measures
        them (None when none is stale)."""
        stale = self.stale(names)
        if not stale:
            return None
        return (f"note: measured with other kernel code than this checkout's (kernel_source "
                f"{kernel_fingerprint()}): "
                + ", ".join(f"{n} (kernel_source {self.kernels[n] or 'not recorded'})"
                            for n in stale)
                + f"; re-measure on a GPU with `{remeasure}`")

    @staticmethod
    def read_document(path: Path) -> dict[str, Any]:
        """A table file's JSON, checked entry by entry (one-line ConfigError otherwise)."""
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"latency table {path} cannot be read: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("format") != TABLE_FORMAT or not isinstance(
                raw.get("entries"), list) or not isinstance(raw.get("provenance"), dict):
            raise ConfigError(f"latency table {path} is not a {TABLE_FORMAT} file")
        batch = raw["provenance"].get("batch")
        if batch is not None and not (is_whole(batch) and batch > 0):
            raise ConfigError(f"latency table {path}: provenance batch {batch!r} is not a "
                              f"positive whole number; fix it or re-measure the table")
        for i, entry in enumerate(raw["entries"]):
            if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
                raise ConfigError(f"latency table {path}: entry {i} has no \"key\" string; "
                                  f"fix it or re-measure the table with `nas measure`")
            for name in ("us", "fp16_cudnn_us"):  # the baseline column is optional
                value = entry.get(name, 1.0 if name == "fp16_cudnn_us" else None)
                if not (is_number(value) and 0 < value < math.inf):
                    raise ConfigError(f"latency table {path}: entry {entry['key']!r} has "
                                      f"{name} {value!r}, not a positive number of "
                                      f"microseconds; fix it or re-measure the table with "
                                      f"`nas measure`")
        return raw


def _is_float(bits: int) -> bool:
    return bits in FLOAT_BITS


def roofline_us(info, w_bits: int, a_bits: int, batch: int, spec: DeviceSpec) -> float:
    """Estimated microseconds of one layer at one precision (see the module docstring)."""
    ho, wo = info.out_hw
    groups = info.groups
    m = batch * ho * wo
    n = info.out_channels // groups
    ci, taps = info.in_channels // groups, info.kernel[0] * info.kernel[1]
    k = ci * taps
    quantized = not _is_float(w_bits) and not _is_float(a_bits)
    depthwise = groups > 1 and groups == info.in_channels
    in_bytes = batch * info.in_channels * info.in_hw[0] * info.in_hw[1] * a_bits / 8
    weight_bytes = info.out_channels * k * w_bits / 8
    out_bytes = batch * info.out_channels * ho * wo * OUTPUT_BYTES
    hbm_s = (in_bytes + weight_bytes + out_bytes) / (spec.hbm_tb_s * 1e12)
    if depthwise:
        compute_s = 2.0 * m * n * k * groups / (spec.cuda_core_tops * 1e12)
        return max(compute_s, hbm_s) * 1e6 + spec.launch_overhead_us
    if quantized:
        peak = spec.int8_tops  # 4-bit operands too: no int4 MMA on this device
    elif max(w_bits, a_bits) <= 16:
        peak = spec.fp16_tflops
    else:
        peak = spec.tf32_tflops
    tiles = math.ceil(m / spec.tile_m) * math.ceil(n / spec.tile_n) * groups

    def gemm_us(splits: int) -> float:
        waves = math.ceil(tiles * splits / spec.sms)
        compute_s = waves * 2.0 * spec.tile_m * spec.tile_n * k / splits / (peak * 1e12 / spec.sms)
        if splits == 1:
            return max(compute_s, hbm_s) * 1e6 + spec.launch_overhead_us
        # Each split stores its int32 partial sums and the epilogue kernel reads them all
        # back (counted at HBM bandwidth, though they may stay in L2); two launches.
        acc_s = 2 * splits * m * info.out_channels * 4 / (spec.hbm_tb_s * 1e12)
        return max(compute_s, hbm_s + acc_s) * 1e6 + 2 * spec.launch_overhead_us

    if not quantized:
        return gemm_us(1)
    # The integer kernels time no split against the split the launch rules propose.
    return min(gemm_us(1), gemm_us(propose_split_k(m, n, groups, ci, taps, spec.sms)))


class LatencyCost(CostModel):
    """Measured latency where the table has the entry, an estimate elsewhere: the roofline,
    calibrated on the device's measured tables where it has any (`nas.cost.calibration`;
    `calibrate=False`: the bare roofline)."""

    name, unit = "latency", "us"

    def __init__(self, spec: DeviceSpec, batch: int = 1, table: LatencyTable | None = None,
                 calibrate: bool = True):
        from nas.cost.calibration import Calibration

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
