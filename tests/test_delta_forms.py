"""The training kernel's two exact forms of a low-rank delta (``delta_fn._branch_form``):
fused into the weight, ``layer(x; W + L R)``, or a branch beside the frozen layer,
``layer(x; W) + L (R x_c)``. Each is checked against plain autograd through the effective weight
(``AdaptedLayer.fused_weight``) on every tiny model SPLoRA adapts, with pruned channels, in
NCHW and channels-last layouts: outputs within 1e-5 relative (fp32, relative to the largest
entry), gradients of input, adapter factors and biases within 5e-5 (the forms sum the input
gradient's two parts in a different order)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparta
from sparta.adapters import AdaptedLayer, delta_fn
from tiny_models import TINY_MODELS, ResidualNet


def _reference_forward(layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor:
    """The layer's function by plain autograd: its effective weight, differentiable."""
    weight, bias = layer.fused_weight()
    x = layer._pad(x)
    return layer.geometry.layer(x, weight, bias)


def _models():
    cases = [(name, cls, cls.example()) for name, cls in TINY_MODELS.items()]
    return cases + [("residual", ResidualNet, torch.randn(3, 3, 8, 8))]


def _wrapped(cls, seed=0):
    torch.manual_seed(seed)
    model = sparta.wrap(cls(), "splora", rank=3)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for ad in (m for m in model.modules() if isinstance(m, sparta.Adapter)):
            for p in ad.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            ad.mask_out[torch.randperm(ad.out_features, generator=gen)[: ad.out_features // 3]] = 0
            ad.mask_in[torch.randperm(ad.in_features, generator=gen)[: ad.in_features // 4]] = 0
    return model.train()


def _run(model, x, form, monkeypatch):
    """Output and gradients (input, then every trainable parameter) with ``form`` forced:
    ``"fused"``, ``"branch"`` (where the layer allows it) or ``"reference"`` (plain autograd)."""
    x = x.clone().requires_grad_(True)
    with monkeypatch.context() as patch:
        if form == "reference":
            patch.setattr(AdaptedLayer, "forward", _reference_forward)
        else:
            forced = lambda geom, x, weight, right: form == "branch" and _allowed(geom, right)  # noqa: E731
            patch.setattr(delta_fn, "_branch_form", forced)
        model.zero_grad(set_to_none=True)
        y = model(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]
    return y.detach(), grads


def _allowed(geom, right) -> bool:
    """Whether the branch form exists for this layer (what ``_branch_form`` checks first)."""
    return right is not None and geom.groups == 1 and min(geom.centre_offsets(), default=0) >= 0


def _close(a: torch.Tensor, b: torch.Tensor, rel=1e-5) -> bool:
    return (a - b).abs().max().item() <= rel * max(b.abs().max().item(), 1e-12)


# channels-last exists for 4-d inputs only: those models run in both layouts
_LAYOUTS = [(*m, cl) for m in _models() for cl in ((False, True) if m[2].dim() == 4 else (False,))]


@pytest.mark.parametrize(
    "name,cls,x,channels_last",
    _LAYOUTS,
    ids=[f"{c[0]}-{'channels_last' if c[3] else 'nchw'}" for c in _LAYOUTS],
)
@pytest.mark.parametrize("form", ["fused", "branch"])
def test_each_form_matches_plain_autograd(name, cls, x, form, channels_last, monkeypatch):
    model = _wrapped(cls)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y_ref, g_ref = _run(model, x, "reference", monkeypatch)
    y, grads = _run(model, x, form, monkeypatch)
    assert _close(y, y_ref)
    assert len(grads) == len(g_ref)
    # Gradients that are zero in exact arithmetic (a conv bias before batch norm) are compared
    # at 1e-5 of the model's largest gradient.
    scale = max(g.abs().max().item() for g in g_ref if g is not None)
    for g, want in zip(grads, g_ref):
        assert (g is None) == (want is None)
        if want is not None:
            err, tol = (
                (g - want).abs().max().item(),
                max(5e-5 * want.abs().max().item(), 1e-5 * scale),
            )
            assert err <= tol, (
                f"{name}/{form}: a gradient differs by {err:.3g} (tolerance {tol:.3g})"
            )


def test_the_cost_model_picks_the_branch_for_large_weights_and_few_positions():
    """Late ResNet-like layers (512 x 512 x 3 x 3 weight, 4 x 4 outputs) take the branch;
    early ones (64 x 64, 32 x 32 outputs) the fused weight."""
    late = AdaptedLayer(nn.Conv2d(512, 512, 3, padding=1), "splora", rank=16)
    early = AdaptedLayer(nn.Conv2d(64, 64, 3, padding=1), "splora", rank=16)
    right = torch.zeros(16, 1)
    x_late, x_early = torch.empty(8, 512, 4, 4), torch.empty(8, 64, 32, 32)
    assert delta_fn._branch_form(late.geometry, x_late, late.base.weight, right)
    assert not delta_fn._branch_form(early.geometry, x_early, early.base.weight, right)
    # a full (non-factored) delta has no branch form
    assert not delta_fn._branch_form(late.geometry, x_late, late.base.weight, None)
