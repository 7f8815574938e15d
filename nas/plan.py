"""Plan: the per-layer precision plan, the system's currency.

Every searcher writes one, every cost model and evaluator reads one, and QAT and export
start from one. Stored as YAML or JSON with the same content; plain data only
(`yaml.safe_load` / `json`, never pickle).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from nas.errors import ConfigError
from nas.spaces import ALLOWED_BITS, FLOAT_BITS, SearchSpace, bit_width_error
from nas.textfiles import parse_yaml, read_text

FORMAT_VERSION = 2
READS_VERSIONS = (1, 2)  # 1: layer_hash without padding and input size
GRANULARITIES = ("per_channel", "per_tensor")
_TOP_KEYS = {"format_version", "model", "default", "layers", "costs", "provenance"}
_MODEL_KEYS = {"space", "name", "layer_hash"}


@dataclass(frozen=True)
class LayerPrecision:
    w_bits: int
    a_bits: int
    w_granularity: str = "per_channel"
    w_symmetric: bool = True
    a_symmetric: bool = False

    def __str__(self) -> str:
        return f"W{self.w_bits}A{self.a_bits}"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> "LayerPrecision":
        names = {f.name for f in fields(cls)}
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: {raw!r} must be a mapping with w_bits and a_bits")
        for key in raw:
            if key not in names:
                raise ConfigError(f"{where}.{key}: unknown key; allowed: {', '.join(sorted(names))}")
        for key in ("w_bits", "a_bits"):
            if key not in raw:
                raise ConfigError(f"{where}: missing {key}")
            problem = bit_width_error(raw[key])
            if problem:
                raise ConfigError(f"{where}.{key}: {problem}")
        if raw.get("w_granularity", "per_channel") not in GRANULARITIES:
            raise ConfigError(f"{where}.w_granularity: {raw['w_granularity']!r}; use "
                              f"per_channel or per_tensor")
        for key in ("w_symmetric", "a_symmetric"):
            if key in raw and not isinstance(raw[key], bool):
                raise ConfigError(f"{where}.{key}: {raw[key]!r} must be true or false")
        return cls(**raw)


def layer_hash(space: SearchSpace, version: int = FORMAT_VERSION) -> str:
    """Identity of a space's quantizable layers: names, types, shapes and (format 2 on) the
    padding, input size and any dilation, which the BitOps and latency of a layer depend on: a
    plan from a space file that changed image_size under a shipped name must not pass as the
    shipped one."""
    rows = []
    for x in space.layers():
        i = x.info
        row = [i.name, i.type, i.in_channels, i.out_channels, list(i.kernel), list(i.stride),
               i.groups]
        if version > 1:
            row += [list(i.padding), list(i.in_hw)] + ([list(i.dilation)] if i.dilated else [])
        rows.append(row)
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def parse_uniform(text: str) -> tuple[int, int]:
    """'W8A8' -> (8, 8); 'W4A32' is weight-only 4-bit."""
    match = re.fullmatch(r"[wW](\d+)[aA](\d+)", text.strip())
    bits = tuple(int(b) for b in match.groups()) if match else None
    if bits is None or any(b not in ALLOWED_BITS for b in bits):
        raise ConfigError(f"--uniform {text!r}: write W<bits>A<bits> with bits 2-8, 16 or 32, "
                          f"for example W8A8 or W4A8")
    return bits


def uniform_plan(space: SearchSpace, text: str) -> "Plan":
    """`--uniform W4A8`: every searchable layer at that precision, which must be a choice of
    each of them, as a plan's must, or else float (the baseline: W16A16, W32A32); fixed
    layers keep theirs."""
    w_bits, a_bits = parse_uniform(text)
    searchable = [x for x in space.layers() if not x.fixed]
    if w_bits in FLOAT_BITS and a_bits in FLOAT_BITS:
        return Plan.uniform(space, w_bits, a_bits).resolved(space, within_choices=False)
    if searchable:
        valid = [c for c in searchable[0].choices
                 if all(c in x.choices for x in searchable[1:])]
        if (w_bits, a_bits) not in {(c.w_bits, c.a_bits) for c in valid}:
            allowed = ", ".join(str(c) for c in valid) or "none common to all its layers"
            raise ConfigError(f"--uniform W{w_bits}A{a_bits} is outside space {space.name}; "
                              f"allowed: {allowed}")
    return Plan.uniform(space, w_bits, a_bits).resolved(space)


@dataclass
class Plan:
    space: str
    model: str
    layer_hash: str
    layers: dict[str, LayerPrecision]
    default: LayerPrecision | None = None
    costs: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    # ------------------------------------------------------------ construction

    @classmethod
    def uniform(cls, space: SearchSpace, w_bits: int, a_bits: int, include_fixed: bool = False,
                **overrides: Any) -> "Plan":
        """Every searchable layer at (w_bits, a_bits); fixed layers keep their precision
        unless `include_fixed` (experiments such as weight-only quantization of every layer).

        `overrides` (w_granularity, w_symmetric, a_symmetric) replace the space's quantizer
        defaults, for baselines such as per-tensor weights.
        """
        q = {**space.quantizer, **overrides}
        layers = {}
        for layer in space.layers():
            keep = layer.fixed and not include_fixed
            w, a = (layer.choices[0].w_bits, layer.choices[0].a_bits) if keep else (w_bits, a_bits)
            layers[layer.name] = LayerPrecision(w, a, q["w_granularity"], q["w_symmetric"],
                                                q["a_symmetric"])
        return cls(space.name, space.model, layer_hash(space), layers,
                   provenance={"method": "uniform", "uniform": f"W{w_bits}A{a_bits}",
                               "date": datetime.now(timezone.utc).isoformat(timespec="seconds")})

    def with_overrides(self, **overrides: Any) -> "Plan":
        """The same plan with every layer's quantizer settings replaced (not its bits)."""
        layers = {n: LayerPrecision(**{**p.to_dict(), **overrides}) for n, p in self.layers.items()}
        return Plan(self.space, self.model, self.layer_hash, layers, self.default,
                    dict(self.costs), dict(self.provenance), self.format_version)

    # ------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "model": {"space": self.space, "name": self.model, "layer_hash": self.layer_hash},
            "default": self.default.to_dict() if self.default else None,
            "layers": {name: p.to_dict() for name, p in self.layers.items()},
            "costs": dict(self.costs),
            "provenance": dict(self.provenance),
        }

    @classmethod
    def from_dict(cls, raw: Any, source: str = "plan") -> "Plan":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: must hold a mapping with keys {', '.join(sorted(_TOP_KEYS))}")
        for key in raw:
            if key not in _TOP_KEYS:
                raise ConfigError(f"{source}: unknown key {key!r}; allowed: {', '.join(sorted(_TOP_KEYS))}")
        version = raw.get("format_version")
        if type(version) is not int or version not in READS_VERSIONS:
            raise ConfigError(f"{source}: format_version {version!r} is not supported; this nas "
                              f"reads versions {', '.join(map(str, READS_VERSIONS))}")
        model = raw.get("model")
        if not isinstance(model, dict) or set(model) != _MODEL_KEYS:
            raise ConfigError(f"{source}: model must have exactly the keys space, name, layer_hash")
        for key in ("space", "name"):
            if not isinstance(model[key], str) or not model[key]:
                raise ConfigError(f"{source}: model.{key} {model[key]!r} must be a name")
        layers_raw = raw.get("layers")
        if not isinstance(layers_raw, dict):
            raise ConfigError(f"{source}: layers must map layer names to precisions")
        layers = {str(n): LayerPrecision.from_dict(p, f"{source}: layers.{n}")
                  for n, p in layers_raw.items()}
        default = raw.get("default")
        default = LayerPrecision.from_dict(default, f"{source}: default") if default else None
        for key in ("costs", "provenance"):
            if not isinstance(raw.get(key) or {}, dict):
                raise ConfigError(f"{source}: {key} must be a mapping")
        return cls(model["space"], model["name"], str(model["layer_hash"]), layers, default,
                   dict(raw.get("costs") or {}), dict(raw.get("provenance") or {}), version)

    def dumps(self, fmt: str = "yaml") -> str:
        if fmt == "json":
            return json.dumps(self.to_dict(), indent=2) + "\n"
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> Path:
        """Write YAML (.yaml/.yml) or JSON (.json), atomically."""
        from nas.runs import atomic_write_text

        path = Path(path)
        atomic_write_text(path, self.dumps("json" if path.suffix == ".json" else "yaml"))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        what = f"plan {path}"
        text = read_text(path, what, "give a plan file (.yaml or .json), such as a run "
                         "folder's plan.yaml", "give a plan file as nas writes it (YAML or JSON)")
        if path.suffix != ".json":
            raw = parse_yaml(text, what)
        else:
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"plan {path} is not valid JSON at line {exc.lineno}, column "
                                  f"{exc.colno}: {exc.msg}") from exc
        return cls.from_dict(raw, source=f"plan {path}")

    # ------------------------------------------------------------ validation

    def resolved(self, space: SearchSpace, within_choices: bool = True) -> "Plan":
        """Validate against `space` and return the plan with every layer listed.

        A layer the model lacks, a layer missing (with no default), or bits outside the
        space's choices (fixed layers: their fixed precision) is a ConfigError naming it.
        `within_choices=False` admits any allowed bit width (uniform baselines).
        """
        space_layers = {x.name: x for x in space.layers()}
        names = list(space_layers)
        if self.space != space.name and (not set(self.layers) <= set(space_layers)
                                         or self.layer_hash != layer_hash(space, self.format_version)):
            # Its layers are another model's: say which space the plan wants.
            from nas.spaces import list_spaces

            wanted = (self.space if self.space in list_spaces()
                      else f"PATH (the YAML file of space {self.space})")
            raise ConfigError(f"plan is for space {self.space}, not {space.name}; give "
                              f"--space {wanted}, or a plan made for {space.name}")
        for name in self.layers:
            if name not in space_layers:
                listed = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
                raise ConfigError(f"plan layer {name!r} is not a quantizable layer of space "
                                  f"{space.name} ({space.model}); its layers are: {listed}")
        layers = {}
        for name, layer in space_layers.items():
            prec = self.layers.get(name, self.default)
            if prec is None:
                raise ConfigError(f"plan has no precision for layer {name!r} of space "
                                  f"{space.name}; add it under layers: or set default:")
            allowed = {(c.w_bits, c.a_bits) for c in layer.choices}
            if (prec.w_bits, prec.a_bits) not in allowed and (layer.fixed or within_choices):
                text = ", ".join(str(c) for c in layer.choices)
                kind = "fixed at" if layer.fixed else "allowed:"
                raise ConfigError(f"plan layer {name!r}: {prec} is outside space {space.name}; "
                                  f"{kind} {text}")
            layers[name] = prec
        expected = layer_hash(space, self.format_version)
        if self.layer_hash != expected:
            raise ConfigError(f"plan was made for other layers (layer_hash {self.layer_hash}) than "
                              f"space {space.name} has ({expected}): same names, other shapes, "
                              f"padding or input size; if it came from a changed copy of "
                              f"{space.name}, give that file with --space PATH")
        return Plan(self.space, self.model, self.layer_hash, layers, self.default,
                    dict(self.costs), dict(self.provenance), self.format_version)

    def bits_histogram(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for p in self.layers.values():
            counts[str(p)] = counts.get(str(p), 0) + 1
        return dict(sorted(counts.items()))
