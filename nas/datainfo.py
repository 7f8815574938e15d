"""What each dataset gives a model (channels, size, classes) and which options it takes.

Kept apart from nas.data so that a space can be validated and described without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nas.errors import ConfigError

DATASETS = ("fashion_mnist", "cifar10", "imagefolder", "synthetic")
SYNTHETIC_DEFAULTS = {"train_size": 2048, "test_size": 512, "in_channels": 1, "image_size": 16,
                      "num_classes": 10, "noise": 1.0}
_KWARGS = {
    "fashion_mnist": set(),
    "cifar10": {"augment"},
    "imagefolder": {"image_size", "num_classes"},
    "synthetic": set(SYNTHETIC_DEFAULTS),
}
_COMMON = {"arch_fraction", "train_subset", "arch_subset", "test_subset"}


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about its input, known without loading any data."""

    in_channels: int
    image_size: tuple[int, int]
    num_classes: int


def check_data_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """Reject an unknown dataset or option before any file is touched."""
    if name not in DATASETS:
        raise ConfigError(f"data.name: unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    for key in kwargs:
        if key not in _KWARGS[name] | _COMMON:
            allowed = ", ".join(sorted(_KWARGS[name] | _COMMON))
            raise ConfigError(f"data.kwargs.{key}: unknown option for {name}; allowed: {allowed}")
    frac = kwargs.get("arch_fraction", 0.2)
    if not isinstance(frac, (int, float)) or not 0.0 < frac < 1.0:
        raise ConfigError(f"data.kwargs.arch_fraction: {frac!r} must be a number between 0 and 1")
    for key in ("train_subset", "arch_subset", "test_subset"):
        value = kwargs.get(key)
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ConfigError(f"data.kwargs.{key}: {value!r} must be a positive whole number")


def dataset_info(name: str, **kwargs: Any) -> DataInfo:
    check_data_kwargs(name, kwargs)
    if name == "fashion_mnist":
        return DataInfo(1, (28, 28), 10)
    if name == "cifar10":
        return DataInfo(3, (32, 32), 10)
    if name == "imagefolder":
        size = int(kwargs.get("image_size", 224))
        return DataInfo(3, (size, size), int(kwargs.get("num_classes", 1000)))
    opts = {**SYNTHETIC_DEFAULTS, **kwargs}
    return DataInfo(int(opts["in_channels"]), (int(opts["image_size"]),) * 2,
                    int(opts["num_classes"]))
