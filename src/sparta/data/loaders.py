"""Data loaders with seeded, reproducible shuffling (and optional distributed sharding)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..errors import ConfigError
from .datasets import Datasets


def make_loaders(
    datasets: Datasets,
    batch_size: int,
    workers: int = 0,
    seed: int = 0,
    distributed: bool = False,
) -> tuple[DataLoader, DataLoader]:
    """``(train_loader, test_loader)`` for ``datasets``.

    The train loader reshuffles every epoch in an order fixed by ``seed``: a
    ``torch.Generator`` seeded with ``seed`` drives the sampler and the workers' seeds (so
    random augmentations repeat too, for the same ``workers``). The test loader keeps the
    dataset's order. Neither drops the last, smaller batch.

    With ``distributed=True`` (``torch.distributed`` must be initialised) the train split is
    sharded with a ``DistributedSampler(shuffle=True, seed=seed, drop_last=False)``: **call
    ``train_loader.sampler.set_epoch(epoch)`` at the start of every epoch**, or every epoch
    repeats the first one's order. Worker seeds then also depend on the rank. The test loader
    is not sharded (every rank sees the whole test split).
    """
    for value, what, low in ((batch_size, "batch_size", 1), (workers, "workers", 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{what} must be an integer >= {low}, got {value!r}")
    extra = {"num_workers": workers, "persistent_workers": workers > 0}
    if distributed:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ConfigError(
                "distributed=True needs an initialised torch.distributed process group "
                "(torch.distributed.init_process_group, e.g. under torchrun)"
            )
        rank = torch.distributed.get_rank()
        sampler = DistributedSampler(datasets.train, shuffle=True, seed=seed, drop_last=False)
        generator = torch.Generator().manual_seed(seed + rank)
        train = DataLoader(
            datasets.train, batch_size, sampler=sampler, generator=generator, **extra
        )
    else:
        generator = torch.Generator().manual_seed(seed)
        train = DataLoader(datasets.train, batch_size, shuffle=True, generator=generator, **extra)
    test_generator = torch.Generator().manual_seed(seed)
    test = DataLoader(datasets.test, batch_size, shuffle=False, generator=test_generator, **extra)
    return train, test
