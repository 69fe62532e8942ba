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
from contextlib import contextmanager
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from ..adapters.layer import AdaptedLayer, TensorMemo
from ..errors import ConfigError
from ..registry import Registry
from ..utils import call
from .groups import Group
from .lrp import composite as _composite
from .lrp import lrp_copy as _lrp_copy
from .lrp import true_class_start as _true_class_start
from .masks import NORMS

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

    @abstractmethod
    def scores(self) -> dict[str, Tensor]:
        """Raw importance per group: a float vector of ``group.size`` (higher = keep)."""


# -- weights -------------------------------------------------------------------------------------
class _Magnitude(Criterion):
    power: ClassVar[int] = 1

    def scores(self) -> dict[str, Tensor]:
        out = {}
        for g in self.groups:
            total = torch.zeros(g.size)
            for m in g.outputs():
                rows = _effective_rows(_module(self.model, m.module), m.site, m.idxs)
                total.index_add_(0, m.units, rows.abs().pow(self.power).sum(1))
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
        return weight.reshape(weight.shape[0], -1)[idxs.to(weight.device)].float().cpu()


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
        with _scoring(self.model):
            entries = self._entries(inputs, targets, loss_fn)
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
                f"criterion {self.name!r} is data-driven: call accumulate((inputs, targets), "
                "loss_fn) on at least one batch before scores()"
            )
        return {name: total.clone() for name, total in self._totals.items()}

    def _entries(self, inputs, targets, loss_fn) -> dict[tuple[str, str], Tensor]:
        probes = _probes(self.model, self.groups, split_attention=False)
        with _attached(probes):
            # cached: each parametrised weight is built once per forward, so the out_proj
            # weight an attention probe catches is the one the forward used
            with parametrize.cached():
                outputs = call(self.model, inputs)
            loss = loss_fn(_logits(outputs), targets)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                raise ConfigError(f"loss_fn must return a scalar tensor, got {got}")
            return _collect(probes, loss.reshape(()), None, self.quantity, self.mean)


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
    used (relevance starts at the true class). Runs zennit on ``sparta.fuse(model)`` (plain
    layers, same names and function; cached while the model is unchanged)."""

    mean = False  # in zennit, the gradient of the rule-modified graph at a tensor IS its relevance
    option_names = ("epsilon",)

    def __init__(self, model: nn.Module, groups: Iterable[Group], epsilon: float = 0.25, **options):
        super().__init__(model, groups, **options)
        if isinstance(epsilon, bool) or not isinstance(epsilon, int | float) or epsilon <= 0:
            raise ConfigError(f"lrp criterion: epsilon must be a number > 0, got {epsilon!r}")
        self.epsilon, self._plain = float(epsilon), TensorMemo()

    def _entries(self, inputs, targets, loss_fn) -> dict[tuple[str, str], Tensor]:
        state = [*self.model.parameters(), *self.model.buffers()]
        plain = self._plain.get(state, lambda: _lrp_copy(self.model, inputs))
        probes = _probes(plain, self.groups, split_attention=True)
        # probes first: their pre-hooks must see a layer's input before zennit wraps it, so the
        # gradient they read is the relevance that the layer's rule hands down
        with _attached(probes), _composite(self.epsilon).context(plain) as hooked:
            logits = _logits(call(hooked, inputs))
            start = _true_class_start(logits, targets)
            return _collect(probes, logits, start, self.quantity, self.mean)


def _scored_members(group: Group):
    """Members whose activations are read. A head is scored by its context (MHA site "o",
    Hugging Face ``output.dense`` site "in"): zeroing the context removes the head, zeroing its
    query or key rows only flattens its attention."""
    if group.kind == "heads":
        consumers = [m for m in group.members if m.site in ("o", "in")]
        if consumers:
            return consumers
    return group.outputs()


def _trackable(t):
    """``t``, or if autograd does not track it a leaf with the same values that it does
    (nothing upstream needs a gradient then, so the graph loses nothing)."""
    if isinstance(t, Tensor) and t.is_floating_point() and not t.requires_grad:
        return t.detach().requires_grad_()
    return t


def _channel_dim(module: nn.Module) -> int:
    base = module.base if isinstance(module, AdaptedLayer) else module
    if isinstance(base, _ConvNd | nn.modules.batchnorm._NormBase | nn.GroupNorm):
        return 1
    return -1  # Linear, LayerNorm, RMSNorm: features last


class _SiteProbe:
    """Records a module's output ("out") or first input ("in") at every call."""

    def __init__(self, module: nn.Module, site: str):
        self.module, self.site, self.dim, self.seen = module, site, _channel_dim(module), []

    def attach(self) -> list:
        if self.site == "out":
            return [self.module.register_forward_hook(self._on_output)]
        return [self.module.register_forward_pre_hook(self._on_input)]

    def _on_output(self, module, args, output):
        # the model gets a copy: in-place ops after the layer (ReLU(inplace=True), a residual
        # ``out += identity``) must not turn the captured tensor into a later one
        output = self._see(output)
        return output.clone() if isinstance(output, Tensor) else None

    def _see(self, t):
        t = _trackable(t)
        if isinstance(t, Tensor) and t.requires_grad:
            self.seen.append(t)
        return t

    def _on_input(self, module, args):
        return (self._see(args[0]), *args[1:]) if args else None

    def tensors(self) -> list[Tensor]:
        return self.seen

    def sums(self, grads, quantity: str) -> tuple[Tensor | None, int]:
        """Per channel, the quantity summed over batch and positions; and the positions."""
        total, count = None, 0
        for a, g in zip(self.seen, grads):
            width = a.shape[self.dim]
            count += a.numel() // width
            if g is None:  # this tensor did not reach the loss
                q = a.new_zeros(width)
            else:
                q = a.detach() * g if quantity == "taylor" else g
                # sum over every other dim in place (a movedim + reshape copies transposed)
                q = q.sum(dim=[d for d in range(q.dim()) if d != self.dim % q.dim()])
            total = q if total is None else total + q
        return total, count


class _AttentionProbe:
    """Head contexts ``a`` of ``nn.MultiheadAttention``, seen through ``out_proj``'s weight.

    The attention applies ``out_proj`` functionally, so no hook sees ``a``. With ``y = a W^T + b``
    over positions ``p``: ``dL/dW[r, c] = sum_p dL/dy[p, r] a[p, c]``, hence
    ``sum_r W[r, c] dL/dW[r, c] = sum_p a[p, c] dL/da[p, c]`` (Taylor) and
    ``sum_p dL/da[p, c] = sum_r W[r, c] sum_p dL/dy[p, r]`` (gradient). ``W`` is the effective
    weight the forward used, caught where its parametrisation is evaluated.
    """

    def __init__(self, mha: nn.MultiheadAttention):
        self.mha, self.weights, self.outputs, self.positions = mha, [], [], 0

    def attach(self) -> list:
        mha = self.mha
        handles = [
            mha.register_forward_pre_hook(self._count, with_kwargs=True),
            mha.register_forward_hook(self._on_output),
        ]
        if parametrize.is_parametrized(mha.out_proj, "weight"):
            chain = mha.out_proj.parametrizations["weight"]
            handles.append(chain.register_forward_hook(self._on_weight))
        else:  # a plain weight: tracked by autograd during this forward only
            weight = mha.out_proj.weight
            self.weights.append(weight)
            if not weight.requires_grad:
                handles.append(_Undo(lambda: weight.requires_grad_(False)))
                weight.requires_grad_(True)
        return handles

    def _count(self, module, args, kwargs):
        query = args[0] if args else kwargs["query"]
        self.positions += query.numel() // query.shape[-1]

    def _on_output(self, module, args, output):
        self.outputs.append(output[0])
        return (output[0].clone(), *output[1:])  # as in _SiteProbe: safe from in-place ops

    def _on_weight(self, module, args, weight):
        if not torch.is_grad_enabled():  # our own read in sums()
            return None
        self.weights.append(_trackable(weight))
        return self.weights[-1]

    def tensors(self) -> list[Tensor]:
        return [*self.weights, *(y for y in self.outputs if y.requires_grad)]

    def sums(self, grads, quantity: str) -> tuple[Tensor | None, int]:
        if not self.positions:
            return None, 0
        with torch.no_grad():
            weight = self.mha.out_proj.weight
        total, n = weight.new_zeros(weight.shape[1]), len(self.weights)
        if quantity == "taylor":
            for w, g in zip(self.weights, grads[:n]):
                if g is not None:  # a read the forward did not use has no gradient
                    total += (w.detach() * g).sum(0)
        else:
            for g in grads[n:]:
                if g is not None:
                    total += g.reshape(-1, g.shape[-1]).sum(0) @ weight
        return total, self.positions


class _Undo:
    def __init__(self, fn: Callable[[], object]):
        self.remove = fn


def _probes(model: nn.Module, groups: list[Group], split_attention: bool) -> dict:
    """One probe per scored (module, site); with ``split_attention`` (the LRP copy), an
    attention's contexts are the input of its ``out_proj`` module."""
    probes: dict[tuple[str, str], object] = {}
    for g in groups:
        members = _scored_members(g)
        if split_attention:
            # LRP passes relevance through norms unchanged (BatchNorm merged or Pass rule),
            # so a norm's output relevance repeats its producer's: read the layers only.
            layers = [m for m in members if not isinstance(_module(model, m.module), NORMS)]
            members = layers or members
        for m in members:
            key, module = (m.module, m.site), _module(model, m.module)
            if key in probes:
                continue
            if m.site == "o":
                probes[key] = (
                    _SiteProbe(_module(model, f"{m.module}.out_proj"), "in")
                    if split_attention
                    else _AttentionProbe(module)
                )
            elif m.site in ("out", "in"):
                probes[key] = _SiteProbe(module, m.site)
            else:
                raise ConfigError(
                    f"group {g.name!r}: cannot read activations at site {m.site!r} of "
                    f"{m.module!r}; data-driven criteria score heads through their contexts"
                )
    return probes


def _collect(probes: dict, root: Tensor, grad_root, quantity: str, mean: bool) -> dict:
    """Gradients of ``root`` at the probes' tensors, reduced to a CPU vector per site."""
    tensors = [t for p in probes.values() for t in p.tensors()]
    grads: list = [None] * len(tensors)
    if tensors and root.requires_grad:
        grads = list(torch.autograd.grad(root, tensors, grad_root, allow_unused=True))
    entries, start = {}, 0
    for key, probe in probes.items():
        n = len(probe.tensors())
        total, count = probe.sums(grads[start : start + n], quantity)
        start += n
        if total is not None:
            entries[key] = (total / max(count, 1) if mean else total).detach().float().cpu()
    return entries


@contextmanager
def _attached(probes: dict):
    handles: list = []
    try:
        for probe in probes.values():
            handles += probe.attach()
        yield
    finally:
        for handle in reversed(handles):
            handle.remove()


@contextmanager
def _scoring(model: nn.Module):
    """Eval mode with autograd on; every module's own train/eval flag is restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


# -- helpers -------------------------------------------------------------------------------------
def _split_batch(batch) -> tuple:
    if not isinstance(batch, tuple | list) or len(batch) != 2:
        size = f" of length {len(batch)}" if isinstance(batch, tuple | list) else ""
        raise ConfigError(
            f"a batch must be a pair (inputs, targets), got {type(batch).__name__}{size}"
        )
    return batch[0], batch[1]


def _logits(outputs):
    """``outputs.logits`` for Hugging Face model outputs, else the outputs themselves."""
    return getattr(outputs, "logits", outputs)


def _module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ConfigError(
            f"group member {name!r} is not a module of this model; were the groups found on "
            "another model?"
        ) from None
