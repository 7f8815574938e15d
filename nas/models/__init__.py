"""Model registry and builders. Importing this package registers every built-in model."""

from nas.models import mobilenetv2, resnet_cifar, tv  # noqa: F401  (registration)
from nas.models.registry import create_model, get_factory, list_models, register_model

__all__ = ["create_model", "get_factory", "list_models", "register_model"]
