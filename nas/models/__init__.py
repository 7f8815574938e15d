"""Model registry and builders. Built-in models load on first use (see registry._BUILTIN)."""

from nas.models.registry import create_model, get_factory, is_known, list_models, register_model

__all__ = ["create_model", "get_factory", "is_known", "list_models", "register_model"]
