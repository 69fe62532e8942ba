"""How :class:`~sparta.pruning.BlockPruner` picks the units to prune at a step, and checks
scores handed to it; plain functions of tensors (no model)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError


def choose_units(
    members: Tensor,
    level: float,
    target: float,
    cost: Tensor,
    size: Tensor,
    score: Tensor,
    shut: Tensor,
    kept: Tensor,
    group: Tensor,
) -> list[int]:
    """Least useful units first (switched-off ones before the rest) until the live blocks
    of ``members`` are at most ``level`` of their blocks; switched-off units go even
    past the level, but never past the target."""
    total = float(size[members].sum())
    goal, floor = level * total + 1e-9, target * total - 1e-9
    now = float(cost[members].sum())
    alive = members[cost[members] > 0].tolist()
    alive.sort(key=lambda i: (not bool(shut[i]), float(score[i])))
    chosen = []
    for i in alive:
        if now <= goal:  # the level is reached: only switched-off units, down to the target
            if not shut[i]:
                break
            if now - float(cost[i]) < floor:
                continue
        if kept[group[i]] <= 1:  # every group keeps a unit
            continue
        chosen.append(i)
        now -= float(cost[i])
        kept[group[i]] -= 1
    return chosen


def given_scores(scores, total: int) -> Tensor:
    """Scores from the caller (``BlockPruner.step(scores)``): one number per block."""
    try:
        out = torch.as_tensor(scores).detach().double().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError(
            f"scores must be numbers, one per block ({total}), got {type(scores).__name__}"
        ) from None
    if tuple(out.shape) != (total,):
        raise ConfigError(
            f"scores must hold one number per block of the pruned layers: expected shape "
            f"({total},), got {tuple(out.shape)}; pass what BlockPruner.importance() returns"
        )
    return out
