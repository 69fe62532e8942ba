"""``wrap`` on models a user brings: every model family of the sweep computes what it computed
before wrapping (up to the adapter's tiny init), and the head is found even when it is a
convolution (layer subclasses and ``.weight`` readers: ``test_layer_forms.py``)."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torchvision
from torch import nn

import sparta
from sparta.heads import output_layers, protected_layers, static_head
from sparta.masks import resolve_mask

timm = pytest.importorskip("timm")

RANK = 4
#: Init scale of the adapters' B factor in the sweep: each adapted weight moves by about
#: RANK * INIT_SCALE of its size, and deep nets amplify a perturbation (a random BiT-ResNet-50,
#: in float64: output change 60x the init scale); float32 rounding through the net adds up to
#: ~1e-5. So: RTOL = 1e-5 + 1e4 * INIT_SCALE. A forward reproduced wrong misses by far more
#: (timm's Conv2dSame adapted as a plain conv: 0.29).
INIT_SCALE = 1e-8
RTOL = 1e-5 + 1e4 * INIT_SCALE


def rel_err(got, want) -> float:
    got, want = got.detach(), want.detach()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def logits(out):
    return out.logits if hasattr(out, "logits") else out


# -- the sweep ---------------------------------------------------------------------------------
#: torchvision: family -> (pattern of its members, smallest member, input px, slow)
TORCHVISION = {
    "alexnet": (r"alexnet", "alexnet", 64, True),
    "convnext": (r"convnext_\w+", "convnext_tiny", 64, True),
    "densenet": (r"densenet\d+", "densenet121", 64, True),
    "efficientnet": (r"efficientnet_b\d", "efficientnet_b0", 32, False),
    "efficientnet_v2": (r"efficientnet_v2_\w", "efficientnet_v2_s", 64, True),
    "googlenet": (r"googlenet", "googlenet", 64, True),
    "inception": (r"inception_v3", "inception_v3", 80, True),
    "maxvit": (r"maxvit_\w", "maxvit_t", 224, True),
    "mnasnet": (r"mnasnet\d_\d+", "mnasnet0_5", 32, False),
    "mobilenet_v2": (r"mobilenet_v2", "mobilenet_v2", 32, True),
    "mobilenet_v3": (r"mobilenet_v3_\w+", "mobilenet_v3_small", 32, False),
    "regnet_x": (r"regnet_x_\w+", "regnet_x_400mf", 32, False),
    "regnet_y": (r"regnet_y_\w+", "regnet_y_400mf", 64, True),
    "resnet": (r"resnet\d+", "resnet18", 32, False),
    "resnext": (r"resnext\d+_\w+", "resnext50_32x4d", 64, True),
    "shufflenet": (r"shufflenet_v2_x\d_\d", "shufflenet_v2_x0_5", 32, False),
    "squeezenet": (r"squeezenet1_0", "squeezenet1_0", 48, False),
    "squeezenet1_1": (r"squeezenet1_1", "squeezenet1_1", 48, False),
    "swin": (r"swin_[tsb]", "swin_t", 32, True),  # default suite: test_swin_t_reads_...
    "swin_v2": (r"swin_v2_[tsb]", "swin_v2_t", 32, True),
    "vgg": (r"vgg\d+", "vgg11", 64, True),
    "vgg_bn": (r"vgg\d+_bn", "vgg11_bn", 64, True),
    "vit": (r"vit_[bhl]_\d+", "vit_b_32", 224, True),
    "wide_resnet": (r"wide_resnet\d+_2", "wide_resnet50_2", 64, True),
}

#: timm: model -> (input px, slow); the layer subclass each one brings is noted.
TIMM = {
    "resnet18": (32, True),
    "efficientnet_b0": (64, True),
    "tf_mobilenetv3_small_minimal_100": (33, False),  # Conv2dSame, timm Linear
    "tf_efficientnet_b0": (64, True),  # Conv2dSame
    "convnext_atto": (32, False),
    "regnetx_002": (32, True),
    "deit_tiny_patch16_224": (224, False),
    "deit_tiny_distilled_patch16_224": (224, True),  # two heads
    "vit_tiny_r_s16_p8_224": (224, True),  # StdConv2dSame (hybrid stem)
    "mobilevitv2_050": (64, False),
    "mobilevit_xxs": (64, True),
    "swin_tiny_patch4_window7_224": (224, True),
    "nf_regnet_b0": (32, False),  # ScaledStdConv2d
    "dm_nfnet_f0": (64, True),  # ScaledStdConv2dSame
    "resnetv2_50x1_bit": (64, True),  # StdConv2d
}


def _param(name, slow):
    return pytest.param(name, id=name, marks=[pytest.mark.slow] if slow else [])


def _torchvision_case(name: str):
    px = next(px for _, (_, member, px, _) in TORCHVISION.items() if member == name)
    model = torchvision.models.get_model(name, weights=None, num_classes=10)
    return model, torch.randn(1, 3, px, px)


def _timm_case(name: str):
    px = TIMM[name][0]
    return timm.create_model(name, pretrained=False, num_classes=10), torch.randn(1, 3, px, px)


def _hf_case(name: str):
    transformers = pytest.importorskip("transformers")
    if name == "bert":
        cfg = transformers.BertConfig(
            vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, num_labels=3,
        )  # fmt: skip
        model = transformers.BertForSequenceClassification(cfg)
        ids = torch.randint(0, 99, (2, 7))
        return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    cfg = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=37, num_labels=3,
    )  # fmt: skip
    return transformers.ViTForImageClassification(cfg), {"pixel_values": torch.randn(2, 3, 32, 32)}


def _run(model, x):
    return logits(model(**x) if isinstance(x, dict) else model(x))


def _check_wrap_equals_base(model: nn.Module, x) -> sparta.WrapReport:
    model.eval()
    with torch.no_grad():
        want = _run(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sparta.SkippedLayerWarning)
        wrapped = sparta.wrap(model, rank=RANK, init_scale=INIT_SCALE, inplace=True)
    report = wrapped.sparta_report
    with torch.no_grad():
        got = _run(wrapped.eval(), x)
    assert got.shape == want.shape
    assert rel_err(got, want) <= RTOL
    assert len(report.adapted) > 0 and len(report.head) == 1
    # The head found without inputs is one of the layers that really produce the outputs.
    assert report.head[0] in output_layers(wrapped, x)
    # Every layer of these models is reproduced: only kernels without a centre tap are left out.
    assert all("even size" in s.reason for s in report.skipped), report.skipped
    return report


def test_the_sweep_covers_every_torchvision_family():
    names = torchvision.models.list_models(module=torchvision.models)
    assert len(names) >= 80
    for name in names:
        owners = [f for f, (pattern, *_) in TORCHVISION.items() if re.fullmatch(pattern, name)]
        assert len(owners) == 1, (name, owners)
    for pattern, member, *_ in TORCHVISION.values():
        assert re.fullmatch(pattern, member) and member in names


@pytest.mark.parametrize(
    "name", [_param(member, slow) for _, member, _, slow in TORCHVISION.values()]
)
def test_torchvision_family_wraps_to_the_same_function(name):
    torch.manual_seed(0)
    _check_wrap_equals_base(*_torchvision_case(name))


@pytest.mark.parametrize("name", [_param(n, slow) for n, (_, slow) in TIMM.items()])
def test_timm_family_wraps_to_the_same_function(name):
    torch.manual_seed(0)
    _check_wrap_equals_base(*_timm_case(name))


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_hugging_face_model_wraps_to_the_same_function(name):
    torch.manual_seed(0)
    report = _check_wrap_equals_base(*_hf_case(name))
    assert report.head == ["classifier"]


# -- the head ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["squeezenet1_0", "squeezenet1_1"])
@pytest.mark.parametrize("adapted", [True, False], ids=["wrapped", "fine-pruned"])
def test_squeezenet_conv_classifier_is_the_head_and_keeps_every_class(name, adapted):
    torch.manual_seed(0)
    base = torchvision.models.get_model(name, weights=None, num_classes=10)
    assert static_head(base) == ["classifier.1"]
    model = sparta.wrap(base, rank=RANK) if adapted else base
    if adapted:
        assert model.sparta_report.head == ["classifier.1"]
        assert type(model.classifier[1]) is nn.Conv2d  # plain and trainable
        assert all(p.requires_grad for p in model.classifier[1].parameters())
    x = torch.randn(1, 3, 48, 48)
    pruner = sparta.Pruner(model, x, "l1", target=0.5, steps=1)
    assert "classifier.1" in pruner.ignored
    pruner.step()
    assert pruner.achieved()["density"] <= 0.5 + 1e-6
    outputs = [m for g in pruner.groups for m in g.outputs() if m.module == "classifier.1"]
    assert outputs == []
    head = model.classifier[1]
    rows = head.weight.detach().flatten(1)
    assert rows.shape[0] == 10 and bool((rows.abs().sum(1) > 0).all())  # every class alive
    mask_out = resolve_mask(model, "classifier.1", "out", create=False)
    assert mask_out is None or bool(mask_out.all())


def test_head_can_be_a_conv_named_explicitly():
    torch.manual_seed(0)
    base = torchvision.models.squeezenet1_1(weights=None, num_classes=10)
    wrapped = sparta.wrap(base, head="features.12.expand3x3")
    assert wrapped.sparta_report.head == ["features.12.expand3x3"]
    assert isinstance(wrapped.classifier[1], sparta.AdaptedLayer)
    assert type(wrapped.features[12].expand3x3) is nn.Conv2d


class _HeadFirst(nn.Module):
    """Registers its classifier before the body: registration order misleads."""

    def __init__(self):
        super().__init__()
        self.classify = nn.Linear(8, 4)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.second = nn.Linear(8, 4)

    def forward(self, x):
        h = self.body(x).mean((2, 3))
        return self.classify(h), 0.5 * self.second(h)


def test_traced_output_layers_find_every_head_whatever_the_registration_order():
    torch.manual_seed(0)
    model = _HeadFirst()
    x = torch.randn(2, 3, 6, 6)
    assert static_head(model) == ["second"]
    assert output_layers(model, x) == ["classify", "second"]
    wrapped = sparta.wrap(model, head=["body.2"])
    with pytest.warns(UserWarning, match=r"kept body.2 as the head, but .* classify, second"):
        protected = protected_layers(wrapped, x)
    assert protected == {"body.2", "classify", "second"}
    assert model.training  # the trace left the training flags as they were


def test_the_pruner_never_prunes_a_layer_producing_the_outputs():
    torch.manual_seed(0)
    model = sparta.wrap(_HeadFirst(), head=None, rank=2)
    x = torch.randn(2, 3, 6, 6)
    pruner = sparta.Pruner(model, x, "l1", target=0.5)
    assert pruner.ignored == {"classify", "second"}
    pruner.step()
    for name in ("classify", "second"):
        assert bool(model.get_submodule(name).mask_out.all())


def test_a_model_without_any_layer_sparta_adapts_is_refused_naming_what_it_holds():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=20, n_positions=8)
    model = transformers.GPT2Model(cfg)  # its projections are transformers' own Conv1D
    with pytest.raises(sparta.ConfigError, match=r"no target layers: .* are Conv1D\)$"):
        sparta.wrap(model)
