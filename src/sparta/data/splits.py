"""Seeded sub-sets of a dataset: a validation split carved from training data, and a smaller,
class-balanced subset. Both stratify by label when the labels can be read without loading the
examples (a ``targets`` attribute, a ``TensorDataset``'s last tensor, and ``Subset`` /
``ConcatDataset`` of those); otherwise they draw plain random indices."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from ..errors import ConfigError


def split_validation(dataset: Dataset, fraction: float, seed: int = 0) -> tuple[Subset, Subset]:
    """``(train_part, val_part)``: ``round(fraction * len(dataset))`` examples of ``dataset``
    held out for validation, the rest kept for training, as two disjoint ``Subset``\\ s.

    The split is fixed by ``seed``. Where labels are cheaply available (see the module) it is
    stratified: every class contributes its share of the validation part (largest remainders
    decide the rounding), so the class proportions of both parts follow the dataset's.
    Indices in each part are in increasing order.

    Raises:
        ConfigError: ``fraction`` not a number strictly between 0 and 1, or a dataset too small
            for both parts to hold an example.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise ConfigError(f"fraction must be a number in (0, 1), got {fraction!r}")
    if not 0.0 < float(fraction) < 1.0:
        raise ConfigError(
            f"fraction must be strictly between 0 and 1 (the share held out for validation), "
            f"got {fraction!r}"
        )
    size = len(dataset)
    n_val = round(float(fraction) * size)
    if n_val < 1 or n_val > size - 1:
        raise ConfigError(
            f"a validation fraction of {fraction} of {size} examples leaves an empty "
            f"{'validation' if n_val < 1 else 'training'} part; use a larger dataset or a "
            f"fraction between {1 / max(size, 1):.3g} and {1 - 1 / max(size, 1):.3g}"
        )
    generator = _generator(seed)
    by_class = _indices_by_class(dataset, generator)
    counts = _proportional([len(i) for i in by_class], n_val)
    val = torch.cat([idx[:k] for idx, k in zip(by_class, counts)])
    chosen = torch.zeros(size, dtype=torch.bool)
    chosen[val] = True
    return (
        Subset(dataset, torch.nonzero(~chosen).flatten().tolist()),
        Subset(dataset, torch.nonzero(chosen).flatten().tolist()),
    )


def subset(dataset: Dataset, n: int, seed: int = 0) -> Subset:
    """A ``Subset`` of ``n`` examples of ``dataset`` drawn with ``seed``, indices increasing.

    Class-balanced where labels are cheaply available (see the module): every class gets
    ``n // classes`` examples (one more for some, chosen by ``seed``), and a class with too
    few examples gives all it has while the others make up the difference.

    Raises:
        ConfigError: ``n`` not an integer between 1 and ``len(dataset)``.
    """
    size = len(dataset)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= size:
        raise ConfigError(
            f"n must be an integer between 1 and the dataset's {size} examples, got {n!r}"
        )
    generator = _generator(seed)
    by_class = _indices_by_class(dataset, generator)
    counts = _balanced([len(i) for i in by_class], n, generator)
    chosen = torch.cat([idx[:k] for idx, k in zip(by_class, counts)])
    return Subset(dataset, sorted(chosen.tolist()))


def dataset_labels(dataset: Dataset) -> Tensor | None:
    """The integer label of every example of ``dataset`` as a 1-D tensor, read without
    loading the examples, or ``None`` where that is not possible."""
    if isinstance(dataset, Subset):
        labels = dataset_labels(dataset.dataset)
        return None if labels is None else labels[torch.as_tensor(dataset.indices).long()]
    if isinstance(dataset, ConcatDataset):
        parts = [dataset_labels(d) for d in dataset.datasets]
        return None if any(p is None for p in parts) else torch.cat(parts)
    if isinstance(dataset, TensorDataset):
        labels = dataset.tensors[-1] if len(dataset.tensors) > 1 else None
    else:
        labels = getattr(dataset, "targets", None)
    try:
        labels = torch.as_tensor(labels) if labels is not None else None
    except (TypeError, ValueError, RuntimeError):
        return None
    if labels is None or labels.dim() != 1 or len(labels) != len(dataset):
        return None
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        return None
    return labels.long()


# -- helpers ---------------------------------------------------------------------------------
def _generator(seed: int) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    return torch.Generator().manual_seed(seed)


def _indices_by_class(dataset: Dataset, generator: torch.Generator) -> list[Tensor]:
    """The dataset's indices grouped by label (one group if labels are unknown), each group in
    a random order drawn from ``generator``."""
    labels = dataset_labels(dataset)
    order = torch.randperm(len(dataset), generator=generator)
    if labels is None:
        return [order]
    shuffled = labels[order]
    return [order[shuffled == c] for c in torch.unique(labels).tolist()]


def _proportional(sizes: Sequence[int], total: int) -> list[int]:
    """Split ``total`` over groups in proportion to ``sizes`` (largest remainders)."""
    whole = sum(sizes)
    shares = [s * total / whole for s in sizes]
    counts = [math.floor(s) for s in shares]
    by_remainder = sorted(range(len(sizes)), key=lambda i: counts[i] - shares[i])
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _balanced(sizes: Sequence[int], total: int, generator: torch.Generator) -> list[int]:
    """Split ``total`` as evenly as possible over groups, none above its size; the groups
    that get one extra are drawn from ``generator``."""
    counts = [0] * len(sizes)
    left = total
    while left > 0:
        open_ = [i for i, s in enumerate(sizes) if counts[i] < s]
        share, extra = divmod(left, len(open_))
        lucky = set(torch.randperm(len(open_), generator=generator)[:extra].tolist())
        for j, i in enumerate(open_):
            give = min(share + (j in lucky), sizes[i] - counts[i])
            counts[i] += give
            left -= give
    return counts
