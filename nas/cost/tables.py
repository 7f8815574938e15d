"""Measured latency tables: JSON files under `cost_models/` (written by `nas measure`), keyed
by layer geometry, batch, w_bits and a_bits, each with its provenance, which records a
fingerprint of the kernel code it measured.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nas.cost.device_spec import COST_MODELS_DIR
from nas.errors import ConfigError
from nas.spaces import ALLOWED_BITS, LayerInfo
from nas.values import is_number, is_whole

# The code a measured latency describes: tables record its fingerprint, so that a table
# measured before the kernels changed is reported as such.
KERNEL_SOURCES = [Path(__file__).resolve().parents[1] / "kernels" / name
                  for name in ("conv_kernels.py", "conv.py", "configs.py")]
TABLE_FORMAT = "nas-latency/1"


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
