"""``sparta.wrap`` / ``sparta.fuse`` / ``sparta.learned_parameters`` on real architectures.

Every model is built offline (``weights=None``) and kept small in input size so that the whole
file runs in about a minute on two CPU cores. Expected results (which layers are adapted, how
many parameters a task learns) are computed here from the base model's own structure, not
from sparta's internals.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.nn.utils import parametrize

import sparta
from tiny_models import tiny_bert

RANK = 8
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


# -- helpers ------------------------------------------------------------------------------------


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of ``expected``."""
    scale = expected.detach().abs().max().item()
    assert scale > 0, "reference output is all zeros: the comparison would be vacuous"
    return (actual.detach() - expected.detach()).abs().max().item() / scale


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def base_name(wrapped_name: str) -> str | None:
    """The base model's name for a wrapped model's parameter; ``None`` for adapter tensors."""
    if ".adapter." in wrapped_name or ".adapters." in wrapped_name:
        return None
    name = re.sub(r"\.parametrizations\.(\w+)\.original$", r".\1", wrapped_name)
    return name.replace(".base.", ".")


def inside(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def target_layers(base: nn.Module, head: list[str]) -> list[str]:
    """Linear, ConvNd and MultiheadAttention modules outside the head, attention projections
    excluded (they are adapted through their attention module)."""
    attention = [n for n, m in base.named_modules() if isinstance(m, nn.MultiheadAttention)]
    names = []
    for n, m in base.named_modules():
        if not n or inside(n, head):
            continue
        if isinstance(m, (nn.MultiheadAttention, *CONV_TYPES)):
            names.append(n)
        elif isinstance(m, nn.Linear) and not any(n.startswith(a + ".") for a in attention):
            names.append(n)
    return names


def expected_learned(base: nn.Module, adapted: list[str], head: list[str], rank: int) -> int:
    """The paper's count, from the base's shapes: r * (in + out) and the bias per adapted layer
    (four projections for attention), every norm's affine parameters, and the head."""
    total = 0
    for n, m in base.named_modules():
        if n in adapted:
            if isinstance(m, nn.MultiheadAttention):
                e = m.embed_dim
                total += rank * ((e + e) + (e + m.kdim) + (e + m.vdim) + (e + e))
                total += (3 * e if m.in_proj_bias is not None else 0) + (
                    e if m.out_proj.bias is not None else 0
                )
            elif isinstance(m, nn.Linear):
                total += rank * (m.in_features + m.out_features)
                total += m.out_features if m.bias is not None else 0
            else:
                total += rank * (m.in_channels // m.groups + m.out_channels)
                total += m.out_channels if m.bias is not None else 0
        elif n in head:
            total += sum(p.numel() for p in m.parameters())
        elif isinstance(m, NORM_TYPES) and not inside(n, head):
            total += sum(p.numel() for p in m.parameters(recurse=False))
    return total


def perturb_adapters(model: nn.Module, seed: int = 0, std: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, sparta.SPLoRA):
                m.B.copy_(torch.randn(m.B.shape, generator=gen) * std)
            elif isinstance(m, sparta.SPPaRA):
                m.P.copy_(torch.randn(m.P.shape, generator=gen) * std)


def prune_some_channels(model: nn.Module) -> int:
    """Zero a quarter of the output mask of every other adapter (those of attention projections
    included) and a few input columns of the others; returns how many adapters were touched."""
    adapters = [m for m in model.modules() if isinstance(m, sparta.Adapter)]
    with torch.no_grad():
        for i, adapter in enumerate(adapters):
            if i % 2 == 0:
                adapter.mask_out[: max(1, adapter.mask_out.numel() // 4)] = 0
            else:
                adapter.mask_in[1:3] = 0
    return len(adapters)


def three_paths(model: nn.Module, run: Callable[[nn.Module], Tensor]):
    """Outputs of the gradient path, the cached fused path and ``sparta.fuse``, all in eval."""
    model.eval()
    with torch.enable_grad():
        grad_path = run(model)
    assert grad_path.requires_grad, "grad-enabled call did not take the gradient path"
    with torch.no_grad():
        fused_path = run(model)
        fused_model = sparta.fuse(model).eval()
        fused_out = run(fused_model)
    return grad_path.detach(), fused_path, fused_out, fused_model


def assert_still_runs(model: nn.Module, run: Callable, expected: Tensor) -> None:
    """``sparta.fuse`` works on a copy: the adapted model keeps its adapters and its function."""
    assert any(isinstance(m, sparta.Adapter) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(run(model), expected)


def fresh_wrap(case: Case) -> nn.Module:
    """A new adapted copy of the case's base, so that no test depends on another's leftovers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return sparta.wrap(case.base, "splora", rank=RANK)


# -- the architectures --------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    base: nn.Module
    wrapped: nn.Module
    run: Callable[[nn.Module], Tensor]
    head: list[str]
    skipped: dict[str, str]  # expected skipped layer -> a word its reason must contain
    state: dict[str, Tensor]  # the base's state_dict before wrapping
    modules: dict[str, nn.Module]  # the base's modules before wrapping


def _images(model: nn.Module) -> Tensor:
    return model(IMAGES)


IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
TOKENS = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(2))
ATTENTION_MASK = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])


def _bert_logits(model: nn.Module) -> Tensor:
    return model(input_ids=TOKENS, attention_mask=ATTENTION_MASK).logits


def build_base(name: str) -> tuple[nn.Module, Callable, list[str], dict[str, str]]:
    torch.manual_seed(0)
    tv = torchvision.models
    if name == "resnet18":
        return tv.resnet18(weights=None, num_classes=10), _images, ["fc"], {}
    if name == "resnet50":
        return tv.resnet50(weights=None, num_classes=10), _images, ["fc"], {}
    if name == "vgg16_bn":
        return tv.vgg16_bn(weights=None, num_classes=10), _images, ["classifier.6"], {}
    if name == "vit_b_16":
        model = tv.vit_b_16(weights=None, image_size=32, num_classes=10)
        # torchvision zero-initialises the head, which would make every output 0 and every
        # comparison vacuous: give it random weights.
        nn.init.normal_(model.heads.head.weight, std=0.1)
        return model, _images, ["heads.head"], {"conv_proj": "even"}
    if name == "bert":
        pytest.importorskip("transformers")
        model = tiny_bert(
            vocab_size=100,
            hidden_size=64,
            intermediate_size=128,
            max_position_embeddings=16,
            attn_implementation="eager",
        ).train()  # as built from its config: dropout on
        return model, _bert_logits, ["classifier"], {}
    raise AssertionError(name)


ARCHS = ["resnet18", "resnet50", "vgg16_bn", "vit_b_16", "bert"]


@pytest.fixture(scope="module", params=ARCHS)
def case(request) -> Case:
    base, run, head, skipped = build_base(request.param)
    state, modules = snapshot(base), dict(base.named_modules())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = sparta.wrap(base, "splora", rank=RANK)
    messages = [str(w.message) for w in caught]
    if skipped:
        # one warning, a UserWarning, that names every skipped layer
        assert len(caught) == 1, messages
        assert issubclass(caught[0].category, UserWarning)
        assert all(n in messages[0] for n in skipped)
    else:
        assert messages == []
    return Case(request.param, base, wrapped, run, head, skipped, state, modules)


# -- per-architecture contract ---------------------------------------------------------------------


def test_report_lists_every_adapted_and_skipped_layer(case: Case):
    report = case.wrapped.sparta_report
    targets = target_layers(case.base, case.head)
    assert report.head == case.head
    assert report.excluded == []
    assert {s.name: s.type for s in report.skipped} == {
        n: type(case.base.get_submodule(n)).__name__ for n in case.skipped
    }
    for s in report.skipped:
        assert case.skipped[s.name] in s.reason
    if case.name == "vit_b_16":
        (conv_proj,) = report.skipped
        assert "16x16" in conv_proj.reason
    expected = [n for n in targets if n not in case.skipped]
    assert len(expected) > 10
    assert sorted(report.adapted) == sorted(expected)
    assert len(set(report.adapted)) == len(report.adapted)
    # the report is plain data
    as_dict = report.to_dict()
    assert as_dict["adapted"] == report.adapted and as_dict["head"] == case.head


def test_adapted_modules_replaced_in_the_copy(case: Case):
    wrapped = case.wrapped
    for name in wrapped.sparta_report.adapted:
        module = wrapped.get_submodule(name)
        if isinstance(case.base.get_submodule(name), nn.MultiheadAttention):
            assert isinstance(module, nn.MultiheadAttention)
            assert parametrize.is_parametrized(module)
            # out_proj is adapted through the attention module, never as a separate Linear
            assert not isinstance(module.out_proj, sparta.AdaptedLayer)
            assert parametrize.is_parametrized(module.out_proj, "weight")
        else:
            assert isinstance(module, sparta.AdaptedLayer), name
            assert type(module.base) is type(case.base.get_submodule(name))
            assert torch.all(module.adapter.mask_out == 1) and torch.all(
                module.adapter.mask_in == 1
            )
    assert not any(n.endswith("out_proj") for n in wrapped.sparta_report.adapted)
    for name in [*case.head, *case.skipped]:
        assert type(wrapped.get_submodule(name)) is type(case.base.get_submodule(name))
    n_adapted = sum(isinstance(m, sparta.AdaptedLayer) for m in wrapped.modules())
    n_attention = sum(
        isinstance(case.base.get_submodule(n), nn.MultiheadAttention)
        for n in wrapped.sparta_report.adapted
    )
    assert n_adapted + n_attention == len(wrapped.sparta_report.adapted)


def test_exactly_adapters_biases_norms_and_head_are_trainable(case: Case):
    report = case.wrapped.sparta_report
    base_params = dict(case.base.named_parameters())
    seen, wrong = set(), []
    for name, p in case.wrapped.named_parameters():
        original = base_name(name)
        if original is None:
            assert p.requires_grad, f"adapter tensor {name} is frozen"
            continue
        assert original in base_params, f"{name} -> {original} is not a base parameter"
        seen.add(original)
        owner, _, leaf = original.rpartition(".")
        if isinstance(case.base.get_submodule(owner), nn.MultiheadAttention):
            owner_adapted = owner in report.adapted
        elif owner.endswith(".out_proj"):
            owner_adapted = owner[: -len(".out_proj")] in report.adapted
        else:
            owner_adapted = owner in report.adapted
        expected = (
            inside(owner, report.head)
            or isinstance(case.base.get_submodule(owner), NORM_TYPES)
            or (owner_adapted and "bias" in leaf)
        )
        if p.requires_grad != expected:
            wrong.append(f"{name}: requires_grad={p.requires_grad}")
        # at wrap time every base tensor is carried over unchanged
        assert torch.equal(p.detach(), case.state[original]), name
    assert seen == set(base_params)
    assert wrong == [], f"{len(wrong)} parameters with the wrong trainability"


def test_training_step_changes_adapters_only(case: Case):
    model = fresh_wrap(case).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert len(frozen) > 0
    # every parameter goes to the optimiser (with weight decay): frozen ones must get no gradient
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.01)
    loss = F.cross_entropy(case.run(model), torch.tensor([1, 2]))
    loss.backward()
    params = dict(model.named_parameters())
    assert [n for n in frozen if params[n].grad is not None] == []
    opt.step()
    for n in frozen:
        assert torch.equal(params[n].detach(), before[n]), f"frozen {n} changed"
        assert torch.equal(params[n].detach(), case.state[base_name(n)])
    adapters = [(n, p) for n, p in model.named_parameters() if base_name(n) is None]
    assert len(adapters) >= 2 * len(model.sparta_report.adapted)
    unchanged = sorted(n for n, p in adapters if torch.equal(p.detach(), before[n]))
    assert unchanged == [], f"adapter tensors not updated: {unchanged[:5]}"
    head = [n for n in params if inside(n, case.head)]
    assert head and all(not torch.equal(params[n].detach(), before[n]) for n in head)


def test_gradient_fused_and_exported_paths_agree(case: Case):
    model = fresh_wrap(case).eval()
    perturb_adapters(model)
    assert prune_some_channels(model) > 5
    grad_path, fused_path, fused_out, fused_model = three_paths(model, case.run)
    assert rel_err(grad_path, fused_path) <= 1e-5
    assert rel_err(fused_out, grad_path) <= 1e-5
    assert rel_err(fused_out, fused_path) <= 1e-5
    # the fused model is plain torch: same parameter names and shapes as the base, no adapters
    assert not any(
        isinstance(m, sparta.AdaptedLayer | sparta.Adapter) for m in fused_model.modules()
    )
    assert not any(parametrize.is_parametrized(m) for m in fused_model.modules())
    fused_state = fused_model.state_dict()
    assert {k: v.shape for k, v in fused_state.items()} == {
        k: v.shape for k, v in case.state.items()
    }
    assert not hasattr(fused_model, "sparta_report")
    assert_still_runs(model, case.run, fused_path)


# convolutions, linear layers and attention; vgg and resnet50 add nothing new here
@pytest.mark.parametrize(
    "case",
    ["resnet18", pytest.param("vit_b_16", marks=pytest.mark.slow), "bert"],  # vit: 30 s
    indirect=True,
)
def test_fused_cache_follows_in_place_edits(case: Case):
    model = fresh_wrap(case).eval()
    with torch.no_grad():
        at_init = case.run(model)  # fills the fused-weight caches
        assert torch.equal(case.run(model), at_init)
    # a stale cache would keep returning ``at_init``
    perturb_adapters(model)
    with torch.no_grad():
        perturbed = case.run(model)
    assert rel_err(perturbed, at_init) > 1e-3, "adapter edit did not reach the fused path"
    assert rel_err(case.run(model), perturbed) <= 1e-5
    prune_some_channels(model)
    with torch.no_grad():
        pruned = case.run(model)
    assert rel_err(pruned, perturbed) > 1e-4, "mask edit did not reach the fused path"
    assert rel_err(case.run(model), pruned) <= 1e-5


def test_learned_parameters_match_independent_count(case: Case):
    report = case.wrapped.sparta_report
    expected = expected_learned(case.base, report.adapted, report.head, RANK)
    assert sparta.learned_parameters(case.wrapped) == expected
    full = sum(p.numel() for p in case.base.parameters())
    assert sparta.learned_parameters(case.base) == full
    assert expected < full / 4


def test_original_model_untouched(case: Case):
    # runs last for each architecture, after the copies of the wrapped model were trained,
    # perturbed, pruned and fused
    assert dict(case.base.named_modules()) == case.modules  # same module objects, none replaced
    assert not any(isinstance(m, sparta.AdaptedLayer) for m in case.base.modules())
    assert not any(parametrize.is_parametrized(m) for m in case.base.modules())
    assert not hasattr(case.base, "sparta_report")
    state = case.base.state_dict()
    assert state.keys() == case.state.keys()
    for k, v in state.items():
        assert torch.equal(v, case.state[k]), k
    assert all(p.requires_grad for p in case.base.parameters())
    # the wrapped model is a copy: it shares no storage with the base
    base_ptrs = {p.data_ptr() for p in case.base.parameters()}
    assert not base_ptrs & {p.data_ptr() for p in case.wrapped.parameters()}


# -- the paper's parameter accounting ------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet50() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None, num_classes=10)


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10)


@pytest.mark.parametrize("rank, count", [(8, 466_338), (32, 1_644_522)])
def test_resnet50_counts_match_the_paper(resnet50: nn.Module, rank: int, count: int):
    assert sparta.learned_parameters(sparta.wrap(resnet50, "splora", rank=rank)) == count


def test_resnet50_full_fine_tuning_count(resnet50: nn.Module):
    assert sparta.learned_parameters(resnet50) == 23_528_522


@pytest.mark.parametrize("rank", [1, 8, 32])
def test_resnet18_count_is_rank_times_in_plus_out(resnet18: nn.Module, rank: int):
    convs = [m for m in resnet18.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in resnet18.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 20 and len(norms) == 20
    expected = (
        sum(rank * (c.in_channels + c.out_channels) for c in convs)
        + sum(2 * bn.num_features for bn in norms)
        + 512 * 10
        + 10
    )
    assert sparta.learned_parameters(sparta.wrap(resnet18, "splora", rank=rank)) == expected


def test_norms_and_biases_can_be_left_out_of_the_task(resnet18: nn.Module):
    full = sparta.learned_parameters(sparta.wrap(resnet18, rank=4))
    no_norms = sparta.learned_parameters(sparta.wrap(resnet18, rank=4, train_norms=False))
    bn = sum(
        m.weight.numel() + m.bias.numel()
        for m in resnet18.modules()
        if isinstance(m, nn.BatchNorm2d)
    )
    assert full - no_norms == bn


def test_pruning_a_channel_drops_the_count_by_r_per_side(resnet18: nn.Module):
    model = sparta.wrap(resnet18, "splora", rank=RANK)
    start = sparta.learned_parameters(model)
    producer = model.get_submodule("layer1.0.conv1")
    consumer = model.get_submodule("layer1.0.conv2")
    assert producer.base.bias is None
    pruned = torch.tensor([0, 5, 17, 63])
    with torch.no_grad():
        producer.adapter.mask_out[pruned] = 0
    assert sparta.learned_parameters(model) == start - RANK * len(pruned)
    with torch.no_grad():
        consumer.adapter.mask_in[pruned] = 0
    assert sparta.learned_parameters(model) == start - 2 * RANK * len(pruned)
    # zeroing an already-zero entry changes nothing
    with torch.no_grad():
        producer.adapter.mask_out[0] = 0
    assert sparta.learned_parameters(model) == start - 2 * RANK * len(pruned)


def test_pruning_a_channel_with_bias_also_drops_the_bias_entry():
    base, _, _, _ = build_base("bert")
    model = sparta.wrap(base, "splora", rank=RANK)
    start = sparta.learned_parameters(model)
    producer = model.get_submodule("bert.encoder.layer.0.intermediate.dense")
    consumer = model.get_submodule("bert.encoder.layer.0.output.dense")
    assert producer.base.bias is not None and producer.base.bias.requires_grad
    pruned = [3, 4, 100]
    with torch.no_grad():
        producer.adapter.mask_out[pruned] = 0
    assert sparta.learned_parameters(model) == start - (RANK + 1) * len(pruned)
    with torch.no_grad():
        consumer.adapter.mask_in[pruned] = 0
    assert sparta.learned_parameters(model) == start - (2 * RANK + 1) * len(pruned)
    # with frozen biases the bias entries never counted
    frozen_bias = sparta.wrap(base, "splora", rank=RANK, train_biases=False)
    biases = sum(base.get_submodule(n).bias.numel() for n in frozen_bias.sparta_report.adapted)
    assert sparta.learned_parameters(frozen_bias) == start - biases


# -- include / exclude / head --------------------------------------------------------------------


def conv_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def test_include_adapts_only_matching_layers(resnet18: nn.Module):
    model = sparta.wrap(resnet18, include="layer4.*")
    report = model.sparta_report
    expected = [n for n in conv_names(resnet18) if n.startswith("layer4.")]
    assert len(expected) == 5  # 2 blocks x 2 convs + the downsample conv
    assert sorted(report.adapted) == sorted(expected)
    assert sorted(report.excluded) == sorted(set(conv_names(resnet18)) - set(expected))
    assert report.head == ["fc"]
    assert isinstance(model.layer4[0].downsample[0], sparta.AdaptedLayer)
    assert isinstance(model.layer3[1].conv2, nn.Conv2d)
    assert not model.layer3[1].conv2.weight.requires_grad
    assert model.fc.weight.requires_grad
    expected_count = (
        sum(
            RANK * (resnet18.get_submodule(n).in_channels + resnet18.get_submodule(n).out_channels)
            for n in expected
        )
        + sum(2 * m.num_features for m in resnet18.modules() if isinstance(m, nn.BatchNorm2d))
        + 5130
    )
    assert sparta.learned_parameters(model) == expected_count


def test_exclude_and_include_lists(resnet18: nn.Module):
    report = sparta.wrap(resnet18, exclude="layer1.*").sparta_report
    assert sorted(report.adapted) == sorted(
        n for n in conv_names(resnet18) if not n.startswith("layer1.")
    )
    assert sorted(report.excluded) == [
        "layer1.0.conv1",
        "layer1.0.conv2",
        "layer1.1.conv1",
        "layer1.1.conv2",
    ]

    report = sparta.wrap(
        resnet18, include=["layer3.*", "conv1"], exclude=["*.downsample.*"]
    ).sparta_report
    assert sorted(report.adapted) == [
        "conv1",
        "layer3.0.conv1",
        "layer3.0.conv2",
        "layer3.1.conv1",
        "layer3.1.conv2",
    ]
    assert "layer3.0.downsample.0" in report.excluded


def test_head_none_adapts_the_classifier_too(resnet18: nn.Module):
    model = sparta.wrap(resnet18, head=None)
    assert model.sparta_report.head == []
    assert isinstance(model.fc, sparta.AdaptedLayer)
    assert not model.fc.base.weight.requires_grad and model.fc.base.bias.requires_grad


def test_named_head_stays_plain_and_trainable(resnet18: nn.Module):
    model = sparta.wrap(resnet18, head=["layer4", "fc"])
    report = model.sparta_report
    assert report.head == ["layer4", "fc"]
    assert not any(n.startswith("layer4") for n in report.adapted)
    assert all(p.requires_grad for p in model.layer4.parameters())
    assert not any(isinstance(m, sparta.AdaptedLayer) for m in model.layer4.modules())
    layer4 = sum(p.numel() for p in resnet18.layer4.parameters())
    rest = expected_learned(resnet18, report.adapted, ["layer4", "fc"], RANK)
    assert sparta.learned_parameters(model) == rest
    assert rest > layer4


class TinyAttention(nn.Module):
    def __init__(self, kdim=None, vdim=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, kdim=kdim, vdim=vdim, batch_first=True)
        self.key = nn.Linear(16, kdim or 16)
        self.value = nn.Linear(16, vdim or 16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        out, _ = self.attn(x, self.key(x), self.value(x), need_weights=False)
        return self.fc(out.mean(1))


@pytest.mark.parametrize("kdim, vdim", [(None, None), (8, 12)])
def test_attention_adapted_as_a_whole(kdim, vdim):
    torch.manual_seed(0)
    base = TinyAttention(kdim, vdim)
    model = sparta.wrap(base, rank=2)
    report = model.sparta_report
    assert sorted(report.adapted) == ["attn", "key", "value"]
    assert not isinstance(model.attn.out_proj, sparta.AdaptedLayer)
    assert parametrize.is_parametrized(model.attn.out_proj, "weight")
    x = torch.randn(2, 5, 16)
    perturb_adapters(model, std=0.3)
    grad_path, fused_path, fused_out, _ = three_paths(model, lambda m: m(x))
    assert rel_err(grad_path, fused_path) <= 1e-5
    assert rel_err(fused_out, grad_path) <= 1e-5
    assert_still_runs(model, lambda m: m(x), fused_path)
    # naming the out projection does not make it a separate target
    with pytest.raises(sparta.ConfigError, match="adapted no layer"):
        sparta.wrap(base, include="attn.out_proj")


@pytest.mark.parametrize("train_biases", [True, False])
def test_attention_biases_are_task_biases(train_biases: bool):
    torch.manual_seed(0)
    base = TinyAttention()
    model = sparta.wrap(base, rank=2, train_biases=train_biases)
    trainable = {base_name(n) for n, p in model.named_parameters() if p.requires_grad}
    biases = {"attn.in_proj_bias", "attn.out_proj.bias", "key.bias", "value.bias"}
    assert trainable - {None} == {"fc.weight", "fc.bias"} | (biases if train_biases else set())
    expected = expected_learned(base, ["attn", "key", "value"], ["fc"], 2)
    if not train_biases:
        expected -= 3 * 16 + 16 + 16 + 16  # in_proj_bias, out_proj.bias, key.bias, value.bias
    assert sparta.learned_parameters(model) == expected


def test_wrapped_at_zero_init_equals_base(resnet18: nn.Module):
    model = sparta.wrap(resnet18, init_scale=0.0).eval()
    base = copy.deepcopy(resnet18).eval()
    with torch.no_grad():
        expected = base(IMAGES)
        fused_path = model(IMAGES)
    grad_path = model(IMAGES)
    assert rel_err(fused_path, expected) <= 1e-6
    assert rel_err(grad_path, expected) <= 1e-6


# -- SPPaRA --------------------------------------------------------------------------------------


def test_sppara_adapts_every_conv_of_resnet18(resnet18: nn.Module):
    model = sparta.wrap(resnet18, "sppara")
    report = model.sparta_report
    assert sorted(report.adapted) == sorted(conv_names(resnet18))
    assert report.skipped == [] and report.head == ["fc"]
    convs = [m for m in resnet18.modules() if isinstance(m, nn.Conv2d)]
    expected = (
        sum(c.in_channels // c.groups * c.out_channels for c in convs)
        + sum(2 * m.num_features for m in resnet18.modules() if isinstance(m, nn.BatchNorm2d))
        + 5130
    )
    assert sparta.learned_parameters(model) == expected
    perturb_adapters(model, std=0.01)
    grad_path, fused_path, fused_out, _ = three_paths(model, _images)
    assert rel_err(grad_path, fused_path) <= 1e-5
    assert rel_err(fused_out, grad_path) <= 1e-5


def test_sppara_leaves_linear_layers_unadapted_with_a_reason(resnet18: nn.Module):
    with pytest.warns(UserWarning, match="fc"):
        model = sparta.wrap(resnet18, "sppara", head=None)
    report = model.sparta_report
    assert [(s.name, s.type) for s in report.skipped] == [("fc", "Linear")]
    assert "linear" in report.skipped[0].reason
    assert not model.fc.weight.requires_grad and not model.fc.bias.requires_grad

    torch.manual_seed(0)
    mixed = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    )
    with pytest.warns(UserWarning, match="sppara"):
        model = sparta.wrap(mixed, "sppara")
    report = model.sparta_report
    assert report.adapted == ["0"] and report.head == ["5"]
    assert [(s.name, s.type) for s in report.skipped] == [("3", "Linear")]
    assert "linear" in report.skipped[0].reason
    assert sparta.learned_parameters(model) == 8 * 3 + 8 + 16 * 5 + 5


def test_sppara_on_a_pure_linear_model_is_an_error():
    mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(sparta.ConfigError, match="adapted no layer"):
        sparta.wrap(mlp, "sppara")
