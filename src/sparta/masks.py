"""Channel masks on every prunable layer: the only thing a pruning step edits.

Adapted layers carry their masks on the adapter (``adapter.mask_out`` / ``mask_in``). Plain
layers that take part in pruning (the head, norms, layers ``wrap`` skipped, and every layer of
a fine-pruned model) get them through a ``torch.nn.utils.parametrize`` parametrisation, so
their own ``forward`` runs unchanged on the masked tensors and the gradient of a masked entry is
zero: pruned channels cannot regrow.

What survives the masks is read here too: which units of a coupled group are alive
(:func:`alive_units`), how many weight entries of a layer are kept (:func:`kept_weights`), how
many q/k/v rows and output columns of an attention module (:func:`attention_kept`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from .adapters.attention import AdaptedWeight
from .adapters.base import grouped_mask, kept_entries
from .adapters.forms import mask_reason
from .adapters.layer import AdaptedLayer
from .errors import NotAdaptableError
from .utils import NORMS


class ChannelMask(nn.Module):
    """Parametrisation ``w -> w * mask``: rows by ``mask_out``, columns (per group) by ``mask_in``.

    One-dimensional tensors (norm affine parameters, biases) are masked by ``mask_out`` only.
    """

    def __init__(self, out_features: int, in_features: int = 0, groups: int = 1):
        super().__init__()
        self.groups = groups
        self.register_buffer("mask_out", torch.ones(out_features))
        self.register_buffer("mask_in", torch.ones(in_features) if in_features else None)

    def matrix(self) -> Tensor:
        return grouped_mask(self.mask_out, self.mask_in, self.groups)

    def forward(self, tensor: Tensor) -> Tensor:
        if tensor.dim() == 1 or self.mask_in is None:
            shape = (-1,) + (1,) * (tensor.dim() - 1)
            return tensor * self.mask_out.view(shape)
        matrix = self.matrix()
        return tensor * matrix.reshape(*matrix.shape, *([1] * (tensor.dim() - 2)))

    def kept(self, tensor_shape: torch.Size) -> int:
        """Entries of a tensor of this shape that survive the mask."""
        if len(tensor_shape) == 1 or self.mask_in is None:
            kept = int(self.mask_out.count_nonzero())  # exact in any dtype (bf16 sums are not)
            return kept * int(torch.Size(tensor_shape[1:]).numel())
        kept = kept_entries(self.mask_out, self.mask_in, self.groups)
        return kept * int(torch.Size(tensor_shape[2:]).numel())


class SharedMask(nn.Module):
    """Parametrisation of a second tensor (a bias) by the ``mask_out`` of another mask.

    The owner is held in a plain list so its buffers are registered (and saved) only once.
    """

    def __init__(self, owner: ChannelMask):
        super().__init__()
        self._owner = [owner]

    def forward(self, tensor: Tensor) -> Tensor:
        return tensor * self._owner[0].mask_out

    def kept(self, tensor_shape: torch.Size) -> int:
        return int(self._owner[0].mask_out.count_nonzero())


def ensure_masks(module: nn.Module, create: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """``(mask_out, mask_in)`` of a prunable layer, attaching a :class:`ChannelMask` if needed
    (``create=False``: ``(None, None)`` instead).

    Supports :class:`AdaptedLayer`, ``nn.Linear``, ``nn.ConvNd`` (not transposed) and norms
    with affine parameters (``mask_in`` is ``None`` for those).
    """
    if isinstance(module, AdaptedLayer):
        return module.adapter.mask_out, module.adapter.mask_in
    existing = channel_mask_of(module, "weight")
    if existing is not None:
        return existing.mask_out, existing.mask_in
    if not create:
        return None, None
    if isinstance(module, nn.Linear):
        mask = ChannelMask(module.out_features, module.in_features)
    elif isinstance(module, _ConvNd) and not module.transposed:
        mask = ChannelMask(module.out_channels, module.in_channels, module.groups)
    elif isinstance(module, NORMS) and getattr(module, "weight", None) is not None:
        if module.weight.dim() != 1:
            raise NotAdaptableError(
                f"cannot mask {type(module).__name__} with a {tuple(module.weight.shape)} weight"
            )
        mask = ChannelMask(module.weight.shape[0])
    else:
        raise NotAdaptableError(f"cannot mask channels of {type(module).__name__}")
    mask = mask.to(module.weight.device, module.weight.dtype)  # w * mask keeps w's dtype
    parametrize.register_parametrization(module, "weight", mask)
    if getattr(module, "bias", None) is not None:
        parametrize.register_parametrization(module, "bias", SharedMask(mask))
    return mask.mask_out, mask.mask_in


def can_mask(module: nn.Module) -> bool:
    if isinstance(module, AdaptedLayer):
        return True
    if isinstance(module, nn.Linear | _ConvNd):  # a subclass only if masking it is pruning
        return not getattr(module, "transposed", False) and mask_reason(module) is None
    return isinstance(module, NORMS) and getattr(module, "weight", None) is not None


def resolve_mask(model: nn.Module, module_name: str, site: str, create: bool = True):
    """The mask tensor (or a view of it) behind a group member's site; see ``pruning.coupled.SITES``.

    Plain layers get a mask attached on first use; ``create=False`` returns ``None`` instead.
    """
    module = submodule(model, module_name)
    if site in ("out", "in"):
        out, inp = ensure_masks(module, create)
        if site == "in" and inp is None and out is not None:
            raise NotAdaptableError(f"{module_name!r} has no input mask")
        return out if site == "out" else inp
    if not isinstance(module, nn.MultiheadAttention):
        raise NotAdaptableError(f"site {site!r} needs a MultiheadAttention, got {module_name!r}")
    return _attention_mask(module, site, create)


def submodule(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)`` through the module dicts directly: the pruner resolves
    tens of thousands of masks per step, and ``get_submodule`` checks each level slowly."""
    module = model
    try:
        for atom in name.split(".") if name else ():
            module = module._modules[atom]
    except (KeyError, AttributeError, TypeError):
        return model.get_submodule(name)  # its error names what is missing
    if module is None:
        return model.get_submodule(name)
    return module


def _attention_mask(mha: nn.MultiheadAttention, site: str, create: bool):
    if site == "o":
        adapted = _adapted(mha.out_proj, "weight")
        if adapted is not None:
            return adapted.adapters["out"].mask_in
        return ensure_masks(mha.out_proj, create)[1]
    # Never read mha.in_proj_weight here: when parametrised, reading it computes W + delta.
    if not mha._qkv_same_embed_dim:  # separate q/k/v weights
        adapted = _adapted(mha, f"{site}_proj_weight")
        if adapted is None:
            raise NotAdaptableError(
                "masking heads of a plain MultiheadAttention with separate q/k/v weights "
                "(kdim/vdim != embed_dim) is not supported; wrap it with an adapter first"
            )
        return adapted.adapters[site].mask_out
    adapted = _adapted(mha, "in_proj_weight")
    if adapted is not None:
        return adapted.adapters[site].mask_out
    e = mha.embed_dim
    mask = channel_mask_of(mha, "in_proj_weight")
    if mask is None and not create:
        return None
    if mask is None:
        mask = ChannelMask(3 * e, e).to(mha.out_proj.weight.device, mha.out_proj.weight.dtype)
        parametrize.register_parametrization(mha, "in_proj_weight", mask)
        if mha.in_proj_bias is not None:
            parametrize.register_parametrization(mha, "in_proj_bias", SharedMask(mask))
    start = "qkv".index(site) * e
    return mask.mask_out[start : start + e]


def _adapted(module: nn.Module, attr: str):
    if parametrize.is_parametrized(module, attr):
        for fn in module.parametrizations[attr]:
            if isinstance(fn, AdaptedWeight):
                return fn
    return None


def alive_units(model: nn.Module, group) -> Tensor:
    """Bool per unit of ``group``: the one definition of which units of a coupled group are
    alive (used by the pruner, the block pruner's promotion and the compact build).

    A unit is alive when any entry it produces (a member at an output site: ``group.outputs()``;
    every member when the group has none) survives its mask. A member whose mask was never
    attached counts as alive: nothing of it was pruned. ``group`` is duck-typed like
    :class:`sparta.pruning.groups.Group`: ``size``, ``outputs()`` and ``members`` with
    ``module``, ``site``, ``idxs`` and ``units``. Reads masks only; attaches none.
    """
    alive = torch.zeros(group.size, dtype=torch.bool)
    for m in group.outputs() or group.members:
        mask = resolve_mask(model, m.module, m.site, create=False)
        if mask is None:
            alive[m.units] = True
        else:
            kept = mask[m.idxs.to(mask.device)].bool().cpu()
            alive.index_put_((m.units.cpu(),), kept, accumulate=True)
    return alive


def channel_mask_of(module: nn.Module, attr: str) -> ChannelMask | None:
    if parametrize.is_parametrized(module, attr):
        for fn in module.parametrizations[attr]:
            if isinstance(fn, ChannelMask):
                return fn
    return None


# -- what survives the masks -------------------------------------------------------------------
def weight_shape(module: nn.Module) -> torch.Size:
    """Shape of ``module.weight`` without computing it: reading a parametrised weight runs its
    parametrisations (masks, adapters) on the whole tensor, and registered ones keep the shape
    unless registered ``unsafe``."""
    if parametrize.is_parametrized(module, "weight"):
        plist = module.parametrizations["weight"]
        if not plist.unsafe:
            return plist.original.shape
    return module.weight.shape


def kept_weights(module: nn.Module) -> int:
    """Weight entries of a Linear/ConvNd (adapted or plain) that survive its masks."""
    if isinstance(module, AdaptedLayer):
        kernel = torch.Size(weight_shape(module.base)[2:]).numel()
        return module.adapter.kept_entries() * kernel
    mask = channel_mask_of(module, "weight")
    if mask is not None:
        return mask.kept(weight_shape(module))
    return weight_shape(module).numel()


def attention_kept(mha: nn.MultiheadAttention) -> tuple[float, float, float, float]:
    """Kept rows of the q, k and v projections and kept input columns of ``out_proj`` (each of
    ``embed_dim``; all of them where nothing is masked)."""
    e = float(mha.embed_dim)
    masks = [resolve_mask(mha, "", site, create=False) for site in "qkvo"]
    kq, kk, kv, ko = (e if m is None else float(m.count_nonzero()) for m in masks)
    return kq, kk, kv, ko
