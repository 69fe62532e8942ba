"""The pruning engine: masks only, exact equivalence with hand-zeroed weights, targets, errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn

import sparta
from sparta.masks import resolve_mask
from sparta.pruning.pruner import Pruner, Target
from tiny_models import TINY_MODELS, ResidualNet, perturb, tiny_bert


def _quiet_wrap(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sparta.SkippedLayerWarning)
        return sparta.wrap(model, **kw)


def _hand_zeroed(plain: nn.Module, pruner: Pruner) -> nn.Module:
    """The unpruned model, fused, with the pruned entries zeroed by hand (independently of the
    mask code): rows and biases for produced channels, columns for consumed ones."""
    ref = copy.deepcopy(plain)
    with torch.no_grad():
        for g in pruner.groups:
            pruned = torch.tensor([u for r in pruner.history for u in r.pruned.get(g.name, [])])
            if not len(pruned):
                continue
            for m in g.members:
                idxs = m.idxs[torch.isin(m.units, pruned)]
                _zero(ref.get_submodule(m.module), m.site, idxs)
    return ref


def _zero(module: nn.Module, site: str, idxs: torch.Tensor) -> None:
    if isinstance(module, nn.MultiheadAttention):
        e = module.embed_dim
        if site == "o":
            module.out_proj.weight[:, idxs] = 0
        else:
            rows = idxs + "qkv".index(site) * e
            if module.in_proj_weight is not None:
                module.in_proj_weight[rows] = 0
            else:  # separate q/k/v weights (kdim/vdim != embed_dim)
                getattr(module, f"{site}_proj_weight")[idxs] = 0
            module.in_proj_bias[rows] = 0
        return
    if site == "out":
        module.weight[idxs] = 0
        if getattr(module, "bias", None) is not None:
            module.bias[idxs] = 0
        return
    groups = getattr(module, "groups", 1)
    in_g = module.weight.shape[1]
    out_g = module.weight.shape[0] // groups
    for i in idxs.tolist():
        j, c = divmod(i, in_g)
        module.weight[j * out_g : (j + 1) * out_g, c] = 0


def _check_equivalence(model, pruner, example, atol=1e-5):
    reference = _hand_zeroed(sparta.fuse(pruner.start_copy), pruner).eval()
    pruned = sparta.fuse(model).eval()
    model.eval()
    with torch.no_grad():
        out = _logits(model(**example) if isinstance(example, dict) else model(example))
        ref = _logits(reference(**example) if isinstance(example, dict) else reference(example))
        fused = _logits(pruned(**example) if isinstance(example, dict) else pruned(example))
    scale = ref.abs().max().item() + 1e-12
    assert (out - ref).abs().max().item() <= atol * scale
    assert (fused - ref).abs().max().item() <= atol * scale


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _prune(model, example, **kw):
    start = copy.deepcopy(model)
    pruner = Pruner(model, example, **kw)
    pruner.start_copy = start
    while not pruner.done:
        pruner.step()
    return pruner


def _frozen(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("adapter", ["splora", "sppara"])
def test_masked_model_equals_hand_zeroed_model_on_tiny_net(adapter):
    torch.manual_seed(0)
    model = _quiet_wrap(
        ResidualNet(), adapter=adapter, **({"rank": 3} if adapter == "splora" else {})
    )
    perturb(model)
    x = torch.randn(2, 3, 8, 8)
    frozen = _frozen(model)
    pruner = _prune(model, x, criterion="l1", target=0.5, steps=2)
    assert abs(pruner.achieved()["density"] - 0.5) <= 0.1  # tiny groups: coarse units
    _check_equivalence(model, pruner, x)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"pruning changed base tensor {n}"
    assert (resolve_mask(model, "fc", "out") == 1).all(), "the head's outputs are never pruned"


@pytest.mark.parametrize("model_name", sorted(TINY_MODELS))
def test_masked_model_equals_hand_zeroed_model_on_contract_models(model_name):
    torch.manual_seed(0)
    model = _quiet_wrap(TINY_MODELS[model_name](), rank=2)
    perturb(model)
    x = TINY_MODELS[model_name].example()
    pruner = _prune(model, x, criterion="l2", target=0.6, steps=2)
    # grouped convolutions lose whole groups (coarse units): the first step may do it all
    assert any(r.pruned for r in pruner.history)
    _check_equivalence(model, pruner, x)


def test_wrapped_resnet18_prunes_to_target_and_stays_equivalent():
    torch.manual_seed(0)
    model = sparta.wrap(torchvision.models.resnet18(num_classes=10), rank=4)
    perturb(model)
    x = torch.randn(2, 3, 32, 32)
    frozen = _frozen(model)
    pruner = _prune(model, x, criterion="l1", target=0.4, steps=2)
    assert abs(pruner.achieved()["density"] - 0.4) <= 0.01
    _check_equivalence(model, pruner, x)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_engine_prunes_a_frozen_base_where_torch_pruning_alone_sees_nothing():
    import torch_pruning as tp

    torch.manual_seed(0)
    model = _quiet_wrap(ResidualNet(), rank=2)
    x = torch.randn(2, 3, 8, 8)
    # torch-pruning follows grad_fn: on a fully frozen plain model its graph loses every
    # coupling (measured: one single-layer group instead of four groups of up to 11 layers).
    frozen_plain = sparta.fuse(model)
    for p in frozen_plain.parameters():
        p.requires_grad_(False)
    graph = tp.DependencyGraph().build_dependency(frozen_plain, example_inputs=x)
    assert sum(len(group) for group in graph.get_all_groups()) <= 1
    pruner = _prune(model, x, criterion="l1", target=0.6, steps=1)
    assert len(pruner.groups) == 3 and max(len(g.members) for g in pruner.groups) == 7
    assert pruner.history[0].pruned, "our engine prunes the frozen, adapted model"


@pytest.mark.parametrize("kind,value", [("density", 0.5), ("sparsity", 0.6), ("macs", 0.4)])
def test_targets_are_reached_within_one_percent_on_resnet18(kind, value):
    torch.manual_seed(0)
    model = sparta.wrap(torchvision.models.resnet18(num_classes=10), rank=4)
    x = torch.randn(1, 3, 32, 32)
    pruner = _prune(model, x, criterion="l2", target=Target(kind, value), steps=3)
    achieved = pruner.achieved()[kind]
    assert abs(achieved - value) <= 0.01, (kind, achieved)
    levels = [r.level for r in pruner.history]
    assert levels == sorted(levels, reverse=True) and len(levels) == 3


def test_fine_pruning_baseline_uses_the_same_engine_on_a_plain_model():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    pruner = _prune(model, x, criterion="l1", target=0.4, steps=2)
    assert abs(pruner.achieved()["density"] - 0.4) <= 0.01
    assert all(p.requires_grad for p in model.parameters()), "fine-pruning learns every weight"
    _check_equivalence(model, pruner, x)


def test_pruned_channels_never_regrow_during_training():
    torch.manual_seed(0)
    model = _quiet_wrap(ResidualNet(), rank=2)
    x = torch.randn(4, 3, 8, 8)
    pruner = Pruner(model, x, criterion="l1", target=0.5, steps=2)
    pruner.step()
    masks_after_first = {k: t.clone() for k, t in pruner._sites().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    for k, t in pruner._sites().items():
        assert torch.equal(t, masks_after_first[k]), f"training changed mask {k}"
    pruner.step()
    for k, t in pruner._sites().items():
        assert bool((t <= masks_after_first[k]).all()), f"a pruned entry of {k} came back"
    layer = model.stem
    dead = layer.adapter.mask_out == 0
    assert dead.any()
    with torch.no_grad():
        weight, bias = layer.fused_weight()
    assert torch.all(weight[dead] == 0) and torch.all(bias[dead] == 0)


def test_min_channels_round_to_and_history():
    torch.manual_seed(0)
    model = sparta.wrap(torchvision.models.resnet18(num_classes=10), rank=4)
    x = torch.randn(1, 3, 32, 32)
    pruner = _prune(model, x, criterion="l1", target=0.3, steps=2, round_to=8, min_channels=16)
    alive = pruner._alive()
    for g in pruner.groups:
        kept = int(alive[g.name].sum())
        assert kept % 8 == 0 and kept >= 16, (g.name, kept)
    assert abs(pruner.achieved()["density"] - 0.3) <= 0.05  # within a rounding unit per group
    record = pruner.history[-1]
    assert record.step == 2 and record.criterion == "l1" and record.pruned
    for name, units in record.pruned.items():
        assert len(units) == len(record.scores[name])


@pytest.mark.parametrize(
    "name,size",
    [
        ("resnet50", 32),
        pytest.param("vgg16_bn", 32, marks=pytest.mark.slow),  # 30-40 s each on two cores
        pytest.param("vit_b_16", 32, marks=pytest.mark.slow),
    ],
)
def test_torchvision_models_prune_and_stay_equivalent(name, size):
    torch.manual_seed(0)
    kwargs = {"image_size": size} if name.startswith("vit") else {}
    base = torchvision.models.get_model(name, num_classes=10, **kwargs)
    if name.startswith("vit"):
        nn.init.normal_(base.heads.head.weight, std=0.02)
    model = _quiet_wrap(base, rank=2)
    perturb(model)
    x = torch.randn(1, 3, size, size)
    pruner = _prune(model, x, criterion="l1", target=0.5, steps=1)
    if name.startswith("vit"):
        assert any(g.kind == "heads" for g in pruner.groups)
        assert any(g.kind == "heads" and g.name in pruner.history[0].pruned for g in pruner.groups)
    _check_equivalence(model, pruner, x, atol=1e-4)


def test_bert_heads_and_ffn_neurons_prune_and_stay_equivalent():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = sparta.wrap(tiny_bert(), rank=2)
    perturb(model)
    example = {"input_ids": torch.randint(0, 50, (2, 6))}
    pruner = _prune(model, example, criterion="l1", target=0.5, steps=1)
    kinds = {g.kind for g in pruner.groups if g.name in pruner.history[0].pruned}
    assert {"heads", "neurons"} <= kinds
    _check_equivalence(model, pruner, example, atol=1e-4)


# -- bad input ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return _quiet_wrap(ResidualNet(), rank=2), torch.randn(2, 3, 8, 8)


@pytest.mark.parametrize(
    "target,match",
    [
        (0.0, r"density target must be in \(0, 1\]"),
        (1.5, r"density target must be in \(0, 1\]"),
        (-0.1, r"density target must be in"),
        ("sparsity=1.0", r"sparsity target must be in \[0, 1\)"),
        ("macs=abc", "cannot read target"),
        ("flops=0.5", "target kind must be one of density, sparsity, macs"),
        ("0.5", "density target must be a number"),
    ],
)
def test_bad_targets(tiny, target, match):
    model, x = tiny
    with pytest.raises(sparta.ConfigError, match=match):
        Pruner(model, x, target=target)


def test_unknown_criterion_lists_the_known_ones(tiny):
    model, x = tiny
    with pytest.raises(sparta.ConfigError, match=r"unknown criterion 'tailor'.*l1.*taylor"):
        Pruner(model, x, criterion="tailor")


def test_unknown_ignored_layer_names_close_ones(tiny):
    model, x = tiny
    with pytest.raises(sparta.ConfigError, match=r"ignored layer 'fcc'.*close names: fc"):
        Pruner(model, x, ignored=["fcc"])


def test_example_inputs_of_the_wrong_shape(tiny):
    model, _ = tiny
    with pytest.raises(
        sparta.ConfigError, match=r"example_inputs of shape \(2, 5, 8, 8\) do not fit"
    ):
        Pruner(model, torch.randn(2, 5, 8, 8))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"min_channels": 0}, "min_channels must be an integer >= 1"),
        ({"round_to": 0}, "round_to must be an integer >= 1"),
        ({"ranking": "layer"}, "ranking must be 'global' or 'local'"),
        ({"schedule": "exponential"}, r"unknown schedule 'exponential'.*linear"),
    ],
)
def test_bad_options(tiny, kwargs, match):
    model, x = tiny
    with pytest.raises(sparta.ConfigError, match=match):
        Pruner(model, x, **kwargs)


def test_stepping_past_the_schedule_is_refused(tiny):
    model, x = tiny
    pruner = Pruner(copy.deepcopy(model), x, target=0.8, steps=1)
    pruner.step()
    with pytest.raises(sparta.ConfigError, match="all 1 pruning steps are done"):
        pruner.step()


def test_given_scores_decide_the_step(tiny):
    model, x = tiny
    own = Pruner(copy.deepcopy(model), x, criterion="l1", target=0.5, steps=1)
    given = Pruner(copy.deepcopy(model), x, criterion="random", target=0.5, steps=1)
    # The l1 scores handed to a random-criterion pruner make it decide exactly as l1 does.
    assert given.step(own.importance()).pruned == own.step().pruned
    fresh = Pruner(copy.deepcopy(model), x, target=0.5, steps=1)
    scores = fresh.importance()
    name = next(iter(scores))
    with pytest.raises(sparta.ConfigError, match="one score per unit"):
        fresh.step({name: scores[name]})
    with pytest.raises(sparta.ConfigError, match="one score per unit"):
        fresh.step({**scores, name: scores[name][:-1]})
