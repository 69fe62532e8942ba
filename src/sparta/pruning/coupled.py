"""Coupled channel groups as data: which mask entries belong to which prunable unit.

A group has ``size`` prunable units (filters, heads, FFN neurons); each member says which
entries of which mask belong to which unit. Found by :mod:`sparta.pruning.groups`, merged by
:mod:`sparta.pruning.conv_groups`, read by everything that prunes, counts or compacts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

#: Mask sites: "out"/"in" of a layer or norm; for nn.MultiheadAttention the output rows of the
#: q, k and v projections ("q", "k", "v") and the input columns of out_proj ("o").
SITES = ("out", "in", "q", "k", "v", "o")


@dataclass
class Member:
    """Entries ``idxs`` of mask ``site`` of module ``module`` belong to units ``units``."""

    module: str
    site: str
    idxs: Tensor
    units: Tensor


@dataclass
class Group:
    name: str
    kind: str  # "channels", "heads" or "neurons"
    size: int
    members: list[Member] = field(default_factory=list)

    def outputs(self) -> list[Member]:
        """Members whose masked entries are produced (scored) rather than consumed."""
        return [m for m in self.members if m.site in ("out", "q", "k", "v")]


class GroupList(list):
    """The groups of a model, with ``notes``: what could not be grouped, and why."""

    notes: list[str]
