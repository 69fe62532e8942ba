"""Property-based tests over random layer shapes: the adapted layer computes the paper's formula.

Reference, written independently of the layer's code: W_task = (W + centre(delta)) * M,
b_task = b * mask_out, evaluated with the untouched torch layer's own forward.
"""

from __future__ import annotations

from unittest import mock

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparta
from sparta.adapters import delta_fn

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@st.composite
def conv_layers(draw):
    dims = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    in_ch = groups * draw(st.integers(1, 3))
    out_ch = groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.sampled_from([1, 3, 5])) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    choice = draw(st.sampled_from(["int", "same", "valid"]))
    if choice == "same" and any(s > 1 for s in stride):
        choice = "int"  # torch refuses padding="same" with stride
    padding = tuple(draw(st.integers(0, 3)) for _ in range(dims)) if choice == "int" else choice
    layer = CONV[dims](
        in_ch, out_ch, kernel, stride=stride, padding=padding, dilation=dilation,
        groups=groups, bias=draw(st.booleans()), padding_mode=mode,
    )  # fmt: skip
    # Input large enough for the receptive field and for reflect padding.
    reach = [d * (k - 1) + 1 for d, k in zip(dilation, kernel)]
    size = [max(r, 4) + draw(st.integers(0, 4)) for r in reach]
    return layer, (draw(st.integers(1, 2)), in_ch, *size)


@st.composite
def adapters(draw, layer):
    name = draw(st.sampled_from(sparta.list_adapters()))
    out_f = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    in_f = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    groups = getattr(layer, "groups", 1)
    if (name == "sppara" and isinstance(layer, nn.Linear)) or (
        name == "splopa" and not isinstance(layer, nn.Linear)
    ):
        name = "splora"
    if name == "splopa":  # blocks that tile the weight
        p = draw(st.sampled_from([d for d in range(1, out_f + 1) if out_f % d == 0]))
        q = draw(st.sampled_from([d for d in range(1, in_f + 1) if in_f % d == 0]))
        return name, {
            "block": (p, q),
            "prototypes": draw(st.integers(1, 5)),
            "prototype_rank": draw(st.sampled_from([1, 2])),
        }
    if name == "splora":
        return name, {"rank": draw(st.integers(1, max(out_f, in_f // groups)))}
    return name, {}


def _reference(layer: nn.Module, adapter, x):
    weight = layer.weight.detach().clone()
    centre = tuple(k // 2 for k in getattr(layer, "kernel_size", ()))
    weight[(slice(None), slice(None), *centre)] += adapter.delta()
    weight = weight * adapter.mask_matrix().reshape(
        *adapter.mask_matrix().shape, *[1] * len(centre)
    )
    bias = None if layer.bias is None else layer.bias * adapter.mask_out
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    return layer._conv_forward(x, weight, bias)


def _check(layer, shape, name, options, data):
    layer = layer.double()
    adapted = sparta.AdaptedLayer(layer, name, **options).double()
    ad = adapted.adapter
    with torch.no_grad():
        for p in ad.parameters():
            p.normal_()
        ad.mask_out.copy_(
            torch.tensor(
                data.draw(
                    st.lists(
                        st.sampled_from([0.0, 1.0]),
                        min_size=ad.out_features,
                        max_size=ad.out_features,
                    )
                )
            )
        )
        ad.mask_in.copy_(
            torch.tensor(
                data.draw(
                    st.lists(
                        st.sampled_from([0.0, 1.0]),
                        min_size=ad.in_features,
                        max_size=ad.in_features,
                    )
                )
            )
        )
    if layer.bias is not None:
        layer.bias.requires_grad_(True)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    wanted = [x, *ad.parameters()] + ([layer.bias] if layer.bias is not None else [])

    # Both ways of differentiating a low-rank delta (thin products or the centre-tap weight
    # gradient) are chosen by cost in practice; each must be exact.
    thin = data.draw(st.booleans())
    # A low-rank delta also runs fused or as a branch beside the layer (chosen by cost).
    branch = data.draw(st.booleans())
    with (
        mock.patch.object(delta_fn, "_prefer_thin", lambda left, right: thin and right is not None),
        mock.patch.object(
            delta_fn,
            "_branch_form",
            lambda geom, x, w, right: (
                branch
                and right is not None
                and geom.groups == 1
                and min(geom.centre_offsets(), default=0) >= 0
            ),
        ),
    ):
        y = adapted(x)
        expected = _reference(layer, ad, x)
        grad_out = torch.randn_like(expected)
        got = torch.autograd.grad(y, wanted, grad_out)
    want = torch.autograd.grad(expected, wanted, grad_out)
    with torch.no_grad():
        fused = adapted(x)
    scale = expected.abs().max().item() + 1e-12
    assert (y - expected).abs().max().item() <= 1e-9 * scale
    assert (fused - expected).abs().max().item() <= 1e-9 * scale
    for g, w in zip(got, want):
        assert (g - w).abs().max().item() <= 1e-9 * (w.abs().max().item() + 1e-12)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_conv_adapter_matches_formula_and_its_gradients(data):
    layer, shape = data.draw(conv_layers())
    name, options = data.draw(adapters(layer))
    _check(layer, shape, name, options, data)


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_linear_adapter_matches_formula_and_its_gradients(data):
    in_f, out_f = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9))
    layer = nn.Linear(in_f, out_f, bias=data.draw(st.booleans()))
    lead = data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    name, options = data.draw(adapters(layer))
    _check(layer, (*lead, in_f), name, options, data)
