"""LRP rules (sparta.pruning.lrp_rules) against zennit, the reference implementation.

The reference runs zennit's rules (ZPlus = alpha1-beta0 for convolutions, Epsilon for linear
layers, Pass for activations and norms, Norm for average pooling and residual sums) on the same
fused copy, made canonical by hand where zennit has no canonizer: every BatchNorm that reads a
layer's output is merged into it (with ``eps = 0`` afterwards, since zennit's merged BatchNorm
divides by ``sqrt(1 + eps)``), residual sums become zennit ``Sum`` modules and functional
pooling becomes a module. The two must then agree to rounding: in float64, every relevance at
every scored layer within 1e-9 of the layer's largest, and the criterion's scores within 1e-9.
(In float32 they agree to about 1e-4 on these models; proportional rules with a 1e-6
stabiliser amplify the rounding of the forward where a window's sum is near zero.)
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import sparta
from sparta.pruning.groups import find_groups
from sparta.pruning.importance import get_criterion
from sparta.pruning.lrp import lrp_copy, relevance_rules, true_class_start
from sparta.pruning.probes import _attached, _probes

zennit = pytest.importorskip("zennit")

TOL = 1e-9  # float64: relative to the largest relevance of the layer


# -- the zennit reference --------------------------------------------------------------------------
def _relative(epsilon: float):
    def stabilise(z):
        eps = epsilon * float(z.detach().std(correction=0)) + 1e-12
        return z + eps * (2 * (z >= 0).to(z.dtype) - 1)

    return stabilise


def _composite(epsilon: float):
    from zennit.composites import EpsilonPlus
    from zennit.rules import Pass, ZPlus

    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    rules = [
        (nn.MultiheadAttention, None),
        ((nn.LayerNorm, nn.GroupNorm), Pass()),
        (convs, ZPlus(stabilizer=_relative(epsilon))),
    ]
    return EpsilonPlus(epsilon=_relative(epsilon), layer_map=rules)


def _merge_batch_norms(plain: nn.Module, x) -> None:
    """Merge each BatchNorm into the conv/linear whose output it reads (found by running)."""
    from zennit.canonizers import MergeBatchNorm

    made, pairs, handles = {}, [], []
    for m in plain.modules():
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear):
            handles.append(
                m.register_forward_hook(lambda mod, a, out: made.update({id(out): (mod, out)}))
            )
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):

            def pre(mod, a):
                if id(a[0]) in made:
                    pairs.append((made[id(a[0])][0], mod))

            handles.append(m.register_forward_pre_hook(pre))
    with torch.no_grad():
        plain(x)
    for h in handles:
        h.remove()
    for layer, bn in pairs:
        MergeBatchNorm.merge_batch_norm([layer], bn)
        bn.eps = 0.0  # zennit leaves x / sqrt(1 + eps): make it the identity


def _sum_module(block: nn.Module, branch) -> None:
    from zennit.layer import Sum

    block.lrp_sum = Sum()

    def forward(self, x):
        return self.lrp_sum(torch.stack([x, branch(self, x)], dim=-1))

    block.forward = types.MethodType(forward, block)


def _pool_module(net: nn.Module, relu: bool) -> None:
    net.lrp_relu, net.lrp_pool = (nn.ReLU() if relu else nn.Identity()), nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.classifier(torch.flatten(self.lrp_pool(self.lrp_relu(self.features(x))), 1))

    net.forward = types.MethodType(forward, net)


def _canonize(plain: nn.Module, x) -> None:
    from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer

    _merge_batch_norms(plain, x)
    for m in plain.modules():
        if isinstance(m, torchvision.models.mobilenetv2.InvertedResidual) and m.use_res_connect:
            _sum_module(m, lambda self, x: self.conv(x))
        if isinstance(m, Block) and m.residual:
            _sum_module(m, Block.branch)
    if isinstance(plain, Families):
        plain.lrp_relu, plain.lrp_pool = nn.ReLU(), nn.AdaptiveAvgPool2d(2)
        plain.forward = types.MethodType(Families.modular_forward, plain)
    if isinstance(plain, torchvision.models.DenseNet | torchvision.models.MobileNetV2):
        _pool_module(plain, relu=isinstance(plain, torchvision.models.DenseNet))
    if isinstance(plain, torchvision.models.ResNet):
        ResNetBottleneckCanonizer().apply(plain)
        ResNetBasicBlockCanonizer().apply(plain)


def _relevances(model, groups, x, y, reference: bool, epsilon: float = 0.25) -> dict:
    """Relevance at every probed tensor: {(module, site): [tensor, ...]}."""
    plain = lrp_copy(model)
    if reference:
        _canonize(plain, x)
    probes = _probes(plain, groups, split_attention=True)
    ctx = _composite(epsilon).context(plain) if reference else relevance_rules(plain, epsilon)
    with _attached(probes), ctx as ruled:
        logits = ruled(x.detach().requires_grad_())
        seen = [t for p in probes.values() for t in p.tensors()]
        grads = torch.autograd.grad(logits, seen, true_class_start(logits, y), allow_unused=True)
    out, i = {}, 0
    for key, p in probes.items():
        n = len(p.tensors())
        out[key], i = list(grads[i : i + n]), i + n
    return out


def _reference_criterion(model, groups, epsilon: float = 0.25):
    """The ``lrp`` criterion with its relevances taken from zennit instead."""
    from sparta.pruning.probes import _collect

    criterion = get_criterion("lrp")(model, groups, epsilon=epsilon)

    def entries(self, inputs, targets, loss_fn):
        plain = lrp_copy(self.model)
        _canonize(plain, inputs)
        probes = _probes(plain, self.groups, split_attention=True)
        with _attached(probes), _composite(epsilon).context(plain) as ruled:
            logits = ruled(inputs.detach().requires_grad_())
            start = true_class_start(logits, targets)
            return _collect(probes, logits, start, "gradient", False)

    criterion._entries = types.MethodType(entries, criterion)
    return criterion


# -- test models -----------------------------------------------------------------------------------
class Block(nn.Module):
    """conv-BN-ReLU, a grouped or depthwise conv-BN, and a residual sum (or a concatenation)."""

    def __init__(self, c: int, groups: int, residual: bool):
        super().__init__()
        self.residual = residual
        self.conv1, self.bn1 = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, groups=groups), nn.BatchNorm2d(c)

    def branch(self, x):
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))

    def forward(self, x):
        return x + self.branch(x) if self.residual else torch.cat([x, self.branch(x)], 1)


class VGGLike(nn.Module):
    """conv-BN-ReLU stacks, max and adaptive average pooling, a two-layer classifier."""

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for width in (8, "M", 16, "M", 16):
            if width == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
                c = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.classifier = nn.Sequential(
            nn.Linear(64, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 10)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class Families(nn.Module):
    """Grouped and depthwise convolutions, a residual sum, a concatenation, a transposed-free
    stem with BatchNorm, and functional adaptive pooling to 2x2."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.grouped = Block(8, groups=2, residual=True)
        self.depthwise = Block(8, groups=8, residual=False)  # concatenation: 16 channels
        self.classifier = nn.Linear(16 * 4, 10)

    def forward(self, x):
        h = self.depthwise(self.grouped(F.relu(self.bn(self.stem(x)))))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(h, 2), 1))

    def modular_forward(self, x):  # the reference's: zennit sees modules only
        h = self.depthwise(self.grouped(self.lrp_relu(self.bn(self.stem(x)))))
        return self.classifier(torch.flatten(self.lrp_pool(h), 1))


def _randomise_norms(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)


def _model(name: str) -> nn.Module:
    tv = torchvision.models
    if name == "densenet":  # densenet121's layers at a tenth of its size
        return tv.DenseNet(growth_rate=8, block_config=(2, 3), num_init_features=8, num_classes=10)
    if name in ("resnet18", "mobilenet_v2", "densenet121"):
        return tv.get_model(name, weights=None, num_classes=10)
    return {"vgg_like": VGGLike, "families": Families}[name]()


_CASES: dict = {}


def _case(name: str, wrapped: bool):
    if (name, wrapped) not in _CASES:
        _CASES[name, wrapped] = _build(name, wrapped)
    return _CASES[name, wrapped]


def _build(name: str, wrapped: bool, size: int = 32):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    base = _model(name)
    _randomise_norms(base, gen)
    x = torch.randn(2, 3, size, size, generator=gen, dtype=torch.float64)
    y = torch.tensor([1, 7])
    model = base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if wrapped:
            model = sparta.wrap(base, "splora", rank=4, init_scale=0.1)
        model = model.double()
        groups, _ = find_groups(model, x, {"classifier", "fc", "classifier.1", "classifier.3"})
    return model, groups, x, y


CASES = [
    *(pytest.param(m, True, id=f"{m}-adapted") for m in ("resnet18", "mobilenet_v2")),
    *(pytest.param(m, True, id=f"{m}-adapted") for m in ("densenet", "vgg_like", "families")),
    *(pytest.param(m, False, id=f"{m}-plain") for m in ("densenet", "vgg_like", "families")),
    pytest.param("densenet121", True, id="densenet121-adapted"),  # the model: 2 s
]


@pytest.mark.parametrize("name,wrapped", CASES)
def test_relevances_match_zennit(name: str, wrapped: bool):
    model, groups, x, y = _case(name, wrapped)
    ours = _relevances(model, groups, x, y, reference=False)
    ref = _relevances(model, groups, x, y, reference=True)
    assert ours.keys() == ref.keys() and len(ours) >= 4
    for key in ref:
        for a, b in zip(ours[key], ref[key], strict=True):
            assert a is not None and b is not None, key
            a, b = a.detach(), b.detach()
            scale = float(b.abs().max())
            assert scale > 0, key  # every scored layer receives relevance
            assert float((a - b).abs().max()) <= TOL * scale, (key, float((a - b).abs().max()))


@pytest.mark.parametrize("name", ["mobilenet_v2", "densenet", "families"])
def test_scores_match_zennit(name: str):
    model, groups, x, y = _case(name, wrapped=True)
    ours = get_criterion("lrp")(model, groups)
    ref = _reference_criterion(model, groups)
    for criterion in (ours, ref):
        criterion.accumulate((x, y), F.cross_entropy)
    got, want = ours.scores(), ref.scores()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=TOL, atol=TOL * float(want[key].max()))
        assert float(want[key].sum()) > 0, key


def test_float32_agrees_with_zennit_on_resnet18():
    """float32, as users score: the criterion's scores agree with the reference to 1e-3."""
    model, groups, x, y = _case("resnet18", wrapped=True)
    model, x = model.float(), x.float()
    ours, ref = get_criterion("lrp")(model, groups), _reference_criterion(model, groups)
    for criterion in (ours, ref):
        criterion.accumulate((x, y), F.cross_entropy)
    got, want = ours.scores(), ref.scores()
    for key in want:
        torch.testing.assert_close(
            got[key], want[key], rtol=1e-3, atol=1e-3 * float(want[key].max())
        )


# -- properties of the rules themselves ------------------------------------------------------------
def test_relevance_is_conserved_layer_by_layer():
    """Positive weights, no biases, a tiny epsilon: z+, the sum, pooling and epsilon rules all
    conserve relevance, so every cut through the network (the stem's output, the residual
    block's, the concatenation's) holds the sum of the true-class logits; the concatenation's
    new half (the depthwise branch) holds a part of it."""
    torch.manual_seed(4)
    net = Families().double().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                m.weight.uniform_(0.0, 1.0)
                m.bias.zero_()
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_()
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.zero_()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 4, 9])
    seen = {}
    hooks = [
        net.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen.setdefault(n, o))
        for n in ("stem", "grouped", "depthwise", "depthwise.conv2")
    ]
    with relevance_rules(net, epsilon=1e-9) as ruled:
        logits = ruled(x)
    for h in hooks:
        h.remove()
    start = true_class_start(logits, y)
    grads = torch.autograd.grad(logits, list(seen.values()), start)
    total = float(start.sum())
    for name, grad in zip(seen, grads):
        assert float(grad.min()) >= 0, name  # z+ with positive inputs: all relevance positive
        if name == "depthwise.conv2":
            assert 0.05 * total < float(grad.sum()) < 0.95 * total
        else:
            assert float(grad.sum()) == pytest.approx(total, rel=1e-6), name


def test_rules_leave_the_forward_unchanged_and_need_no_weight_gradients():
    torch.manual_seed(5)
    net = Families().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = net(x)
    with relevance_rules(net) as ruled:
        got = ruled(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert all(p.requires_grad for p in net.parameters())
    got.backward(got.detach())
    assert all(p.grad is None for p in net.parameters())  # relevances only


def test_depthwise_alpha1_beta0_matches_zennit_for_inputs_of_both_signs():
    """A depthwise conv reading inputs of either sign takes both passes of alpha1-beta0."""
    from zennit.rules import ZPlus

    torch.manual_seed(6)
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4).double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    start = torch.rand(2, 4, 6, 6, dtype=torch.float64)
    with relevance_rules(conv) as ruled:
        xt = x.clone().requires_grad_()
        (ours,) = torch.autograd.grad(ruled(xt), xt, start)
    conv.requires_grad_(False)
    handle = ZPlus(stabilizer=_relative(0.25)).register(conv)
    xt = x.clone().requires_grad_()
    (ref,) = torch.autograd.grad(conv(xt), xt, start)
    handle.remove()
    assert bool((x < 0).any())
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "convnext_atto", "resnet10t"])
def test_timm_models_score(name: str):
    """timm's own layers (hard-swish, SE gates, LayerNorm2d, layer scale, functional pooling):
    every group gets finite scores and relevance reaches every scored layer."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(7)
    base = timm.create_model(name, pretrained=False, num_classes=5)
    _randomise_norms(base, torch.Generator().manual_seed(7))  # timm zero-inits last BN weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sparta.wrap(base, rank=2)
        x = torch.randn(2, 3, 32, 32)
        groups, _ = find_groups(model, x, set(model.sparta_report.head))
    criterion = get_criterion("lrp")(model, groups)
    criterion.accumulate((x, torch.tensor([0, 3])), F.cross_entropy)
    scores = criterion.scores()
    assert scores.keys() == {g.name for g in groups}
    for key, s in scores.items():
        assert torch.isfinite(s).all() and (s >= 0).all(), key
    assert all(float(s.sum()) > 0 for s in scores.values())
