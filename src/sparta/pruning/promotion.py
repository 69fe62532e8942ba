"""Promotion: heads and FFN neurons that block pruning has silenced become dead channels.

A Hugging Face attention head or FFN neuron whose contribution the SPLoPA block masks make
exactly zero (no live block in its consumer columns, or none in its value / intermediate rows
and a zero bias) still has its channel-mask entries set; :func:`promote_dead_units` clears
them, so that :func:`sparta.masks.alive_units` reads the unit as dead and the compact build
removes it (the "hybrid filled" model of Lagunas et al. 2021). It changes no output.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..adapters.layer import AdaptedLayer
from ..adapters.splopa import SPLoPA
from ..masks import alive_units, ensure_masks, resolve_mask
from .coupled import Group
from .groups import _transformer_groups


def _alive_lines(module: nn.Module, dim: int) -> Tensor:
    """Bool: rows (dim 0) or columns (dim 1) of the effective weight with a kept entry."""
    if isinstance(module, AdaptedLayer):
        ad = module.adapter
        mask = ad.mask_out if dim == 0 else ad.mask_in
        if isinstance(ad, SPLoPA):
            live = ad._live_blocks().any(1 - dim)
            return mask.bool() & live.repeat_interleave(ad.block[dim])
        other = ad.mask_in if dim == 0 else ad.mask_out
        return mask.bool() & bool(other.any())
    mask = ensure_masks(module, create=False)[dim]
    width = module.weight.shape[dim]
    return torch.ones(width, dtype=torch.bool) if mask is None else mask.bool()


def _silent_rows(module: nn.Module, rows: Tensor) -> bool:
    """Whether rows ``rows`` of ``module`` output exact zeros (no kept weight, zero bias)."""
    if not isinstance(module, AdaptedLayer) or bool(_alive_lines(module, 0)[rows].any()):
        return False
    bias = module.base.bias
    return bias is None or bool((bias.detach()[rows] * module.mask_out[rows] == 0).all())


def _silenced_units(model: nn.Module, group: Group, modules: dict) -> Tensor:
    """Units of a heads/neurons group that contribute exactly nothing to the output under the
    *block* masks: the candidates for promotion.

    Not a second definition of "alive" (that is :func:`sparta.masks.alive_units`, read from
    the channel masks alone): a unit silenced here may still have every channel-mask entry set,
    because its zeros come from the blocks (its consumer columns have no live block, or its
    value / intermediate rows have none and a zero bias). :func:`promote_dead_units` writes
    this fact into the channel masks; from then on ``alive_units`` reads these units as dead,
    and that is what the compact build removes."""
    consumer = next(m for m in group.members if m.site == "in")
    producers = [m for m in group.members if m.site == "out"]
    cols = _alive_lines(modules[consumer.module], 1)[consumer.idxs].cpu()
    alive = torch.zeros(group.size, dtype=torch.bool).index_put_(
        (consumer.units,), cols, accumulate=True
    )
    # A head whose value rows are silent outputs softmax @ 0 = 0; an FFN neuron with silent
    # rows outputs act(0), zero for ReLU/GELU. Query and key rows alone do not silence a head.
    silent_site = producers[-1] if group.kind == "heads" else producers[0]
    silent_ok = group.kind == "heads" or _act_zero_at_zero(modules, group.name)
    dead = (~alive).nonzero().flatten().tolist()
    if silent_ok:
        owner = modules[silent_site.module]
        for unit in alive.nonzero().flatten().tolist():
            if _silent_rows(owner, silent_site.idxs[silent_site.units == unit]):
                dead.append(unit)
    return torch.tensor(sorted(dead), dtype=torch.long)


def _act_zero_at_zero(modules: dict, ffn_name: str) -> bool:
    act = getattr(modules.get(ffn_name), "intermediate_act_fn", None)
    if act is None:
        return False
    with torch.no_grad():
        return bool(act(torch.zeros(1)) == 0)


def promote_dead_units(model: nn.Module, groups: list[Group] | None = None) -> dict[str, int]:
    """Clear the channel masks of every Hugging Face head and FFN neuron of ``model`` whose
    contribution is already exactly zero (its consumer columns are all pruned, or its value /
    intermediate rows are pruned with zero bias), so compaction removes it. Changes no output.
    Returns ``{group name: units newly cleared}``."""
    groups = _transformer_groups(model) if groups is None else groups
    modules = dict(model.named_modules())
    done = {}
    with torch.no_grad():
        for g in (g for g in groups if g.kind in ("heads", "neurons")):
            dead = _silenced_units(model, g, modules)
            fresh = int((alive_units(model, g) & torch.isin(torch.arange(g.size), dead)).sum())
            if not fresh:
                continue
            for m in g.members:
                mask = resolve_mask(model, m.module, m.site)
                mask[m.idxs[torch.isin(m.units, dead)].to(mask.device)] = 0
            done[g.name] = fresh
    return done
