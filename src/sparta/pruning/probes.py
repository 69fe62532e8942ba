"""Probes for the data-driven criteria: where a unit's activation is read, and how.

A probe records the tensors a scored (module, site) produces or takes during one forward pass;
:func:`_collect` takes the gradient of the loss (or of the relevance start, for LRP) at all of
them at once and reduces each to one value per channel. Nothing here changes the model: hooks
are removed and every module's train/eval flag is restored after each batch.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from ..adapters.layer import AdaptedLayer
from ..errors import ConfigError
from ..masks import NORMS
from .groups import Group


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
            acc = _accumulator(a.dtype)
            if g is None:  # this tensor did not reach the loss
                q = a.new_zeros(width, dtype=acc)
            else:
                q = a.detach() * g if quantity == "taylor" else g
                # sum over every other dim in place (a movedim + reshape copies transposed)
                q = q.sum(dim=[d for d in range(q.dim()) if d != self.dim % q.dim()], dtype=acc)
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
        acc = _accumulator(weight.dtype)
        total, n = weight.new_zeros(weight.shape[1], dtype=acc), len(self.weights)
        if quantity == "taylor":
            for w, g in zip(self.weights, grads[:n]):
                if g is not None:  # a read the forward did not use has no gradient
                    total += (w.detach() * g).sum(0, dtype=acc)
        else:
            for g in grads[n:]:
                if g is not None:
                    total += g.reshape(-1, g.shape[-1]).sum(0, dtype=acc) @ weight.to(acc)
        return total, self.positions


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    """Scores add up in float32 at least: a bf16 model's (or autocast's) sums would round."""
    return torch.promote_types(dtype, torch.float32)


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


def _module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ConfigError(
            f"group member {name!r} is not a module of this model; were the groups found on "
            "another model?"
        ) from None
