"""Block pruning of SPLoPA-wrapped transformers (issue #6): schedule, criteria, promotion of
emptied heads and FFN neurons to dead channels, export -> build, accounting, bad input."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import sparta
from sparta.adapters import AdaptedLayer, SPLoPA
from sparta.errors import ConfigError
from sparta.pruning import BlockPruner, list_block_criteria
from sparta.pruning.blocks import promote_dead_units
from sparta.pruning.schedules import level_at
from test_train import one_thread  # noqa: F401  (autouse: tiny matrices run faster on 1 thread)

transformers = pytest.importorskip("transformers")

HEADS, LAYERS, FFN = 4, 2, 128


@pytest.fixture(scope="module")
def base():
    cfg = transformers.BertConfig(
        vocab_size=40,
        hidden_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=16,
        num_labels=3,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).eval()


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 40, (8, 10), generator=gen), torch.randint(0, 3, (8,), generator=gen)


def _wrapped(base, seed: int = 0):
    torch.manual_seed(seed)
    return sparta.wrap(base, "splopa", block=16, prototypes=4).train()


def _train(model, pruner, steps: int, lam: float = 0.0, seed: int = 0) -> list[torch.Tensor]:
    """Train on random tokens with a made-up target; pruner.step() after every update.
    Returns the block masks after every step."""
    ids, labels = _batch(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    history = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(ids).logits, labels)
        if pruner is not None:
            loss = loss + lam * pruner.penalty()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if pruner is not None:
            pruner.step()
            history.append(_block_masks(model))
    return history


def _block_masks(model) -> torch.Tensor:
    return torch.cat([m.mask_block.flatten().clone() for m in _adapters(model)])


def _adapters(model) -> list[SPLoPA]:
    return [m for m in model.modules() if isinstance(m, SPLoPA)]


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


# -- schedule ------------------------------------------------------------------------------------
def test_cubic_schedule_with_warmup_and_cooldown():
    total, warm, cool, final = 20, 3, 4, 0.5
    values = [level_at(t, total, final, "cubic", warm, cool) for t in range(1, total + 1)]
    assert values[:warm] == [1.0] * warm  # no pruning during the initial warm-up
    assert values[total - cool - 1 :] == [final] * (cool + 1)  # final level held
    span = total - warm - cool
    for t in range(warm + 1, total - cool):
        tau = (t - warm) / span
        assert values[t - 1] == pytest.approx(final + (1 - final) * (1 - tau) ** 3)
    assert all(b <= a for a, b in zip(values, values[1:]))
    with pytest.raises(ConfigError, match="warmup"):
        level_at(1, 5, 0.5, "cubic", 3, 2)


# -- end to end ----------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["blocks", ("heads", "neurons")])
def test_movement_pruned_model_exports_and_builds_compact(base, granularity, tmp_path):
    model = _wrapped(base)
    _train(model, None, 2)  # some training before pruning starts
    pruner = BlockPruner(
        model, "movement", target=0.5, total_steps=6, warmup_steps=1, cooldown_steps=1,
        granularity=granularity,
    )  # fmt: skip
    history = _train(model, pruner, 6, seed=1)
    for before, after in zip(history, history[1:]):
        assert bool((after <= before).all())  # never regrows
    assert [r.level for r in pruner.history][:1] == [1.0] and pruner.history[-1].level == 0.5
    assert pruner.final and all(m.factors_hook is None for m in _adapters(model))
    summary = pruner.summary()
    assert summary["density"] <= 0.5 + 1e-9
    if granularity == "blocks":
        assert summary["density"] >= 0.45  # here 2 heads and 16 neurons emptied (seed 0)
    else:  # whole units: at least one head and one run of neurons went
        assert summary["heads_removed"] > 0 and summary["neurons_removed"] > 0

    ids, _ = _batch(2)
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
    sparta.export(model, example_inputs=ids).save(tmp_path / "task.safetensors")
    compact = sparta.build(base, sparta.Task.load(tmp_path / "task.safetensors"))
    with torch.no_grad():
        got = compact(ids).logits
    assert _rel(got, want) <= 1e-5

    heads = sum(
        m.num_attention_heads for n, m in compact.named_modules() if n.endswith("attention.self")
    )
    widths = [
        m.out_features for n, m in compact.named_modules() if n.endswith("intermediate.dense")
    ]
    assert heads == LAYERS * HEADS - summary["heads_removed"]
    assert sum(widths) == LAYERS * FFN - summary["neurons_removed"]
    for n, m in compact.named_modules():
        if n.endswith("attention.self"):
            assert m.query.weight.shape[0] == m.num_attention_heads * 16 == m.value.out_features


@pytest.mark.parametrize(
    "criterion", ["magnitude", "activation", "movement", "soft-movement", "l0"]
)
def test_every_criterion_prunes_to_the_target_on_bert(base, criterion):
    model = _wrapped(base)
    pruner = BlockPruner(model, criterion, target=0.5, total_steps=5, warmup_steps=1)
    start = [p.detach().clone() for p in pruner.parameters()]
    if criterion in ("soft-movement", "l0"):
        penalty = pruner.penalty()
        assert penalty.requires_grad and 0 < float(penalty.detach()) <= 1
    history = _train(model, pruner, 5, lam=0.1)
    assert all(bool((b <= a).all()) for a, b in zip(history, history[1:]))
    assert pruner.density() <= 0.5 + 1e-9 and pruner.history[-1].level == 0.5
    for before, p in zip(start, pruner.parameters()):  # learned scores / gates were trained
        assert not torch.equal(before, p.detach())
    assert float(pruner.penalty()) == 0.0  # detached: the masks are deterministic now
    ids, _ = _batch(3)
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
        got = sparta.fuse(model)(ids).logits
    assert _rel(got, want) <= 1e-5
    gradient_path = model(ids).logits  # grad enabled: SPLoPA.factors, no gate left there
    assert gradient_path.requires_grad and _rel(gradient_path.detach(), want) <= 1e-5


def test_activation_criterion_keeps_the_blocks_that_pass_energy_on():
    """Quiet input features make their blocks cheap to lose even under large weights (where
    magnitude would keep them); the scores are sqrt(sum W'^2 mean x^2) per block, read from
    forward passes with gradients only; the input hooks go when the pruner detaches."""
    torch.manual_seed(0)
    model = sparta.wrap(nn.Sequential(nn.Linear(64, 32)), "splopa", head=None, block=16)
    layer = model[0]
    with torch.no_grad():
        layer.base.weight[:, :32] *= 10  # large weights on the first 32 input features
        layer.adapter.pos.normal_(0, 0.1)  # a non-zero delta, part of W'
    magnitude = BlockPruner(model, "magnitude", target=0.5, ranking="local").criterion.scores()
    pruner = BlockPruner(model, "activation", target=0.5, total_steps=1)
    x = torch.randn(3, 40, 64)
    x[..., :32] *= 0.01  # ... which hardly ever carry a signal
    model(x).sum().backward()
    with torch.no_grad():
        model(torch.randn(5, 64) * 100)  # not a training pass: not recorded
    copy.deepcopy(model)(torch.randn(5, 64) * 100)  # a copy is not the pruned model
    with torch.no_grad():
        weight = (layer.base.weight + layer.adapter.delta()).double()
        mean_sq = x.reshape(-1, 64).double().square().mean(0)
        want = torch.tensor(
            [
                float((weight[r : r + 16, c : c + 16].square() * mean_sq[c : c + 16]).sum())
                for r in (0, 16)
                for c in (0, 16, 32, 48)
            ],
            dtype=torch.float64,
        ).sqrt()
    assert torch.allclose(pruner.criterion.scores(), want, rtol=1e-5)
    assert magnitude.view(2, 4)[:, :2].min() > magnitude.view(2, 4)[:, 2:].max()
    assert len(layer._forward_pre_hooks) == 1
    pruner.step()
    assert torch.equal(layer.adapter.mask_block, torch.tensor([[0.0, 0, 1, 1], [0, 0, 1, 1]]))
    assert len(layer._forward_pre_hooks) == 0  # final step: detached


def test_activation_scores_a_head_by_what_it_passes_on(base):
    """Head 0 of layer 0 computes loud queries, keys and values but its output columns are so
    small that it passes on little: activation (consumer side) drops it; magnitude, which also
    counts the rows, keeps it."""
    kept = {}
    for criterion in ("activation", "magnitude"):
        model = _wrapped(base)
        att = model.bert.encoder.layer[0].attention
        with torch.no_grad():
            for name in ("query", "key", "value"):
                getattr(att.self, name).base.weight[:16] *= 100
            att.output.dense.base.weight[:, :16] *= 1e-4  # net: 1e-2 of its output
        pruner = BlockPruner(model, criterion, target=0.75, granularity="heads", ranking="local")
        model(_batch()[0])  # a training-mode forward: activation records its inputs
        pruner.step()
        kept[criterion] = att.output.dense.adapter.mask_block.any(0)
    assert kept["activation"].tolist() == [False, True, True, True]
    assert bool(kept["magnitude"][0]) and int(kept["magnitude"].sum()) == 3


@pytest.mark.parametrize("criterion", ["activation", "movement"])
def test_a_model_under_pruning_pickles_whole_and_its_copy_is_not_pruned(base, criterion):
    model = _wrapped(base)
    pruner = BlockPruner(model, criterion, target=0.5, total_steps=4, warmup_steps=1)
    _train(model, pruner, 2)
    buffer = io.BytesIO()
    torch.save(model, buffer)  # the pruner's hooks are on the model: they pickle, inert
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)

    def state():
        c = pruner.criterion
        return torch.cat(c.energy) if criterion == "activation" else c.accumulated.clone()

    before = state()
    ids, labels = _batch(1)
    nn.functional.cross_entropy(loaded(ids).logits, labels).backward()
    assert torch.equal(state(), before)  # the copy feeds the pruner nothing
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    model.train()
    _train(model, pruner, 2)  # the pruner goes on driving the original
    assert pruner.done and pruner.density() <= 0.5 + 1e-9


def test_local_ranking_keeps_the_same_fraction_in_every_layer(base):
    model = _wrapped(base)
    pruner = BlockPruner(model, "magnitude", target=0.25, ranking="local")
    pruner.step()
    for ad in _adapters(model):
        assert int(ad.mask_block.sum()) == ad.mask_block.numel() // 4


def test_head_units_span_query_key_value_and_output(base):
    model = _wrapped(base)
    pruner = BlockPruner(model, "magnitude", target=0.5, granularity="heads")
    pruner.step()
    layer = model.bert.encoder.layer[0].attention
    rows = [getattr(layer.self, n).adapter.mask_block.any(1) for n in ("query", "key", "value")]
    cols = layer.output.dense.adapter.mask_block.any(0)
    assert all(torch.equal(r, cols) for r in rows)  # a head's blocks go together
    dead = (~cols).nonzero().flatten()
    assert not bool(layer.self.query.adapter.mask_out.view(HEADS, -1)[dead].any())
    assert not bool(layer.output.dense.adapter.mask_in.view(HEADS, -1)[dead].any())


# -- promotion -----------------------------------------------------------------------------------
def test_promotion_changes_no_output_and_only_takes_silent_units(base):
    model = _wrapped(base).eval()
    for ad in _adapters(model):
        with torch.no_grad():
            ad.pos.normal_(0, 0.05)
    att = model.bert.encoder.layer[0].attention
    ffn = model.bert.encoder.layer[1]
    with torch.no_grad():
        att.output.dense.adapter.mask_block[:, 1] = 0  # head 1: every output column pruned
        att.self.value.adapter.mask_block[2] = 0  # head 2: value rows pruned, bias != 0
        ffn.output.dense.adapter.mask_block[:, 3] = 0  # neurons 48..63: output columns pruned
        ffn.intermediate.dense.adapter.mask_block[5] = 0  # neurons 80..95: rows, bias kept
        att.self.value.base.bias.fill_(0.1)  # BERT starts with zero biases
        ffn.intermediate.dense.base.bias.fill_(0.1)
        ffn.intermediate.dense.base.bias[96:112] = 0
        ffn.intermediate.dense.adapter.mask_block[6] = 0  # neurons 96..111: rows, zero bias
    ids, _ = _batch(4)
    with torch.no_grad():
        before = model(ids).logits
        done = promote_dead_units(model)
        after = model(ids).logits
    assert torch.equal(before, after)
    assert done == {
        "bert.encoder.layer.0.attention.self": 1,
        "bert.encoder.layer.1.intermediate": 32,
    }
    q = att.self.query.adapter.mask_out.view(HEADS, -1)
    assert not bool(q[1].any()) and bool(q[2].all())  # a silent value with a bias still speaks
    kept = ffn.intermediate.dense.adapter.mask_out
    assert not bool(kept[48:64].any()) and not bool(kept[96:112].any())
    assert bool(kept[80:96].all())
    assert promote_dead_units(model) == {}


# -- accounting ----------------------------------------------------------------------------------
def test_learned_parameters_of_a_block_pruned_model(base):
    model = _wrapped(base)
    pruner = BlockPruner(model, "magnitude", target=0.4, granularity=("heads", "neurons"))
    pruner.step()
    with torch.no_grad():  # a few more blocks in the pooler, which no head owns
        model.bert.pooler.dense.adapter.mask_block[0, :3] = 0
    expected = 0
    for m in model.modules():
        if isinstance(m, AdaptedLayer):
            ad = m.adapter
            (p, q), (rows, cols) = ad.block, ad.mask_block.shape
            live = 0
            for a in range(rows):
                for b in range(cols):
                    row_ok = ad.mask_out[a * p : (a + 1) * p].sum() > 0
                    col_ok = ad.mask_in[b * q : (b + 1) * q].sum() > 0
                    live += int(bool(ad.mask_block[a, b]) and row_ok and col_ok)
            prototypes = 4 * (p + q) * 1 if live else 0  # R (p + q) rank, if any block lives
            expected += prototypes + 4 * live + int(ad.mask_out.sum())  # bias: kept rows
        elif isinstance(m, nn.LayerNorm):
            expected += sum(p.numel() for p in m.parameters())
    expected += sum(p.numel() for p in model.classifier.parameters())
    assert sparta.learned_parameters(model) == expected
    assert pruner.summary()["heads_removed"] > 0  # the count above saw pruned rows


# -- bad input -----------------------------------------------------------------------------------
def test_bad_input_is_refused_with_the_reason(base):
    model = _wrapped(base)
    with pytest.raises(
        ConfigError, match="known block criteria: " + ", ".join(list_block_criteria())
    ):
        BlockPruner(model, "taylor")
    for target in (0, 1.5, True, "half"):
        with pytest.raises(ConfigError, match="target"):
            BlockPruner(model, target=target)
    with pytest.raises(ConfigError, match="granularity"):
        BlockPruner(model, granularity="rows")
    with pytest.raises(ConfigError, match="warmup"):
        BlockPruner(model, total_steps=3, warmup_steps=2, cooldown_steps=1)
    with pytest.raises(ConfigError, match="takes no option 'lr'"):
        BlockPruner(model, "movement", lr=0.1)
    with pytest.raises(ConfigError, match="splopa"):
        BlockPruner(sparta.wrap(base, "splora", rank=2))
    pruner = BlockPruner(model, "movement")
    with pytest.raises(ConfigError, match="another BlockPruner"):
        BlockPruner(model, "l0")
    pruner.step()
    with pytest.raises(ConfigError, match="steps are done"):
        pruner.step()


def test_switched_off_blocks_go_ahead_of_the_schedule_but_not_past_the_target(base):
    model = _wrapped(base)
    # every soft-movement gate starts closed: the first pruning step goes straight to the target
    pruner = BlockPruner(model, "soft-movement", target=0.3, total_steps=10, init=-1.0)
    _train(model, pruner, 1)
    assert pruner.history[0].level > 0.8 and pruner.density() == pytest.approx(0.3, abs=0.01)
