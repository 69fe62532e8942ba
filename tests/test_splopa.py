"""SPLoPA (block-SPA): the Kronecker delta, block and channel masks, sharing, counts, options."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import sparta
from sparta.adapters import AdaptedLayer, AdaptedWeight, SPLoPA
from sparta.errors import ConfigError, NotAdaptableError
from tiny_models import TINY_MODELS, tiny_bert


def _reference_delta(ad: SPLoPA) -> torch.Tensor:
    """sum_i B_i kron (u_i v_i^T), written with torch.kron, independently of the adapter."""
    terms = [torch.kron(ad.pos[i], ad.U[i] @ ad.V[i].t()) for i in range(ad.prototypes)]
    return torch.stack(terms).sum(0)


def _randomise(ad: SPLoPA, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ad.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _rel_close(a, b, rel=1e-5) -> bool:
    return (a - b).abs().max().item() <= rel * max(b.abs().max().item(), 1e-12)


@pytest.mark.parametrize("block, rank", [((2, 3), 1), ((4, 2), 2), ((8, 12), 1)])
def test_delta_is_the_kronecker_sum(block, rank):
    ad = SPLoPA(8, 12, block=block, prototypes=5, prototype_rank=rank).double()
    _randomise(ad)
    assert ad.delta().shape == (8, 12)
    assert torch.allclose(ad.delta(), _reference_delta(ad), rtol=1e-12, atol=1e-12)
    rows, cols = torch.tensor([7, 0, 3]), torch.tensor([11, 2])
    assert torch.equal(ad.delta_at(rows, cols), ad.delta()[rows][:, cols])


def test_init_is_next_to_the_base():
    torch.manual_seed(0)
    base = nn.Linear(64, 32)
    layer = AdaptedLayer(copy.deepcopy(base), "splopa", block=16)
    x = torch.randn(5, 64)
    assert layer.adapter.delta().abs().max() < 1e-3
    with torch.no_grad():
        assert _rel_close(layer(x), base(x), rel=1e-3)
    assert layer.adapter.prototypes == 64 and layer.adapter.pos.shape == (64, 2, 4)


def test_prototypes_are_capped_at_the_block_size():
    ad = SPLoPA(8, 8, block=2, prototypes=64)
    assert ad.prototypes == 4 and ad.U.shape == (4, 2, 1) and ad.pos.shape == (4, 4, 4)


def _masked_layer(seed: int = 0, channels: bool = True) -> AdaptedLayer:
    torch.manual_seed(seed)
    layer = AdaptedLayer(nn.Linear(12, 8), "splopa", block=(2, 3), prototypes=3).double()
    _randomise(layer.adapter, seed)
    ad = layer.adapter
    with torch.no_grad():
        ad.mask_block[0, 1] = ad.mask_block[3, 3] = ad.mask_block[2, 0] = 0
        if channels:
            ad.mask_out[5] = 0
            ad.mask_in[0] = 0
    return layer


def test_block_and_channel_masks_zero_exactly_the_masked_entries():
    layer = _masked_layer()
    ad = layer.adapter
    weight, bias = layer.fused_weight()
    blocks = torch.kron(ad.mask_block, torch.ones(2, 3, dtype=torch.float64))
    expected = (layer.base.weight + _reference_delta(ad)) * blocks
    expected[5] = 0
    expected[:, 0] = 0
    assert torch.allclose(weight, expected, rtol=1e-12, atol=0)
    dead = expected == 0
    assert torch.all(weight[dead] == 0)
    assert int((weight != 0).sum()) == ad.kept_entries() == int(ad.mask_matrix().sum())
    assert bias[5] == 0 and bool((bias[torch.arange(8) != 5] != 0).all())
    rows, cols = torch.tensor([5, 0, 1, 7]), torch.tensor([4, 0, 11, 3])
    assert torch.equal(ad.mask_at(rows, cols), ad.mask_matrix()[rows][:, cols])
    assert torch.equal(ad.mask_at(rows, None), ad.mask_matrix()[rows])


def test_fused_path_equals_fuse():
    layer = _masked_layer()
    x = torch.randn(4, 12, dtype=torch.float64)
    with torch.no_grad():
        fused = layer(x)
        plain = sparta.fuse(layer)(x)
    assert _rel_close(plain, fused)
    weight, _ = layer.fused_weight()
    assert torch.equal(sparta.fuse(layer).weight, weight.detach())


def _check_training_path(layer: AdaptedLayer) -> None:
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    with torch.no_grad():
        fused = layer(x)
    assert y.requires_grad and _rel_close(y.detach(), fused, rel=1e-10)
    # Gradients equal those of the formula, differentiated by autograd.
    weight, bias = layer.fused_weight()
    expected = nn.functional.linear(x, weight, bias)
    g = torch.randn_like(expected)
    wanted = [x, *layer.adapter.parameters()]
    for a, b in zip(torch.autograd.grad(y, wanted, g), torch.autograd.grad(expected, wanted, g)):
        assert _rel_close(a, b, rel=1e-10)


def test_training_path_with_block_and_channel_masks():
    _check_training_path(_masked_layer(channels=True))


def test_training_path_with_block_masks_only():
    # No channel pruned: the layer must still mask W by the blocks, and notice a block-mask edit
    # made after a first training step.
    layer = _masked_layer(channels=False)
    _check_training_path(layer)
    with torch.no_grad():
        layer.adapter.mask_block[1, 2] = 0
    _check_training_path(layer)


def test_channel_masks_kill_the_delta_on_both_paths():
    torch.manual_seed(0)
    layer = AdaptedLayer(nn.Linear(12, 8), "splopa", block=(2, 3), prototypes=3).double()
    _randomise(layer.adapter)
    with torch.no_grad():
        layer.adapter.mask_out[2] = 0
        layer.adapter.mask_in[7] = 0
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert torch.all(y[:, 2] == 0)
    y.square().sum().backward()
    assert torch.all(x.grad[:, 7] == 0)  # the masked input is never read
    with torch.no_grad():
        assert _rel_close(y.detach(), layer(x))


def test_num_learned_counts_prototypes_and_live_position_weights():
    ad = SPLoPA(8, 12, block=(2, 3), prototypes=3, prototype_rank=2)
    protos = 3 * (2 + 3) * 2
    assert ad.num_learned() == protos + 3 * 16 == sum(p.numel() for p in ad.parameters())
    with torch.no_grad():
        ad.mask_block[0, 0] = 0
        ad.mask_out[2:4] = 0  # the whole second block row
        ad.mask_in[3] = 0  # one column of a block: that block column stays live
    assert ad.num_learned() == protos + 3 * (16 - 1 - 4)
    with torch.no_grad():
        ad.mask_block.zero_()
    assert ad.num_learned() == 0 and ad.kept_entries() == 0


def test_unpruned_learned_parameters_match_trainable_tensors_mlp():
    torch.manual_seed(0)
    model = sparta.wrap(TINY_MODELS["mlp"](), "splopa", block=4, prototypes=5)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sparta.learned_parameters(model) == trainable


def _bert():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    return tiny_bert(
        vocab_size=40, hidden_size=64, intermediate_size=128, max_position_embeddings=16
    )


def test_bert_wraps_counts_and_paths_agree():
    base = _bert()
    model = sparta.wrap(base, "splopa", block=16, prototypes=8)
    report = model.sparta_report
    assert not report.skipped and report.head == ["classifier"]
    linears = {n: m for n, m in base.named_modules() if type(m) is nn.Linear}
    assert set(report.adapted) == set(linears) - {"classifier"} and len(report.adapted) == 13
    expected = sum(
        8 * (16 + 16) + 8 * (m.out_features // 16) * (m.in_features // 16) + m.out_features
        for n, m in linears.items()
        if n != "classifier"
    )
    expected += sum(p.numel() for m in base.modules() if isinstance(m, nn.LayerNorm)
                    for p in m.parameters())  # fmt: skip
    expected += sum(p.numel() for p in base.classifier.parameters())
    assert sparta.learned_parameters(model) == expected

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (2, 7), generator=gen)
    for ad in (m for m in model.modules() if isinstance(m, SPLoPA)):
        with torch.no_grad():
            for p in ad.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            ad.mask_out[torch.randperm(ad.out_features, generator=gen)[:5]] = 0
            ad.mask_in[torch.randperm(ad.in_features, generator=gen)[:3]] = 0
    y_grad = model(ids).logits
    assert y_grad.requires_grad
    with torch.no_grad():
        y_fused = model(ids).logits
        y_plain = sparta.fuse(model)(ids).logits
    assert _rel_close(y_grad.detach(), y_fused) and _rel_close(y_plain, y_fused)


def test_base_stays_bit_identical_after_optimiser_steps():
    base = _bert()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = sparta.wrap(base, "splopa", block=16, prototypes=4).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 40, (2, 6))
    for _ in range(2):
        opt.zero_grad()
        model(ids).logits.square().mean().backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_multihead_attention_block_mask():
    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True))
    mha = sparta.wrap(model, "splopa", head=None, block=4, prototypes=3)[0]
    weights = [m for m in mha.modules() if isinstance(m, AdaptedWeight)]
    assert sorted(list(w.adapters) for w in weights) == [["out"], ["q", "k", "v"]]
    k = next(w for w in weights if "k" in w.adapters).adapters["k"]
    with torch.no_grad():
        _randomise(k)
        k.mask_block[1, 0] = 0
    in_proj = mha.in_proj_weight  # parametrised: (W + delta) * M for q, k, v stacked
    assert torch.all(in_proj[8 + 4 : 8 + 8, 0:4] == 0)
    assert bool((in_proj[8:12, 0:4] != 0).all()) and bool((in_proj[0:8] != 0).all())
    x = torch.randn(2, 3, 8)
    y = mha(x, x, x, need_weights=False)[0]
    with torch.no_grad():
        assert _rel_close(y.detach(), mha(x, x, x, need_weights=False)[0])


# -- sharing -----------------------------------------------------------------------------------
def _shared_pair(context, shape=(8, 8)):
    return [SPLoPA(*shape, block=4, prototypes=3, shared=True, context=context) for _ in range(2)]


def test_shared_prototypes_are_per_context_and_counted_once():
    bank = SPLoPA.new_context()
    a, b = _shared_pair(bank)
    c = SPLoPA(8, 16, block=4, prototypes=3, shared=True, context=bank)
    d = SPLoPA(8, 16, block=(4, 8), prototypes=3, shared=True, context=bank)
    assert a.U is b.U is c.U and a.V is b.V is c.V
    assert d.U is not a.U and len(bank) == 2
    assert [x.owns_prototypes for x in (a, b, c, d)] == [True, False, False, True]
    holder = nn.ModuleList([a, b, c, d])
    unique = sum(p.numel() for p in holder.parameters())
    assert sum(x.num_learned() for x in holder) == unique
    other_a, _ = _shared_pair(SPLoPA.new_context())
    assert other_a.U is not a.U, "two contexts (two models) must never share"
    clone = copy.deepcopy(holder)
    assert clone[0].U is clone[1].U and clone[0].U is not a.U


def test_shared_prototypes_learn_from_every_layer_and_round_trip():
    bank = SPLoPA.new_context()
    layers = nn.ModuleList(
        AdaptedLayer(nn.Linear(8, 8), SPLoPA(8, 8, block=4, prototypes=3, shared=True,
                                             context=bank))
        for _ in range(2)
    )  # fmt: skip
    x = torch.randn(2, 8)
    layers[1](x).sum().backward()
    assert layers[0].adapter.U.grad is not None  # the same tensor, reached through layer 1
    other = copy.deepcopy(layers)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    layers.load_state_dict(other.state_dict())
    assert torch.equal(layers[0].adapter.U, other[1].adapter.U)
    assert layers[0].adapter.U is layers[1].adapter.U


def test_shared_needs_a_context():
    with pytest.raises(ConfigError, match="PrototypeBank"):
        SPLoPA(8, 8, block=4, shared=True)
    with pytest.raises(TypeError, match="PrototypeBank"):
        SPLoPA(8, 8, block=4, context={})


def test_context_is_not_a_user_option():
    assert "context" not in SPLoPA.option_names()
    with pytest.raises(ConfigError, match="no option 'context'"):
        SPLoPA.resolve_options({"context": None})


# -- options -----------------------------------------------------------------------------------
def test_options_and_defaults():
    assert SPLoPA.resolve_options({}) == {
        "block": 32,
        "prototypes": 64,
        "prototype_rank": 1,
        "shared": False,
        "init_scale": 1e-4,
    }
    assert SPLoPA(64, 32, block=[32, 16]).block == (32, 16)  # a JSON round trip gives a list


@pytest.mark.parametrize(
    "options, match",
    [
        ({"prototypes": 0}, "prototypes must be a positive integer"),
        ({"prototypes": -3}, "prototypes must be a positive integer"),
        ({"prototypes": 2.0}, "prototypes must be a positive integer"),
        ({"prototype_rank": 3}, "prototype_rank must be 1 or 2"),
        ({"prototype_rank": True}, "prototype_rank must be 1 or 2"),
        ({"block": 0}, "block must be"),
        ({"block": (4,)}, "block must be"),
        ({"block": (4, -1)}, "block must be"),
        ({"block": "32"}, "block must be"),
        ({"shared": 1}, "shared must be True or False"),
        ({"init_scale": -1.0}, "init_scale"),
        ({"rank": 2}, "no option 'rank'"),
    ],
)
def test_bad_options_are_refused(options, match):
    with pytest.raises(ConfigError, match=match):
        SPLoPA.resolve_options(options)
    with pytest.raises(ConfigError, match=match):
        sparta.wrap(TINY_MODELS["mlp"](), "splopa", **options)


def test_blocks_that_do_not_tile_a_layer_are_skipped_with_the_reason():
    with pytest.raises(NotAdaptableError, match="32 x 32 blocks do not tile the 16 x 12"):
        AdaptedLayer(nn.Linear(12, 16), "splopa")
    with pytest.raises(ConfigError, match="do not tile"):
        SPLoPA(16, 12, block=(4, 8))
    with pytest.warns(sparta.SkippedLayerWarning, match="do not tile"):
        model = sparta.wrap(TINY_MODELS["mlp"](), "splopa", block=16)
    assert model.sparta_report.adapted == ["body.3"]
    assert "16 x 16 blocks do not tile the 16 x 12" in model.sparta_report.skipped[0].reason
    with pytest.raises(ConfigError, match="adapted no layer"):
        sparta.wrap(TINY_MODELS["mlp"](), "splopa")  # 32 x 32 tiles nothing here


def test_convolutions_are_not_adapted():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError, match="adapts linear, attention layers, not conv"):
            sparta.wrap(TINY_MODELS["conv2d"](), "splopa", block=2)
    with pytest.raises(NotAdaptableError, match="not conv"):
        AdaptedLayer(nn.Conv2d(4, 4, 1), "splopa", block=2)


# -- with the rest of sparta: wrap's sharing context, artifacts, compact models -----------------
def _perturb_pruned(model, seed: int = 1):
    """Non-trivial adapters, three pruned blocks and five pruned rows per adapter."""
    gen = torch.Generator().manual_seed(seed)
    for adapter in (m for m in model.modules() if isinstance(m, SPLoPA)):
        with torch.no_grad():
            for p in adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            blocks = torch.randperm(adapter.mask_block.numel(), generator=gen)[:3]
            adapter.mask_block.view(-1)[blocks] = 0
            adapter.mask_out[torch.randperm(adapter.out_features, generator=gen)[:5]] = 0


def test_wrap_shares_prototypes_within_one_model_only():
    pytest.importorskip("transformers")
    base = _bert()
    a = sparta.wrap(base, "splopa", block=16, prototypes=8, shared=True)
    b = sparta.wrap(base, "splopa", block=16, prototypes=8, shared=True)
    in_a = [m for m in a.modules() if isinstance(m, SPLoPA)]
    in_b = [m for m in b.modules() if isinstance(m, SPLoPA)]
    assert len({id(m.U) for m in in_a}) == 1 and in_a[0].U is not in_b[0].U
    assert sparta.learned_parameters(a) == sum(p.numel() for p in a.parameters() if p.requires_grad)
    unshared = sparta.wrap(base, "splopa", block=16, prototypes=8)
    # 13 adapted layers (2 x q, k, v, output, FFN in, FFN out, and the pooler) of one block
    # shape: unshared, 12 more sets of 8 prototypes of 16 + 16 entries.
    assert sparta.learned_parameters(unshared) - sparta.learned_parameters(a) == 12 * 8 * 32


@pytest.mark.parametrize("shared", [False, True])
def test_task_round_trip_keeps_block_masks_and_sharing(shared, tmp_path):
    pytest.importorskip("transformers")
    from sparta.tasks import Task, apply_task, export

    base = _bert()
    model = sparta.wrap(base, "splopa", block=16, prototypes=4, shared=shared)
    _perturb_pruned(model)
    ids = torch.randint(0, 40, (2, 6))
    export(model).save(tmp_path / "t.safetensors")
    loaded = Task.load(tmp_path / "t.safetensors")
    assert any(k.endswith("mask_block") for k in loaded.tensors)
    rebuilt = apply_task(base, loaded).eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(ids).logits, model(ids).logits)
    if shared:
        assert len({id(m.U) for m in rebuilt.modules() if isinstance(m, SPLoPA)}) == 1


def test_bert_training_path_fused_path_and_fuse_agree_under_block_masks():
    pytest.importorskip("transformers")
    model = sparta.wrap(_bert(), "splopa", block=16, prototypes=4)
    _perturb_pruned(model)
    ids = torch.randint(0, 40, (2, 6))
    trained = model(ids).logits.detach()
    with torch.no_grad():
        fused_path = model(ids).logits
        fused = sparta.fuse(model)(ids).logits
    scale = fused_path.abs().max()
    assert (trained - fused_path).abs().max() <= 1e-5 * scale
    assert (fused - fused_path).abs().max() <= 1e-5 * scale


def test_compact_model_keeps_block_masks():
    from sparta.tasks import build_compact

    torch.manual_seed(0)
    model = sparta.wrap(TINY_MODELS["mlp"](), "splopa", block=4, prototypes=3)
    _perturb_pruned(model)
    x = TINY_MODELS["mlp"].example()
    pruner = sparta.Pruner(model, x, criterion="l1", target=0.5, steps=1)
    pruner.step()
    with torch.no_grad():  # one more live block pruned per adapter, after the channel step
        for adapter in (m for m in model.modules() if isinstance(m, SPLoPA)):
            live = adapter._live_blocks().nonzero()
            adapter.mask_block[tuple(live[0])] = 0
    compact, _ = build_compact(model.eval(), pruner.groups, x)
    with torch.no_grad():
        want, got = model(x), compact(x)
    assert (want - got).abs().max() <= 1e-5 * want.abs().max()
