"""Fashion-MNIST (and the other MNIST-format datasets) through ``load_dataset``, on small
files written in the real IDX format, and the seeded ``split_validation`` / ``subset``.

The IDX format: big-endian; images start with magic 2051 (0x00000803: unsigned bytes, 3
dimensions) then N, rows, cols; labels with magic 2049 (1 dimension) then N; then the bytes.
"""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from sparta.data import (
    GrayscaleImages,
    dataset_labels,
    list_datasets,
    load_dataset,
    make_loaders,
    split_validation,
    subset,
)
from sparta.errors import ConfigError

MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])
NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"]
NAMES += ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def write_idx(raw: Path, split: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    n, rows, cols = images.shape
    blobs = {
        f"{split}-images-idx3-ubyte": struct.pack(">4i", 2051, n, rows, cols) + images.tobytes(),
        f"{split}-labels-idx1-ubyte": struct.pack(">2i", 2049, n) + labels.tobytes(),
    }
    for name, blob in blobs.items():
        if gz:
            (raw / f"{name}.gz").write_bytes(gzip.compress(blob))
        else:
            (raw / name).write_bytes(blob)


def make_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    rng.shuffle(labels)
    return images, labels


@pytest.fixture
def fashion(tmp_path):
    """A data_dir holding a 60-image train and 20-image test Fashion-MNIST, gzipped as
    distributed; returns (root, train images, train labels, test images, test labels)."""
    raw = tmp_path / "FashionMNIST" / "raw"
    train, test = make_split(60, 0), make_split(20, 1)
    write_idx(raw, "train", *train, gz=True)
    write_idx(raw, "t10k", *test, gz=True)
    return tmp_path, *train, *test


def expected(image: np.ndarray) -> torch.Tensor:
    """One 28x28 uint8 image as the loader should serve it at 28 px (no resize)."""
    x = torch.from_numpy(image.astype(np.float32) / 255.0)
    return (x.expand(3, 28, 28) - MEAN.view(3, 1, 1)) / STD.view(3, 1, 1)


def test_fashion_mnist_from_gzipped_idx_files(fashion):
    root, x_train, y_train, x_test, y_test = fashion
    data = load_dataset("fashion-mnist", data_dir=root, image_size=28)
    assert "fashion-mnist" in list_datasets()
    assert (len(data.train), len(data.test)) == (60, 20)
    assert data.num_classes == 10 and data.classes == NAMES and data.input_shape == (3, 28, 28)
    for split, images, labels in ((data.train, x_train, y_train), (data.test, x_test, y_test)):
        for i in (0, 7, len(images) - 1):
            image, label = split[i]
            assert image.dtype == torch.float32 and image.shape == (3, 28, 28)
            torch.testing.assert_close(image, expected(images[i]), rtol=0, atol=1e-6)
            assert label == int(labels[i]) and isinstance(label, int)
        assert torch.equal(split.targets, torch.from_numpy(labels.astype(np.int64)))
    # the gzipped files were decompressed once, next to themselves, readable by others
    plain = root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    assert plain.stat().st_size == 16 + 60 * 28 * 28 and plain.stat().st_mode & 0o044
    assert not list(plain.parent.glob(".*"))  # no temporary file left behind


def test_default_size_32_resizes_bilinear_and_normalises(fashion):
    root, x_train, *_ = fashion
    data = load_dataset("fashion-mnist", data_dir=root)
    assert data.input_shape == (3, 32, 32)
    image, _ = data.train[3]
    assert image.shape == (3, 32, 32)
    # undo the normalisation: the three channels hold the same grayscale picture
    pixels = image * STD.view(3, 1, 1) + MEAN.view(3, 1, 1)
    torch.testing.assert_close(pixels[0], pixels[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(pixels[0], pixels[2], atol=1e-5, rtol=0)
    source = torch.from_numpy(x_train[3].astype(np.float32) / 255)[None, None]
    bilinear = torch.nn.functional.interpolate(source, size=(32, 32), mode="bilinear")
    torch.testing.assert_close(pixels[0], bilinear[0, 0], atol=1e-5, rtol=0)
    # a constant image stays that constant after resizing: 255 -> (1 - mean) / std per channel
    white = GrayscaleImages(
        torch.full((1, 28, 28), 255, dtype=torch.uint8), torch.zeros(1), NAMES, 64, MEAN, STD
    )[0][0]
    assert white.shape == (3, 64, 64)
    torch.testing.assert_close(white[:, 10, 20], (1 - MEAN) / STD)
    shrunk = load_dataset("fashion-mnist", data_dir=root, image_size=14).test[0][0]
    assert shrunk.shape == (3, 14, 14)


def test_loaders_batch_the_images(fashion):
    root, *_ = fashion
    train, test = make_loaders(load_dataset("fashion-mnist", data_dir=root, image_size=40), 16)
    images, labels = next(iter(train))
    assert images.shape == (16, 3, 40, 40) and labels.dtype == torch.int64
    assert sum(len(y) for _, y in test) == 20


def test_plain_idx_files_and_mnist(tmp_path):
    images, labels = make_split(30, 2)
    for split in ("train", "t10k"):
        write_idx(tmp_path / "MNIST" / "raw", split, images, labels, gz=False)
    data = load_dataset("mnist", data_dir=tmp_path, image_size=28)
    assert data.classes[0] == "0 - zero" and data.num_classes == 10
    torch.testing.assert_close(data.test[5][0], expected(images[5]), rtol=0, atol=1e-6)


def test_missing_files_say_where_and_both_fixes(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_dataset("fashion-mnist", data_dir=tmp_path / "nowhere")
    message = str(caught.value)
    assert str((tmp_path / "nowhere" / "FashionMNIST" / "raw").resolve()) in message
    assert "apt-get install dataset-fashion-mnist" in message and "make assets" in message
    assert "download=True" in message and "train-images-idx3-ubyte" in message
    # only the test split there: the train files are named as missing, the test ones are not
    raw = tmp_path / "partial" / "FashionMNIST" / "raw"
    write_idx(raw, "t10k", *make_split(10, 3), gz=True)
    with pytest.raises(ConfigError, match="missing train-images") as caught:
        load_dataset("fashion-mnist", data_dir=tmp_path / "partial")
    named = re.search(r": missing ([^(]*)\(", str(caught.value)).group(1)
    assert named == "train-images-idx3-ubyte, train-labels-idx1-ubyte "


def test_corrupt_gzip_and_bad_image_size(fashion, tmp_path):
    raw = tmp_path / "bad" / "FashionMNIST" / "raw"
    write_idx(raw, "train", *make_split(10, 4), gz=True)
    write_idx(raw, "t10k", *make_split(10, 5), gz=True)
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ConfigError, match="cannot decompress .*t10k-labels"):
        load_dataset("fashion-mnist", data_dir=tmp_path / "bad")
    with pytest.raises(ConfigError, match="image_size"):
        load_dataset("fashion-mnist", data_dir=fashion[0], image_size=0)
    # a plain file that is not IDX (torchvision's reader asserts on its header)
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"\xff" * 64)
    with pytest.raises(ConfigError, match="'fashion-mnist' in .* is unusable"):
        load_dataset("fashion-mnist", data_dir=tmp_path / "bad")


def test_failed_download_names_the_offline_way(tmp_path, monkeypatch):
    from torchvision.datasets import FashionMNIST

    def offline(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")

    monkeypatch.setattr(FashionMNIST, "download", offline)
    with pytest.raises(ConfigError) as caught:
        load_dataset("fashion-mnist", data_dir=tmp_path, download=True)
    message = str(caught.value)
    assert (
        "no network" in message and "offline: sudo apt-get install dataset-fashion-mnist" in message
    )


# -- split_validation and subset -------------------------------------------------------------
def labelled(n: int = 200) -> TensorDataset:
    """n examples whose labels are 0..3 with counts in ratio 4:3:2:1."""
    labels = torch.tensor([c for c, k in enumerate((4, 3, 2, 1)) for _ in range(k)] * (n // 10))
    return TensorDataset(torch.arange(len(labels)).float(), labels)


def class_counts(part: Subset, labels: torch.Tensor) -> list[int]:
    return torch.bincount(labels[part.indices], minlength=4).tolist()


def test_split_validation_is_stratified_seeded_and_disjoint():
    data = labelled()
    labels = data.tensors[1]
    train, val = split_validation(data, 0.25, seed=0)
    assert isinstance(train, Subset) and train.dataset is data
    assert (len(train), len(val)) == (150, 50)
    assert set(train.indices).isdisjoint(val.indices)
    assert sorted(train.indices + val.indices) == list(range(200))
    assert class_counts(val, labels) == [20, 15, 10, 5]  # a quarter of 80, 60, 40, 20
    again = split_validation(data, 0.25, seed=0)
    other = split_validation(data, 0.25, seed=1)
    assert again[1].indices == val.indices and other[1].indices != val.indices
    assert class_counts(other[1], labels) == [20, 15, 10, 5]
    # largest remainders: 0.1 of (80, 60, 40, 20) is exact; 0.13 * 200 = 26 split 10.4/7.8/5.2/2.6
    assert class_counts(split_validation(data, 0.13, 3)[1], labels) == [10, 8, 5, 3]


def test_split_of_a_subset_and_of_unlabelled_data():
    data = labelled()
    part = subset(data, 80, seed=0)
    train, val = split_validation(part, 0.25, seed=0)
    assert isinstance(val.dataset, Subset) and (len(train), len(val)) == (60, 20)
    labels = dataset_labels(val)
    assert torch.bincount(labels).tolist() == [5, 5, 5, 5]  # the subset is balanced: 20 each
    assert labels.tolist() == [int(data[part.indices[i]][1]) for i in val.indices]

    class Unlabelled(Dataset):
        def __len__(self):
            return 50

        def __getitem__(self, i):
            return torch.zeros(1), 0

    assert dataset_labels(Unlabelled()) is None
    train, val = split_validation(Unlabelled(), 0.3, seed=5)
    assert (len(train), len(val)) == (35, 15) and set(train.indices).isdisjoint(val.indices)
    assert val.indices == split_validation(Unlabelled(), 0.3, seed=5)[1].indices


def test_subset_is_class_balanced_and_seeded():
    data = labelled()
    labels = data.tensors[1]
    part = subset(data, 40, seed=0)
    assert class_counts(part, labels) == [10, 10, 10, 10]
    assert part.indices == sorted(part.indices) and len(set(part.indices)) == 40
    assert subset(data, 40, seed=0).indices == part.indices
    assert subset(data, 40, seed=1).indices != part.indices
    # class 3 has only 20: it gives them all and the others share the rest
    counts = class_counts(subset(data, 120, seed=0), labels)
    assert counts[3] == 20 and sorted(counts[:3]) == [33, 33, 34]
    assert class_counts(subset(data, 170, seed=0), labels) == [55, 55, 40, 20]  # 2 and 3 full
    assert sorted(class_counts(subset(data, 6, seed=2), labels)) == [1, 1, 2, 2]
    assert len(subset(data, 200, seed=0)) == 200


def test_labels_of_torchvision_style_and_concatenated_datasets():
    images = torch.zeros(6, 28, 28, dtype=torch.uint8)
    first = GrayscaleImages(images, torch.tensor([0, 1, 2, 0, 1, 2]), "abc", 28, MEAN, STD)
    both = ConcatDataset([first, TensorDataset(torch.zeros(2), torch.tensor([5, 5]))])
    assert dataset_labels(both).tolist() == [0, 1, 2, 0, 1, 2, 5, 5]
    assert dataset_labels(TensorDataset(torch.zeros(3), torch.rand(3))) is None  # float labels
    assert dataset_labels(TensorDataset(torch.zeros(3))) is None  # no labels at all


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1, float("nan"), "0.2", True, None])
def test_split_validation_refuses_bad_fractions(fraction):
    with pytest.raises(ConfigError, match="fraction"):
        split_validation(labelled(), fraction, seed=0)


def test_bad_subset_sizes_and_too_small_splits():
    data = labelled(20)
    for n in (0, -1, 21, 2.5, True, "3"):
        with pytest.raises(ConfigError, match="n must be an integer between 1 and .* 20"):
            subset(data, n, seed=0)
    with pytest.raises(ConfigError, match="empty validation part"):
        split_validation(data, 0.01, seed=0)
    with pytest.raises(ConfigError, match="empty training part"):
        split_validation(data, 0.99, seed=0)
    with pytest.raises(ConfigError, match="seed must be an integer"):
        subset(data, 5, seed="x")
