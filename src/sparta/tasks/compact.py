"""``build_compact``: a pruned model as plain torch modules with its pruned units removed.

``sparta.fuse`` bakes adapters and masks into plain weights (a pruned unit is exact zeros);
then every group's dead units are cut out physically. Convolution and MLP channels go through
torch-pruning's dependency graph, which knows how a removed channel propagates to norms,
residual additions, concatenation offsets, depthwise convolutions and flattened Linear inputs
(the same graph the groups came from, see ``pruning/groups.py``). Hugging Face attention heads
and FFN neurons are sliced here, explicitly: the attention module's head count must change too.

Removal is exact only where a dead channel contributes nothing but zeros. That fails for a
LayerNorm/GroupNorm over the channels (their statistics count the zero channels) and cannot be
expressed for ``nn.MultiheadAttention`` heads (torch assumes q/k/v width == embed_dim); such
groups stay dense, with the reason in the report.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from ..adapters.base import Adapter
from ..adapters.layer import AdaptedLayer
from ..errors import ConfigError, SpartaError
from ..masks import NORMS, alive_units
from ..pruning.conv_groups import grouped
from ..pruning.groups import Group
from .compact_checks import _check_widths, _compare, _count, _output, _widths
from .compact_cut import (
    _cut_and_fuse_adapted,
    _cut_function,
    _cut_plain,
    _depthwise,
    _fill,
    _layer,
    _prune_channels,
    _slice_group,
)

#: Norms whose output at a channel depends on the other channels: removal would not be exact.
_CROSS_CHANNEL_NORMS = (nn.LayerNorm, nn.GroupNorm)


@dataclass
class GroupOutcome:
    """One group: ``units`` in all, ``alive`` of them unpruned, ``removed`` physically."""

    name: str
    kind: str
    units: int
    alive: int
    removed: int
    dense_reason: str | None = None


@dataclass
class CompactReport:
    params_before: int  # the fused, dense model (same architecture as the base)
    params_after: int
    groups: list[GroupOutcome] = field(default_factory=list)
    #: Layers whose channels were never pruned, with the reason (from the grouping).
    notes: list[str] = field(default_factory=list)

    @property
    def dense(self) -> list[GroupOutcome]:
        """Groups with pruned units that were kept in place (as exact zeros), with reasons."""
        return [g for g in self.groups if g.dense_reason is not None]

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"parameters {self.params_before:,} -> {self.params_after:,}"]
        lines += [f"kept dense {g.name} ({g.kind}): {g.dense_reason}" for g in self.dense]
        lines += [f"not pruned: {note}" for note in self.notes]
        return "\n".join(lines)


def build_compact(
    model: nn.Module,
    groups: list[Group],
    example_inputs=None,
    verify: bool = True,
    inplace: bool = False,
    skeleton: nn.Module | None = None,
    structure: dict | None = None,
    record: dict | None = None,
) -> tuple[nn.Module, CompactReport]:
    """A new plain model computing what pruned ``model`` computes, with dead units removed.

    Args:
        model: a pruned model (``sparta.wrap`` + ``Pruner``, or a fine-pruned plain model);
            never modified unless ``inplace``.
        groups: its groups (``pruner.groups``).
        example_inputs: a batch the model accepts (tensor, tuple or dict); needed to verify,
            and to trace models with layers the direct cut does not handle.
        verify: run the fused model before and after removal (eval mode, on
            ``example_inputs``) and raise if the outputs differ by more than 1e-4 relative.
        inplace: fuse ``model`` itself instead of a copy (it is consumed; saves a copy).
        skeleton: a structure copy of the wrapped ``model``'s base to fill and cut instead of
            fusing ``model`` (which then stays usable; see ``Builder``).
        structure: with ``skeleton``, a dict the caller keeps for this ``model`` and ``groups``:
            what depends on their structure only is computed once and kept there.
        record: a dict that receives what was removed, for the task's compact plan
            (``export.make_plan``): ``cuts`` (``{(layer, site): removed indices}``, ``None``
            when torch-pruning had to trace), ``channel`` and ``sliced`` (``(group, removed
            units)`` pairs).

    Returns ``(compact_model, report)``.
    """
    from ..wrapping import fuse

    if not isinstance(model, nn.Module):
        raise TypeError(f"build_compact expects a torch.nn.Module, got {type(model).__name__}")
    if verify and example_inputs is None:
        raise ConfigError("build_compact(verify=True) needs example_inputs to compare outputs")
    dead_units = [(~alive_units(model, g)).nonzero().flatten() for g in groups]  # before fusing
    want = _output(model, example_inputs) if verify else None
    work = model if inplace or skeleton is not None else copy.deepcopy(model)
    known = structure if structure is not None and skeleton is not None else {}
    if "flags" not in known:
        known.update(
            count=_plain_count(work),
            flags=_plain_flags(work),
            widths=_widths(work, groups),
            reasons={id(g): _dense_reason(work, g) for g in groups},
        )
    report = CompactReport(known["count"], 0, notes=list(getattr(groups, "notes", [])))
    report.notes += _outside_groups(model, groups)
    flags, widths = known["flags"], known["widths"]
    channel_plans, sliced_plans = [], []
    for g, dead in zip(groups, dead_units):
        removed = dead[1:] if len(dead) == g.size else dead  # keep one (zero) unit, never none
        reason = known["reasons"][id(g)] if len(removed) else None
        outcome = GroupOutcome(g.name, g.kind, g.size, g.size - len(dead), 0, reason)
        report.groups.append(outcome)
        if len(removed) and reason is None:
            outcome.removed = len(removed)
            (channel_plans if g.kind == "channels" else sliced_plans).append((g, removed))
    removed_entries = _removed_entries(channel_plans + sliced_plans)
    cuts = _cuts(work, channel_plans, removed_entries)
    if record is not None:
        record.update(cuts=cuts, channel=channel_plans, sliced=sliced_plans)
    if skeleton is not None:  # filled from the task model, which stays as it is
        done, plain = _fill(skeleton, work, cuts), skeleton
    else:  # adapted layers: cut first, then fuse only the kept weights
        done = _cut_and_fuse_adapted(work, cuts) if cuts is not None else set()
        plain = fuse(work, inplace=True)
    if cuts is not None:
        cuts = {k: v for k, v in cuts.items() if k[0] not in done}
    if cuts is not None:
        _cut_plain(plain, cuts)
    elif channel_plans:
        if example_inputs is None:
            raise ConfigError(
                "build_compact needs example_inputs to trace this model's dependency graph "
                "(it has layers the direct cut does not handle, e.g. grouped convolutions)"
            )
        _prune_channels(plain, channel_plans, example_inputs)
    for g, removed in sliced_plans:
        _slice_group(plain, g, removed)
    for n, p in plain.named_parameters():
        p.requires_grad_(flags.get(n, False))
    _check_widths(plain, widths, removed_entries)
    report.params_after = _count(plain)
    if verify:
        try:
            got = _output(plain, example_inputs)
        except Exception as exc:  # the cut model does not run: never hand it out
            raise SpartaError(
                f"the compact model cannot run its own forward ({type(exc).__name__}: {exc}); "
                "a coupling of its channels was not found (please report this model)"
            ) from exc
        _compare(want, got)
    return plain, report


def _outside_groups(model: nn.Module, groups: list[Group]) -> list[str]:
    """Notes (and a warning) for pruned output channels that no group covers: they stay as
    exact zeros, so the model is not as compact as its masks say. It happens only when the
    groups given here differ from those the model was pruned with; it is never silent."""
    from ..errors import SkippedLayerWarning
    from ..masks import channel_mask_of

    covered: dict[str, set[int]] = {}
    for g in groups:
        for m in g.members:
            if m.site == "out":
                covered.setdefault(m.module, set()).update(m.idxs.tolist())
    notes = []
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            mask = module.mask_out
        else:
            found = channel_mask_of(module, "weight") if name else None
            mask = None if found is None else found.mask_out
        if mask is None:
            continue
        dead = set((mask == 0).nonzero().flatten().tolist()) - covered.get(name, set())
        if dead:
            notes.append(
                f"{name}: {len(dead)} pruned output channel(s) belong to no channel group of "
                "this model, so they stay as exact zeros instead of being removed"
            )
    if notes:
        warnings.warn(
            "compact model: " + "; ".join(notes[:3]) + (" ..." if len(notes) > 3 else ""),
            SkippedLayerWarning,
            stacklevel=3,
        )
    return notes


def _plain_count(model: nn.Module) -> int:
    """Parameters of the fused model: everything but the adapters' own tensors."""
    adapter = {id(p) for m in model.modules() if isinstance(m, Adapter) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in adapter)


def _plain_flags(model: nn.Module) -> dict[str, bool]:
    """``requires_grad`` by the fused model's parameter names (``x.base.bias`` -> ``x.bias``,
    ``x.parametrizations.w.original`` -> ``x.w``)."""
    flags = {}
    for name, p in model.named_parameters():
        name = name.replace(".parametrizations.", ".").replace(".original", "")
        flags[name.replace(".base.", ".")] = p.requires_grad
    return flags


# -- groups kept dense -------------------------------------------------------------------------------
def _dense_reason(plain: nn.Module, group: Group) -> str | None:
    modules = {m.module: _layer(plain.get_submodule(m.module)) for m in group.members}
    if any(isinstance(m, nn.MultiheadAttention) for m in modules.values()):
        return (
            "torch nn.MultiheadAttention needs q/k/v width == embed_dim, so its heads cannot "
            "be removed; dead heads stay as exact zeros"
        )
    for name, module in modules.items():
        if isinstance(module, _CROSS_CHANNEL_NORMS):
            return (
                f"{type(module).__name__} {name!r} normalises over the channels, so removing "
                "zero channels would change its statistics; dead channels stay as exact zeros"
            )
    if group.kind != "channels":
        for name, module in modules.items():
            if not isinstance(module, nn.Linear):
                return f"{group.kind} member {name!r} is a {type(module).__name__}, not a Linear"
    return None


# -- removal -----------------------------------------------------------------------------------
def _cuts(model: nn.Module, plans, removed: dict) -> dict[tuple[str, str], Tensor] | None:
    """``{(layer, side): indices to remove}``, each (layer, side) once, in the base's
    coordinates; ``None`` when some member is a layer the direct cut does not handle.

    The groups already hold, per member, which entries belong to which unit (index mappings
    through concatenation and flattening included, from the dependency graph that made them),
    so no new trace is needed.
    """
    hits: dict[tuple[str, str], list[Tensor]] = {}
    channel_sites = {(m.module, m.site) for g, _ in plans for m in g.members}
    for (name, site), idxs in removed.items():
        if (name, site) not in channel_sites:
            continue
        module = _layer(model.get_submodule(name))
        if _cut_function(module, site) is None:
            return None
        # Norms and depthwise convolutions have one channel axis for both sides.
        site = "out" if isinstance(module, NORMS) or _depthwise(module) else site
        hits.setdefault((name, site), []).append(idxs)
    cuts = {k: v[0] if len(v) == 1 else torch.cat(v).unique() for k, v in hits.items()}
    for name in {n for n, _ in cuts}:
        module = _layer(model.get_submodule(name))
        if grouped(module):
            cuts[(name, "out")] = _whole_groups(module, name, cuts)
            cuts.pop((name, "in"), None)
    return cuts


def _whole_groups(conv: nn.Module, name: str, cuts) -> Tensor:
    """The output channels to remove from grouped convolution ``conv``: whole groups, the same
    ones on both sides (the groups were merged so, see ``pruning/conv_groups.py``)."""
    sides = {}
    for site, width in (("out", conv.out_channels), ("in", conv.in_channels)):
        idxs = cuts.get((name, site), torch.empty(0, dtype=torch.long))
        per_group = width // conv.groups
        counts = torch.bincount(idxs // per_group, minlength=conv.groups)
        sides[site] = counts.nonzero().flatten()
        if bool((counts[sides[site]] != per_group).any()):
            sides[site] = None
    if sides["out"] is None or sides["in"] is None or not torch.equal(sides["out"], sides["in"]):
        raise SpartaError(
            f"compact model: grouped convolution {name!r} (groups={conv.groups}) would lose "
            "partial or different groups on its input and output sides; its channel groups "
            "disagree with the model (please report this model)"
        )
    per_out = conv.out_channels // conv.groups
    return (sides["out"].view(-1, 1) * per_out + torch.arange(per_out)).flatten()


def _removed_entries(plans) -> dict[tuple[str, str], Tensor]:
    """``{(layer, site): entries removed}`` (sorted, unique) over all planned groups."""
    hits: dict[tuple[str, str], list[Tensor]] = {}
    for g, removed in plans:
        dead = torch.zeros(g.size, dtype=torch.bool)
        dead[removed] = True
        for m in g.members:
            hits.setdefault((m.module, m.site), []).append(m.idxs[dead[m.units]])
    return {k: torch.cat(v).unique() for k, v in hits.items()}
