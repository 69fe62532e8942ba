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
from torch.nn.modules.conv import _ConvNd

from ..adapters.base import Adapter
from ..adapters.layer import AdaptedLayer
from ..errors import ConfigError, SpartaError
from ..masks import NORMS, alive_units
from ..pruning.conv_groups import grouped
from ..pruning.fused_heads import set_heads
from ..pruning.groups import Group
from ..utils import call

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
    from ..wrap import fuse

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


def _cut_plain(plain: nn.Module, cuts: dict[tuple[str, str], Tensor]) -> None:
    """Cut plain layers with torch-pruning's per-layer functions."""
    for (name, site), idxs in cuts.items():
        if len(idxs):
            module = plain.get_submodule(name)
            _cut_function(module, site)(module, idxs.tolist())


def _cut_and_fuse_adapted(model: nn.Module, cuts) -> set[str]:
    """Replace each cut :class:`AdaptedLayer` by its plain fused layer (see
    :func:`_fused_block`); returns the names replaced."""
    done = set()
    for name in {n for n, _ in cuts}:
        layer = model.get_submodule(name)
        plain = _fused_block(layer, name, cuts) if isinstance(layer, AdaptedLayer) else None
        if plain is not None:
            _put(model, name, plain)
            done.add(name)
    return done


def _fused_block(layer: AdaptedLayer, name: str, cuts) -> nn.Module | None:
    """The plain layer of a cut adapted layer (groups 1 or depthwise; else ``None``), with
    ``(W + delta) * M`` computed on the kept rows and columns only: building a task never
    touches the pruned part of the base's weights."""
    if layer.form.standardise is not None:  # its weight depends on whole rows: fuse, then cut
        return None
    depthwise = _depthwise(layer.base)
    by_group = grouped(layer.base)
    out_keep = _kept(layer.adapter.out_features, cuts.get((name, "out")))
    in_cut = cuts.get((name, "in"))
    in_keep = out_keep if depthwise else _kept(layer.adapter.in_features, in_cut)
    device = layer.base.weight.device  # index_select needs the index on the weight's device
    out_keep, in_keep = out_keep.to(device), in_keep.to(device)
    with torch.no_grad():
        weight = layer.base.weight
        mask = layer.mask_out[out_keep].view(-1, 1)
        if depthwise:
            weight = weight.index_select(0, out_keep)
            delta = layer.adapter.delta_at(out_keep, None)
        elif by_group:  # whole groups: the kept rows, every column of their group
            weight = weight.index_select(0, out_keep)
            delta = layer.adapter.delta_at(out_keep, None)
            mask = layer.adapter.mask_matrix().index_select(0, out_keep)
        else:  # the kept block (two index_selects: twice as fast as one fancy index)
            weight = weight.index_select(0, out_keep).index_select(1, in_keep)
            delta = layer.adapter.delta_at(out_keep, in_keep)
            mask = layer.adapter.mask_at(out_keep, in_keep)  # channels (and blocks)
        # ``weight`` is a fresh tensor: add the delta at the centre tap and mask in place.
        if weight.dim() == 2 or all(k == 1 for k in weight.shape[2:]):
            weight += delta.view(weight.shape)
        else:
            weight[layer.geometry.centre] += delta
        if not bool(mask.all()):  # usually all kept, except units left as exact zeros
            weight *= mask.view(*mask.shape, *([1] * (weight.dim() - 2)))
        bias = layer.base.bias
        bias = None if bias is None else bias[out_keep] * layer.mask_out[out_keep]
    plain = copy.copy(layer.base)
    for slot in ("_parameters", "_buffers", "_modules"):
        setattr(plain, slot, dict(getattr(plain, slot)))
    plain.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        plain.bias = nn.Parameter(bias, requires_grad=layer.base.bias.requires_grad)
    if by_group:
        _set_grouped_width(plain, len(out_keep))
    else:
        _set_width(plain, len(out_keep), len(in_keep), depthwise)
    return plain


def _set_grouped_width(conv: nn.Module, out: int) -> None:
    """A grouped convolution that kept ``out`` rows (whole groups): fewer groups, same width
    per group."""
    per_out, per_in = conv.out_channels // conv.groups, conv.in_channels // conv.groups
    conv.groups = out // per_out
    conv.out_channels, conv.in_channels = out, conv.groups * per_in


def _fill(skeleton: nn.Module, model: nn.Module, cuts) -> set[str]:
    """Give ``skeleton`` (a structure copy of ``model``'s base) the fused tensors of ``model``,
    leaving ``model`` unchanged: adapted layers become their fused (kept-block, where cut)
    plain layers, every other tensor a copy of what ``model`` computes for it (masks
    applied), cut on the way where ``cuts`` says so. Returns the layers already cut."""
    from ..wrap import _fused_copy

    done = set()
    # Every name of a module used at several places (shared between blocks), so that each
    # place gets the fused layer, which stays one module as in the base.
    sources = dict(model.named_modules(remove_duplicate=False))
    fused: dict[int, nn.Module] = {}
    for name, target in list(skeleton.named_modules(remove_duplicate=False)):
        src = sources.get(name)
        if src is None:
            raise SpartaError(f"compact model: the task model has no module {name!r}")
        if isinstance(src, AdaptedLayer):
            if id(src) not in fused:
                plain = _fused_block(src, name, cuts) if cuts is not None else None
                if plain is not None:
                    done.add(name)
                fused[id(src)] = plain or _fused_copy(src)
            _put(skeleton, name, fused[id(src)])
            continue
        keep = _plain_keep(target, name, cuts)
        if keep is not None:
            done.add(name)
        parametrized = getattr(src, "parametrizations", {})
        with torch.no_grad():
            for attr, p in list(target._parameters.items()):
                if p is None:
                    continue
                source = parametrized[attr].original if attr in parametrized else None
                source = src._parameters[attr] if source is None else source
                value = _select(getattr(src, attr), attr, keep)
                target._parameters[attr] = nn.Parameter(value, requires_grad=source.requires_grad)
            for attr, b in list(target._buffers.items()):
                if b is not None:
                    target._buffers[attr] = _select(src._buffers[attr], attr, keep)
        if keep is not None:
            _set_plain_width(target, *keep)
    return done


def _plain_keep(module: nn.Module, name: str, cuts) -> tuple[Tensor, Tensor | None] | None:
    """``(kept outputs, kept inputs or None)`` of a plain Conv (groups 1 or depthwise), Linear
    or BatchNorm with cuts; ``None`` when it has none (or is another kind)."""
    if cuts is None or not ((name, "out") in cuts or (name, "in") in cuts):
        return None
    width_in = None
    if isinstance(module, _ConvNd) and not module.transposed:
        width_out, width_in = module.out_channels, module.in_channels
        width_in = None if _depthwise(module) or grouped(module) else width_in
    elif isinstance(module, nn.Linear):
        width_out, width_in = module.out_features, module.in_features
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        width_out = module.num_features
    else:
        return None
    in_keep = None if width_in is None else _kept(width_in, cuts.get((name, "in")))
    return _kept(width_out, cuts.get((name, "out"))), in_keep


def _select(value: Tensor, attr: str, keep) -> Tensor:
    """A fresh copy of ``value`` with only the kept entries (channels on dim 0 of every
    tensor of these layers; inputs on dim 1 of the weight)."""
    value = value.detach()
    if keep is None or value.dim() == 0:
        return value.clone()
    out_keep, in_keep = keep
    value = value.index_select(0, out_keep.to(value.device))
    if in_keep is not None and attr == "weight":
        value = value.index_select(1, in_keep.to(value.device))
    return value


def _set_plain_width(module: nn.Module, out_keep: Tensor, in_keep: Tensor | None) -> None:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.num_features = len(out_keep)
    elif grouped(module):
        _set_grouped_width(module, len(out_keep))
    else:
        depthwise = _depthwise(module)
        width_in = len(out_keep if depthwise else in_keep)
        _set_width(module, len(out_keep), width_in, depthwise)


def _kept(width: int, removed: Tensor | None) -> Tensor:
    keep = torch.ones(width, dtype=torch.bool)
    if removed is not None:
        keep[removed] = False
    return keep.nonzero().flatten()


def _set_width(layer: nn.Module, out: int, inp: int, depthwise: bool) -> None:
    if isinstance(layer, nn.Linear):
        layer.out_features, layer.in_features = out, inp
    else:
        layer.out_channels, layer.in_channels = out, inp
        if depthwise:
            layer.groups = out


def _put(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    model.get_submodule(parent)._modules[child] = module


def _layer(module: nn.Module) -> nn.Module:
    """The torch layer behind an adapted one."""
    return module.base if isinstance(module, AdaptedLayer) else module


def _depthwise(module: nn.Module) -> bool:
    return (
        isinstance(module, _ConvNd)
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
    )


def _cut_function(module: nn.Module, site: str):
    import torch_pruning as tp

    if isinstance(module, _ConvNd) and not module.transposed:
        if _depthwise(module):
            return tp.prune_depthwise_conv_out_channels
        if module.groups == 1:
            return tp.prune_conv_out_channels if site == "out" else tp.prune_conv_in_channels
        return _cut_grouped  # whole groups, both sides at once (see _whole_groups)
    if isinstance(module, nn.Linear):
        return tp.prune_linear_out_channels if site == "out" else tp.prune_linear_in_channels
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
        return tp.prune_batchnorm_out_channels
    return None


def _cut_grouped(conv: nn.Module, idxs: list[int]) -> None:
    keep = _kept(conv.out_channels, torch.tensor(idxs, dtype=torch.long)).to(conv.weight.device)
    weight = conv.weight
    with torch.no_grad():
        conv.weight = nn.Parameter(weight.index_select(0, keep), weight.requires_grad)
        if conv.bias is not None:
            conv.bias = nn.Parameter(conv.bias.index_select(0, keep), conv.bias.requires_grad)
    _set_grouped_width(conv, len(keep))


def _prune_channels(plain: nn.Module, plans, example_inputs) -> None:
    import torch_pruning as tp

    training = {m: m.training for m in plain.modules()}
    for p in plain.parameters():  # torch-pruning follows grad_fn
        p.requires_grad_(True)
    plain.eval()  # tracing runs a forward: never touch BatchNorm statistics
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch-pruning warns about modules it does not know
            graph = tp.DependencyGraph().build_dependency(plain, example_inputs=example_inputs)
    except Exception as exc:
        raise SpartaError(
            f"torch-pruning could not trace the fused model ({type(exc).__name__}: {exc}); "
            "its channel groups cannot be removed"
        ) from exc
    finally:
        for m, flag in training.items():
            m.training = flag
    for g, removed in plans:
        root = plain.get_submodule(g.name)
        fn = tp.prune_conv_out_channels if isinstance(root, _ConvNd) else None
        fn = tp.prune_linear_out_channels if isinstance(root, nn.Linear) else fn
        member = next((m for m in g.members if m.module == g.name and m.site == "out"), None)
        if fn is None or member is None:
            raise SpartaError(
                f"group {g.name!r}: its root must be a Conv/Linear with an 'out' member, got "
                f"{type(root).__name__}"
            )
        idxs = member.idxs[torch.isin(member.units, removed)]
        graph.get_pruning_group(root, fn, idxs=[int(i) for i in idxs]).prune()


def _slice_group(plain: nn.Module, group: Group, removed: Tensor) -> None:
    """Heads or FFN neurons: rows of the producing Linears, columns of the consuming one."""
    for m in group.members:
        linear = plain.get_submodule(m.module)
        dim = 0 if m.site == "out" else 1
        drop = m.idxs[torch.isin(m.units, removed)]
        keep = torch.ones(linear.weight.shape[dim], dtype=torch.bool)
        keep[drop] = False
        _slice_linear(linear, dim, keep.nonzero().flatten())
    if group.kind == "heads" and not hasattr(plain.get_submodule(group.name), "all_head_size"):
        set_heads(plain.get_submodule(group.name), group.size - len(removed))  # fused q/k/v
    elif group.kind == "heads":  # Hugging Face self-attention: reshapes by these attributes
        attention = plain.get_submodule(group.name)
        attention.num_attention_heads = group.size - len(removed)
        attention.all_head_size = attention.num_attention_heads * attention.attention_head_size
        parent = plain.get_submodule(group.name.rpartition(".")[0])
        if isinstance(getattr(parent, "pruned_heads", None), set):
            parent.pruned_heads |= {int(u) for u in removed}


def _slice_linear(linear: nn.Linear, dim: int, keep: Tensor) -> None:
    weight = linear.weight
    keep = keep.to(weight.device)
    with torch.no_grad():
        linear.weight = nn.Parameter(weight.index_select(dim, keep).clone(), weight.requires_grad)
        if dim == 0 and linear.bias is not None:
            bias = linear.bias
            linear.bias = nn.Parameter(bias.index_select(0, keep).clone(), bias.requires_grad)
    if dim == 0:
        linear.out_features = len(keep)
    else:
        linear.in_features = len(keep)


# -- checks ------------------------------------------------------------------------------------
def _width(module: nn.Module, site: str) -> int | None:
    module = _layer(module)
    if isinstance(module, _ConvNd):
        return module.out_channels if site == "out" else module.in_channels
    if isinstance(module, nn.Linear):
        return module.out_features if site == "out" else module.in_features
    if isinstance(module, NORMS) and site == "out":
        return module.weight.shape[0]
    return None


def _widths(plain: nn.Module, groups: list[Group]) -> dict[tuple[str, str], int | None]:
    return {
        (m.module, m.site): _width(plain.get_submodule(m.module), m.site)
        for g in groups
        for m in g.members
    }


def _check_widths(plain: nn.Module, before: dict, removed: dict) -> None:
    """Every member lost exactly its removed entries: else refuse the result."""
    dropped = {k: len(v) for k, v in removed.items()}
    for (name, site), width in before.items():
        if width is None:
            continue
        expected = width - dropped.get((name, site), 0)
        got = _width(plain.get_submodule(name), site)
        if got != expected:
            raise SpartaError(
                f"compact model: {name!r} ({site}) has width {got}, expected {expected} "
                f"({width} minus the removed units); the dependency graph disagrees with groups"
            )


def _output(model: nn.Module, example_inputs) -> Tensor:
    """The model's (first) output in eval mode; every module's training flag restored."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            return _first_tensor(call(model, example_inputs))
    finally:
        for m, flag in flags.items():
            m.training = flag


def _compare(want: Tensor, got: Tensor) -> None:
    scale = want.abs().max().item() + 1e-12
    err = (got - want).abs().max().item() / scale if got.shape == want.shape else float("inf")
    # bf16/fp16 models round every layer's output (bf16 keeps 8 bits), so an equally exact but
    # different summation order in the narrower layers may flip last bits: 4 eps of the dtype
    allowed = max(1e-4, 4 * torch.finfo(want.dtype).eps) if want.is_floating_point() else 1e-4
    if not err <= allowed:
        raise SpartaError(
            f"compact model differs from the pruned model: output {tuple(got.shape)} vs "
            f"{tuple(want.shape)}, max relative difference {err:.3g} (allowed {allowed:.3g})"
        )


def _first_tensor(out) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    values = list(out.values()) if isinstance(out, dict) else list(out)
    return _first_tensor(values[0])


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
