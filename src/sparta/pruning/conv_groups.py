"""Grouped convolutions: their channel groups are pruned whole.

A convolution with ``groups=G`` (ResNeXt, RegNet, ...) computes output group ``g`` from input
group ``g`` only. Its compact form is again a grouped convolution, so it can only lose whole
groups: input channels ``g * in/G ...`` and output channels ``g * out/G ...`` together, and
with them whatever is coupled to those channels upstream and downstream. The groups found in
the dependency graph (one for the layer feeding the convolution, one for the convolution's
outputs) are therefore merged so that one unit is one convolution group and everything
coupled to it (a union-find over units). Depthwise convolutions (``groups == in == out``) are
already coupled channel by channel and are left as they are.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..adapters.layer import AdaptedLayer
from .coupled import Group, Member


def grouped(module: nn.Module) -> bool:
    """A convolution with groups that is not depthwise (``groups == in == out``)."""
    layer = module.base if isinstance(module, AdaptedLayer) else module
    if not isinstance(layer, _ConvNd) or layer.groups == 1:
        return False
    return not (layer.groups == layer.in_channels == layer.out_channels)


def merge_conv_groups(groups: list, modules: dict[str, nn.Module], notes: list[str]) -> list:
    """``groups`` with those around each grouped convolution merged into whole-group units;
    groups around one that cannot lose whole groups (an input or output side not prunable) are
    dropped, with a note."""
    convs = {n: _layer(m) for n, m in modules.items() if grouped(m)}
    if not convs:
        return groups
    parent: dict = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a, b):
        parent[find(a)] = find(b)

    covered: dict[tuple[str, str], set[int]] = {}
    touching: dict[str, set[int]] = {}
    for gi, g in enumerate(groups):
        for m in g.members:
            conv = convs.get(m.module)
            if conv is None:
                continue
            width = conv.out_channels if m.site == "out" else conv.in_channels
            per_group = width // conv.groups
            touching.setdefault(m.module, set()).add(gi)
            covered.setdefault((m.module, m.site), set()).update(m.idxs.tolist())
            for idx, unit in zip(m.idxs.tolist(), m.units.tolist()):
                union((gi, unit), (m.module, idx // per_group))
    dropped: set[int] = set()
    for name, conv in convs.items():
        whole = all(
            len(covered.get((name, site), ())) == width
            for site, width in (("in", conv.in_channels), ("out", conv.out_channels))
        )
        if not whole and name in touching:
            dropped |= touching[name]
            notes.append(
                f"{name}: grouped convolution (groups={conv.groups}) whose input or output "
                "channels are not all prunable, so it cannot lose whole groups; its coupled "
                "channels are not pruned"
            )
    return _rebuild(groups, dropped, find, parent)


def _rebuild(groups: list, dropped: set[int], find, parent: dict) -> list:
    """New groups: the groups whose units share a root become one, units renumbered."""
    owners: dict = {}  # root -> group indices with a unit there
    for gi, g in enumerate(groups):
        if gi in dropped:
            continue
        for u in range(g.size):
            owners.setdefault(find((gi, u)), set()).add(gi)
    # groups connected through any shared root are one merged group
    link = {gi: gi for gi in range(len(groups))}

    def top(i):
        while link[i] != i:
            link[i] = link[link[i]]
            i = link[i]
        return i

    for gis in owners.values():
        first, *rest = sorted(gis)
        for other in rest:
            link[top(other)] = top(first)
    clusters: dict[int, list[int]] = {}
    for gi in range(len(groups)):
        if gi not in dropped:
            clusters.setdefault(top(gi), []).append(gi)
    out = []
    for gis in clusters.values():
        if len(gis) == 1 and not any((gis[0], u) in parent for u in range(groups[gis[0]].size)):
            out.append(groups[gis[0]])
            continue
        numbering: dict = {}
        members = []
        for gi in gis:
            g = groups[gi]
            roots = [find((gi, u)) for u in range(g.size)]
            new = torch.tensor([numbering.setdefault(r, len(numbering)) for r in roots])
            members += [Member(m.module, m.site, m.idxs, new[m.units]) for m in g.members]
        out.append(Group(groups[gis[0]].name, "channels", len(numbering), members))
    return out


def _layer(module: nn.Module) -> nn.Module:
    return module.base if isinstance(module, AdaptedLayer) else module
