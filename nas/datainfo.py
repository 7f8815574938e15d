"""What each dataset gives a model (channels, size, classes) and which options it takes.

Kept apart from nas.data so that a space can be validated and described without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nas.errors import ConfigError
from nas.values import is_finite, is_whole

DATASETS = ("fashion_mnist", "cifar10", "imagefolder", "synthetic")
SYNTHETIC_MAX_BYTES = 8 * 2**30  # synthetic images live in memory: beyond, a typo
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


def split_sizes(n: int, fraction: float) -> tuple[int, int]:
    """(train, arch) image counts of a training set of `n` split by `fraction`: the arch
    split always gets at least one image (nas.data splits by exactly this rule)."""
    n_arch = min(n, max(1, int(round(n * fraction))))
    return n - n_arch, n_arch


def min_train_images(fraction: float) -> int:
    """The fewest training images that leave both splits at least one image."""
    n = 2
    while split_sizes(n, fraction)[0] < 1:
        n += 1
    return n


def _check_whole(kwargs: dict[str, Any], key: str, least: int, why: str = "") -> None:
    value = kwargs.get(key)
    if value is not None and (not is_whole(value) or value < least):
        raise ConfigError(f"data.kwargs.{key}: {value!r} must be a whole number of at least "
                          f"{least}{why}")


def check_data_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """Reject an unknown dataset or option, or a value out of range, before any file is
    touched: one ConfigError naming the key and the values it takes."""
    if name not in DATASETS:
        raise ConfigError(f"data.name: unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    for key in kwargs:
        if key not in _KWARGS[name] | _COMMON:
            allowed = ", ".join(sorted(_KWARGS[name] | _COMMON))
            raise ConfigError(f"data.kwargs.{key}: unknown option for {name}; allowed: {allowed}")
    frac = kwargs.get("arch_fraction", 0.2)
    if not is_finite(frac) or not 0.0 < frac < 1.0:
        raise ConfigError(f"data.kwargs.arch_fraction: {frac!r} must be a number between 0 and 1")
    for key in ("train_subset", "arch_subset", "test_subset"):
        value = kwargs.get(key)
        if value is not None and (not is_whole(value) or value <= 0):
            raise ConfigError(f"data.kwargs.{key}: {value!r} must be a positive whole number")
    if "augment" in kwargs and not isinstance(kwargs["augment"], bool):
        raise ConfigError(f"data.kwargs.augment: {kwargs['augment']!r} must be true or false")
    _check_whole(kwargs, "image_size", 1)
    _check_whole(kwargs, "in_channels", 1)
    _check_whole(kwargs, "num_classes", 2, " (a classifier needs two classes)")
    if name == "synthetic":
        least = min_train_images(frac)
        _check_whole(kwargs, "train_size", least,
                     f" (arch_fraction {frac:g} holds out at least one image for the arch "
                     f"split and one must be left to train on)")
        _check_whole(kwargs, "test_size", 1, " (accuracy on no test images means nothing)")
        noise = kwargs.get("noise", 0.0)
        if not is_finite(noise) or noise < 0:
            raise ConfigError(f"data.kwargs.noise: {noise!r} must be a number of at least 0")
        opts = {**SYNTHETIC_DEFAULTS, **kwargs}
        per_image = 4 * int(opts["in_channels"]) * int(opts["image_size"]) ** 2  # float32
        need = per_image * (int(opts["train_size"]) + int(opts["test_size"]))
        if need > SYNTHETIC_MAX_BYTES:
            raise ConfigError(f"data.kwargs: synthetic data of {opts['train_size']} + "
                              f"{opts['test_size']} images of {opts['in_channels']}x"
                              f"{opts['image_size']}x{opts['image_size']} would take "
                              f"{need / 2**30:.3g} GiB of memory (at most "
                              f"{SYNTHETIC_MAX_BYTES // 2**30} GiB); give fewer or smaller images")


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
