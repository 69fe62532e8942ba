"""``build_compact``: physically smaller, same function, input untouched."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils import parametrize

import sparta
from sparta.masks import resolve_mask
from sparta.tasks import build_compact
from tiny_models import ResidualNet, perturb, tiny_bert


def _wrap(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sparta.SkippedLayerWarning)
        return sparta.wrap(model, rank=2)


def _prune(model, x):
    pruner = sparta.Pruner(model, x, criterion="l1", target=0.5, steps=1)
    pruner.step()
    return pruner


def _run(model, x):
    out = model(**x) if isinstance(x, dict) else model(x)
    return out.logits if hasattr(out, "logits") else out


def _width(module, site):
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels if site == "out" else module.in_channels
    if isinstance(module, nn.Linear):
        return module.out_features if site == "out" else module.in_features
    return module.weight.shape[0]  # a norm


def _dead_entries(model, groups):
    """(module, site) -> number of entries whose mask is zero, read from the masks directly."""
    dead = {}
    for g in groups:
        for m in g.members:
            if m.site in ("out", "in"):
                mask = resolve_mask(model, m.module, m.site, create=False)
                hit = m.idxs[mask[m.idxs] == 0].tolist()
                dead.setdefault((m.module, m.site), set()).update(hit)
    return {k: len(v) for k, v in dead.items()}


def _check(model, groups, x, rtol=1e-5):
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = _run(model, x)
    plain = sparta.fuse(model)
    compact, report = build_compact(model, groups, x)
    compact.eval()
    with torch.no_grad():
        after, out = _run(model, x), _run(compact, x)
    # same function, also on a batch it was not traced with
    scale = before.abs().max().item()
    assert (out - before).abs().max().item() <= rtol * scale
    if isinstance(x, torch.Tensor):
        other = torch.randn(3, *x.shape[1:])
        with torch.no_grad():
            want, got = _run(model, other), _run(compact, other)
        assert (got - want).abs().max().item() <= rtol * want.abs().max().item()
    # the input model is untouched
    assert torch.equal(after, before)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # plain torch only
    for m in compact.modules():
        assert not type(m).__module__.startswith("sparta"), type(m)
        assert not parametrize.is_parametrized(m)
    # smaller, by exactly the dead units of every group not kept dense
    n_params = sum(p.numel() for p in compact.parameters())
    assert report.params_after == n_params < report.params_before
    assert report.params_before == sum(p.numel() for p in plain.parameters())
    dead = _dead_entries(model, groups)
    dense = {g.name for g in report.dense}
    removed_somewhere = False
    for g in groups:
        if g.name in dense:
            continue
        for m in g.members:
            if (m.module, m.site) not in dead:
                continue
            was = _width(plain.get_submodule(m.module), m.site)
            now = _width(compact.get_submodule(m.module), m.site)
            assert now == was - dead[(m.module, m.site)], (g.name, m.module, m.site)
            removed_somewhere |= now < was
    assert removed_somewhere
    return compact, report


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")
def test_tiny_residual_net_compacts_exactly_and_traces():
    torch.manual_seed(0)
    model = _wrap(ResidualNet(image=32, stem_stride=2))
    perturb(model)
    x = torch.randn(2, 3, 32, 32)
    pruner = _prune(model, x)
    compact, report = _check(model, pruner.groups, x)
    assert not report.dense and all(g.removed == g.units - g.alive for g in report.groups)
    flags = {n: p.requires_grad for n, p in sparta.fuse(model).named_parameters()}
    assert {n: p.requires_grad for n, p in compact.named_parameters()} == flags
    # the root's removed weight rows are the group's dead units
    assert compact.dw.out_channels == compact.dw.groups == report.groups[-1].alive
    assert compact.fc.in_features == compact.mix.out_channels * 8 * 8
    with torch.no_grad():
        traced = torch.jit.trace(compact, x)
        assert torch.allclose(traced(x), compact(x), atol=1e-6)
        assert torch.allclose(traced(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name", ["resnet18", "resnet50", pytest.param("vgg16_bn", marks=pytest.mark.slow)]
)
def test_wrapped_torchvision_cnns_compact_exactly(name):
    torch.manual_seed(0)
    model = _wrap(torchvision.models.get_model(name, weights=None, num_classes=10))
    perturb(model)
    x = torch.randn(2, 3, 32, 32)
    pruner = _prune(model, x)
    _, report = _check(model, pruner.groups, x, rtol=1e-4)
    assert not report.dense
    assert report.params_after < 0.6 * report.params_before


def test_fine_pruned_plain_resnet18_compacts_exactly():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    perturb(model)
    x = torch.randn(2, 3, 32, 32)
    pruner = _prune(model, x)
    _check(model, pruner.groups, x, rtol=1e-4)


@pytest.mark.slow  # vit_b_16: 30-40 s on two cores
def test_vit_keeps_heads_dense_and_removes_mlp_neurons():
    torch.manual_seed(0)
    base = torchvision.models.vit_b_16(weights=None, image_size=32, num_classes=10)
    nn.init.normal_(base.heads.head.weight, std=0.02)
    model = _wrap(base)
    perturb(model)
    x = torch.randn(2, 3, 32, 32)
    pruner = _prune(model, x)
    compact, report = _check(model, pruner.groups, x, rtol=1e-4)
    kinds = {g.kind for g in report.dense}
    assert kinds == {"heads"} and all("MultiheadAttention" in g.dense_reason for g in report.dense)
    mlp = [g for g in report.groups if g.name.endswith("mlp.0")]
    assert mlp and any(g.removed for g in mlp)
    assert isinstance(compact.encoder.layers[0].self_attention, nn.MultiheadAttention)


def test_bert_heads_and_ffn_neurons_are_removed():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = _wrap(tiny_bert())
    perturb(model)
    x = {"input_ids": torch.randint(0, 50, (2, 6))}
    pruner = _prune(model, x)
    compact, report = _check(model, pruner.groups, x, rtol=1e-4)
    assert not report.dense
    removed = {g.kind for g in report.groups if g.removed}
    assert {"heads", "neurons"} <= removed  # and the pooler's channels, traced by torch-pruning
    for g in report.groups:
        if g.kind == "heads":
            attention = compact.get_submodule(g.name)
            assert attention.num_attention_heads == g.alive
            assert attention.all_head_size == g.alive * attention.attention_head_size
            assert attention.query.out_features == attention.all_head_size


def test_groups_over_a_layer_norm_stay_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.LayerNorm(16), nn.Linear(16, 4))
    x = torch.randn(2, 12)
    pruner = _prune(copy.deepcopy(model), x)
    pruned = pruner.model
    compact, report = build_compact(pruned, pruner.groups, x)
    assert [g.name for g in report.dense] == ["0"] and "LayerNorm" in report.dense[0].dense_reason
    with torch.no_grad():
        assert torch.allclose(compact.eval()(x), pruned.eval()(x), rtol=1e-5, atol=1e-6)
    assert compact[0].out_features == 16


def test_a_group_with_every_unit_pruned_keeps_one_zero_unit():
    torch.manual_seed(0)
    model = ResidualNet(image=32, stem_stride=2).eval()
    x = torch.randn(2, 3, 32, 32)
    pruner = _prune(model, x)
    side = next(g for g in pruner.groups if g.name == "side")
    with torch.no_grad():
        for m in side.members:
            resolve_mask(model, m.module, m.site)[m.idxs] = 0
    compact, report = build_compact(model, pruner.groups, x)
    outcome = next(g for g in report.groups if g.name == "side")
    assert (outcome.alive, outcome.removed) == (0, side.size - 1)
    assert compact.side.out_channels == 1 and not compact.side.weight.any()
    with torch.no_grad():
        assert torch.allclose(compact.eval()(x), model(x), rtol=1e-5, atol=1e-6)


def test_not_a_module_is_refused():
    with pytest.raises(TypeError, match="build_compact expects a torch.nn.Module, got str"):
        build_compact("resnet18", [], torch.zeros(1))


class SharedBlockNet(nn.Module):
    """One depthwise conv called at two places (timm CoaT shares its position encoders so)."""

    def __init__(self):
        super().__init__()
        shared = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.stem, self.mid = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.a, self.b = nn.Sequential(shared, nn.ReLU()), nn.Sequential(shared, nn.ReLU())
        self.tail = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.tail(self.b(self.mid(self.a(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("wrapped", [True, False])
def test_a_module_shared_between_blocks_stays_whole_and_builds_exactly(wrapped):
    torch.manual_seed(0)
    base, x = SharedBlockNet().eval(), torch.randn(2, 3, 8, 8)
    before = copy.deepcopy(base.state_dict())
    model = _wrap(base) if wrapped else copy.deepcopy(base)
    perturb(model)
    pruner = sparta.Pruner(model, x, target="density=0.5")
    pruner.step()
    assert any("'a.0', a module used under several names" in n for n in pruner.notes)
    assert all(m.module not in ("a.0", "b.0") for g in pruner.groups for m in g.members)
    if wrapped:
        compact = sparta.build(base, sparta.export(model))
    else:
        compact, _ = build_compact(model, pruner.groups, x)
    assert compact.a[0] is compact.b[0]  # still one module, as in the base
    assert compact.tail[0].out_channels < 16
    torch.testing.assert_close(compact(x), model.eval()(x), rtol=1e-5, atol=1e-6)
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k
