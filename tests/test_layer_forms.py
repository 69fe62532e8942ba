"""Torch-layer subclasses are adapted only where sparta reproduces their forward exactly (timm's
dynamic "same" padding and weight standardisation, checked at several input sizes), others are
skipped with the reason; code reading ``.weight`` / ``.bias`` of an adapted layer gets the
effective tensors and trains the adapter through them (torchvision's Swin)."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import sparta
from sparta.adapters import forms

timm = pytest.importorskip("timm")

RANK = 4
INIT_SCALE = 1e-8
RTOL = 1e-5 + 1e4 * INIT_SCALE  # see test_wrap_models.py


def rel_err(got, want) -> float:
    got, want = got.detach(), want.detach()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


# -- torch-layer subclasses --------------------------------------------------------------------
def _adapted(layer: nn.Module, **options) -> sparta.AdaptedLayer:
    return sparta.AdaptedLayer(copy.deepcopy(layer), "splora", rank=RANK, **options)


def _perturb(adapted: sparta.AdaptedLayer, std: float = 0.05) -> None:
    with torch.no_grad():
        for p in adapted.adapter.parameters():
            p.normal_(0, std)


@pytest.mark.parametrize("px", [(96, 96), (97, 97), (224, 224), (97, 60)])
@pytest.mark.parametrize("kernel, stride, dilation", [(3, 2, 1), (5, 2, 1), (3, 1, 2), (3, 2, 2)])
def test_conv2d_same_is_reproduced_exactly_at_any_input_size(px, kernel, stride, dilation):
    from timm.layers import Conv2dSame

    torch.manual_seed(0)
    conv = Conv2dSame(4, 6, kernel, stride=stride, dilation=dilation, bias=True).eval()
    x = torch.randn(2, 4, *px)
    adapted = _adapted(conv, init_scale=0.0)
    with torch.no_grad():
        assert rel_err(adapted(x), conv(x)) <= 1e-6
    # With a delta: the same as Conv2dSame holding W + delta at its centre tap, on both paths.
    _perturb(adapted)
    reference = copy.deepcopy(conv)
    with torch.no_grad():
        reference.weight[:, :, kernel // 2, kernel // 2] += adapted.adapter.delta()
        want = reference(x)
        fused = adapted(x)
    trained = adapted(x)  # gradient path (DeltaLayerFn over the padded input)
    assert trained.grad_fn is not None
    assert rel_err(fused, want) <= 1e-5 and rel_err(trained, want) <= 1e-5
    plain = sparta.fuse(nn.Sequential(adapted))[0]
    assert type(plain) is Conv2dSame
    with torch.no_grad():
        assert rel_err(plain(x), want) <= 1e-5


def test_tf_efficientnet_wraps_exactly_at_sizes_plain_conv_would_break():
    # At 96 px a Conv2dSame adapted as a plain conv crashed; at 97 its padding differs per side.
    torch.manual_seed(0)
    model = timm.create_model("tf_mobilenetv3_small_minimal_100", pretrained=False).eval()
    wrapped = sparta.wrap(model, rank=RANK, init_scale=0.0)
    kinds = {type(m.base).__name__ for m in wrapped.modules() if isinstance(m, sparta.AdaptedLayer)}
    assert "Conv2dSame" in kinds and not wrapped.sparta_report.skipped
    for px in (96, 97):
        x = torch.randn(1, 3, px, px)
        with torch.no_grad():
            assert rel_err(wrapped.eval()(x), model(x)) <= 1e-6


def _std_rows(w: torch.Tensor, eps: float, gain: torch.Tensor | None = None) -> torch.Tensor:
    """Weight standardisation written out: each row to mean 0, (biased) variance 1."""
    rows = w.reshape(w.shape[0], -1)
    mean = rows.mean(1, keepdim=True)
    var = rows.var(1, unbiased=False, keepdim=True)
    out = (rows - mean) / torch.sqrt(var + eps)
    if gain is not None:
        out = out * gain.reshape(-1, 1)
    return out.reshape_as(w)


@pytest.mark.parametrize("kind", ["StdConv2d", "ScaledStdConv2d", "StdConv2dSame"])
def test_weight_standardised_conv_standardises_the_masked_weight_plus_delta(kind):
    import timm.layers as tl

    torch.manual_seed(0)
    cls = getattr(tl, kind)
    conv = cls(6, 8, 3, stride=2, bias=True).eval()
    with torch.no_grad():
        conv.bias.normal_()
        if kind == "ScaledStdConv2d":
            conv.gain.uniform_(0.5, 1.5)
    x = torch.randn(2, 6, 11, 11)
    adapted = _adapted(conv, init_scale=0.0)
    with torch.no_grad():
        assert rel_err(adapted(x), conv(x)) <= 1e-6
    _perturb(adapted)
    with torch.no_grad():
        adapted.adapter.mask_out[[1, 5]] = 0
        adapted.adapter.mask_in[2] = 0
    gain = (conv.gain * conv.scale).flatten() if kind == "ScaledStdConv2d" else None
    mask = (adapted.mask_out[:, None] * adapted.mask_in[None, :])[..., None, None]
    raw = conv.weight.detach().clone()
    raw[:, :, 1, 1] += adapted.adapter.delta().detach()
    weight = _std_rows(raw * mask, conv.eps, gain) * mask
    bias = conv.bias * adapted.mask_out
    padded = forms.same_pad(conv, x) if getattr(conv, "same_pad", False) else x
    want = F.conv2d(padded, weight, bias, conv.stride, conv.padding)
    with torch.no_grad():
        assert rel_err(adapted(x), want) <= 1e-5
        assert rel_err(adapted.weight, weight) <= 1e-6
    # Training: the gradient passes through the standardisation to the adapter; pruned
    # entries get none, so they cannot regrow.
    adapted(x).square().sum().backward()
    grad_a = adapted.adapter.A.grad
    assert grad_a.abs().sum() > 0 and bool((grad_a[:, 2] == 0).all())
    assert bool((adapted.adapter.B.grad[[1, 5]] == 0).all())
    plain = sparta.fuse(nn.Sequential(adapted))[0]
    assert type(plain) in (nn.Conv2d, tl.Conv2dSame) and not hasattr(plain, "gain")
    with torch.no_grad():
        assert rel_err(plain(x), want) <= 1e-5


class _Doubled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class _OwnConvForward(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, weight.flip(-1), bias)


class _Renamed(nn.Conv2d):  # overrides nothing the forward runs through: adapted as a conv
    def describe(self) -> str:
        return "mine"


def _model_with(layer: nn.Module) -> nn.Sequential:
    """``layer`` (6 outputs), then an adaptable layer and a head."""
    if isinstance(layer, nn.Linear):
        return nn.Sequential(layer, nn.ReLU(), nn.Linear(6, 6), nn.Linear(6, 3))
    pool = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)]
    return nn.Sequential(layer, nn.ReLU(), nn.Conv2d(6, 6, 1), *pool)


@pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")
@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: _Doubled(5, 6), "_Doubled overrides forward of torch's Linear"),
        (lambda: _OwnConvForward(3, 6, 3, padding=1), "overrides _conv_forward of torch's Conv2d"),
        (lambda: nn.utils.weight_norm(nn.Linear(5, 6)), "forward hooks"),
        (lambda: nn.utils.parametrizations.spectral_norm(nn.Linear(5, 6)), "parametrization"),
    ],
    ids=["forward", "conv_forward", "weight_norm", "parametrized"],
)
def test_a_layer_whose_forward_sparta_cannot_reproduce_is_skipped_with_its_reason(make, words):
    torch.manual_seed(0)
    layer = make()
    model = _model_with(layer).eval()
    x = torch.randn(2, 5) if isinstance(layer, nn.Linear) else torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
    with pytest.raises(sparta.ConfigError, match=re.escape(words)):
        sparta.wrap(model, rank=2, include="0")  # nothing left to adapt: refused, with the reason
    with pytest.warns(sparta.SkippedLayerWarning, match=re.escape(words)):
        wrapped = sparta.wrap(model, rank=2, init_scale=0.0)
    report = wrapped.sparta_report
    assert report.adapted == ["2"]
    assert [s.name for s in report.skipped] == ["0"] and words in report.skipped[0].reason
    assert type(wrapped[0]) is type(layer)  # left as it is, frozen
    assert not any(p.requires_grad for p in wrapped[0].parameters())
    with torch.no_grad():
        assert rel_err(wrapped.eval()(x), want) <= 1e-6
    with pytest.raises(sparta.NotAdaptableError, match=re.escape(words)):
        sparta.AdaptedLayer(copy.deepcopy(layer))


def test_a_subclass_that_overrides_nothing_of_the_forward_is_adapted():
    torch.manual_seed(0)
    model = _model_with(_Renamed(3, 6, 3, padding=1)).eval()
    wrapped = sparta.wrap(model, rank=2, init_scale=0.0)
    assert wrapped.sparta_report.adapted == ["0", "2"] and not wrapped.sparta_report.skipped
    assert type(wrapped[0].base) is _Renamed
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(wrapped.eval()(x), model(x)) <= 1e-6


def test_a_wrong_recipe_is_caught_by_the_probe_and_the_layer_skipped():
    torch.manual_seed(0)
    name = f"{_Doubled.__module__}.{_Doubled.__qualname__}"
    forms.register_form(name)  # claims: plain Linear (wrong: the output is doubled)
    try:
        model = nn.Sequential(_Doubled(5, 6), nn.ReLU(), nn.Linear(6, 6), nn.Linear(6, 3))
        with pytest.warns(sparta.SkippedLayerWarning, match="differs from its forward by 0.5"):
            wrapped = sparta.wrap(model, rank=2)
        assert [s.name for s in wrapped.sparta_report.skipped] == ["0"]
    finally:
        del forms._FORMS[name]


# -- .weight / .bias of an adapted layer -------------------------------------------------------
class _Reader(nn.Module):
    """Uses its projection's tensors instead of calling it (as torchvision's Swin does)."""

    def __init__(self, read: bool):
        super().__init__()
        self.read = read
        self.proj = nn.Linear(5, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = F.linear(x, self.proj.weight, self.proj.bias) if self.read else self.proj(x)
        return self.head(h.relu())


def test_weight_and_bias_of_an_adapted_layer_are_the_effective_tensors():
    torch.manual_seed(0)
    layer = _adapted(nn.Linear(5, 6))
    _perturb(layer)
    with torch.no_grad():
        layer.adapter.mask_out[4] = 0
        layer.adapter.mask_in[1] = 0
    mask = layer.mask_out[:, None] * layer.mask_in[None, :]
    want = (layer.base.weight + layer.adapter.B @ layer.adapter.A) * mask
    assert torch.allclose(layer.weight, want, atol=1e-7)
    assert layer.weight.requires_grad  # differentiable to the adapter: gradients are on
    assert torch.equal(layer.bias, layer.base.bias * layer.mask_out)
    assert (layer.weight.shape, layer.weight.dtype) == (layer.base.weight.shape, torch.float32)
    with torch.no_grad():
        first = layer.weight
        assert first is layer.weight and not first.requires_grad  # cached
    assert not layer.base.weight.requires_grad  # the frozen tensor is untouched
    assert "weight" not in dict(layer.named_parameters())  # nothing new to save or train


def test_a_module_reading_weight_trains_the_adapter_exactly_as_calling_the_layer():
    torch.manual_seed(0)
    calls, reads = _Reader(read=False), _Reader(read=True)
    reads.load_state_dict(calls.state_dict())
    x = torch.randn(4, 5)
    grads = []
    for model in (calls, reads):
        torch.manual_seed(1)
        wrapped = sparta.wrap(model, rank=RANK)
        _perturb(wrapped.proj)
        out = wrapped(x)
        out.square().sum().backward()
        adapter = wrapped.proj.adapter
        grads.append((out.detach(), adapter.A.grad, adapter.B.grad, wrapped.proj.base.bias.grad))
    for got, want in zip(grads[1], grads[0]):
        assert got.abs().sum() > 0
        assert rel_err(got, want) <= 1e-5


def test_swin_t_reads_weights_and_trains_its_adapters():
    torch.manual_seed(0)
    base = torchvision.models.swin_t(weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = base(x)
    with pytest.warns(sparta.SkippedLayerWarning, match="features.0.0"):  # 4x4 patchify conv
        wrapped = sparta.wrap(base, rank=RANK, init_scale=INIT_SCALE)
    with torch.no_grad():
        assert rel_err(wrapped.eval()(x), want) <= RTOL
    qkv = wrapped.features[1][0].attn.qkv  # read as .weight / .bias, never called
    assert isinstance(qkv, sparta.AdaptedLayer)
    wrapped.train()
    wrapped(x).logsumexp(1).sum().backward()
    assert float(qkv.adapter.B.grad.abs().sum()) > 0 and float(qkv.base.bias.grad.abs().sum()) > 0
    proj = wrapped.features[1][0].attn.proj
    assert float(proj.adapter.B.grad.abs().sum()) > 0
    assert qkv.base.weight.grad is None  # the base stays frozen


def _std_net() -> nn.Sequential:
    from timm.layers import StdConv2d

    layers = [StdConv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()


def test_a_standardised_conv_is_pruned_when_adapted_and_kept_whole_when_fine_pruned():
    from sparta.tasks import build_compact

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    # Plain (fine-pruning): a mask on the stored weight is not pruning once standardised.
    pruner = sparta.Pruner(_std_net(), x, "l1", target=0.5)
    assert all(m.module != "0" for g in pruner.groups for m in g.members)
    assert any("StdConv2d '0'" in note for note in pruner.notes)
    # Adapted: the mask is applied after the standardisation, so it prunes, and slicing the
    # fused (standardised) weight reproduces it.
    wrapped = sparta.wrap(_std_net(), rank=2)
    _perturb(wrapped[0])
    pruner = sparta.Pruner(wrapped, x, "l1", target=0.5, ranking="local")
    pruner.step()
    assert int(wrapped[0].mask_out.sum()) == 4
    compact, _ = build_compact(wrapped, pruner.groups, x)  # verify: raises if outputs differ
    assert type(compact[0]) is nn.Conv2d and compact[0].out_channels == 4


def test_a_task_with_standardised_convs_builds_them_cut():
    """sparta.build groups the task's own (adapted) model, where a standardising conv can be
    cut; grouped on the plain base it could not, and the task was built uncut."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    base = _std_net()
    wrapped = sparta.wrap(base, rank=2)
    _perturb(wrapped[0])
    sparta.Pruner(wrapped, x, "l1", target=0.5, ranking="local").step()
    compact = sparta.build(base, sparta.export(wrapped))
    assert compact[0].out_channels == 4 and compact[2].in_channels == 4
    torch.testing.assert_close(compact(x), wrapped.eval()(x), rtol=1e-5, atol=1e-6)


def test_a_linear_output_on_an_nd_input_can_be_edited_in_place_while_training():
    """F.linear of an N-d input is a view; Swin V2 edits such outputs in place."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 4))
    wrapped = sparta.wrap(model, rank=2).train()
    x = torch.randn(2, 5, 8)
    out = wrapped(x)
    torch.testing.assert_close(out, model(x), rtol=1e-3, atol=1e-3)
    out.sum().backward()
    assert float(wrapped[0].adapter.B.grad.abs().sum()) > 0
