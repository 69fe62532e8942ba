"""``sparta.data``: datasets by name and seeded loaders.

Every torchvision dataset is exercised on a few files written here in its real on-disk layout,
so nothing is downloaded. torchvision checks the MD5 of the official CIFAR and Flowers102
metadata files; files written here cannot match those sums, so those tests replace the
module's ``check_integrity`` with an existence check (only the checksum is skipped: the
layout, pickles, ``.mat`` files and images are read by torchvision's own code).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparta.data import Datasets, list_datasets, load_dataset, make_loaders
from sparta.errors import ConfigError, UnknownNameError

CIFAR10_MEAN = torch.tensor((0.4914, 0.4822, 0.4465)).view(3, 1, 1)
CIFAR10_STD = torch.tensor((0.2470, 0.2435, 0.2616)).view(3, 1, 1)


def exists_only(fpath, md5=None) -> bool:
    """Stand-in for torchvision's ``check_integrity``: the file exists (MD5 not checked)."""
    return os.path.isfile(fpath)


def write_jpeg(path: Path, seed: int, size=(48, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


def dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def sample(datasets: Datasets, split: str, index: int = 0):
    image, label = getattr(datasets, split)[index]
    assert isinstance(image, torch.Tensor) and isinstance(label, int)
    return image, label


# -- CIFAR ------------------------------------------------------------------------------------
def write_cifar10(root: Path, per_batch: int = 2) -> tuple[np.ndarray, list[int]]:
    """Five train batches and a test batch; returns the test images (N, 3072) and labels."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    for i in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        dump(folder / f"data_batch_{i}", {"data": data, "labels": [i, 9 - i][:per_batch]})
    test_data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    test_labels = [0, 9, 4]
    dump(folder / "test_batch", {"data": test_data, "labels": test_labels})
    names = [f"class{i}" for i in range(10)]
    dump(folder / "batches.meta", {"label_names": names, "num_cases_per_batch": per_batch})
    return test_data, test_labels


def test_cifar10_layout_labels_and_transforms(tmp_path, monkeypatch):
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", exists_only)
    test_data, test_labels = write_cifar10(tmp_path)
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert (len(ds.train), len(ds.test)) == (10, 3)
    assert ds.num_classes == 10 and ds.input_shape == (3, 32, 32)
    assert ds.classes == [f"class{i}" for i in range(10)]
    image, _ = sample(ds, "train")
    assert image.shape == (3, 32, 32)
    assert sorted(label for _, label in ds.train) == sorted([1, 8, 2, 7, 3, 6, 4, 5, 5, 4])
    # The test transform is normalisation only: compare with the raw pixels.
    for i, expected_label in enumerate(test_labels):
        image, label = sample(ds, "test", i)
        raw = torch.tensor(test_data[i], dtype=torch.float32).view(3, 32, 32) / 255
        torch.testing.assert_close(image, (raw - CIFAR10_MEAN) / CIFAR10_STD)
        assert label == expected_label

    resized = load_dataset("cifar10", data_dir=tmp_path, image_size=40)
    assert resized.input_shape == (3, 40, 40)
    assert sample(resized, "train")[0].shape == sample(resized, "test")[0].shape == (3, 40, 40)


def test_cifar100_layout(tmp_path, monkeypatch):
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", exists_only)
    folder = tmp_path / "cifar-100-python"
    rng = np.random.default_rng(1)
    train_labels, test_labels = [0, 99, 50, 7], [99, 3]
    for split, labels in (("train", train_labels), ("test", test_labels)):
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        dump(
            folder / split,
            {"data": data, "fine_labels": labels, "coarse_labels": [0] * len(labels)},
        )
    names = [f"fine{i}" for i in range(100)]
    dump(folder / "meta", {"fine_label_names": names, "coarse_label_names": ["c"] * 20})
    ds = load_dataset("cifar100", data_dir=tmp_path)
    assert ds.num_classes == 100 and ds.classes == names
    assert [label for _, label in ds.train] == train_labels
    assert [label for _, label in ds.test] == test_labels
    assert sample(ds, "train")[0].shape == (3, 32, 32)


def test_missing_data_says_where_and_how(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_dataset("cifar10", data_dir=tmp_path / "nowhere")
    message = str(error.value)
    assert str((tmp_path / "nowhere" / "cifar-10-batches-py").resolve()) in message
    assert "--download" in message and "download=True" in message
    for name, folder in (("flowers102", "flowers-102"), ("pets", "oxford-iiit-pet")):
        with pytest.raises(ConfigError, match=folder):
            load_dataset(name, data_dir=tmp_path)


# -- Flowers102 and Oxford-IIIT Pet ------------------------------------------------------------
def test_flowers102_train_plus_val(tmp_path, monkeypatch):
    from scipy.io import savemat

    monkeypatch.setattr("torchvision.datasets.flowers102.check_integrity", exists_only)
    folder = tmp_path / "flowers-102"
    for image_id in range(1, 8):
        write_jpeg(folder / "jpg" / f"image_{image_id:05d}.jpg", image_id)
    labels = np.array([1, 2, 102, 1, 2, 102, 50])  # 1-based, as in imagelabels.mat
    savemat(folder / "imagelabels.mat", {"labels": labels})
    savemat(folder / "setid.mat", {"trnid": [1, 2], "valid": [3, 4, 7], "tstid": [5, 6]})
    ds = load_dataset("flowers102", data_dir=tmp_path, image_size=32)
    assert (len(ds.train), len(ds.test)) == (5, 2)
    assert ds.num_classes == 102 == len(ds.classes) and ds.input_shape == (3, 32, 32)
    assert [label for _, label in ds.train] == [0, 1, 101, 0, 49]
    assert [label for _, label in ds.test] == [1, 101]
    assert sample(ds, "train")[0].shape == sample(ds, "test")[0].shape == (3, 32, 32)


def test_pets_cat_vs_dog(tmp_path):
    folder = tmp_path / "oxford-iiit-pet"
    # "<image> <breed id> <species: 1 cat, 2 dog> <breed id within species>"
    trainval = ["Abyssinian_1 1 1 1", "beagle_2 3 2 1", "Bengal_3 2 1 2", "pug_4 4 2 2"]
    test = ["Abyssinian_5 1 1 1", "pug_6 4 2 2"]
    (folder / "annotations").mkdir(parents=True)
    for split, lines in (("trainval", trainval), ("test", test)):
        (folder / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
        for seed, line in enumerate(lines):
            write_jpeg(folder / "images" / f"{line.split()[0]}.jpg", seed)
    ds = load_dataset("pets", data_dir=tmp_path, image_size=24)
    assert ds.num_classes == 2 and ds.classes == ["Cat", "Dog"]
    assert [label for _, label in ds.train] == [0, 1, 0, 1]
    assert [label for _, label in ds.test] == [0, 1]
    assert sample(ds, "train")[0].shape == sample(ds, "test")[0].shape == (3, 24, 24)


# -- ImageFolder -------------------------------------------------------------------------------
def test_imagefolder_val_split_with_a_missing_class(tmp_path):
    for i, cls in enumerate(["ant", "bee", "cat"]):
        for j in range(2):
            write_jpeg(tmp_path / "train" / cls / f"{j}.jpg", 10 * i + j)
    write_jpeg(tmp_path / "val" / "cat" / "0.jpg", 99)  # the val split lacks ant and bee
    ds = load_dataset("imagefolder", data_dir=tmp_path)
    assert ds.classes == ["ant", "bee", "cat"] and ds.num_classes == 3
    assert [label for _, label in ds.train] == [0, 0, 1, 1, 2, 2]
    assert [label for _, label in ds.test] == [2]  # still "cat", not renumbered to 0
    assert ds.input_shape == (3, 224, 224)
    assert sample(ds, "train")[0].shape == sample(ds, "test")[0].shape == (3, 224, 224)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(ConfigError, match="needs data_dir"):
        load_dataset("imagefolder")
    with pytest.raises(ConfigError, match="train/<class>/"):
        load_dataset("imagefolder", data_dir=tmp_path)
    write_jpeg(tmp_path / "train" / "ant" / "0.jpg", 0)
    write_jpeg(tmp_path / "test" / "wasp" / "0.jpg", 1)
    with pytest.raises(ConfigError, match="wasp"):
        load_dataset("imagefolder", data_dir=tmp_path)


# -- digits (real data, offline) ----------------------------------------------------------------
def test_digits_real_data_and_disjoint_tasks():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    original = {images[i].tobytes(): int(digits.target[i]) for i in range(len(images))}

    def originals(x: torch.Tensor) -> list[int]:
        return [original[img.numpy().tobytes()] for img in x[:, 0]]

    full = load_dataset("digits")
    assert full.num_classes == 10 and full.input_shape == (1, 8, 8)
    assert len(full.train) + len(full.test) == len(digits.target) == 1797
    assert len(full.test) == pytest.approx(0.25 * 1797, abs=1)
    x, y = full.train.tensors
    assert x.min() >= 0 and x.max() <= 1 and x.shape[1:] == (1, 8, 8)
    assert originals(x) == y.tolist()

    seen = {}
    for name, offset in (("digits-source", 0), ("digits-target", 5)):
        ds = load_dataset(name)
        assert ds.num_classes == 5 and ds.classes == [str(offset + c) for c in range(5)]
        for split in (ds.train, ds.test):
            x, y = split.tensors
            assert set(y.tolist()) == set(range(5))
            assert originals(x) == (y + offset).tolist()  # relabelled, real images
        seen[name] = {
            int(c) for c in originals(torch.cat([ds.train.tensors[0], ds.test.tensors[0]]))
        }
    assert seen["digits-source"] == {0, 1, 2, 3, 4} and seen["digits-target"] == {5, 6, 7, 8, 9}


def test_digits_split_is_fixed_by_the_seed():
    a, b, c = (load_dataset("digits-target", seed=s) for s in (3, 3, 4))
    for split in ("train", "test"):
        for t1, t2 in zip(getattr(a, split).tensors, getattr(b, split).tensors):
            assert torch.equal(t1, t2)
    assert not torch.equal(a.test.tensors[0], c.test.tensors[0])
    counts = torch.bincount(a.test.tensors[1])  # stratified: about a quarter of each class
    assert counts.min() >= 40 and counts.max() <= 50


def test_digits_resized_to_16():
    ds = load_dataset("digits", image_size=16)
    assert ds.input_shape == (1, 16, 16) and sample(ds, "train")[0].shape == (1, 16, 16)


def test_unknown_dataset_and_bad_values():
    assert {"cifar10", "digits", "digits-target", "imagefolder", "pets"} <= set(list_datasets())
    with pytest.raises(UnknownNameError, match="did you mean 'cifar10'"):
        load_dataset("cifar-10")
    with pytest.raises(ConfigError, match="image_size"):
        load_dataset("digits", image_size=0)


# -- loaders ------------------------------------------------------------------------------------
def epoch_labels(loader) -> list[int]:
    return [int(v) for _, y in loader for v in y]


def test_loaders_shuffle_reproducibly_from_the_seed():
    ds = load_dataset("digits-source")
    train, test = make_loaders(ds, batch_size=64, seed=7)
    first, second = epoch_labels(train), epoch_labels(train)
    assert first != second  # reshuffled every epoch ...
    again = make_loaders(ds, batch_size=64, seed=7)[0]
    assert [epoch_labels(again), epoch_labels(again)] == [first, second]  # ... reproducibly
    assert epoch_labels(make_loaders(ds, batch_size=64, seed=8)[0]) != first
    assert epoch_labels(test) == ds.test.tensors[1].tolist()  # test order kept, last batch kept
    assert sum(len(y) for _, y in train) == len(ds.train)
    with pytest.raises(ConfigError, match="batch_size"):
        make_loaders(ds, batch_size=0)
    with pytest.raises(ConfigError, match="init_process_group"):
        make_loaders(ds, batch_size=8, distributed=True)


def test_distributed_sampler_is_seeded(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    ds = load_dataset("digits-source")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        train, _ = make_loaders(ds, batch_size=64, seed=5, distributed=True)
        sampler = train.sampler
        assert isinstance(sampler, torch.utils.data.DistributedSampler)
        assert sampler.seed == 5 and sampler.shuffle and not sampler.drop_last
        epoch0 = epoch_labels(train)
        assert epoch_labels(train) == epoch0  # same order until set_epoch is called
        sampler.set_epoch(1)
        assert epoch_labels(train) != epoch0
        assert sorted(epoch0) == sorted(ds.train.tensors[1].tolist())
    finally:
        dist.destroy_process_group()
