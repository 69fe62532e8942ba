"""Cutting a fused model's dead units (the graph path of ``build_compact``): plain layers by
torch-pruning's per-layer functions, or its dependency graph where the direct cut does not
apply (traced on ``example_inputs``); adapted layers fused on their kept block only; heads and
FFN neurons sliced explicitly (Hugging Face and fused q/k/v attention attributes too).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from ..adapters.layer import AdaptedLayer
from ..errors import SpartaError
from ..pruning.conv_groups import grouped
from ..pruning.fused_heads import set_heads
from ..pruning.groups import Group


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
    from ..wrapping import _fused_copy

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
