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

import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from ..errors import SpartaError
from ..pruning.groups import Group
from ..pruning.masks import NORMS, resolve_mask
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

    @property
    def dense(self) -> list[GroupOutcome]:
        """Groups with pruned units that were kept in place (as exact zeros), with reasons."""
        return [g for g in self.groups if g.dense_reason is not None]

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"parameters {self.params_before:,} -> {self.params_after:,}"]
        lines += [f"kept dense {g.name} ({g.kind}): {g.dense_reason}" for g in self.dense]
        return "\n".join(lines)


def build_compact(
    model: nn.Module, groups: list[Group], example_inputs, verify: bool = True
) -> tuple[nn.Module, CompactReport]:
    """A new plain model computing what pruned ``model`` computes, with dead units removed.

    Args:
        model: a pruned model (``sparta.wrap`` + ``Pruner``, or a fine-pruned plain model);
            it is never modified.
        groups: its groups (``pruner.groups``).
        example_inputs: a batch the model accepts (tensor, tuple or dict), used to trace.
        verify: run the fused model before and after removal (eval mode, on
            ``example_inputs``) and raise if the outputs differ by more than 1e-4 relative.

    Returns ``(compact_model, report)``.
    """
    from ..wrap import fuse

    if not isinstance(model, nn.Module):
        raise TypeError(f"build_compact expects a torch.nn.Module, got {type(model).__name__}")
    plain = fuse(model)
    report = CompactReport(_count(plain), 0)
    flags = {n: p.requires_grad for n, p in plain.named_parameters()}
    widths = _widths(plain, groups)
    want = _output(plain, example_inputs) if verify else None
    channel_plans, sliced_plans = [], []
    for g in groups:
        dead = _dead_units(model, g)
        removed = dead[1:] if len(dead) == g.size else dead  # keep one (zero) unit, never none
        reason = _dense_reason(plain, g) if len(removed) else None
        outcome = GroupOutcome(g.name, g.kind, g.size, g.size - len(dead), 0, reason)
        report.groups.append(outcome)
        if len(removed) and reason is None:
            outcome.removed = len(removed)
            (channel_plans if g.kind == "channels" else sliced_plans).append((g, removed))
    if channel_plans:
        _prune_channels(plain, channel_plans, example_inputs)
    for g, removed in sliced_plans:
        _slice_group(plain, g, removed)
    for n, p in plain.named_parameters():
        p.requires_grad_(flags.get(n, False))
    _check_widths(plain, widths, channel_plans + sliced_plans)
    report.params_after = _count(plain)
    if verify:
        _compare(want, _output(plain, example_inputs))
    return plain, report


# -- which units are dead ----------------------------------------------------------------------
def _dead_units(model: nn.Module, group: Group) -> Tensor:
    """Units none of whose produced entries survive the masks (as ``Pruner._alive``)."""
    alive = torch.zeros(group.size, dtype=torch.bool)
    for m in group.outputs() or group.members:
        mask = resolve_mask(model, m.module, m.site, create=False)
        if mask is None:  # never masked: everything alive
            alive[m.units] = True
        else:
            alive.index_put_((m.units,), mask[m.idxs].bool().cpu(), accumulate=True)
    return (~alive).nonzero().flatten()


def _dense_reason(plain: nn.Module, group: Group) -> str | None:
    modules = {m.module: plain.get_submodule(m.module) for m in group.members}
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
    if group.kind == "heads":  # Hugging Face self-attention: reshapes by these attributes
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


def _check_widths(plain: nn.Module, before: dict, plans) -> None:
    """Every member lost exactly its removed entries: else refuse the result."""
    dropped: dict[tuple[str, str], set[int]] = {}
    for g, removed in plans:
        for m in g.members:
            hit = m.idxs[torch.isin(m.units, removed)]
            dropped.setdefault((m.module, m.site), set()).update(int(i) for i in hit)
    for (name, site), width in before.items():
        if width is None:
            continue
        expected = width - len(dropped.get((name, site), ()))
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
    if err > 1e-4:
        raise SpartaError(
            f"compact model differs from the pruned model: output {tuple(got.shape)} vs "
            f"{tuple(want.shape)}, max relative difference {err:.3g} (allowed 1e-4)"
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
