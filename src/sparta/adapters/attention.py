"""Adapters for ``nn.MultiheadAttention`` through ``torch.nn.utils.parametrize``.

``MultiheadAttention.forward`` reads its projection weights as attributes rather than calling
sub-modules, so instead of copying that forward we parametrise the attributes: reading
``in_proj_weight`` (or ``q/k/v_proj_weight``) and ``out_proj.weight`` returns the frozen weight
plus the masked delta, one adapter per projection (q, k, v and output, as in LoRA). Biases are
masked the same way. ``sparta.fuse`` bakes the parametrisations into plain tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .base import Adapter
from .delta_fn import autocast_off
from .layer import TensorMemo


class AdaptedWeight(nn.Module):
    """Parametrisation ``W -> (W + delta) * M`` for adapters stacked along the output rows."""

    def __init__(self, adapters: dict[str, Adapter]):
        super().__init__()
        self.adapters = nn.ModuleDict(adapters)
        self._memo = TensorMemo()

    def _compute(self, weight: Tensor) -> Tensor:
        rows = weight.split([a.out_features for a in self.adapters.values()])
        with autocast_off(weight.device):  # the weight's dtype; attention's own ops cast it
            return _cat(
                [(w + a.delta()) * a.mask_matrix() for w, a in zip(rows, self.adapters.values())]
            )

    def forward(self, weight: Tensor) -> Tensor:
        if _needs_grad(self.adapters.parameters()):
            return self._compute(weight)
        keys = [weight, *self.adapters.parameters(), *self.adapters.buffers()]
        return self._memo.get(keys, lambda: self._compute(weight))

    def num_learned(self) -> int:
        return sum(a.num_learned() for a in self.adapters.values())


class MaskedBias(nn.Module):
    """Parametrisation ``b -> b * mask_out`` using the masks of :class:`AdaptedWeight` s.

    The weight parametrisations are held in a plain list so that their adapters are not
    registered (and saved) twice.
    """

    def __init__(self, weights: list[AdaptedWeight]):
        super().__init__()
        self._weights = list(weights)

    def mask(self) -> Tensor:
        return _cat([a.mask_out for w in self._weights for a in w.adapters.values()])

    def forward(self, bias: Tensor) -> Tensor:
        return bias * self.mask()

    def num_kept(self) -> int:
        return int(self.mask().count_nonzero())


def _cat(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _needs_grad(params) -> bool:
    return torch.is_grad_enabled() and any(p.requires_grad for p in params)


def adapt_attention(
    mha: nn.MultiheadAttention, make: Callable[[int, int], Adapter]
) -> list[AdaptedWeight]:
    """Parametrise ``mha`` in place; ``make(out, in)`` builds one adapter. Returns the weights."""
    like = mha.out_proj.weight  # adapters (and masks) take the projections' device and dtype

    def new(out: int, inp: int) -> Adapter:
        return make(out, inp).to(like.device, like.dtype)

    e = mha.embed_dim
    added: list[tuple[nn.Module, str, AdaptedWeight]] = []
    if mha.in_proj_weight is not None:  # q, k, v stacked in one (3E, E) tensor
        added.append((mha, "in_proj_weight", AdaptedWeight({n: new(e, e) for n in "qkv"})))
    else:
        for n, dim in zip("qkv", (e, mha.kdim, mha.vdim)):
            added.append((mha, f"{n}_proj_weight", AdaptedWeight({n: new(e, dim)})))
    added.append((mha.out_proj, "weight", AdaptedWeight({"out": new(e, e)})))
    for module, attr, weight in added:
        getattr(module, attr).requires_grad_(False)
        parametrize.register_parametrization(module, attr, weight, unsafe=True)
    weights = [w for _, _, w in added]
    if mha.in_proj_bias is not None:
        parametrize.register_parametrization(mha, "in_proj_bias", MaskedBias(weights[:-1]))
    if mha.out_proj.bias is not None:
        parametrize.register_parametrization(mha.out_proj, "bias", MaskedBias(weights[-1:]))
    return weights
