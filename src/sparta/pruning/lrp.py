"""Layer-wise relevance propagation (Yeom et al. 2021) for the ``lrp`` criterion.

Relevance is computed on ``sparta.fuse(model)`` (plain layers, same names, same function) under
the rules of :mod:`sparta.pruning.lrp_rules` (our own autograd functions, one modified backward
pass); zennit is the reference they are tested against.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..wrapping import fuse
from .lrp_rules import AMBIGUOUS_MODULES, RelevanceMode

__all__ = ["lrp_copy", "relevance_rules", "true_class_start"]


class _SplitAttention(nn.Module):
    """LRP copy only: ``mha`` with an identity output projection, then its real ``out_proj``
    as a module, so that a rule and a hook see the heads' contexts (exact: ``a I^T + 0 = a``).
    Inside the attention no rule applies (relevance flows through it as a gradient)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.out_proj, w = mha.out_proj, mha.out_proj.weight
        identity = nn.Linear(w.shape[1], w.shape[0], mha.out_proj.bias is not None, w.device)
        with torch.no_grad():
            identity.weight.copy_(torch.eye(w.shape[0]))
            if identity.bias is not None:
                identity.bias.zero_()
        mha.out_proj, self.attention = identity.to(w.dtype).requires_grad_(False), mha

    def forward(self, *args, **kwargs):
        context, weights = self.attention(*args, **kwargs)
        return self.out_proj(context), weights


def lrp_copy(model: nn.Module, inputs=None) -> nn.Module:
    """Plain layers with the model's names and function, in eval mode, needing no gradient
    (the rules return relevances, never weight gradients). ``inputs`` is not used (kept for
    callers of the zennit version, which ran the model to check its BatchNorm merges): the
    rules fold each BatchNorm into the layer it reads from, as the call order says."""
    plain = fuse(model).eval().requires_grad_(False)
    for name, m in list(plain.named_modules()):
        if isinstance(m, nn.MultiheadAttention) and name:
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent), child, _SplitAttention(m))
    return plain


def _track(inputs):
    """Floating inputs as leaves that need a gradient, so every activation is tracked."""
    if isinstance(inputs, Tensor):
        if inputs.requires_grad or not inputs.is_floating_point():
            return inputs  # the caller's own leaf (relevance at the input), or ids and masks
        return inputs.detach().requires_grad_()
    if isinstance(inputs, dict):
        return {k: _track(v) for k, v in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(_track(v) for v in inputs)
    return inputs


class _Ruled(nn.Module):
    """``model`` called under the rules, its floating inputs tracked."""

    def __init__(self, model: nn.Module, epsilon: float):
        super().__init__()
        self.model, self.epsilon = model, epsilon

    def forward(self, *args, **kwargs):
        mode = RelevanceMode(self.epsilon)
        handles = [
            m.register_forward_pre_hook(lambda *_: setattr(mode, "depth", mode.depth + 1))
            for m in self.model.modules()
            if isinstance(m, AMBIGUOUS_MODULES)
        ]
        handles += [
            m.register_forward_hook(lambda *_: setattr(mode, "depth", mode.depth - 1))
            for m in self.model.modules()
            if isinstance(m, AMBIGUOUS_MODULES)
        ]
        try:
            with mode, torch.enable_grad():
                return self.model(*_track(args), **_track(kwargs))
        finally:
            for h in handles:
                h.remove()


@contextmanager
def relevance_rules(model: nn.Module, epsilon: float = 0.25):
    """A module calling ``model`` under the LRP rules: the gradient of its output (started at
    the relevance of the output, e.g. ``one_hot(y) * z``) at any tensor of the forward is that
    tensor's relevance. ``model`` should be plain torch layers in eval mode (``sparta.fuse``)
    whose parameters need no gradient (a weight gradient would cost a backward of its own)."""
    yield _Ruled(model, epsilon)


def true_class_start(logits, targets) -> Tensor:
    """Relevance starts at the true class as ``one_hot(y) * |z_y|``: the standard ``one_hot(y)
    * z`` when ``z_y > 0`` (the usual case once trained); ``| |`` keeps a sample with a negative
    true-class logit from flipping the sign of all its relevances and cancelling others'."""
    ok = isinstance(logits, Tensor) and isinstance(targets, Tensor) and logits.dim() >= 1
    if not ok or targets.is_floating_point() or targets.shape != logits.shape[:-1]:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        want = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
        raise ConfigError(
            "lrp needs class scores (..., classes) and integer class targets (...); "
            f"got scores {got} and targets {want}"
        )
    onehot = F.one_hot(targets.long(), logits.shape[-1]).to(logits.dtype)
    return onehot * logits.detach().abs()
