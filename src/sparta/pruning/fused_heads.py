"""Attention with one fused q/k/v projection (timm ``Attention`` and alike): heads as units.

Such a module holds ``qkv`` (a Linear whose outputs are q, k and v, each ``num_heads *
head_dim`` wide), ``proj`` (the Linear reading the heads' concatenated outputs) and the
attributes ``num_heads`` and ``head_dim`` its forward reshapes by. A unit is one head: its rows
in q, k and v and its columns of ``proj``; the compact model slices them and lowers
``num_heads`` (and ``attn_dim`` where the module has one).

Whether that is exact depends on the module's forward, which sparta does not read. So it is
proven once per module, numerically, before any head can be pruned: a plain copy with one head
zeroed must compute what the copy with that head sliced out computes. A module that fails the
proof (its forward needs more per-head state, such as a relative position bias table, or
inputs of another shape) keeps its heads, with the reason in the notes.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..adapters.layer import AdaptedLayer
from ..wrapping import fuse


def is_fused_attention(module: nn.Module) -> bool:
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    heads, dim = getattr(module, "num_heads", None), getattr(module, "head_dim", None)
    if not (isinstance(heads, int) and isinstance(dim, int) and heads > 1 and dim > 0):
        return False
    return _linear(qkv) is not None and _linear(proj) is not None


def fused_heads(name: str, module: nn.Module, group_cls, member_cls):
    """The heads group of ``module`` (named ``name``), or a note saying why it has none."""
    heads, dim = module.num_heads, module.head_dim
    width = heads * dim
    qkv, proj = _linear(module.qkv), _linear(module.proj)
    if qkv.out_features != 3 * width or proj.in_features != width:
        return (
            f"{name}: fused q/k/v attention whose widths (qkv {qkv.out_features}, proj "
            f"{proj.in_features}) are not 3 x and 1 x num_heads x head_dim; heads not pruned"
        )
    why = _disproof(module, heads, dim)
    if why:
        return f"{name}: fused q/k/v attention ({type(module).__name__}): {why}; heads not pruned"
    idxs = torch.arange(width)
    units = idxs // dim
    members = [
        member_cls(
            f"{name}.qkv", "out", torch.cat([idxs, idxs + width, idxs + 2 * width]), units.repeat(3)
        ),
        member_cls(f"{name}.proj", "in", idxs, units),
    ]
    return group_cls(name, "heads", heads, members)


def set_heads(attention: nn.Module, kept: int) -> None:
    """Update the attributes a fused attention's forward reshapes by."""
    attention.num_heads = kept
    if isinstance(getattr(attention, "attn_dim", None), int):
        attention.attn_dim = kept * attention.head_dim


def _disproof(module: nn.Module, heads: int, dim: int) -> str | None:
    """``None`` if removing head 0 of a plain copy equals zeroing it, else why not."""
    plain = fuse(module) if _wrapped(module) else copy.deepcopy(module)
    plain.eval()
    qkv, proj = plain.qkv, plain.proj
    width = heads * dim
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, qkv.in_features, generator=generator).to(qkv.weight)
    head = torch.arange(dim)
    rows = torch.cat([head, head + width, head + 2 * width])
    try:
        with torch.no_grad():
            zeroed = copy.deepcopy(plain)
            zeroed.qkv.weight[rows] = 0
            if zeroed.qkv.bias is not None:
                zeroed.qkv.bias[rows] = 0
            zeroed.proj.weight[:, head] = 0
            want = zeroed(x)
            keep_rows = torch.ones(3 * width, dtype=torch.bool)
            keep_rows[rows] = False
            keep_cols = torch.ones(width, dtype=torch.bool)
            keep_cols[head] = False
            _slice(qkv, 0, keep_rows.nonzero().flatten())
            _slice(proj, 1, keep_cols.nonzero().flatten())
            set_heads(plain, heads - 1)
            got = plain(x)
    except Exception as exc:  # the forward does not take this: not proven
        return f"its forward cannot be checked on a (batch, tokens, channels) input ({exc})"
    if not isinstance(want, torch.Tensor) or got.shape != want.shape:
        return "its output changes shape when a head is removed"
    scale = want.abs().max() + 1e-12
    if float((got - want).abs().max() / scale) > 1e-5:
        return "removing a head does not compute what zeroing it does"
    return None


def _slice(linear: nn.Linear, dim: int, keep: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.index_select(dim, keep), requires_grad=False)
    if dim == 0 and linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.index_select(0, keep), requires_grad=False)
    if dim == 0:
        linear.out_features = len(keep)
    else:
        linear.in_features = len(keep)


def _linear(module) -> nn.Linear | None:
    layer = module.base if isinstance(module, AdaptedLayer) else module
    return layer if isinstance(layer, nn.Linear) else None


def _wrapped(module: nn.Module) -> bool:
    return any(isinstance(m, AdaptedLayer) for m in module.modules())
