"""A device's spec: the SM count, peak rates, bandwidth and launch overhead that the roofline
estimate reads, from `cost_models/devices/<name>.yaml`, each field checked as it loads."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from nas.errors import ConfigError
from nas.textfiles import parse_yaml, read_text
from nas.values import is_finite, is_whole

# Device specs (devices/) and the measured latency tables live here.
COST_MODELS_DIR = Path(__file__).resolve().parents[2] / "cost_models"


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
