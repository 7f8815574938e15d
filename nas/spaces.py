"""SearchSpace: which model, which data, which layers, which (w_bits, a_bits) choices.

A space is pure data loaded from YAML (`search_spaces/NAME.yaml` or any path). `resolve()`
builds the model once and matches the layer globs against its Conv2d and Linear modules,
recording each layer's geometry for the cost models. A Conv2d or Linear that neither
`searchable` nor `fixed` names is no space layer: it stays float and outside every cost
(`unnamed_layers` lists them, and `nas cost` / `nas search` say so).
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import math
import os
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nas.errors import ConfigError
from nas.values import is_whole

ALLOWED_BITS = (2, 3, 4, 5, 6, 7, 8, 16, 32)
FLOAT_BITS = (16, 32)
DEFAULT_SPACE = "fmnist_resnet8"
SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
_TOP_KEYS = {"name", "description", "model", "data", "searchable", "choices", "fixed",
             "quantizer", "train"}
_QUANTIZER_DEFAULTS = {"w_granularity": "per_channel", "w_symmetric": True, "a_symmetric": False}
_TRAIN_DEFAULTS = {"budget": "3ep", "batch_size": 128, "lr": 0.1, "weight_decay": 5e-4}


@dataclass(frozen=True)
class Choice:
    w_bits: int
    a_bits: int

    def __str__(self) -> str:
        return f"W{self.w_bits}A{self.a_bits}"


@dataclass(frozen=True)
class LayerInfo:
    """Geometry of one Conv2d or Linear as it runs on a batch of one (Linear: kernel 1x1)."""

    name: str
    type: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    params: int
    macs: int
    # The Triton kernels have no dilation: a dilated layer is never matched to a measured
    # undilated one (its table key and layer hash name it) and `nas measure` refuses it.
    dilation: tuple[int, int] = (1, 1)

    @property
    def dilated(self) -> bool:
        return self.dilation != (1, 1)

    def prepadded(self) -> "LayerInfo":
        """The same layer on its input already bordered by its padding (padding 0, the
        input larger by it): a layout where the producer writes inside a border."""
        (ph, pw), (h, w) = self.padding, self.in_hw
        return replace(self, padding=(0, 0), in_hw=(h + 2 * ph, w + 2 * pw))


@dataclass(frozen=True)
class SpaceLayer:
    info: LayerInfo
    choices: tuple[Choice, ...]
    fixed: bool

    @property
    def name(self) -> str:
        return self.info.name


def _spaces_dir() -> Path:
    return Path(os.environ.get("NAS_SPACES_DIR", SPACES_DIR))


def list_spaces() -> list[str]:
    return sorted(p.stem for p in _spaces_dir().glob("*.yaml"))


def _bits_list(value: Any, key: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key}: {value!r} must be a non-empty list of bit widths")
    for b in value:
        _check_bits(b, key)
    return tuple(sorted(set(value)))


# Run folders are named <time>-<space name>-<command>, and a file system allows 255 bytes.
MAX_NAME_BYTES = 100


def _check_name(name: str) -> None:
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise ConfigError(f"name: {size} bytes is too long (it names run folders); give at most "
                          f"{MAX_NAME_BYTES}")
    bad = next((c for c in name if not c.isprintable() or c in "/\\"), None)
    if bad is not None:
        raise ConfigError(f"name: {name!r} holds {bad!r}, which a run folder's name cannot; use "
                          f"letters, digits, '-' and '_'")


def bit_width_error(value: Any) -> str | None:
    """Why `value` is not a bit width (None when it is one). 4.0 is refused: a float would be
    costed and named as another precision (W4.0A8) than the integer one."""
    if isinstance(value, float) and value.is_integer():
        return (f"{value!r} is not an allowed bit width: write it as a whole number, "
                f"{int(value)}")
    if isinstance(value, bool) or not isinstance(value, int) or value not in ALLOWED_BITS:
        return f"{value!r} is not an allowed bit width; allowed: 2-8, or 16 / 32 for float"
    return None


def _check_bits(value: Any, key: str) -> int:
    problem = bit_width_error(value)
    if problem:
        raise ConfigError(f"{key}: {problem}")
    return value


_PRECISION_HINT = "write W<bits>A<bits> with bits 2-8, 16 or 32, for example W4A8"


def _choice_entry(entry: Any, key: str) -> Choice:
    """One entry of a `choices:` list: 'W4A8' (either case) or {w_bits: 4, a_bits: 8}."""
    if isinstance(entry, dict):
        if set(entry) != {"w_bits", "a_bits"}:
            raise ConfigError(f"{key}: {entry!r} must be {{w_bits: N, a_bits: N}}; or "
                              f"{_PRECISION_HINT}")
        return Choice(_check_bits(entry["w_bits"], f"{key}.w_bits"),
                      _check_bits(entry["a_bits"], f"{key}.a_bits"))
    match = re.fullmatch(r"[wW](\d+)[aA](\d+)", entry.strip()) if isinstance(entry, str) else None
    bits = tuple(int(b) for b in match.groups()) if match else None
    if bits is None or any(b not in ALLOWED_BITS for b in bits):
        raise ConfigError(f"{key}: {entry!r} is not a precision; {_PRECISION_HINT}")
    return Choice(*bits)


def _choice_pairs(value: list) -> tuple[Choice, ...]:
    """`choices: [W8A8, W4A8, ...]`: only these (w_bits, a_bits) pairs, in canonical order."""
    if not value:
        raise ConfigError("choices: [] lists no precision; give at least one, for example "
                          "[W8A8, W4A8], or {w_bits: [...], a_bits: [...]}")
    seen: dict[Choice, int] = {}
    for i, entry in enumerate(value):
        choice = _choice_entry(entry, f"choices[{i}]")
        if choice in seen:  # refused, not merged: a repeat is likely a typo for another pair
            raise ConfigError(f"choices[{i}]: {entry!r} repeats {choice} "
                              f"(choices[{seen[choice]}]); list each precision once")
        seen[choice] = i
    return tuple(sorted(seen, key=lambda c: (c.w_bits, c.a_bits)))


def _section(raw: dict, key: str, allowed: set[str]) -> dict:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: must be a mapping, got {value!r}")
    for sub in value:
        if sub not in allowed:
            raise ConfigError(f"{key}.{sub}: unknown key; allowed: {', '.join(sorted(allowed))}")
    return value


def _train_section(raw: dict) -> dict[str, Any]:
    """The train: defaults a command falls back on, checked here so that a bad value is
    refused when the space loads (and by 'nas spaces show'), not when training starts."""
    from nas.budget import parse_budget
    from nas.errors import BudgetError

    train = {**_TRAIN_DEFAULTS, **_section(raw, "train", set(_TRAIN_DEFAULTS))}
    try:
        parse_budget(str(train["budget"]))
    except BudgetError as exc:
        raise ConfigError(f"train.budget: {exc}") from None
    size = train["batch_size"]
    if not is_whole(size) or size <= 0:
        raise ConfigError(f"train.batch_size: {size!r} must be a positive whole number")
    for key, least, above in (("lr", 0.0, True), ("weight_decay", 0.0, False)):
        value = train[key]
        try:  # PyYAML reads 1e-3 (no dot) as a string: numbers written so are accepted
            number = float(value) if not isinstance(value, bool) else float("nan")
        except (TypeError, ValueError):
            number = float("nan")
        if not math.isfinite(number) or number < least or (above and number == least):
            takes = "a number above 0" if above else "a number of at least 0"
            raise ConfigError(f"train.{key}: {value!r} must be {takes}")
        train[key] = number
    return train


def _globs(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(g, str) for g in value) or not value:
        raise ConfigError(f"{key}: {value!r} must be a module-name glob or a list of them")
    return tuple(value)


@dataclass
class SearchSpace:
    name: str
    model: str
    data: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data_kwargs: dict[str, Any] = field(default_factory=dict)
    searchable: tuple[str, ...] = ("*",)
    w_bits: tuple[int, ...] = (2, 4, 8)
    a_bits: tuple[int, ...] = (4, 8)
    # Explicit (w_bits, a_bits) pairs (`choices: [W8A8, W4A8]`); None: every w_bits x a_bits.
    pairs: tuple[Choice, ...] | None = None
    fixed: dict[str, Choice] = field(default_factory=dict)
    quantizer: dict[str, Any] = field(default_factory=lambda: dict(_QUANTIZER_DEFAULTS))
    train: dict[str, Any] = field(default_factory=lambda: dict(_TRAIN_DEFAULTS))
    description: str = ""
    # How the user named the space (a shipped name or a path), for hints in messages.
    origin: str = field(default="", repr=False, compare=False)
    _layers: list[SpaceLayer] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.pairs is not None:  # w_bits / a_bits then name the bits the pairs use
            self.pairs = tuple(sorted(set(self.pairs), key=lambda c: (c.w_bits, c.a_bits)))
            self.w_bits = tuple(sorted({c.w_bits for c in self.pairs}))
            self.a_bits = tuple(sorted({c.a_bits for c in self.pairs}))

    # ------------------------------------------------------------ loading

    @classmethod
    def from_dict(cls, raw: Any, source: str = "search space") -> "SearchSpace":
        """Validate the schema; every problem is one ConfigError naming the key and value."""
        try:
            return cls._from_dict(raw)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def _from_dict(cls, raw: Any) -> "SearchSpace":
        from nas.datainfo import check_data_kwargs
        from nas.models import get_factory, is_known
        from nas.models.registry import check_model_kwargs

        if not isinstance(raw, dict):
            raise ConfigError("the file must hold a mapping with keys name, model, data, ...")
        for key in raw:
            if key not in _TOP_KEYS:
                raise ConfigError(f"unknown key {key!r}; allowed: {', '.join(sorted(_TOP_KEYS))}")
        for key in ("name", "model", "data"):
            if key not in raw:
                raise ConfigError(f"missing required key {key!r}")
        if not isinstance(raw["name"], str) or not raw["name"]:
            raise ConfigError(f"name: {raw['name']!r} must be a non-empty string")
        _check_name(raw["name"])
        model = _section(raw, "model", {"name", "kwargs"})
        data = _section(raw, "data", {"name", "kwargs"})
        for key, sec in (("model", model), ("data", data)):
            if not isinstance(sec.get("name"), str):
                raise ConfigError(f"{key}.name: missing or not a string")
            if not isinstance(sec.get("kwargs") or {}, dict):
                raise ConfigError(f"{key}.kwargs: must be a mapping, got {sec['kwargs']!r}")
        try:
            if ":" in model["name"] or not is_known(model["name"]):
                get_factory(model["name"])  # imports a user module; names the choices if unknown
        except Exception as exc:  # ModelError, or an import error in a user module
            raise ConfigError(f"model.name: {exc}") from exc
        check_model_kwargs(model["name"], model.get("kwargs") or {})
        check_data_kwargs(data["name"], data.get("kwargs") or {})
        pairs = None
        if isinstance(raw.get("choices"), list):
            pairs, choices = _choice_pairs(raw["choices"]), {}
        elif raw.get("choices") is not None and not isinstance(raw["choices"], dict):
            raise ConfigError(f"choices: {raw['choices']!r} must be a list of precisions such as "
                              f"[W8A8, W4A8] or a mapping {{w_bits: [...], a_bits: [...]}}")
        else:
            choices = _section(raw, "choices", {"w_bits", "a_bits"})
        quantizer = {**_QUANTIZER_DEFAULTS,
                     **_section(raw, "quantizer", set(_QUANTIZER_DEFAULTS))}
        if quantizer["w_granularity"] not in ("per_channel", "per_tensor"):
            raise ConfigError(f"quantizer.w_granularity: {quantizer['w_granularity']!r}; "
                              f"use per_channel or per_tensor")
        for key in ("w_symmetric", "a_symmetric"):
            if not isinstance(quantizer[key], bool):
                raise ConfigError(f"quantizer.{key}: {quantizer[key]!r} must be true or false")
        train = _train_section(raw)
        fixed_raw = raw.get("fixed") or {}
        if not isinstance(fixed_raw, dict):
            raise ConfigError(f"fixed: must map layer globs to {{w_bits, a_bits}}, got {fixed_raw!r}")
        fixed = {}
        for glob, prec in fixed_raw.items():
            if not isinstance(prec, dict) or set(prec) != {"w_bits", "a_bits"}:
                raise ConfigError(f"fixed.{glob}: {prec!r} must be {{w_bits: N, a_bits: N}}")
            fixed[str(glob)] = Choice(_check_bits(prec["w_bits"], f"fixed.{glob}.w_bits"),
                                      _check_bits(prec["a_bits"], f"fixed.{glob}.a_bits"))
        return cls(
            name=raw["name"], description=str(raw.get("description", "")),
            model=model["name"], model_kwargs=dict(model.get("kwargs") or {}),
            data=data["name"], data_kwargs=dict(data.get("kwargs") or {}),
            searchable=_globs(raw.get("searchable", ["*"]), "searchable"),
            w_bits=_bits_list(choices.get("w_bits", [2, 4, 8]), "choices.w_bits"),
            a_bits=_bits_list(choices.get("a_bits", [4, 8]), "choices.a_bits"),
            pairs=pairs, fixed=fixed, quantizer=quantizer, train=train)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "SearchSpace":
        from nas.textfiles import parse_yaml, read_text

        path = Path(path)
        what = f"search space {path}"
        raw = parse_yaml(read_text(path, what, "give a search space .yaml file or a shipped "
                                   "space's name (see 'nas spaces')",
                                   "save it as a UTF-8 YAML file"), what)
        space = cls.from_dict(raw, source=f"search space {path}")
        space.origin = str(path)
        return space

    def to_dict(self) -> dict[str, Any]:
        """The resolved space as plain data (what run folders save as config)."""
        return {
            "name": self.name, "description": self.description,
            "model": {"name": self.model, "kwargs": dict(self.model_kwargs)},
            "data": {"name": self.data, "kwargs": dict(self.data_kwargs)},
            "searchable": list(self.searchable),
            "choices": ([str(c) for c in self.pairs] if self.pairs is not None
                        else {"w_bits": list(self.w_bits), "a_bits": list(self.a_bits)}),
            "fixed": {g: {"w_bits": c.w_bits, "a_bits": c.a_bits} for g, c in self.fixed.items()},
            "quantizer": dict(self.quantizer), "train": dict(self.train),
        }

    # ------------------------------------------------------------ model and layers

    def data_info(self):
        from nas.datainfo import dataset_info

        return dataset_info(self.data, **self.data_kwargs)

    def build_model(self, seed: int | None = None):
        """The space's model. `seed` sets its initial weights (a model about to be trained
        from scratch) without touching torch's global generator; without it they come from
        that generator (fine for a model whose weights are loaded next)."""
        import torch

        from nas.models import create_model

        info = self.data_info()

        def create():
            return create_model(self.model, defaults={"num_classes": info.num_classes,
                                                      "in_channels": info.in_channels},
                                **self.model_kwargs)

        if seed is None:
            return create()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return create()

    @property
    def choices(self) -> tuple[Choice, ...]:
        if self.pairs is not None:
            return self.pairs
        return tuple(Choice(w, a) for w, a in itertools.product(self.w_bits, self.a_bits))

    def layers(self, model=None) -> list[SpaceLayer]:
        """The quantizable layers in module order, each with its geometry and choices."""
        if self._layers is None:
            self._layers = self._resolve(model)
        return self._layers

    def unnamed_layers(self) -> list[str]:
        """The Conv2d and Linear layers neither `searchable` nor `fixed` names: they stay
        float in the quantized model and are in no cost table (a partial space's totals
        leave them out; `fixed: {NAME: {w_bits: 32, a_bits: 32}}` counts one)."""
        named = {layer.name for layer in self.layers()}
        return [name for name in self.geometry() if name not in named]

    def geometry(self, model=None) -> dict[str, "LayerInfo"]:
        """Every Conv2d / Linear of the model with its geometry; cached on disk for built-in
        models, so that describing a space or costing a plan needs no torch import."""
        info = self.data_info()
        shape = (1, info.in_channels, *info.image_size)
        if model is not None:
            return layer_geometry(model, shape)
        cache = _geometry_cache(self.model, self.model_kwargs, shape, info.num_classes)
        if cache is not None and cache.is_file():
            try:
                rows = json.loads(cache.read_text())
                return {r["name"]: LayerInfo(**{k: tuple(v) if isinstance(v, list) else v
                                                for k, v in r.items()}) for r in rows}
            except (OSError, ValueError, TypeError, KeyError):
                pass  # a damaged cache entry is rebuilt below
        geometry = layer_geometry(self.build_model(), shape)
        if cache is not None:
            try:
                from nas.runs import atomic_write_text

                cache.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(cache, json.dumps([g.__dict__ for g in geometry.values()]))
            except OSError:
                pass  # no writable cache: compute again next time
        return geometry

    def _resolve(self, model) -> list[SpaceLayer]:
        geometry = self.geometry(model)
        names = list(geometry)
        listed = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        show = f"its {len(names)} layers: {listed}"
        for i, glob in enumerate(self.searchable):
            if not any(fnmatch.fnmatchcase(n, glob) for n in names):
                raise ConfigError(f"space {self.name}: searchable[{i}] {glob!r} matches no Conv2d "
                                  f"or Linear layer of {self.model}; {show}")
        for glob in self.fixed:
            if not any(fnmatch.fnmatchcase(n, glob) for n in names):
                raise ConfigError(f"space {self.name}: fixed.{glob} matches no Conv2d or Linear "
                                  f"layer of {self.model}; {show}")
        layers = []
        for name in names:
            fixed = next((c for g, c in self.fixed.items() if fnmatch.fnmatchcase(name, g)), None)
            if fixed is None and not any(fnmatch.fnmatchcase(name, g) for g in self.searchable):
                continue  # stays float, outside the space: see unnamed_layers
            if fixed is not None:
                layers.append(SpaceLayer(geometry[name], (fixed,), True))
            else:
                layers.append(SpaceLayer(geometry[name], self.choices, False))
        return layers


def _numeric_padding(conv) -> tuple[int, int]:
    """A Conv2d's padding as numbers per side: 'valid' is 0, and 'same' pads half of
    dilation * (kernel - 1); where that total is odd, the larger half, which torch puts on the
    right and bottom (so the cost counts one extra row and column of border)."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        return tuple((d * (k - 1) + 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))
    return tuple(conv.padding)


def layer_geometry(model, input_shape: tuple[int, ...]) -> dict[str, LayerInfo]:
    """Run one batch of zeros through `model` and record every Conv2d and Linear it calls."""
    import torch
    from torch import nn

    found: dict[str, LayerInfo] = {}
    hooks = []

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0]
            if isinstance(module, nn.Conv2d):
                kernel, stride = tuple(module.kernel_size), tuple(module.stride)
                padding = _numeric_padding(module)
                in_hw, out_hw = tuple(x.shape[-2:]), tuple(output.shape[-2:])
                macs = (output.shape[-1] * output.shape[-2] * module.out_channels
                        * (module.in_channels // module.groups) * kernel[0] * kernel[1])
                kind, cin, cout, groups = "Conv2d", module.in_channels, module.out_channels, module.groups
                dilation = tuple(module.dilation)
            else:
                kernel, stride, padding, in_hw, out_hw = (1, 1), (1, 1), (0, 0), (1, 1), (1, 1)
                rows = x.numel() // module.in_features
                macs = rows * module.in_features * module.out_features
                kind, cin, cout, groups = "Linear", module.in_features, module.out_features, 1
                dilation = (1, 1)
            params = sum(p.numel() for p in module.parameters(recurse=False))
            if name in found:  # a module called twice: its work counts twice
                prev = found[name]
                macs += prev.macs
                found[name] = LayerInfo(**{**prev.__dict__, "macs": macs})
                return
            found[name] = LayerInfo(name, kind, cin, cout, kernel, stride, tuple(padding), groups,
                                    in_hw, out_hw, params, int(macs), dilation)
        return record

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            hooks.append(module.register_forward_hook(hook(name)))
    modes = [(m, m.training) for m in model.modules()]  # each its own, as it was
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(input_shape))
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes:
            m.training = training
    order = [n for n, m in model.named_modules() if n in found]
    return {n: found[n] for n in order}


def _geometry_cache(model: str, kwargs: dict, shape: tuple, classes: int) -> Path | None:
    """Cache file for a built-in model's geometry, keyed by everything it depends on: the
    model's source file, its arguments, the input shape and the installed torchvision."""
    import hashlib
    import importlib.metadata
    import importlib.util

    from nas.models.registry import _BUILTIN

    if model not in _BUILTIN:
        return None  # a user's model may change under the same name: never cached
    try:
        source = Path(importlib.util.find_spec(_BUILTIN[model]).origin).read_bytes()
        tv = importlib.metadata.version("torchvision")
    except (OSError, AttributeError, importlib.metadata.PackageNotFoundError):
        return None
    # "dilation": entries from before LayerInfo recorded it are not read.
    key = hashlib.sha256(json.dumps([model, kwargs, list(shape), classes, tv, "dilation"],
                                    sort_keys=True,
                                    default=str).encode() + source).hexdigest()[:20]
    root = os.environ.get("NAS_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nas"
    return Path(root) / "geometry" / f"{model}-{key}.json"


def load_space(name_or_path: str | Path | None = None) -> SearchSpace:
    """A shipped space by name, or a YAML file by path; no argument gives the default."""
    name_or_path = name_or_path or DEFAULT_SPACE
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.exists():
            raise ConfigError(f"search space file {path} does not exist")
        return SearchSpace.from_yaml(path)
    candidate = _spaces_dir() / f"{name_or_path}.yaml"
    if not candidate.is_file():
        if path.is_dir():
            raise ConfigError(f"search space {path} is a directory; give a search space "
                              f".yaml file or a shipped space's name (see 'nas spaces')")
        raise ConfigError(f"unknown search space {str(name_or_path)!r}; choose one of "
                          f"{', '.join(list_spaces())} (see 'nas spaces') or give a .yaml path")
    space = SearchSpace.from_yaml(candidate)
    space.origin = str(name_or_path)
    return space


PLAN_MIXES = ("uniform", "mixed")
MIXED_ALPHA = 0.1


def random_plans(space: SearchSpace, n: int, seed: int, mix: str = "uniform") -> list[dict]:
    """n random plans (layer name -> Choice), reproducible from the seed.

    uniform: every layer picks among its choices with equal odds, so plans differ in many
    small ways and their totals cluster (a sum of many independent picks). mixed: each plan
    first draws odds of its own over the choices (a sparse Dirichlet, MIXED_ALPHA) and its
    layers pick with those, so most plans lean on one or two precisions and plans range from
    mostly one to mostly another, as a search's candidates do. (Summed over the H200 tables,
    200 plans of seed 0 spread 1.7-2.8x as widely mixed as uniform, by the coefficient of
    variation: ResNet-18 4.2-5.7 % against 2.0-2.5 %. Few plans vary more from draw to draw.)"""
    if mix not in PLAN_MIXES:
        raise ConfigError(f"plan mix {mix!r}: choose one of {', '.join(PLAN_MIXES)}")
    rng = random.Random(seed)
    layers = space.layers()
    if mix == "uniform":
        return [{layer.name: rng.choice(layer.choices) for layer in layers} for _ in range(n)]
    every = sorted({c for layer in layers for c in layer.choices},
                   key=lambda c: (c.w_bits, c.a_bits))
    plans = []
    for _ in range(n):
        odds = {c: rng.gammavariate(MIXED_ALPHA, 1.0) + 1e-12 for c in every}  # never all 0
        plans.append({layer.name: rng.choices(layer.choices,
                                              [odds[c] for c in layer.choices])[0]
                      for layer in layers})
    return plans
