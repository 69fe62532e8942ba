"""Datasets by name for experiments, seeded data loaders and seeded subsets.

``load_dataset("cifar10", data_dir="data", download=True)`` returns a :class:`Datasets`
(train and test splits, class count and names, input shape); :func:`make_loaders` turns it into
reproducibly shuffled ``DataLoader``\\ s; :func:`list_datasets` lists the names. The
``digits``, ``digits-source`` and ``digits-target`` datasets are built in and need no
download; ``fashion-mnist`` reads the real IDX files (offline: ``make assets``).
:func:`split_validation` carves a seeded, stratified validation part out of a training split,
:func:`subset` draws a seeded, class-balanced subset.
"""

from .datasets import Datasets, image_transforms, list_datasets, load_dataset
from .idx import GrayscaleImages
from .loaders import make_loaders
from .splits import dataset_labels, split_validation, subset

__all__ = [
    "Datasets",
    "GrayscaleImages",
    "dataset_labels",
    "image_transforms",
    "list_datasets",
    "load_dataset",
    "make_loaders",
    "split_validation",
    "subset",
]
