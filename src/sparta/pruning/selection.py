"""Which units a pruning step removes, given their scores: ranking, per-group floors, the
smallest prefix of the ranking that reaches a level, and rounding to multiples.

Pure functions of the groups, the scores and which units are alive; :class:`~sparta.Pruner`
supplies the measure (``level_after``: the level reached if the first n candidates went).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from .coupled import Group

Unit = tuple[str, int]  # (group name, unit index)


def floor(group: Group, min_channels: int, round_to: int | None) -> int:
    """Units ``group`` keeps at least: ``min_channels``, and a whole ``round_to`` if set."""
    keep = min(min_channels, group.size)
    if round_to:
        keep = max(keep, min(round_to, group.size))
    return keep


def by_group(groups: Sequence[Group], units: Sequence[Unit]) -> dict[str, Tensor]:
    """``{group name: sorted unit indices}`` (every group, maybe empty) of ``units``."""
    out: dict[str, list[int]] = {g.name: [] for g in groups}
    for name, unit in units:
        out[name].append(unit)
    return {k: torch.tensor(sorted(v), dtype=torch.long) for k, v in out.items()}


def order(
    groups: Sequence[Group], scores: dict[str, Tensor], alive: dict[str, Tensor], ranking: str
) -> list[Unit]:
    """Alive units, least important first: scores normalised per group to unit root mean
    square (Molchanov et al. 2017 normalise by the L2 norm; dividing by the RMS instead
    keeps groups of different sizes comparable, else a 12-head group could never compete
    with a 3072-neuron one), compared across groups (``"global"``) or as within-group
    quantiles (``"local"``)."""
    keys: list[tuple[float, str, int]] = []
    for g in groups:
        s = scores[g.name]
        if s.shape != (g.size,):
            raise ConfigError(
                f"criterion returned {tuple(s.shape)} scores for group {g.name!r} of {g.size}"
            )
        idx = alive[g.name].nonzero().flatten()
        norm = s / (s.norm() / g.size**0.5 + 1e-12)
        if ranking == "local":
            ranks = torch.argsort(torch.argsort(norm[idx]))
            values = (ranks.double() + 1) / max(len(idx), 1)
        else:
            values = norm[idx]
        keys += [(v, g.name, u) for v, u in zip(values.tolist(), idx.tolist())]
    keys.sort()
    return [(name, unit) for _, name, unit in keys]


def candidates(ranked: Sequence[Unit], alive: dict[str, Tensor], floors: dict[str, int]):
    """The units of ``ranked`` that may go, in order, each group stopping at its floor."""
    kept = {name: int(a.sum()) for name, a in alive.items()}
    out = []
    for name, unit in ranked:
        if kept[name] > floors[name]:
            out.append((name, unit))
            kept[name] -= 1
    return out


def shortest_prefix(n: int, level: float, level_after: Callable[[int], float]) -> int:
    """The smallest ``k <= n`` with ``level_after(k) <= level`` (``n`` if none); the level
    falls as more units go, so a binary search finds it."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if level_after(mid) <= level + 1e-9:
            hi = mid
        else:
            lo = mid + 1
    return lo


def round_groups(
    groups: Sequence[Group],
    chosen: dict[str, Tensor],
    alive: dict[str, Tensor],
    ranked: Sequence[Unit],
    floors: dict[str, int],
    round_to: int,
) -> dict[str, Tensor]:
    """``chosen`` adjusted so that each group keeps a multiple of ``round_to`` units (at
    least its floor), the least important going first."""
    result = {}
    per_group: dict[str, list[int]] = {}
    for name, unit in ranked:
        per_group.setdefault(name, []).append(unit)
    for g in groups:
        units = per_group.get(g.name, [])  # alive units, least important first
        n_alive = int(alive[g.name].sum())
        keep = n_alive - len(chosen[g.name])
        target = max(floors[g.name], int(round(keep / round_to)) * round_to)
        target = min(target, n_alive)
        result[g.name] = torch.tensor(sorted(units[: n_alive - target]), dtype=torch.long)
    return result
