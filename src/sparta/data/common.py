"""What every dataset loader shares: the :class:`Datasets` record, ImageNet normalisation and
image resizing (below both ``datasets.py`` and ``idx.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Datasets:
    """A task's train and test splits, each yielding ``(image tensor, int label)``.

    ``input_shape`` is ``(C, H, W)`` of one transformed image; ``classes`` names the labels
    ``0 .. num_classes - 1`` in order (an empty list where the dataset has no names).
    """

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]
    classes: list[str] = field(default_factory=list)


def resize_images(images: Tensor, size: int) -> Tensor:
    """Images ``(N, C, H, W)`` resized (bilinear) to ``size`` x ``size``, antialiased when
    shrinking."""
    shrink = size < min(images.shape[-2:])
    return F.interpolate(
        images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink
    )
