"""One pruning protocol for channels and blocks (the factory that picks a pruner is
:func:`sparta.pruning.factory.make_pruner`).

:class:`~sparta.pruning.Pruner` (coupled channels: filters, heads, FFN neurons, scored between
training phases) and :class:`~sparta.pruning.BlockPruner` (p x q blocks of SPLoPA adapters,
pruned as training goes) are driven the same way::

    pruner = sparta.make_pruner(model, example_inputs=x, criterion=..., target=...)
    while not pruner.done:
        pruner.score(batches, loss_fn)   # data-driven criteria; 0 where needs_scoring is False
        loss = task_loss + lam * pruner.penalty()   # a zero scalar where there is none
        ...
        record = pruner.step()
    pruner.achieved()  # {"density", "sparsity", "macs", "macs_abs", "learned", "learned_paper"}

What differs is when ``step()`` is called: a channel pruner's steps are few and far apart
(recovery training between them), a block pruner's follows every optimiser step. Callers that
schedule steps (the trainer callbacks of :mod:`sparta.integrations`) read ``granularity`` and
``total`` (how many ``step()`` calls the schedule spans).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import asdict
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..measure import learned_parameters

GRANULARITIES = ("channels", "blocks")

#: The keys of every pruner's :meth:`PrunerBase.achieved`.
ACHIEVED_KEYS = ("density", "sparsity", "macs", "macs_abs", "learned", "learned_paper")


class PrunerBase(ABC):
    """What every pruner offers (see the module docstring).

    ``granularity``: ``"channels"`` or ``"blocks"``. ``needs_scoring``: whether :meth:`score`
    must see batches before a step (a data-driven channel criterion); block criteria learn
    from the training batches themselves and their ``score`` returns 0. ``total``: how many
    ``step()`` calls the schedule spans. ``history``: one record per step taken.
    """

    granularity: ClassVar[str] = ""
    model: nn.Module
    history: list

    @property
    @abstractmethod
    def done(self) -> bool:
        """Every scheduled step has been taken."""

    @property
    @abstractmethod
    def needs_scoring(self) -> bool:
        """Whether :meth:`score` must see batches before each :meth:`step`."""

    @property
    @abstractmethod
    def total(self) -> int:
        """How many :meth:`step` calls the schedule spans."""

    @abstractmethod
    def score(self, batches: Iterable, loss_fn: Callable, progress: Callable | None = None) -> int:
        """Feed ``(inputs, targets)`` batches to a data-driven criterion; returns how many."""

    @abstractmethod
    def importance(self):
        """This process's raw scores (summed over ranks in a distributed run, then passed to
        ``step(scores)`` so that every rank decides alike)."""

    @abstractmethod
    def step(self, scores=None):
        """Take the next step of the schedule; returns its record."""

    @abstractmethod
    def achieved(self) -> dict:
        """Where the model stands now, under :data:`ACHIEVED_KEYS`."""

    def penalty(self) -> Tensor:
        """A loss term to add (``loss + lam * pruner.penalty()``): a zero scalar unless the
        criterion learns gates that a regulariser pushes shut."""
        return torch.zeros((), device=_device(self.model))

    def history_dicts(self) -> list[dict]:
        """:attr:`history` as plain dicts (JSON-ready)."""
        return [asdict(r) for r in self.history]

    def _learned(self) -> dict:
        return {
            "learned": learned_parameters(self.model),
            "learned_paper": learned_parameters(self.model, accounting="paper"),
        }


def _device(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def check_progress(progress) -> None:
    if progress is not None and not callable(progress):
        raise ConfigError(f"progress must be a function of the batch count, got {progress!r}")
