"""Datasets and deterministic splits.

Four sources, none downloaded: `fashion_mnist` (IDX .gz files, as Debian's
dataset-fashion-mnist installs them), `cifar10` (the standard `cifar-10-batches-py` folder),
`imagefolder` (ImageNet-style `train/` and `val/` class folders) and `synthetic`
(deterministic and learnable, for tests). Every source yields three splits: `train`, `arch`
(a held-out part of train for architecture updates and model selection) and `test`.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from nas.datainfo import (  # noqa: F401  (DATASETS, check_data_kwargs: re-exported)
    DATASETS, SYNTHETIC_DEFAULTS, DataInfo, check_data_kwargs, dataset_info, min_train_images,
    split_sizes)
from nas.errors import DataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FIX = (
    "install it with 'apt-get install dataset-fashion-mnist' (or 'make data'), or point "
    "--data-dir / NAS_DATA_DIR at a folder holding the four IDX .gz files"
)
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_STATS = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclass
class DataSplits:
    train: Dataset
    arch: Dataset
    test: Dataset
    info: DataInfo


# ---------------------------------------------------------------- in-memory datasets

class ArrayDataset(Dataset):
    """Images held in memory (uint8 scaled to [0, 1], or float as is), normalised per batch.

    Batches are cut by index straight from the tensors, which is far faster on a CPU than
    collating samples one by one.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 mean: tuple[float, ...] = (0.0,), std: tuple[float, ...] = (1.0,),
                 augment: bool = False):
        self.images, self.labels = images, labels.long()
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x, y = self.batch(torch.tensor([i]), augment=False)
        return x[0], y[0]

    def subset(self, indices: torch.Tensor, augment: bool | None = None) -> "ArrayDataset":
        return ArrayDataset(self.images[indices], self.labels[indices],
                            tuple(self.mean.flatten().tolist()), tuple(self.std.flatten().tolist()),
                            self.augment if augment is None else augment)

    def batch(self, idx: torch.Tensor, augment: bool | None = None,
              generator: torch.Generator | None = None):
        x = self.images[idx]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if self.augment if augment is None else augment:
            x = _flip_and_shift(x, generator)
        return (x - self.mean) / self.std, self.labels[idx]


def _flip_and_shift(x: torch.Tensor, gen: torch.Generator | None, pad: int = 4) -> torch.Tensor:
    """Random horizontal flip and a random crop of the zero-padded image, per sample."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


class BatchLoader:
    """Iterates an ArrayDataset in batches, shuffled by its own seeded generator."""

    def __init__(self, dataset: ArrayDataset, batch_size: int, shuffle: bool, seed: int = 0,
                 drop_last: bool = False):
        self.dataset, self.batch_size = dataset, batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.dataset)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            augment = None if self.shuffle else False  # evaluation never augments
            yield self.dataset.batch(idx, augment=augment, generator=self.generator)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0,
                num_workers: int = 0, drop_last: bool = False):
    """A batch iterator for any split: fast path for in-memory data, DataLoader otherwise."""
    if isinstance(dataset, ArrayDataset):
        return BatchLoader(dataset, batch_size, shuffle, seed, drop_last)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      drop_last=drop_last, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- sources

def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    """Read one IDX file (gzip or plain) of unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}; {FASHION_MNIST_FIX}") from exc
    if len(raw) < 4 + 4 * expected_dims:
        raise DataError(f"{path} is truncated; {FASHION_MNIST_FIX}")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim != expected_dims:
        raise DataError(f"{path} is not an unsigned-byte IDX file with {expected_dims} "
                        f"dimensions; {FASHION_MNIST_FIX}")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    body = raw[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)):
        raise DataError(f"{path} holds {len(body)} bytes of data, expected {int(np.prod(shape))} "
                        f"for shape {shape}; {FASHION_MNIST_FIX}")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(f"Fashion-MNIST file {stem}.gz not found in {root}; {FASHION_MNIST_FIX}")


def _fashion_mnist(root: Path, part: str) -> ArrayDataset:
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST folder {root} does not exist; {FASHION_MNIST_FIX}")
    images_stem, labels_stem = _FMNIST_FILES[part]
    images = _read_idx(_find_idx(root, images_stem), 3)
    labels = _read_idx(_find_idx(root, labels_stem), 1)
    if len(images) != len(labels):
        raise DataError(f"Fashion-MNIST {part} files in {root} disagree: {len(images)} images, "
                        f"{len(labels)} labels; {FASHION_MNIST_FIX}")
    mean, std = _STATS["fashion_mnist"]
    return ArrayDataset(torch.from_numpy(images.copy()).unsqueeze(1),
                        torch.from_numpy(labels.astype(np.int64)), mean, std)


def _cifar10(root: Path, part: str, augment: bool) -> ArrayDataset:
    folder = root if root.name == "cifar-10-batches-py" else root / "cifar-10-batches-py"
    fix = ("unpack cifar-10-python.tar.gz there, or point --data-dir / NAS_DATA_DIR at the "
           "folder that holds cifar-10-batches-py")
    names = [f"data_batch_{i}" for i in range(1, 6)] if part == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise DataError(f"CIFAR-10 file {path} not found; {fix}")
        try:
            with open(path, "rb") as f:
                # The standard CIFAR-10 python format is a pickle; it is the user's own file.
                batch = pickle.load(f, encoding="bytes")
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
        except Exception as exc:  # noqa: BLE001 - any decoding failure means a corrupt file
            raise DataError(f"CIFAR-10 file {path} is corrupt ({exc}); {fix}") from exc
    mean, std = _STATS["cifar10"]
    return ArrayDataset(torch.from_numpy(np.concatenate(images)),
                        torch.from_numpy(np.concatenate(labels)), mean, std,
                        augment=augment and part == "train")


def _read_image(path: str):
    """torchvision's loader, with a file PIL cannot read reported by name (images are opened
    only as batches are drawn, so this can come mid-run: a DataError, which the run folder
    and the CLI handle as bad input)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except UnidentifiedImageError as exc:
        raise DataError(f"image {path} is not an image PIL can read; replace or remove "
                        f"it") from exc
    except (OSError, ValueError) as exc:  # unreadable, or truncated mid-decode
        reason = getattr(exc, "strerror", None) or str(exc).strip().split("\n")[0]
        raise DataError(f"image {path} cannot be read ({reason}); replace or remove it") from exc


def _imagefolder(root: Path, part: str, image_size: int):
    from torchvision import datasets, transforms

    folder = root / ("train" if part == "train" else "val")
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist; point --data-dir / NAS_DATA_DIR "
                        f"at a folder with train/ and val/ class subfolders")
    mean, std = _STATS["imagefolder"]
    if part == "train":
        tf = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    else:
        tf = [transforms.Resize(int(image_size * 256 / 224)), transforms.CenterCrop(image_size)]
    tf += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    try:
        return datasets.ImageFolder(str(folder), transform=transforms.Compose(tf),
                                    loader=_read_image)
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"image folder {folder}: {exc}") from exc


def _check_classes(root: Path, train, val, num_classes: int) -> None:
    """Labels are class-folder indices: train/ and val/ must name the same classes (or a
    label would mean another class in each), and the model needs an output for each."""
    if train.classes != val.classes:
        only = sorted(set(train.classes) ^ set(val.classes))
        raise DataError(f"image folders {root / 'train'} and {root / 'val'} hold different "
                        f"classes ({', '.join(only[:5])} in only one); give both the same class "
                        f"subfolders")
    if len(train.classes) > num_classes:
        raise DataError(f"image folder {root / 'train'} has {len(train.classes)} class folders "
                        f"but data.kwargs.num_classes is {num_classes}; set num_classes to at "
                        f"least {len(train.classes)}")


def _synthetic(part: str, n: int, in_channels: int, image_size: int, num_classes: int,
               noise: float, seed: int) -> ArrayDataset:
    """Class templates plus Gaussian noise: learnable, and the same for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    templates = torch.randn(num_classes, in_channels, image_size, image_size, generator=gen)
    part_gen = torch.Generator().manual_seed(seed + (1 if part == "train" else 2))
    labels = torch.randint(0, num_classes, (n,), generator=part_gen)
    images = templates[labels] + noise * torch.randn(n, in_channels, image_size, image_size,
                                                     generator=part_gen)
    return ArrayDataset(images, labels)


# ---------------------------------------------------------------- public entry points

def default_data_dir(name: str) -> Path:
    if os.environ.get("NAS_DATA_DIR"):
        return Path(os.environ["NAS_DATA_DIR"])
    return Path(FASHION_MNIST_DIR) if name == "fashion_mnist" else Path("data")


def _split_indices(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_arch = split_sizes(n, fraction)[1]
    return order[n_arch:], order[:n_arch]


def _check_sizes(name: str, root: Path, n_train: int, n_test: int, fraction: float) -> None:
    """Refuse data too small to train and select on, or to test, before any run starts (an
    empty train split never finishes an epoch; an empty test split has no accuracy)."""
    if name == "imagefolder":
        train, test = f"image folder {root / 'train'}", f"image folder {root / 'val'}"
    else:
        train = test = "synthetic data" if name == "synthetic" else f"{name} in {root}"
    least = min_train_images(fraction)
    if n_train < least:
        raise DataError(f"{train} has {n_train} training image{'s' * (n_train != 1)}; it "
                        f"needs at least {least}: arch_fraction {fraction:g} holds out at "
                        f"least one for the arch split and one must be left to train on")
    if n_test < 1:
        raise DataError(f"{test} has no test images; give it some to measure accuracy on")


def _limit(indices: torch.Tensor, size: int | None) -> torch.Tensor:
    return indices if size is None else indices[:size]


def load_data(name: str, data_dir: str | Path | None = None, seed: int = 0,
              **kwargs: Any) -> DataSplits:
    """Load a dataset and split it deterministically by `seed`.

    `arch_fraction` (default 0.2) of the training set is held out as the arch split;
    `train_subset`, `arch_subset` and `test_subset` cut each split to a seeded subset.
    """
    info = dataset_info(name, **kwargs)
    root = Path(data_dir) if data_dir else default_data_dir(name)
    fraction = float(kwargs.get("arch_fraction", 0.2))
    if name == "synthetic":
        opts = {**SYNTHETIC_DEFAULTS, **kwargs}
        common = (opts["in_channels"], opts["image_size"], opts["num_classes"], opts["noise"], seed)
        full_train = _synthetic("train", opts["train_size"], *common)
        test = _synthetic("test", opts["test_size"], *common)
    elif name == "fashion_mnist":
        full_train, test = _fashion_mnist(root, "train"), _fashion_mnist(root, "test")
    elif name == "cifar10":
        augment = bool(kwargs.get("augment", True))
        full_train, test = _cifar10(root, "train", augment), _cifar10(root, "test", False)
    else:
        size = info.image_size[0]
        full_train, test = _imagefolder(root, "train", size), _imagefolder(root, "val", size)
        _check_classes(root, full_train, test, info.num_classes)
    _check_sizes(name, root, len(full_train), len(test), fraction)

    train_idx, arch_idx = _split_indices(len(full_train), fraction, seed)
    train_idx = _limit(train_idx, kwargs.get("train_subset"))
    arch_idx = _limit(arch_idx, kwargs.get("arch_subset"))
    test_idx = _limit(torch.randperm(len(test), generator=torch.Generator().manual_seed(seed + 7)),
                      kwargs.get("test_subset"))
    if isinstance(full_train, ArrayDataset):
        # The arch split is for selection and architecture steps: never augmented.
        return DataSplits(full_train.subset(train_idx), full_train.subset(arch_idx, augment=False),
                          test.subset(test_idx.sort().values), info)
    from torch.utils.data import Subset

    arch_view = _imagefolder(root, "val", info.image_size[0])  # eval transforms on train images
    arch_view.samples = arch_view.imgs = full_train.samples
    arch_view.targets = full_train.targets
    return DataSplits(Subset(full_train, train_idx.tolist()), Subset(arch_view, arch_idx.tolist()),
                      Subset(test, test_idx.sort().values.tolist()), info)
