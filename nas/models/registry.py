"""One registry for every model: `@register_model`, `create_model`, `list_models`.

A name with a colon, `package.module:factory`, loads a user's own factory instead. Built-in
models are imported on first use, so naming and validating them needs no torch import.
"""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING, Any, Callable

from nas.errors import ConfigError, ModelError
from nas.values import is_finite, is_whole

if TYPE_CHECKING:
    from torch import nn

_REGISTRY: dict[str, Callable[..., "nn.Module"]] = {}
# Built-in model name -> the module whose import registers it.
_BUILTIN = {
    "resnet8": "nas.models.resnet_cifar", "resnet20": "nas.models.resnet_cifar",
    "resnet32": "nas.models.resnet_cifar", "resnet56": "nas.models.resnet_cifar",
    "mobilenetv2": "nas.models.mobilenetv2",
    "resnet18": "nas.models.tv", "mobilenet_v2": "nas.models.tv",
}

# Each built-in factory's arguments (tests check them against the signatures), so that a
# space's model.kwargs are checked when it loads, before torch is imported.
_RESNET_ARGS = ("num_classes", "in_channels", "width")
_BUILTIN_ARGS = {
    "resnet8": _RESNET_ARGS, "resnet20": _RESNET_ARGS, "resnet32": _RESNET_ARGS,
    "resnet56": _RESNET_ARGS,
    "mobilenetv2": ("num_classes", "in_channels", "width_mult", "dropout", "stem_stride"),
    "resnet18": ("num_classes", "in_channels"),
    "mobilenet_v2": ("num_classes", "in_channels", "width_mult"),
}


def _whole_from(least: int):
    return (lambda v: is_whole(v) and v >= least), f"a whole number of at least {least}"


# argument -> (accepts, the values it takes, for the message)
_ARG_RULES = {
    "num_classes": _whole_from(2), "in_channels": _whole_from(1), "width": _whole_from(1),
    "stem_stride": _whole_from(1),
    "width_mult": (lambda v: is_finite(v) and v > 0, "a number above 0"),
    "dropout": (lambda v: is_finite(v) and 0 <= v < 1, "a number from 0 up to (not including) 1"),
}


def check_model_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """Refuse a built-in model's unknown or out-of-range argument with one line naming it;
    a user's factory (`pkg.mod:fn`) checks its own arguments."""
    allowed = _BUILTIN_ARGS.get(name)
    if allowed is None:
        return
    for key, value in kwargs.items():
        if key not in allowed:
            raise ConfigError(f"model.kwargs.{key}: unknown option for {name}; allowed: "
                              f"{', '.join(sorted(allowed))}")
        accepts, takes = _ARG_RULES[key]
        if not accepts(value):
            raise ConfigError(f"model.kwargs.{key}: {value!r} must be {takes}")


def register_model(fn: Callable[..., "nn.Module"] | None = None, *, name: str | None = None):
    """Decorator: register a factory under its function name (or `name`)."""

    def wrap(f: Callable[..., "nn.Module"]) -> Callable[..., "nn.Module"]:
        key = name or f.__name__
        if key in _REGISTRY or (key in _BUILTIN and f.__module__ != _BUILTIN[key]):
            raise ValueError(f"model {key!r} is registered twice")
        _REGISTRY[key] = f
        return f

    return wrap(fn) if fn is not None else wrap


def list_models() -> list[str]:
    return sorted(set(_REGISTRY) | set(_BUILTIN))


def is_known(name: str) -> bool:
    """A registered or built-in name, or a 'package.module:factory' spec (checked on use)."""
    return ":" in name or name in _REGISTRY or name in _BUILTIN


def _user_factory(spec: str) -> Callable[..., "nn.Module"]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelError(f"model {spec!r}: a user model is written 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"model {spec!r}: cannot import {module_name!r} ({exc}); "
                         f"make sure it is on PYTHONPATH") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"model {spec!r}: {module_name!r} has no callable {attr!r}")
    return factory


def get_factory(name: str) -> Callable[..., "nn.Module"]:
    if ":" in name:
        return _user_factory(name)
    if name not in _REGISTRY and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _REGISTRY:
        raise ModelError(f"unknown model {name!r}; choose one of {', '.join(list_models())} "
                         f"or give 'package.module:factory'")
    return _REGISTRY[name]


def _accepted(factory: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Drop the data-derived defaults (classes, channels) a user factory does not take."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def create_model(name: str, *, defaults: dict[str, Any] | None = None, **kwargs: Any) -> "nn.Module":
    """Build a model. `defaults` (for example num_classes and in_channels from the data) are
    passed only where the factory accepts them; explicit `kwargs` always are."""
    check_model_kwargs(name, kwargs)  # a bad width would fail only at the first forward
    factory = get_factory(name)
    args = {**_accepted(factory, defaults or {}), **kwargs}
    try:
        model = factory(**args)
    except TypeError as exc:
        raise ModelError(f"model {name!r} rejected its arguments {sorted(args)}: {exc}") from exc
    from torch import nn

    if not isinstance(model, nn.Module):
        raise ModelError(f"model {name!r}: the factory returned {type(model).__name__}, "
                         f"not a torch.nn.Module")
    return model
