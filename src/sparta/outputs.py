"""Model outputs of any structure, compared: what :func:`sparta.deploy` checks a runtime with.

An output is a tensor or a (nested) tuple, list or dict of tensors; a Hugging Face style output
(an object with a ``logits`` tensor) stands for its logits.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

RTOL = 1e-4  # float32; lower precisions get a few of their own ulps (see tolerance)


def hf_logits(out) -> Tensor | None:
    """The ``logits`` of a Hugging Face style output; ``None`` for anything else."""
    logits = getattr(out, "logits", None)
    return logits if not isinstance(out, Tensor) and isinstance(logits, Tensor) else None


def pick(out):
    """``out``, or its logits when it is a Hugging Face style output."""
    logits = hf_logits(out)
    return out if logits is None else logits


def difference(got, want) -> float:
    """Largest difference of ``got`` from ``want`` (outputs of any structure) relative to the
    largest finite entry of ``want``; infinite when their structures differ or an entry
    differs infinitely (NaN where ``want`` has a number, or a number where it has NaN)."""
    got, want = pytree.tree_leaves(pick(got)), pytree.tree_leaves(pick(want))
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        return float("inf")
    diff = max((_absmax(g, w) for g, w in zip(got, want) if w.numel()), default=0.0)
    if diff == float("inf"):
        return diff
    scale = max((_finite_absmax(w) for w in want if w.numel()), default=0.0)
    return diff / (scale + 1e-12)


def _absmax(a: Tensor, b: Tensor) -> float:
    """Largest ``|a - b|``, where equal entries (infinities too) and NaN in both count as 0 and
    NaN in one only as infinite."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    d = (a - b).abs().masked_fill((a == b) | (a.isnan() & b.isnan()), 0.0)
    return d.nan_to_num(nan=float("inf"), posinf=float("inf")).max().item()


def _finite_absmax(a: Tensor) -> float:
    a = a.detach().float().cpu().abs()
    return a.masked_fill(~a.isfinite(), 0.0).max().item()


def tolerance_of(want) -> float:
    """The relative difference :func:`difference` may show for outputs like ``want``: ``RTOL``
    for float32, a few ulps of a lower precision."""
    leaves = pytree.tree_leaves(pick(want))
    return max((tolerance(w.dtype) for w in leaves), default=RTOL)


def tolerance(dtype: torch.dtype) -> float:
    return max(RTOL, 8 * torch.finfo(dtype).eps) if dtype.is_floating_point else RTOL
