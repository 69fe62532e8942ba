"""Contract tests: every registered adapter x every tiny model it applies to (design.md invariants)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import sparta
from sparta.adapters import AdaptedLayer, AdaptedWeight
from tiny_models import TINY_MODELS


def _supported(adapter: str, model_name: str) -> bool:
    kinds = set(sparta.get_adapter(adapter).kinds)
    model = TINY_MODELS[model_name]()
    has = {
        "conv": any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()),
        "attention": any(isinstance(m, nn.MultiheadAttention) for m in model.modules()),
        # a Linear other than the head (the last one) and outside attention modules
        "linear": sum(type(m) is nn.Linear for m in model.modules()) > 1,
    }
    return any(has[k] for k in kinds)


CASES = [(a, m) for a in sparta.list_adapters() for m in TINY_MODELS if _supported(a, m)]


def _options(adapter: str) -> dict:
    # splopa: 2 x 2 blocks tile every adapted weight of the tiny models (their 32 x 32 default
    # tiles none of them).
    return {"splora": {"rank": 2}, "splopa": {"block": 2, "prototypes": 3}}.get(adapter, {})


def _wrapped(adapter: str, model_name: str, seed: int = 0):
    torch.manual_seed(seed)
    base = TINY_MODELS[model_name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. sppara skips Linear layers, by design
        model = sparta.wrap(base, adapter, **_options(adapter))
    return base, model, TINY_MODELS[model_name].example()


def _adapters(model):
    return [m for m in model.modules() if isinstance(m, sparta.Adapter)]


def _perturb(model, seed: int = 1, mask: bool = True):
    """Give adapters non-trivial values and prune some channels, as training and pruning would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ad in _adapters(model):
            for p in ad.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            if mask:
                ad.mask_out[
                    torch.randperm(ad.out_features, generator=gen)[: ad.out_features // 3]
                ] = 0
                ad.mask_in[torch.randperm(ad.in_features, generator=gen)[: ad.in_features // 4]] = 0


def _rel_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return (a - b).abs().max().item() <= rel * max(b.abs().max().item(), 1e-12)


@pytest.mark.parametrize("adapter,model_name", CASES)
def test_base_frozen_and_bit_identical_after_optimiser_step(adapter, model_name):
    base, model, x = _wrapped(adapter, model_name)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen, "a wrapped model must keep frozen base weights"
    adapters_before = [p.detach().clone() for ad in _adapters(model) for p in ad.parameters()]

    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(x).square().mean().backward()
    opt.step()

    for n, p in model.named_parameters():
        if n in frozen:
            assert not p.requires_grad and p.grad is None, n
            assert torch.equal(p, frozen[n]), f"frozen tensor {n} changed"
    for k, v in base.state_dict().items():
        assert torch.equal(v, original[k]), f"the original model's {k} changed"
    after = [p for ad in _adapters(model) for p in ad.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(after, adapters_before)), (
        "adapters did not learn"
    )


@pytest.mark.parametrize("adapter,model_name", CASES)
@pytest.mark.parametrize("mask", [False, True])
def test_gradient_path_fused_path_and_fuse_agree(adapter, model_name, mask):
    _, model, x = _wrapped(adapter, model_name)
    _perturb(model, mask=mask)
    model.eval()
    y_grad = model(x)  # autograd must reach the adapters: gradient (training) path
    assert y_grad.requires_grad
    with torch.no_grad():
        y_fused = model(x)  # cached fused weights
        y_plain = sparta.fuse(model)(x)
    assert _rel_close(y_grad.detach(), y_fused)
    assert _rel_close(y_plain, y_fused)


@pytest.mark.parametrize("adapter,model_name", CASES)
def test_fuse_returns_plain_torch_modules(adapter, model_name):
    _, model, x = _wrapped(adapter, model_name)
    plain = sparta.fuse(model)
    assert not any(
        isinstance(m, AdaptedLayer | sparta.Adapter | AdaptedWeight) for m in plain.modules()
    )
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in plain.modules())
    assert not hasattr(plain, "sparta_report")
    assert any(isinstance(m, AdaptedLayer | AdaptedWeight) for m in model.modules()), "fuse copies"


@pytest.mark.parametrize("adapter,model_name", CASES)
def test_masks_zero_exactly_the_masked_channels(adapter, model_name):
    _, model, x = _wrapped(adapter, model_name)
    _perturb(model, mask=False)
    layers = [m for m in model.modules() if isinstance(m, AdaptedLayer)]
    weights = [m for m in model.modules() if isinstance(m, AdaptedWeight)]
    assert layers or weights
    outputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.__setitem__(m, o)) for m in layers]
    for layer in layers:
        layer.adapter.mask_out[0] = 0
        layer.adapter.mask_in[-1] = 0
    for w in weights:
        for ad in w.adapters.values():
            ad.mask_out[0] = 0
            ad.mask_in[-1] = 0
    model.eval()
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            model(x)
        for layer in layers:
            out = outputs[layer]
            channel = 1 if layer.geometry.spatial_dims else -1
            assert torch.all(out.select(channel, 0) == 0), "a masked output channel is not dead"
            assert torch.all(out.select(channel, 1).abs().sum() > 0)
            weight, bias = layer.fused_weight()
            assert torch.all(weight[0] == 0) and (bias is None or bias[0] == 0)
            g = layer.adapter.groups
            assert torch.all(weight[-(weight.shape[0] // g) :, -1] == 0), "masked input read"
            assert weight[1, 0].abs().sum() > 0
    for w in weights:
        for ad in w.adapters.values():
            matrix = ad.mask_matrix()
            assert matrix[0].sum() == 0 and matrix[:, -1].sum() == 0
            assert matrix.sum() == (ad.out_features - 1) * (ad.in_features - 1)
    for h in hooks:
        h.remove()


@pytest.mark.parametrize("adapter,model_name", CASES)
def test_masked_input_channel_is_ignored(adapter, model_name):
    """Zeroing mask_in[c] gives the same output as zeroing input channel c by hand."""
    _, model, _ = _wrapped(adapter, model_name)
    _perturb(model, mask=False)
    layer = next((m for m in model.modules() if isinstance(m, AdaptedLayer)), None)
    if layer is None:  # attention-only adapters are checked through their weights above
        return
    channel = 1 if layer.geometry.spatial_dims else -1
    shape = [2, layer.adapter.in_features] + [9] * layer.geometry.spatial_dims
    x = torch.randn(shape if channel == 1 else [2, 3, layer.adapter.in_features])
    reference = layer(x.index_fill(channel, torch.tensor([0]), 0.0)).detach()
    layer.adapter.mask_in[0] = 0
    assert _rel_close(layer(x).detach(), reference)
    with torch.no_grad():
        assert _rel_close(layer(x), reference)


@pytest.mark.parametrize("adapter,model_name", CASES)
def test_state_dict_round_trip(adapter, model_name):
    _, model, x = _wrapped(adapter, model_name, seed=0)
    _perturb(model)
    _, fresh, _ = _wrapped(adapter, model_name, seed=5)
    fresh.load_state_dict(model.state_dict())  # strict: same keys both ways
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("adapter,model_name", CASES)
def test_eval_cache_follows_adapter_and_mask_edits(adapter, model_name):
    _, model, x = _wrapped(adapter, model_name)
    model.eval()
    with torch.no_grad():
        before = model(x).clone()
        _perturb(model, mask=False)  # in-place edits of the adapter parameters
        after_params = model(x).clone()
        _perturb(model, mask=True)  # in-place edits of the masks
        after_masks = model(x)
    expected = sparta.fuse(model)(x)
    assert not torch.equal(before, after_params)
    assert _rel_close(after_masks, expected)


@pytest.mark.parametrize("adapter,model_name", CASES)
def test_learned_parameters_counts_trainable_tensors_when_unpruned(adapter, model_name):
    _, model, _ = _wrapped(adapter, model_name)
    # Unpruned, the paper's count is exactly the number of trainable entries.
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sparta.learned_parameters(model) == trainable
    assert trainable < sum(p.numel() for p in model.parameters())


def test_deepcopy_keeps_model_working():
    _, model, x = _wrapped("splora", "attention")
    _perturb(model)
    clone = copy.deepcopy(model)
    model.eval(), clone.eval()
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))
        next(a for a in _adapters(clone)).mask_out.zero_()
        assert not torch.equal(clone(x), model(x)), "copies must not share masks"
