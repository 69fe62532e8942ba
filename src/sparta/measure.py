"""Counting what a task learns, the way the paper does (design.md, "parameter accounting").

Per adapted layer: the adapter's parameters that still reach the output under the masks
(SPLoRA r * (kept in + kept out), SPPaRA kept in x kept out), plus the kept entries of the
layer's bias; every other trainable tensor (norm affine parameters, the head, anything the
user unfroze) counts in full. Frozen tensors are the shared base and count nothing.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from .adapters.attention import AdaptedWeight, MaskedBias
from .adapters.layer import AdaptedLayer


def learned_parameters(model: nn.Module) -> int:
    """Number of parameters the task learns (trainable ones, restricted to kept channels)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"learned_parameters expects a torch.nn.Module, got {type(model).__name__}")
    counted: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, AdaptedLayer):
            if _trainable(module.adapter):
                total += module.adapter.num_learned()
            bias = module.base.bias
            if bias is not None and bias.requires_grad:
                total += int(module.mask_out.sum())
            counted.update(id(p) for p in module.parameters())
        elif parametrize.is_parametrized(module):
            for plist in module.parametrizations.values():
                for fn in plist:
                    if isinstance(fn, AdaptedWeight) and _trainable(fn):
                        total += fn.num_learned()
                    elif isinstance(fn, MaskedBias) and plist.original.requires_grad:
                        total += fn.num_kept()
                counted.update(id(p) for p in plist.parameters())
    for p in model.parameters():
        if p.requires_grad and id(p) not in counted:
            total += p.numel()
    return total


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())
