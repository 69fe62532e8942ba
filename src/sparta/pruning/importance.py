"""Importance criteria: how much each unit (filter, head, FFN neuron) of a coupled group matters.

A criterion maps every group of :func:`~sparta.pruning.groups.find_groups` to RAW scores, one
per unit (higher = more important; the pruner normalises per group and ranks globally), taken on
the adapted model (effective weights ``(W + delta) * M``) and summed over the group's members.
No criterion changes the model: data-driven ones run it in eval mode (no dropout, BatchNorm
statistics untouched), take gradients with ``torch.autograd.grad`` (no ``.grad`` is written),
and remove their hooks and restore every module's train/eval flag after each batch.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Callable, Iterable
from math import inf
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..adapters.layer import AdaptedLayer, TensorMemo
from ..errors import ConfigError
from ..inputs import check_nonempty, describe, tensors
from ..registry import Registry
from .checks import (
    check_entries,
    check_loss,
    check_outputs,
    check_weights,
    finite,
    guarded,
    run_loss,
    run_model,
)
from .groups import Group
from .lrp import lrp_copy as _lrp_copy
from .lrp import relevance_rules as _relevance_rules
from .lrp import true_class_start as _true_class_start
from .probes import _attached, _collect, _module, _probes, _scored_members, _scoring

_CRITERIA: Registry[Criterion] = Registry("criterion")


def register_criterion(name: str) -> Callable[[type[Criterion]], type[Criterion]]:
    """Class decorator that makes a :class:`Criterion` available by name."""
    return _CRITERIA.register(name)


def get_criterion(name: str) -> type[Criterion]:
    """The criterion class registered under ``name``; unknown names list the known ones."""
    return _CRITERIA.get(name)


def list_criteria() -> list[str]:
    return _CRITERIA.names()


class Criterion(metaclass=ABCMeta):
    """Scores the units of ``groups`` of ``model``.

    ``accumulate((inputs, targets), loss_fn)`` feeds a batch: ``inputs`` a tensor, a tuple
    (positional) or a dict (keyword, e.g. Hugging Face); ``loss_fn(outputs, targets)`` returns a
    scalar and gets ``outputs.logits`` where the model returns such an object. ``scores()`` maps
    every group name to a float32 CPU tensor of ``group.size`` raw scores.
    """

    name: ClassVar[str] = ""
    data_driven: ClassVar[bool] = False
    option_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module, groups: Iterable[Group], **options):
        if options:
            raise ConfigError(
                f"criterion {self.name!r} takes no option {sorted(options)[0]!r}; "
                f"its options are: {', '.join(self.option_names) or 'none'}"
            )
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected an nn.Module to score, got {type(model).__name__}")
        self.model, self.groups, self._batches = model, list(groups), 0

    @property
    def batches(self) -> int:
        """How many batches have been accumulated."""
        return self._batches

    def accumulate(self, batch, loss_fn: Callable) -> None:
        _split_batch(batch)  # weight-based criteria read no data but refuse malformed batches
        self._batches += 1

    def check_weights(self) -> None:
        """Raise :class:`~sparta.NonFiniteError` naming any NaN/inf parameter or buffer of
        the scored modules (their base weights, adapters, norms)."""
        read = {m.module for g in self.groups for m in g.members}
        check_weights(self.model, read, f"criterion {self.name!r}")

    @abstractmethod
    def scores(self) -> dict[str, Tensor]:
        """Raw importance per group: a float vector of ``group.size`` (higher = keep)."""


# -- weights -------------------------------------------------------------------------------------
class _Magnitude(Criterion):
    power: ClassVar[int] = 1

    def scores(self) -> dict[str, Tensor]:
        self.check_weights()  # a NaN weight would rank at random
        out = {}
        for g in self.groups:
            total = torch.zeros(g.size)
            for m in g.outputs():
                rows = _effective_rows(_module(self.model, m.module), m.site, m.idxs)
                rows = rows.abs() if self.power == 1 else rows.abs().pow(self.power)
                total.index_add_(0, m.units, rows.sum(1))
            # l2: squares of every row producing the unit (all members), then one root
            out[g.name] = total if self.power == 1 else total.sqrt()
        return out


@register_criterion("l1")
class L1(_Magnitude):
    """Sum of the L1 norms of the effective weight rows producing a unit."""


@register_criterion("l2")
class L2(_Magnitude):
    """L2 norm of the effective weight rows producing a unit."""

    power = 2


def _effective_rows(module: nn.Module, site: str, idxs: Tensor) -> Tensor:
    """Rows ``idxs`` of the effective weight producing ``site``, flattened, float32 on the CPU.
    Parametrised weights (attention adapters, channel masks) read as their effective value."""
    with torch.no_grad():
        if site in ("q", "k", "v"):
            weight, e = module.in_proj_weight, module.embed_dim
            if weight is None:  # separate q/k/v weights (kdim/vdim != embed_dim)
                weight = getattr(module, f"{site}_proj_weight")
            else:  # rows 0..E-1 are q, E..2E-1 k, 2E..3E-1 v
                weight = weight["qkv".index(site) * e :][:e]
        elif isinstance(module, AdaptedLayer):
            weight = module.fused_weight()[0]
        else:
            weight = module.weight  # norms: a 1-D weight, one "row" per channel
        rows = weight.reshape(weight.shape[0], -1)
        if len(idxs) != len(rows) or not bool((idxs.cpu() == torch.arange(len(rows))).all()):
            rows = rows[idxs.to(weight.device)]  # else all rows in order (the usual case)
        return rows.float().cpu()  # may be a view of the weight: callers never write to it


@register_criterion("random")
class Random(Criterion):
    """Uniform random scores, seeded by ``seed``: the baseline informed criteria must beat."""

    option_names = ("seed",)

    def __init__(self, model: nn.Module, groups: Iterable[Group], seed: int = 0, **options):
        super().__init__(model, groups, **options)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"random criterion: seed must be an integer, got {seed!r}")
        self.seed = seed

    def scores(self) -> dict[str, Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        return {g.name: torch.rand(g.size, generator=gen) for g in self.groups}


# -- activations ---------------------------------------------------------------------------------
class _Attribution(Criterion):
    """Per batch and member: a per-channel ``quantity`` (``a * dL/da`` or ``dL/da``) summed over
    batch and positions (divided by their number if ``mean``; made absolute per channel if
    ``abs_entries``), summed per unit, made absolute. Batches add up."""

    data_driven = True
    quantity: ClassVar[str] = "gradient"
    mean: ClassVar[bool] = True
    abs_entries: ClassVar[bool] = False

    def __init__(self, model: nn.Module, groups: Iterable[Group], **options):
        super().__init__(model, groups, **options)
        self._totals = {g.name: torch.zeros(g.size) for g in self.groups}

    def accumulate(self, batch, loss_fn: Callable) -> None:
        inputs, targets = _split_batch(batch)
        check_nonempty(inputs, f"the inputs of scoring batch {self._batches + 1}")
        with _scoring(self.model):
            entries = self._entries(inputs, targets, loss_fn)
        check_entries(entries, self.name, self._batches + 1)  # before anything is added up
        for g in self.groups:
            for m in _scored_members(g):
                entry = entries.get((m.module, m.site))
                if entry is not None:  # None: the module did not run
                    entry = entry.abs() if self.abs_entries else entry
                    units = torch.zeros(g.size).index_add_(0, m.units, entry[m.idxs])
                    self._totals[g.name] += units.abs()
        self._batches += 1

    def scores(self) -> dict[str, Tensor]:
        if not self._batches:
            raise ConfigError(
                f"criterion {self.name!r} is data-driven and has seen no batch: call "
                "Pruner.score(batches, loss_fn) (or accumulate((inputs, targets), loss_fn)) "
                "with at least one batch before pruning"
            )
        return {name: total.clone() for name, total in self._totals.items()}

    def _entries(self, inputs, targets, loss_fn) -> dict[tuple[str, str], Tensor]:
        probes = _probes(self.model, self.groups, split_attention=False)
        with _attached(probes):
            # cached: each parametrised weight is built once per forward, so the out_proj
            # weight an attention probe catches is the one the forward used
            batch = self._batches + 1
            with parametrize.cached():
                outputs = run_model(self.model, inputs, batch)
            loss = run_loss(loss_fn, _logits(outputs), targets, batch)
            if isinstance(loss, Tensor) and not finite(loss):
                self.check_weights()  # a diverged weight is the cause to name, if there is one
            loss = check_loss(loss, self.name, batch)
            return _collect(probes, loss, None, self.quantity, self.mean)


@register_criterion("gradient")
class Gradient(_Attribution):
    """``|mean over batch and positions of dL/da_c|`` per channel ``c``, summed over batches."""

    abs_entries = True


@register_criterion("taylor")
class Taylor(_Attribution):
    """First-order Taylor (Molchanov et al. 2017): ``|mean over batch and positions of
    a_c dL/da_c|``, summed over batches. A head sums its context channels before ``| |``: the
    first-order loss change of zeroing the whole head (Michel et al. 2019)."""

    quantity = "taylor"


@register_criterion("lrp")
class LRP(_Attribution):
    """Layer-wise relevance propagation (Yeom et al. 2021): ``|sum over batch and positions of
    the relevance R_c|`` at each channel's activation, summed over batches; ``loss_fn`` is not
    used (relevance starts at the true class). Runs our LRP rules on ``sparta.fuse(model)`` (plain
    layers, same names and function; cached while the model is unchanged)."""

    mean = False  # the gradient of the rule-modified graph at a tensor IS its relevance
    option_names = ("epsilon",)

    def __init__(self, model: nn.Module, groups: Iterable[Group], epsilon: float = 0.25, **options):
        super().__init__(model, groups, **options)
        number = isinstance(epsilon, int | float) and not isinstance(epsilon, bool)
        if not (number and 0 < epsilon < inf):
            raise ConfigError(
                f"lrp criterion: epsilon must be a finite number > 0, got {epsilon!r}"
            )
        self.epsilon, self._plain = float(epsilon), TensorMemo()

    def _entries(self, inputs, targets, loss_fn) -> dict[tuple[str, str], Tensor]:
        state = [*self.model.parameters(), *self.model.buffers()]
        batch = self._batches + 1
        what = f"the model failed on scoring batch {batch} (inputs {describe(inputs)})"
        plain = guarded(lambda: self._plain.get(state, lambda: _lrp_copy(self.model, inputs)), what)
        probes = _probes(plain, self.groups, split_attention=True)
        with _attached(probes), _relevance_rules(plain, self.epsilon) as hooked:
            logits = _logits(run_model(hooked, inputs, batch))
            if not all(finite(t) for t in tensors(logits)):
                self.check_weights()
            check_outputs(logits, self.name, batch)
            start = _true_class_start(logits, targets)
            return _collect(probes, logits, start, self.quantity, self.mean)


# -- helpers -------------------------------------------------------------------------------------
def _split_batch(batch) -> tuple:
    if not isinstance(batch, tuple | list) or len(batch) != 2:
        size = f" of length {len(batch)}" if isinstance(batch, tuple | list) else ""
        raise ConfigError(
            f"a batch must be a pair (inputs, targets), got {type(batch).__name__}{size}; "
            "score() takes an iterable of such pairs: for one batch, pass [(inputs, targets)]"
        )
    return batch[0], batch[1]


def _logits(outputs):
    """``outputs.logits`` for Hugging Face model outputs, else the outputs themselves."""
    return getattr(outputs, "logits", outputs)
