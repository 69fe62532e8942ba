"""The training loop: a reproducible data order, one epoch of training, evaluation, and the
optimiser and learning-rate schedule factories.

Data order. Every epoch of a run has an index ``e`` (counted over the whole run: initial
training, then every recovery phase). Its order is a permutation of the training set that
depends only on ``(seed, e)``, cut into *global* batches of ``batch_size``. With ``W`` ranks,
rank ``r`` takes the ``r``-th of ``W`` equal slices of each global batch (the batch size must
be a multiple of ``W``), and each rank's loss is the mean over its slice; DDP averages the
gradients, so every step sees the same gradient as one process on the whole global batch.
The last incomplete batch of an epoch is dropped in training (so the slices are equal).

Batches are ``(inputs, labels)``; inputs are a tensor (images) or a dict of tensors (tokenised
text, passed to the model as keyword arguments), and a model may return its logits directly or
as the ``logits`` of a Hugging Face output.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import ConfigError
from ..utils import call


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that depends only on ``keys`` (non-negative integers)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


class EpochBatchSampler(Sampler[list[int]]):
    """This rank's slice of every global batch of epoch ``epoch`` (see the module docstring).

    ``shuffle=False`` keeps the dataset order (evaluation); ``drop_last`` drops an incomplete
    last global batch. ``set_epoch`` chooses the epoch, as for ``DistributedSampler``.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        if batch_size < 1 or size < 0:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside a world of {world_size}")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.drop_last, self.epoch = shuffle, drop_last, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[Tensor]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=gen)
        else:
            order = torch.arange(self.size)
        batches = list(order.split(self.batch_size))
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def __iter__(self):
        for batch in self.global_batches():
            part = torch.tensor_split(batch, self.world_size)[self.rank]
            if len(part):  # a short last evaluation batch may leave a rank nothing
                yield part.tolist()

    def __len__(self) -> int:
        full, rest = divmod(self.size, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)


def make_loader(
    dataset: Dataset,
    sampler: EpochBatchSampler,
    workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A loader over ``sampler``'s batches. Workers are seeded from ``(seed, epoch, rank)``
    through the loader's generator, so augmentations repeat with the data order."""
    gen = torch.Generator().manual_seed(derive_seed(sampler.seed, sampler.epoch, sampler.rank, 1))
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        generator=gen,
    )


# -- optimisation ------------------------------------------------------------------------------
#: The ``step`` schedule: the rate is divided by 10 at these fractions of each training phase.
STEP_MILESTONES = (0.5, 0.75)
STEP_GAMMA = 0.1


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def param_groups(model: nn.Module, lr: float, adapter_lr_scale: float = 1.0) -> list[dict]:
    """The model's trainable parameters as optimiser groups: the parameters of every sparta
    :class:`~sparta.adapters.base.Adapter` module at ``lr * adapter_lr_scale`` (group
    ``"adapter"``), every other trainable one (head, norms, biases, fine-pruned weights) at
    ``lr`` (group ``"other"``). A scale of 1 or a model without adapters gives one group."""
    from ..adapters.base import Adapter

    trainable = trainable_parameters(model)
    adapter_ids = {id(p) for m in model.modules() if isinstance(m, Adapter) for p in m.parameters()}
    adapted = [p for p in trainable if id(p) in adapter_ids]
    if adapter_lr_scale == 1.0 or not adapted:
        return [{"params": trainable, "lr": lr, "name": "all"}]
    others = [p for p in trainable if id(p) not in adapter_ids]
    groups = [{"params": adapted, "lr": lr * adapter_lr_scale, "name": "adapter"}]
    return ([{"params": others, "lr": lr, "name": "other"}] if others else []) + groups


def make_optimizer(
    params: Iterable[nn.Parameter] | Iterable[dict],
    name: str = "sgd",
    lr: float = 0.01,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """``sgd`` (with ``momentum``), ``adam`` or ``adamw`` over ``params`` (parameters, or groups
    from :func:`param_groups`: a group's own ``lr`` wins over ``lr``)."""
    params = list(params)
    groups = [g for g in params if isinstance(g, dict)]
    if not params or (len(groups) == len(params) and not any(g["params"] for g in groups)):
        raise ConfigError("the model has no trainable parameters to optimise")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"optimizer must be one of sgd, adam, adamw, got {name!r}")


def make_scheduler(
    optimizer: torch.optim.Optimizer, name: str = "cosine", total_steps: int = 1
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration schedule over the ``total_steps`` iterations of one training phase, as a
    factor of each group's base rate: ``cosine`` (from 1 to 0), ``constant``, or ``step``: the
    rate is multiplied by 0.1 (:data:`STEP_GAMMA`) once the phase has done
    ``max(1, floor(f * total_steps))`` iterations, for each ``f`` in 0.5 and 0.75
    (:data:`STEP_MILESTONES`); a 4-epoch phase thus trains 2 epochs at lr, 1 at lr/10 and 1
    at lr/100, and a 1-iteration phase trains at lr."""
    total = max(int(total_steps), 1)
    if name == "cosine":

        def factor(step: int) -> float:
            return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    elif name == "constant":

        def factor(step: int) -> float:
            return 1.0
    elif name == "step":
        milestones = [max(1, math.floor(f * total)) for f in STEP_MILESTONES]

        def factor(step: int) -> float:
            return STEP_GAMMA ** sum(step >= m for m in milestones)
    else:
        raise ConfigError(f"lr_schedule must be 'cosine', 'constant' or 'step', got {name!r}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# -- one epoch, evaluation -----------------------------------------------------------------------
def to_device(inputs, device):
    """``inputs`` (a tensor, or a dict / tuple / list of tensors) on ``device``."""
    if isinstance(inputs, Tensor):
        return inputs.to(device, non_blocking=True)
    if isinstance(inputs, dict):
        return {k: to_device(v, device) for k, v in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(to_device(v, device) for v in inputs)
    return inputs


def _to(batch, device):
    x, y = batch
    return to_device(x, device), y.to(device, non_blocking=True)


def logits_of(model: nn.Module, inputs) -> Tensor:
    """The model's logits on ``inputs`` (a dict goes in as keyword arguments; a Hugging Face
    output gives its ``logits``)."""
    out = call(model, inputs)
    return getattr(out, "logits", out)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler=None,
    device: torch.device | str = "cpu",
    loss_fn: Callable = nn.functional.cross_entropy,
    on_batch: Callable[[int, float], None] | None = None,
    penalty: Callable[[], Tensor] | None = None,
    after_step: Callable[[dict], None] | None = None,
) -> dict:
    """One pass over ``loader``: mean training loss and accuracy (this rank's batches), the
    number of batches and seconds. ``scheduler`` steps after every batch.

    ``penalty()``, when given, is added to each batch's loss before the backward pass (a block
    pruner's regulariser, already weighted); the recorded loss is the task loss alone.
    ``after_step({"batch": n, "loss": ..., "accuracy": ...})`` runs after every optimiser step
    (a block pruner's step, experiment tracking)."""
    model.train()
    start = time.perf_counter()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = batches = 0
    for batch in loader:
        x, y = _to(batch, device)
        optimizer.zero_grad(set_to_none=True)
        out = logits_of(model, x)
        loss = loss_fn(out, y)
        (loss + penalty() if penalty is not None else loss).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        hits = (out.detach().argmax(1) == y).sum()
        loss_sum += loss.detach().double() * len(y)
        correct += hits
        seen += len(y)
        batches += 1
        if on_batch is not None:
            on_batch(batches, loss.detach().item())
        if after_step is not None:
            stats = {"loss": loss.detach().item(), "accuracy": hits.item() / max(len(y), 1)}
            after_step({"batch": batches, **stats})
    if not torch.isfinite(loss_sum):
        raise FloatingPointError(
            f"the training loss became {float(loss_sum)} in this epoch; lower the learning "
            "rate (lr) or check the data"
        )
    return {
        "loss": float(loss_sum) / max(seen, 1),
        "accuracy": float(correct) / max(seen, 1),
        "batches": batches,
        "seconds": time.perf_counter() - start,
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str = "cpu",
    loss_fn: Callable = nn.functional.cross_entropy,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> dict:
    """Accuracy and mean loss over ``loader`` in eval mode. ``reduce`` (an all-reduce sum over
    ranks) combines the per-rank sums when each rank evaluates a shard."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
        for batch in loader:
            x, y = _to(batch, device)
            out = logits_of(model, x)
            totals[0] += loss_fn(out, y, reduction="sum").double()
            totals[1] += (out.argmax(1) == y).sum()
            totals[2] += len(y)
    finally:
        for m, flag in flags:
            m.training = flag
    if reduce is not None:
        totals = reduce(totals)
    n = max(float(totals[2]), 1.0)
    return {"accuracy": float(totals[1]) / n, "loss": float(totals[0]) / n, "samples": int(n)}
