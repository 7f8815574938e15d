"""One registry for every model: `@register_model`, `create_model`, `list_models`.

A name with a colon, `package.module:factory`, loads a user's own factory instead. Built-in
models are imported on first use, so naming and validating them needs no torch import.
"""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING, Any, Callable

from nas.errors import ModelError

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
