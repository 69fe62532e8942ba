"""The cuts of a plan, as tensor operations on one module: kept index sets decoded, which
widths a layer may be cut along, a tensor's kept rows/columns, a fused delta added at the
kernel's centre tap, and the width attributes of a cut layer. Used by :mod:`.plan_job`.
"""

from __future__ import annotations

import base64
import binascii

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from .manifest import ArtifactError


def decode_set(entry: list, path: str = "<task>") -> Tensor:
    """The kept indices (int64, sorted, unique, at least one) of a set from :func:`encode_set`."""
    width, text = entry
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != (width + 7) // 8:
        raise ArtifactError(f"task {path!r}: a kept-index set of the plan is not {width} bits")
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))
    if bits[width:].any() or not bits[:width].any():
        raise ArtifactError(
            f"task {path!r}: a kept-index set of the plan keeps nothing or has bits past its "
            f"width {width}"
        )
    return torch.from_numpy(np.flatnonzero(bits[:width]))


def _like_float(t: Tensor, like: Tensor) -> Tensor:
    """``t`` on ``like``'s device, and dtype if floating point (masks keep theirs)."""
    if t.is_floating_point():
        return _like(t, like)
    return t if t.device == like.device else t.to(like.device)


def _like(t: Tensor, like: Tensor | None) -> Tensor:
    """``t`` on ``like``'s device and dtype (itself when it already is)."""
    if like is None or (t.dtype == like.dtype and t.device == like.device):
        return t
    return t.to(like.device, like.dtype)


def _all_kept(adapter, rows: Tensor, cols: Tensor) -> bool:
    """Whether the channel masks keep the whole block (usually: the plan cut the rest), read
    from the two mask vectors instead of the block; adapters with more masks (blocks) say
    ``False`` and the block mask is built."""
    if tuple(adapter.mask_names) != ("mask_out", "mask_in"):
        return False
    return bool(adapter.mask_out[rows].all()) and bool(adapter.mask_in[cols].all())


# -- helpers ---------------------------------------------------------------------------------
def _is_layer(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, _ConvNd) and not module.transposed)


def _depthwise(module: nn.Module) -> bool:
    return (
        isinstance(module, _ConvNd)
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
    )


def _cut_widths(module) -> tuple[int, int | None] | None:
    """``(outputs, inputs or None)`` a plan may cut in ``module``; ``None``: not cut at all."""
    if isinstance(module, _ConvNd) and not module.transposed:
        return module.out_channels, module.in_channels if module.groups == 1 else None
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, _BatchNorm) and module.weight is not None:
        return module.num_features, None
    return None


def _check_groups(module: nn.Module, keep: Tensor | None, name: str, path: str) -> None:
    """A grouped convolution (not depthwise) keeps whole groups."""
    if keep is None or not isinstance(module, _ConvNd) or module.groups == 1 or _depthwise(module):
        return
    per = module.out_channels // module.groups
    counts = torch.bincount(keep // per, minlength=module.groups)
    if bool(((counts != 0) & (counts != per)).any()):
        raise ArtifactError(
            f"task {path!r}: the plan keeps part of a group of grouped convolution {name!r}"
        )


def _out_width(module: nn.Module) -> int | None:
    widths = _cut_widths(module)
    return None if widths is None else widths[0]


def _cut(value: Tensor, attr: str, width, out_keep, in_keep) -> Tensor:
    """A fresh copy of ``value`` with the kept entries: dim 0 of every per-channel tensor, and
    dim 1 of the weight (indices on ``value``'s device; no autograd: the build runs under
    ``no_grad``, so no copy is detached)."""
    fresh = False
    if out_keep is not None and value.dim() >= 1 and value.shape[0] == width:
        value, fresh = value.index_select(0, out_keep), True
    if in_keep is not None and attr == "weight":
        value, fresh = value.index_select(1, in_keep), True
    return value if fresh else value.clone()


def _take(value: Tensor, out_keep, in_keep) -> Tensor:
    """``value[out_keep][:, in_keep]`` (``None``: all; ``value`` itself when both are)."""
    if out_keep is not None:
        value = value.index_select(0, out_keep)
    if in_keep is not None:
        value = value.index_select(1, in_keep)
    return value


def _all(keep: Tensor | None, width: int, like: Tensor) -> Tensor:
    return torch.arange(width, device=like.device) if keep is None else keep


def _with_delta(weight: Tensor, delta: Tensor) -> Tensor:
    """``weight`` (a fresh tensor) plus ``delta`` at the kernel's centre tap, in place."""
    taps = weight.shape[2:]
    if not taps:
        weight.add_(delta)
    elif max(taps) == 1:
        weight.add_(delta.view(weight.shape))
    else:
        weight[(slice(None), slice(None), *(k // 2 for k in taps))].add_(delta)
    return weight


def _spread(mask: Tensor, like: Tensor) -> Tensor:
    return mask.reshape(*mask.shape, *([1] * (like.dim() - mask.dim())))


def _set_widths(module: nn.Module) -> None:
    """The width attributes of a cut layer, from its (cut) weight."""
    d = module.__dict__
    shape = module._parameters["weight"].shape
    if isinstance(module, _BatchNorm):
        d["num_features"] = shape[0]
    elif isinstance(module, nn.Linear):
        d["out_features"], d["in_features"] = shape[0], shape[1]
    elif d["groups"] == 1:
        d["out_channels"], d["in_channels"] = shape[0], shape[1]
    elif _depthwise(module):
        d["out_channels"] = d["in_channels"] = d["groups"] = shape[0]
    else:  # whole groups: fewer groups, the same width per group
        per_out, per_in = d["out_channels"] // d["groups"], d["in_channels"] // d["groups"]
        d["groups"] = shape[0] // per_out
        d["out_channels"], d["in_channels"] = shape[0], d["groups"] * per_in
