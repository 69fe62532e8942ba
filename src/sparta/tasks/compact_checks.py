"""Checks of a compact model (graph path and export): widths per group member, outputs
compared with the masked model's within 1e-4 relative (4 eps for half precision)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from ..errors import SpartaError
from ..masks import NORMS
from ..pruning.groups import Group
from ..utils import call
from .compact_cut import _layer


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
