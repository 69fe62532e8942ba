"""Coupled channel groups: which mask entries must be cleared together.

Convolutional and MLP structure comes from torch-pruning's dependency graph, traced on a plain
proxy of the model (``sparta.fuse`` of it, every parameter set to require grad: torch-pruning
follows ``grad_fn`` and would see nothing on a frozen base). Transformer attention heads and
FFN hidden units are found structurally (``nn.MultiheadAttention``; Hugging Face BERT-style
``query/key/value`` + ``output.dense`` and ``intermediate.dense`` + ``output.dense``).

A group has ``size`` prunable units (filters, heads, FFN neurons); each member says which
entries of which mask belong to which unit.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..adapters.layer import AdaptedLayer
from ..errors import ConfigError, SkippedLayerWarning
from ..inputs import describe
from ..masks import can_mask
from ..utils import call, evaluating
from ..wrapping import fuse
from . import tracing
from .conv_groups import merge_conv_groups
from .coupled import Group, GroupList, Member
from .fused_heads import fused_heads, is_fused_attention


def check_inputs(model: nn.Module, example_inputs) -> None:
    """Run the model once; a failure becomes a clear error about the example inputs."""
    try:
        with evaluating(model):
            call(model, example_inputs)
    except Exception as exc:  # any failure here means the inputs do not fit the model
        shape = describe(example_inputs)
        raise ConfigError(
            f"example_inputs {shape} do not fit the model: {type(exc).__name__}: {exc}"
        ) from exc


def find_groups(
    model: nn.Module, example_inputs, ignored: set[str]
) -> tuple[list[Group], list[str]]:
    """Groups of ``model`` (wrapped or plain) and notes on what could not be grouped.

    ``ignored`` names modules whose outputs must not be pruned (typically the head). A failure
    to trace the model raises :class:`ConfigError`, unless attention/FFN groups were found
    structurally: then those are kept, and the failure is a note and a
    :class:`~sparta.SkippedLayerWarning` (the convolution/MLP channels stay unpruned).
    """
    notes: list[str] = []
    groups = _transformer_groups(model, notes)
    claimed = {(m.module, m.site) for g in groups for m in g.members}
    claimed_modules = {m.module for g in groups for m in g.members}
    try:
        tp_groups = _traced_groups(model, example_inputs, ignored | claimed_modules, notes)
    except ConfigError:
        raise
    except (MemoryError, RecursionError) as exc:
        raise ConfigError(
            f"tracing the model's dependency graph ran out of {type(exc).__name__[:-5].lower()} "
            "resources; sparta refuses to prune it (pass smaller example_inputs, or prune a "
            "part of the model)"
        ) from exc
    except Exception as exc:  # torch-pruning cannot trace every model
        why = f"dependency graph unavailable ({type(exc).__name__}: {exc})"
        if not groups:
            raise ConfigError(
                f"cannot group the model's channels: {why}; sparta cannot prune this model"
            ) from exc
        notes.append(why + "; only attention heads and FFN neurons are pruned")
        warnings.warn(notes[-1], SkippedLayerWarning, stacklevel=3)
        tp_groups = []
    groups += [g for g in tp_groups if not any((m.module, m.site) in claimed for m in g.members)]
    groups = _without_shared(groups, _shared_modules(model), notes)
    groups = GroupList(groups)
    groups.notes = notes
    return groups, notes


def _without_shared(groups: list[Group], shared: set[str], notes: list[str]) -> list[Group]:
    """Groups that touch no module registered under several names. Such a module is called
    at several places, each coupling its channels with other neighbours, which one cut cannot
    honour: its groups stay whole, with a note."""
    kept = []
    for g in groups:
        reused = sorted({m.module for m in g.members} & shared)
        if reused:
            notes.append(
                f"{g.name}: coupled with {reused[0]!r}, a module used under several names "
                "(shared between blocks); not pruned"
            )
        else:
            kept.append(g)
    return kept


def _shared_modules(model: nn.Module) -> set[str]:
    """Every name of every module registered under more than one name."""
    names: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(name)
    return {n for ns in names.values() if len(ns) > 1 for n in ns}


# -- torch-pruning -----------------------------------------------------------------------------
def _plain_proxy(model: nn.Module) -> nn.Module:
    proxy = fuse(model)  # a copy with plain modules, same names, same function
    for p in proxy.parameters():
        p.requires_grad_(True)
    return proxy.eval()


def _traced_groups(model, example_inputs, ignored: set[str], notes: list[str]) -> list[Group]:
    proxy = _plain_proxy(model)
    names = {m: n for n, m in proxy.named_modules()}
    real = dict(model.named_modules())
    graph = tracing.build_graph(proxy, example_inputs)  # looked up per call: tests patch it
    ignored_modules = [m for m, n in names.items() if n in ignored]
    groups = []
    for root, items in tracing.all_closures(graph, ignored_modules, notes, names):
        group = _convert(graph, root, items, names, real)
        if isinstance(group, str):
            notes.append(group)
        elif group is not None:
            groups.append(group)
    return merge_conv_groups(groups, real, notes)


def _convert(graph, root, items: dict, names: dict, real: dict) -> Group | str | None:
    root_name = names.get(root)
    members: list[Member] = []
    for (node, handler), pairs in items.items():
        module = node.module
        if graph.is_out_channel_pruning_fn(handler):
            site = "out"
        elif graph.is_in_channel_pruning_fn(handler):
            site = "in"
        else:
            continue
        if module not in names:
            if isinstance(module, nn.Parameter):
                return f"{root_name}: coupled with a bare parameter; not pruned"
            continue  # a functional op (add, cat, flatten...): it holds no tensor to mask
        name = names[module]
        if not can_mask(real[name]) or isinstance(real[name], nn.MultiheadAttention):
            return f"{root_name}: coupled with {type(real[name]).__name__} {name!r}; not pruned"
        pairs = sorted(pairs)
        idxs = torch.tensor([i for i, _ in pairs], dtype=torch.long)
        units = torch.tensor([u for _, u in pairs], dtype=torch.long)
        members.append(Member(name, site, idxs, units))
    if root_name is None or not members:
        return None
    size = int(max(int(m.units.max()) for m in members) + 1)
    return Group(root_name, "channels", size, members)


# -- transformers ------------------------------------------------------------------------------
def _transformer_groups(model: nn.Module, notes: list[str] | None = None) -> list[Group]:
    groups: list[Group] = []
    modules = dict(model.named_modules())
    for name, m in modules.items():
        if isinstance(m, nn.MultiheadAttention):
            groups.append(_mha_heads(name, m))
        elif _is_hf_self_attention(m):
            parent = name.rpartition(".")[0]
            out = modules.get(f"{parent}.output.dense")
            if out is not None and can_mask(out):
                groups.append(_hf_heads(name, m, f"{parent}.output.dense"))
        elif _is_hf_ffn(name, modules):
            groups.append(_ffn(name, modules))
        elif is_fused_attention(m):
            group = fused_heads(name, m, Group, Member)
            if isinstance(group, str):
                if notes is not None:
                    notes.append(group)
            else:
                groups.append(group)
    return groups


def _heads_member(module: str, site: str, width: int, head_dim: int) -> Member:
    idxs = torch.arange(width)
    return Member(module, site, idxs, idxs // head_dim)


def _mha_heads(name: str, mha: nn.MultiheadAttention) -> Group:
    e, h = mha.embed_dim, mha.num_heads
    members = [_heads_member(name, s, e, e // h) for s in ("q", "k", "v", "o")]
    return Group(name, "heads", h, members)


def _is_hf_self_attention(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("query", "key", "value")) and hasattr(
        m, "attention_head_size"
    )


def _hf_heads(name: str, m: nn.Module, out_name: str) -> Group:
    heads = getattr(m, "num_attention_heads", None) or m.config.num_attention_heads
    d = m.attention_head_size
    width = heads * d
    members = [_heads_member(f"{name}.{p}", "out", width, d) for p in ("query", "key", "value")]
    members.append(_heads_member(out_name, "in", width, d))
    return Group(name, "heads", heads, members)


def _is_hf_ffn(name: str, modules: dict) -> bool:
    up, down = modules.get(f"{name}.intermediate.dense"), modules.get(f"{name}.output.dense")
    return up is not None and down is not None and can_mask(up) and can_mask(down)


def _ffn(name: str, modules: dict) -> Group:
    up = f"{name}.intermediate.dense"
    width = out_width(modules[up])
    idxs = torch.arange(width)
    members = [Member(up, "out", idxs, idxs), Member(f"{name}.output.dense", "in", idxs, idxs)]
    return Group(f"{name}.intermediate", "neurons", width, members)


def out_width(module: nn.Module) -> int:
    if isinstance(module, AdaptedLayer):
        return module.adapter.out_features
    return module.out_features
