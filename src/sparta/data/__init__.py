"""Datasets by name for experiments, and seeded data loaders.

``load_dataset("cifar10", data_dir="data", download=True)`` returns a :class:`Datasets`
(train and test splits, class count and names, input shape); :func:`make_loaders` turns it into
reproducibly shuffled ``DataLoader``\\ s; :func:`list_datasets` lists the names. The
``digits``, ``digits-source`` and ``digits-target`` datasets are built in and need no
download.
"""

from .datasets import Datasets, image_transforms, list_datasets, load_dataset
from .loaders import make_loaders

__all__ = ["Datasets", "image_transforms", "list_datasets", "load_dataset", "make_loaders"]
