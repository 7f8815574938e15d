import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from nas.data import dataset_info, load_data, make_loader
from nas.errors import ConfigError, DataError
from tests.conftest import FMNIST, needs_fmnist


def write_idx(path, array: np.ndarray):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_fmnist(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", train)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(50) % 10)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(20) % 10)
    return tmp_path, train, test


def test_idx_files_are_read_exactly(tiny_fmnist):
    root, train, test = tiny_fmnist
    splits = load_data("fashion_mnist", data_dir=root, seed=0)
    assert len(splits.train) == 40 and len(splits.arch) == 10 and len(splits.test) == 20
    x, y = splits.test.batch(torch.arange(20))
    # Undo the normalisation: the pixels must be the file's bytes exactly.
    pixels = (x * 0.3530 + 0.2860) * 255
    assert torch.equal(pixels.round().to(torch.uint8)[:, 0], torch.from_numpy(test))
    assert y.tolist() == [i % 10 for i in range(20)]


def test_splits_are_deterministic_disjoint_and_cover_train(tiny_fmnist):
    root, train, _ = tiny_fmnist
    a = load_data("fashion_mnist", data_dir=root, seed=3)
    b = load_data("fashion_mnist", data_dir=root, seed=3)
    c = load_data("fashion_mnist", data_dir=root, seed=4)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.arch.images, b.arch.images)
    assert not torch.equal(a.arch.images, c.arch.images)
    rows = {bytes(img.numpy().tobytes()) for img in torch.cat([a.train.images, a.arch.images])}
    assert rows == {bytes(img.tobytes()) for img in train[:, None]}


def test_subsets_and_arch_fraction(tiny_fmnist):
    root, _, _ = tiny_fmnist
    s = load_data("fashion_mnist", data_dir=root, arch_fraction=0.5, train_subset=7,
                  arch_subset=3, test_subset=5)
    assert (len(s.train), len(s.arch), len(s.test)) == (7, 3, 5)


def test_missing_folder_names_path_and_fix(tmp_path):
    with pytest.raises(DataError) as err:
        load_data("fashion_mnist", data_dir=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)
    assert "apt-get install dataset-fashion-mnist" in str(err.value)


def test_truncated_file_is_reported(tiny_fmnist):
    root, _, _ = tiny_fmnist
    path = root / "train-images-idx3-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:1000]))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz holds 984 bytes"):
        load_data("fashion_mnist", data_dir=root)


def test_not_gzip_is_reported(tiny_fmnist):
    root, _, _ = tiny_fmnist
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(b"this is not gzip")
    with pytest.raises(DataError, match="cannot read .*t10k-labels-idx1-ubyte.gz"):
        load_data("fashion_mnist", data_dir=root)


def test_synthetic_is_deterministic_and_learnable_shape():
    a = load_data("synthetic", seed=1, train_size=100, test_size=30, image_size=8, in_channels=3)
    b = load_data("synthetic", seed=1, train_size=100, test_size=30, image_size=8, in_channels=3)
    assert torch.equal(a.test.images, b.test.images)
    assert a.test.images.shape == (30, 3, 8, 8) and a.info.in_channels == 3
    # Learnable: the nearest class template classifies noisy samples far above chance.
    x, y = a.train.batch(torch.arange(len(a.train)))
    means = torch.stack([x[y == c].mean(0) for c in range(10)])
    pred = torch.cdist(x.flatten(1), means.flatten(1)).argmin(1)
    assert (pred == y).float().mean() > 0.9


def test_cifar10_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                 b"labels": list(range(4))}
        (folder / name).write_bytes(pickle.dumps(batch))
    s = load_data("cifar10", data_dir=tmp_path, arch_fraction=0.25)
    assert (len(s.train), len(s.arch), len(s.test)) == (15, 5, 4)
    assert s.train.augment and not s.arch.augment and not s.test.augment
    x, _ = next(iter(make_loader(s.train, 8, shuffle=True)))
    assert x.shape == (8, 3, 32, 32)
    (folder / "test_batch").write_bytes(b"garbage")
    with pytest.raises(DataError, match="test_batch is corrupt"):
        load_data("cifar10", data_dir=folder)


def test_imagefolder(tmp_path):
    from PIL import Image

    for part in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / part / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 30), (i * 40, 10, 200)).save(tmp_path / part / cls / f"{i}.png")
    s = load_data("imagefolder", data_dir=tmp_path, image_size=32, num_classes=2, arch_fraction=1 / 3)
    assert (len(s.train), len(s.arch), len(s.test)) == (4, 2, 6)
    x, y = next(iter(make_loader(s.arch, 2, shuffle=False)))
    assert x.shape == (2, 3, 32, 32)
    with pytest.raises(DataError, match="image folder .*nowhere/train does not exist"):
        load_data("imagefolder", data_dir=tmp_path / "nowhere")
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="Found no valid file for the classes cat"):
        load_data("imagefolder", data_dir=tmp_path / "empty")


@pytest.mark.parametrize("name, kwargs, message", [
    ("mnist", {}, "unknown dataset 'mnist'"),
    ("synthetic", {"colour": 1}, "data.kwargs.colour: unknown option"),
    ("fashion_mnist", {"arch_fraction": 1.5}, "arch_fraction: 1.5 must be"),
    ("fashion_mnist", {"train_subset": -1}, "train_subset: -1 must be"),
    ("synthetic", {"test_size": 0}, "test_size: 0 must be a whole number of at least 1"),
    ("cifar10", {"augment": "maybe"}, "augment: 'maybe' must be true or false"),
])
def test_bad_options(name, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        dataset_info(name, **kwargs)


@needs_fmnist
def test_real_fashion_mnist():
    s = load_data("fashion_mnist", data_dir=FMNIST, seed=0, test_subset=1000)
    assert (len(s.train), len(s.arch), len(s.test)) == (48000, 12000, 1000)
    assert s.train.images.shape[1:] == (1, 28, 28) and s.train.images.dtype == torch.uint8
    assert sorted(torch.unique(s.train.labels).tolist()) == list(range(10))
    # Train and arch splits together are the whole training file, nothing lost or repeated:
    # 6000 images of each class and the file's exact pixel total (mean 72.94 = 0.2860 * 255,
    # Fashion-MNIST's published normalisation mean).
    labels = torch.cat([s.train.labels, s.arch.labels])
    assert torch.bincount(labels).tolist() == [6000] * 10
    pixels = torch.cat([s.train.images, s.arch.images]).sum(dtype=torch.int64).item()
    assert pixels == 3_431_114_169


def _image_folder(root, train_per_class=3, classes=("cat", "dog"), val_classes=None):
    from PIL import Image

    for part, names, n in (("train", classes, train_per_class),
                           ("val", val_classes or classes, 2)):
        for cls in names:
            (root / part / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (20, 20), (i * 40, 10, 200)).save(root / part / cls / f"{i}.png")
    return root


def test_unreadable_image_is_named(tmp_path):
    root = _image_folder(tmp_path)
    broken = root / "train" / "cat" / "broken.jpg"
    broken.write_bytes(b"not an image")
    s = load_data("imagefolder", data_dir=root, image_size=16, num_classes=2)
    with pytest.raises(DataError) as err:
        list(make_loader(s.train, 16, shuffle=False)) + list(make_loader(s.arch, 16, shuffle=False))
    assert str(err.value) == f"image {broken} is not an image PIL can read; replace or remove it"


def test_too_few_images_are_refused(tmp_path):
    root = _image_folder(tmp_path / "one", train_per_class=1, classes=("cat",))
    with pytest.raises(DataError) as err:
        load_data("imagefolder", data_dir=root, image_size=16, num_classes=2)
    assert str(err.value) == (f"image folder {root / 'train'} has 1 training image; it needs at "
                              f"least 2: arch_fraction 0.2 holds out at least one for the arch "
                              f"split and one must be left to train on")
    # arch_fraction 0.5 of 3 images holds out 2: one is left.
    root = _image_folder(tmp_path / "three", train_per_class=1, classes=("a", "b", "c"))
    s = load_data("imagefolder", data_dir=root, image_size=16, num_classes=3, arch_fraction=0.5)
    assert (len(s.train), len(s.arch)) == (1, 2)


def test_empty_test_split_is_refused(tiny_fmnist):
    root, _, _ = tiny_fmnist
    write_idx(root / "t10k-images-idx3-ubyte.gz", np.zeros((0, 28, 28)))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.zeros((0,)))
    with pytest.raises(DataError) as err:
        load_data("fashion_mnist", data_dir=root)
    assert str(err.value) == (f"fashion_mnist in {root} has no test images; give it some to "
                              f"measure accuracy on")


def test_image_folder_classes_must_agree(tmp_path):
    root = _image_folder(tmp_path / "a", val_classes=("cat", "cow"))
    with pytest.raises(DataError) as err:
        load_data("imagefolder", data_dir=root, image_size=16, num_classes=2)
    assert str(err.value) == (f"image folders {root / 'train'} and {root / 'val'} hold different "
                              f"classes (cow, dog in only one); give both the same class "
                              f"subfolders")
    root = _image_folder(tmp_path / "b", classes=("a", "b", "c"))
    with pytest.raises(DataError) as err:
        load_data("imagefolder", data_dir=root, image_size=16, num_classes=2)
    assert str(err.value) == (f"image folder {root / 'train'} has 3 class folders but "
                              f"data.kwargs.num_classes is 2; set num_classes to at least 3")


def test_train_stops_on_an_unreadable_image_in_one_line(cli, tmp_path):
    """Images are opened as batches are drawn, so this error comes inside the run: still one
    line, exit 2, and the run folder is removed."""
    import yaml

    root = _image_folder(tmp_path / "images")
    broken = root / "train" / "cat" / "broken.jpg"
    broken.write_bytes(b"not an image")
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "name": "folder", "model": {"name": "resnet8", "kwargs": {"width": 4}},
        "data": {"name": "imagefolder", "kwargs": {"image_size": 16, "num_classes": 2}},
        "train": {"budget": "1ep", "batch_size": 16}}))  # one batch holds every image
    runs = tmp_path / "runs"
    result = cli("--runs-dir", str(runs), "train", "--space", str(space), "--data-dir",
                 str(root), "--no-progress")
    assert (result.returncode, result.stderr) == (
        2, f"nas: error: image {broken} is not an image PIL can read; replace or remove it\n")
    assert not runs.exists() or not any(runs.iterdir())
