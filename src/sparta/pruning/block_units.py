"""What :class:`~sparta.pruning.blocks.BlockPruner` prunes: the SPLoPA-adapted layers and
their blocks, and which blocks make one unit (a block, a Hugging Face attention head, or a run
of FFN neurons spanning the layers that produce and consume it)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..adapters.layer import AdaptedLayer
from ..adapters.splopa import SPLoPA
from ..errors import ConfigError
from .block_criteria import BlockLayer
from .coupled import Group


@dataclass
class Units:
    unit_of: Tensor  # (entries,) unit of each (unit, block) pair
    block_of: Tensor  # (entries,) flat block index
    group_of: list[int]  # per unit: index into names
    names: list[str]  # the groups: layers, attention modules or FFNs
    consumer: Tensor  # (entries,) bool: the block takes the unit's output (a column block)


def block_units(layers: list[BlockLayer]) -> Units:
    total = sum(lay.count for lay in layers)
    group_of = [i for i, lay in enumerate(layers) for _ in range(lay.count)]
    index = torch.arange(total)
    return Units(index, index, group_of, [lay.name for lay in layers], index >= 0)


def structured_units(layers: list[BlockLayer], groups: list[Group], kinds: set[str]) -> Units:
    by_name = {lay.name: lay for lay in layers}
    unit_of, block_of, group_of, names, consumer = [], [], [], [], []
    for g in (g for g in groups if g.kind in kinds):
        width = len(g.members[0].idxs)
        run = width // g.size  # head dim (heads) or 1 (neurons)
        for m in g.members:
            if m.module not in by_name:
                raise ConfigError(
                    f"granularity {g.kind!r} needs every layer of {g.name!r} adapted with "
                    f"splopa; {m.module!r} is not"
                )
            p, q = by_name[m.module].adapter.block
            run = math.lcm(run, p if m.site == "out" else q)
        if width % run:
            raise ConfigError(f"{g.name!r}: blocks straddle its {g.kind}; choose another block")
        for unit in range(width // run):
            first = len(group_of)
            for m in g.members:
                lay = by_name[m.module]
                rows, cols = lay.adapter.mask_block.shape
                grid = torch.zeros(rows, cols, dtype=torch.bool)
                p, q = lay.adapter.block
                if m.site == "out":
                    grid[unit * run // p : (unit + 1) * run // p] = True
                else:
                    grid[:, unit * run // q : (unit + 1) * run // q] = True
                idx = grid.flatten().nonzero().flatten() + lay.offset
                block_of.append(idx)
                unit_of.append(torch.full_like(idx, first))
                consumer.append(torch.full_like(idx, m.site == "in", dtype=torch.bool))
            group_of.append(len(names))
        names.append(g.name)
    if not names:
        raise ConfigError(f"found no Hugging Face {' or '.join(sorted(kinds))} to prune")
    return Units(torch.cat(unit_of), torch.cat(block_of), group_of, names, torch.cat(consumer))


def splopa_layers(model: nn.Module) -> list[BlockLayer]:
    layers, offset = [], 0
    for name, m in model.named_modules():
        if isinstance(m, AdaptedLayer) and isinstance(m.adapter, SPLoPA):
            if isinstance(m.base, nn.Linear):
                layers.append(BlockLayer(name, m, offset))
                offset += layers[-1].count
    if not layers:
        raise ConfigError(
            "BlockPruner needs a model wrapped with the 'splopa' adapter "
            "(sparta.wrap(model, 'splopa', block=...)); this one has no SPLoPA-adapted Linear"
        )
    return layers
