"""Block criteria for :class:`~sparta.pruning.BlockPruner`: how much each SPLoPA block matters.

A criterion scores every p x q block of the pruned layers (one flat vector over all of them,
higher = keep) and may act on the training path of each layer through ``SPLoPA.factors``
(reading the effective weight's gradient, or gating blocks). Registered by name; see
:mod:`sparta.pruning.blocks` for the method and the references.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..adapters.layer import AdaptedLayer
from ..adapters.splopa import SPLoPA
from ..errors import ConfigError
from ..registry import Registry
from .checks import all_zero, bad_count, finite, nonfinite

_BLOCK_CRITERIA: Registry[BlockCriterion] = Registry("block criterion")


def register_block_criterion(name: str) -> Callable[[type], type]:
    return _BLOCK_CRITERIA.register(name)


def list_block_criteria() -> list[str]:
    return _BLOCK_CRITERIA.names()


def get_block_criterion(name: str) -> type[BlockCriterion]:
    """The block criterion registered under ``name``; unknown names list the known ones."""
    return _BLOCK_CRITERIA.get(name)


@dataclass
class BlockLayer:
    """One SPLoPA-adapted Linear and where its blocks sit in the flat vector of all blocks."""

    name: str
    layer: AdaptedLayer
    offset: int  # index of its first block in the flat vector over all pruned layers

    @property
    def adapter(self) -> SPLoPA:
        return self.layer.adapter

    @property
    def count(self) -> int:
        return self.adapter.mask_block.numel()

    def per_block(self, matrix: Tensor) -> Tensor:
        """Sum of an (out x in) matrix over each block, flattened (rows * cols)."""
        (p, q), (rows, cols) = self.adapter.block, self.adapter.mask_block.shape
        return matrix.reshape(rows, p, cols, q).sum((1, 3)).flatten()

    def expand(self, per_block: Tensor) -> Tensor:
        """A (rows x cols) per-block tensor laid out like the weight."""
        (p, q), (rows, cols) = self.adapter.block, self.adapter.mask_block.shape
        return per_block.view(rows, 1, cols, 1).expand(rows, p, cols, q).reshape(rows * p, -1)

    def masked_base(self) -> Tensor:
        return self.layer.base.weight * self.adapter.mask_matrix()


class PrunerHook:
    """A pruner's hook on a model (``SPLoPA.factors_hook``, a forward pre-hook). A copy of the
    model (``copy.deepcopy``, ``torch.save``/``torch.load``) gets it inert: the copy is not
    pruned, and the model can be pickled whole while a pruner drives it. Inert, it returns
    argument ``passthrough`` (or None)."""

    def __init__(self, fn: Callable | None, passthrough: int | None = None):
        self.fn, self.passthrough = fn, passthrough

    def __call__(self, *args):
        if self.fn is not None:
            return self.fn(*args)
        return None if self.passthrough is None else args[self.passthrough]

    def __getstate__(self) -> dict:
        return {"fn": None, "passthrough": self.passthrough}


# -- criteria -----------------------------------------------------------------------------------
class BlockCriterion(ABC):
    """Scores every block of the pruned layers (one flat vector, higher = keep).

    ``hook(layer, masked)`` runs on the training path of each layer (``SPLoPA.factors``) when
    ``uses_hook``; ``closed()`` names blocks the criterion has switched off, which are pruned
    ahead of the schedule (never past the target); ``penalty(live)`` is a loss term.
    """

    name: ClassVar[str] = ""
    uses_hook: ClassVar[bool] = False
    normalise: ClassVar[bool] = False  # scale per layer (RMS) before a global ranking
    # Score a head / FFN neuron by the blocks that take its output only (its columns in the
    # attention output or FFN output layer), not by the rows that produce it.
    consumer_side: ClassVar[bool] = False
    options: ClassVar[dict] = {}
    positive: ClassVar[tuple[str, ...]] = ()  # options that must be > 0
    #: What the criterion's hooks read, for the message when it is NaN/inf.
    reads: ClassVar[str] = "the values it reads"

    def __init__(self, layers: list[BlockLayer], **options):
        unknown = set(options) - set(self.options)
        if unknown:
            raise ConfigError(
                f"block criterion {self.name!r} takes no option {sorted(unknown)[0]!r}; "
                f"its options are: {', '.join(self.options) or 'none'}"
            )
        for key, value in options.items():
            number = isinstance(value, int | float) and not isinstance(value, bool)
            low = key in self.positive
            if not (number and math.isfinite(value) and (value > 0 or not low)):
                raise ConfigError(
                    f"block criterion {self.name!r}: {key} must be a finite number"
                    f"{' > 0' if low else ''}, got {value!r}"
                )
        self.layers = layers
        self.total = sum(lay.count for lay in layers)
        self.device = layers[0].layer.base.weight.device
        # per layer: [non-finite entries, entries] the hooks met (and dropped) since the last
        # step, kept as device tensors: a hook never waits for the device
        self.bad: dict[str, list] = {}
        for key, default in self.options.items():
            setattr(self, key, options.get(key, default))

    @abstractmethod
    def scores(self) -> Tensor:
        """One score per block of every layer (higher = keep)."""

    def hook(self, lay: BlockLayer, masked: Tensor) -> Tensor:
        return masked

    def closed(self) -> Tensor | None:
        return None

    def penalty(self, live: Tensor) -> Tensor:
        return torch.zeros((), device=self.device)

    def update(self) -> None:
        """Called by every ``BlockPruner.step`` before pruning (nothing to do by default)."""
        return None

    def check(self) -> None:
        """Called by every ``BlockPruner.step`` before :meth:`update`: raise
        :class:`~sparta.NonFiniteError` if the hooks met NaN/inf since the last step (they
        dropped those values, so a caller that skips such a batch may go on)."""
        bad, self.bad = self.bad, {}
        if all_zero(n for n, _ in bad.values()):  # one host sync per device
            return
        nonfinite(
            f"block criterion {self.name!r}: {self.reads} since the last step",
            [f"{k!r} ({int(n)} NaN or inf of {t})" for k, (n, t) in bad.items() if int(n)],
            "They were not added to the scores and no mask was changed.",
        )

    def _screen(self, name: str, values: Tensor) -> Tensor:
        """Whether every entry of ``values`` is finite, as a 0-d bool tensor (no host sync: a
        hook never waits for the device); non-finite entries are counted for :meth:`check`."""
        bad = (~torch.isfinite(values)).sum()
        count = self.bad.setdefault(name, [0, 0])
        count[0], count[1] = bad + count[0], count[1] + values.numel()
        return bad == 0

    def parameters(self) -> list[nn.Parameter]:
        return []

    def attach(self) -> None:
        """Called once by the pruner: install whatever the criterion reads besides ``hook``."""
        return None

    def release(self) -> None:
        """Called when the pruner detaches: remove what ``attach`` installed."""
        return None


@register_block_criterion("magnitude")
class Magnitude(BlockCriterion):
    """Frobenius norm of each block of ``W + delta``."""

    normalise = True

    def scores(self) -> Tensor:
        with torch.no_grad():
            parts = [
                lay.per_block((lay.layer.base.weight + lay.adapter.delta()).square()).sqrt()
                for lay in self.layers
            ]
        return torch.cat(parts).double().cpu()


@register_block_criterion("activation")
class Activation(BlockCriterion):
    """Output energy of each block on the data seen: ``sqrt(sum_block W'_ij^2 E[x_j^2])`` with
    ``W' = W + delta`` and ``E[x_j^2]`` the mean square of input feature ``j`` over every token
    of the forward passes run with gradients enabled (Wanda, Sun et al. 2023, summed per block).

    Needs no gradient, so it ranks well from the first step of a distillation, where the
    student starts equal to its teacher and every gradient (movement's signal) is zero. A head
    or FFN neuron is scored by what it passes on: the energy of its columns in the layer that
    takes its output (attention output, FFN output), not by the rows that compute it.
    """

    normalise = True
    consumer_side = True
    reads = "the inputs of the pruned layers"

    def __init__(self, layers, **options):
        super().__init__(layers, **options)
        self.energy = [
            torch.zeros(lay.layer.base.weight.shape[1], device=self.device) for lay in layers
        ]
        self.tokens = [torch.zeros((), device=self.device) for _ in layers]
        self._handles: list = []

    def attach(self) -> None:
        for i, lay in enumerate(self.layers):
            hook = PrunerHook(self._recorder(i))
            self._handles.append(lay.layer.register_forward_pre_hook(hook))

    def release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _recorder(self, i: int):
        def record(module: nn.Module, args: tuple) -> None:
            if torch.is_grad_enabled() and args and isinstance(args[0], Tensor):
                x = args[0].detach()
                x = x.reshape(-1, x.shape[-1])
                energy = x.float().square().sum(0)  # float32: any device
                ok = self._screen(self.layers[i].name, x)  # NaN/inf inputs are dropped
                self.energy[i] += torch.where(ok, energy, 0.0)
                self.tokens[i] += ok * x.shape[0]

        return record

    def scores(self) -> Tensor:
        parts = []
        with torch.no_grad():
            for lay, energy, n in zip(self.layers, self.energy, self.tokens, strict=True):
                weight = (lay.layer.base.weight + lay.adapter.delta()).double()
                mean = energy.double() / n.double().clamp(min=1)
                parts.append(lay.per_block(weight.square() * mean).sqrt())
        return torch.cat(parts).cpu()


@register_block_criterion("movement")
class Movement(BlockCriterion):
    """First-order movement: ``S -= sum_block W' * dL/dW'`` at every backward pass."""

    uses_hook = True
    reads = "the gradients of the pruned weights"

    def __init__(self, layers, **options):
        super().__init__(layers, **options)
        self.accumulated = torch.zeros(self.total, device=self.device)

    def hook(self, lay: BlockLayer, masked: Tensor) -> Tensor:
        if masked.requires_grad:
            value = masked.detach()

            def accumulate(grad: Tensor) -> None:
                # dL/d(masked delta) is dL/dW' on the Linear path; W' = masked W + masked delta
                weight = lay.masked_base() + value
                product = weight * grad
                ok = self._screen(lay.name, product)  # dropped if NaN/inf: not poisoning all
                moved = torch.where(ok, lay.per_block(product), 0.0)
                self.accumulated[lay.offset : lay.offset + lay.count] -= moved

            masked.register_hook(accumulate)
        return masked

    def scores(self) -> Tensor:
        return self.accumulated.double().cpu()


class _Gated(BlockCriterion):
    """Learned per-block values that gate the weight on the training path."""

    uses_hook = True

    def __init__(self, layers, **options):
        super().__init__(layers, **options)
        self.value = nn.Parameter(torch.full((self.total,), float(self.init), device=self.device))
        self.optimizer = torch.optim.Adam([self.value], lr=self.lr)

    @abstractmethod
    def gate(self, lay: BlockLayer) -> Tensor:
        """The gate of each block of ``lay`` on the training path."""

    def hook(self, lay: BlockLayer, masked: Tensor) -> Tensor:
        # W' = (W m + delta m) * z  is  W m + [delta m * z + W m * (z - 1)]: the gate rides on
        # the delta term, so the layer's single fused product stays as it is.
        z = lay.expand(self.gate(lay).to(masked.dtype))
        return masked * z + lay.masked_base() * (z - 1)

    def update(self) -> None:
        if self.value.grad is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def check(self) -> None:
        super().check()
        grad = self.value.grad
        if grad is not None and not finite(grad):
            self.value.grad = None  # dropped: the scores learn nothing from this step
            parts = [(lay, grad[lay.offset : lay.offset + lay.count]) for lay in self.layers]
            nonfinite(
                f"block criterion {self.name!r}: the gradients of its learned scores",
                [f"{lay.name!r} ({bad_count(g)})" for lay, g in parts if not finite(g)],
                "They were dropped and no mask was changed.",
            )

    def scores(self) -> Tensor:
        return self.value.detach().double().cpu()

    def parameters(self) -> list[nn.Parameter]:
        return [self.value]

    def _part(self, lay: BlockLayer) -> Tensor:
        return self.value[lay.offset : lay.offset + lay.count]


@register_block_criterion("soft-movement")
class SoftMovement(_Gated):
    """Scores ``S`` (start ``init``) gate blocks by ``1[S > threshold]`` with a
    straight-through gradient ``dL/dS = sum_block W' * dL/dW'`` (Sanh et al. 2020)."""

    options: ClassVar[dict] = {"threshold": 0.0, "init": 1.0, "lr": 1e-2}
    positive = ("lr",)

    def gate(self, lay: BlockLayer) -> Tensor:
        s = self._part(lay)
        return (s > self.threshold).to(s.dtype) + s - s.detach()

    def closed(self) -> Tensor:
        return (self.value.detach() <= self.threshold).cpu()

    def penalty(self, live: Tensor) -> Tensor:
        return _mean_live(torch.sigmoid(self.value), live)


@register_block_criterion("l0")
class HardConcrete(_Gated):
    """Hard-concrete gates ``z = clamp(sigmoid((logit u + log_alpha) / beta) (zeta - gamma)
    + gamma, 0, 1)`` per block (Louizos et al. 2018), sampled in training, deterministic in
    eval (``u = 1/2``); the score is ``log_alpha``."""

    options: ClassVar[dict] = {"init": 3.0, "lr": 1e-2, "beta": 2 / 3}
    positive = ("lr", "beta")
    gamma, zeta = -0.1, 1.1

    def _stretch(self, s: Tensor) -> Tensor:
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0, 1)

    def gate(self, lay: BlockLayer) -> Tensor:
        log_alpha = self._part(lay)
        if not lay.layer.training:
            return self._stretch(torch.sigmoid(log_alpha))
        u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
        return self._stretch(torch.sigmoid((u.log() - (-u).log1p() + log_alpha) / self.beta))

    def closed(self) -> Tensor:
        return (self._stretch(torch.sigmoid(self.value.detach())) <= 0).cpu()

    def penalty(self, live: Tensor) -> Tensor:
        shift = self.beta * math.log(-self.gamma / self.zeta)
        return _mean_live(torch.sigmoid(self.value - shift), live)


def _mean_live(values: Tensor, live: Tensor) -> Tensor:
    live = live.to(values.device)
    return values[live].mean() if bool(live.any()) else values.sum() * 0
