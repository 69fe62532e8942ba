"""Fashion-MNIST (and MNIST, KMNIST) through torchvision's loaders, as 3-channel images for
ImageNet backbones, held in memory."""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import KMNIST, MNIST, FashionMNIST

from ..errors import ConfigError
from .common import IMAGENET_MEAN, IMAGENET_STD, Datasets, resize_images

#: Output side length when ``image_size`` is not given.
IDX_DEFAULT_SIZE = 32
#: name -> (torchvision class, how to get the files without torchvision's download).
IDX_DATASETS = {
    "fashion-mnist": (
        FashionMNIST,
        "sudo apt-get install dataset-fashion-mnist && make assets (the Debian package puts the "
        "four files in /usr/share/datasets/fashion-mnist/; `make assets` links them into ./data)",
    ),
    "mnist": (MNIST, None),
    "kmnist": (KMNIST, None),
}


class GrayscaleImages(Dataset):
    """``uint8`` grayscale images ``(N, H, W)`` kept in memory, served as normalised
    ``(3, S, S)`` float tensors: scaled to [0, 1], resized (bilinear) per item, replicated to
    3 channels and normalised with ``mean``/``std`` (one value per output channel).

    ``targets`` (``int64``, ``(N,)``) and ``classes`` are public, so :func:`split_validation`
    and :func:`subset` stratify without touching the images.
    """

    def __init__(self, data: Tensor, targets: Tensor, classes, size: int, mean, std):
        if data.dim() != 3 or data.dtype != torch.uint8 or len(data) != len(targets):
            raise ConfigError(
                f"GrayscaleImages needs uint8 images (N, H, W) and N labels, got "
                f"{data.dtype} {tuple(data.shape)} images and {len(targets)} labels"
            )
        self.data = data
        self.targets = torch.as_tensor(targets, dtype=torch.long)
        self.classes = list(classes)
        self.size = int(size)
        self.mean = torch.as_tensor(mean, dtype=torch.float32).clone().view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).clone().view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.data[index].to(torch.float32).div_(255.0)[None, None]
        if tuple(image.shape[-2:]) != (self.size, self.size):
            image = resize_images(image, self.size)
        channels = len(self.mean)
        image = (image[0].expand(channels, self.size, self.size) - self.mean) / self.std
        return image, int(self.targets[index])


def load_idx_dataset(name: str, root: Path, download: bool, image_size: int | None, seed: int):
    """The ``load_dataset`` entry of the MNIST-format datasets (see its docstring)."""
    cls, offline_hint = IDX_DATASETS[name]
    raw = root / cls.__name__ / "raw"
    files = [os.path.splitext(os.path.basename(url))[0] for url, _ in cls.resources]
    _extract_gzipped(raw, files)
    if not download and not all((raw / f).is_file() for f in files):
        raise _missing(name, raw, files, offline_hint)
    try:
        if download:
            root.mkdir(parents=True, exist_ok=True)
        splits = [cls(str(root), train=train, download=download) for train in (True, False)]
    # not found, failed download (URLError is an OSError), malformed file (torchvision asserts)
    except (RuntimeError, OSError, AssertionError, TypeError, ValueError) as error:
        offline = f"; offline: {offline_hint}" if offline_hint and download else ""
        raise ConfigError(
            f"dataset {name!r} in {raw.resolve()} is unusable: {error}".rstrip() + offline
        ) from None
    size = image_size or IDX_DEFAULT_SIZE
    train, test = (
        GrayscaleImages(s.data, s.targets, s.classes, size, IMAGENET_MEAN, IMAGENET_STD)
        for s in splits
    )
    return Datasets(name, train, test, len(train.classes), (3, size, size), train.classes)


def _missing(name: str, raw: Path, files: list[str], offline_hint: str | None) -> ConfigError:
    absent = [f for f in files if not (raw / f).is_file() and not (raw / f"{f}.gz").is_file()]
    online = f"pass download=True (--download) to let torchvision fetch them into {raw.resolve()}"
    fixes = f"either {offline_hint}, or {online}" if offline_hint else online
    return ConfigError(
        f"dataset {name!r} not found in {raw.resolve()}: missing {', '.join(absent)} "
        f"(each may be gzipped, .gz). To get it: {fixes}"
    )


def _extract_gzipped(raw: Path, files: list[str]) -> None:
    """Decompress ``<file>.gz`` next to itself for every listed file that is only there
    gzipped (torchvision reads the plain files). Written to a temporary file and renamed, so
    processes loading at the same time never read half a file."""
    for name in files:
        target, packed = raw / name, raw / f"{name}.gz"
        if target.is_file() or not packed.is_file():
            continue
        temporary = None
        try:
            handle, temporary = tempfile.mkstemp(dir=raw, prefix=f".{name}.")
            with os.fdopen(handle, "wb") as out, gzip.open(packed, "rb") as source:
                shutil.copyfileobj(source, out)
            os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide it from other users
            os.replace(temporary, target)
        except (OSError, EOFError) as error:  # unwritable folder, bad or truncated gzip
            if temporary is not None and os.path.exists(temporary):
                os.unlink(temporary)
            raise ConfigError(
                f"cannot decompress {packed.resolve()} ({type(error).__name__}: {error}); "
                f"decompress it yourself (gunzip -k {packed}) or point data_dir at a writable "
                "copy of the folder"
            ) from None
