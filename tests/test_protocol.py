"""One pruning protocol (issue #14, item 1): ``Pruner`` (channels) and ``BlockPruner``
(blocks) share an interface, ``sparta.make_pruner`` picks one from the adapter and refuses
options it does not take, and ``sparta.list_criteria(granularity)`` lists each registry."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import sparta
from sparta.errors import ConfigError, UnknownNameError
from sparta.pruning import BlockPruner, Pruner, PrunerBase, list_block_criteria
from sparta.pruning.protocol import ACHIEVED_KEYS
from test_train import one_thread  # noqa: F401  (autouse: tiny matrices run faster on 1 thread)
from tiny_models import MLP, Conv1dNet, tiny_bert

pytest.importorskip("transformers")

CHANNEL_MODELS = [MLP, Conv1dNet]


def _bert(seed: int = 0):
    torch.manual_seed(seed)
    return tiny_bert(
        vocab_size=40, hidden_size=64, intermediate_size=128, max_position_embeddings=16
    )


def _tokens(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 40, (6, 10), generator=gen), torch.randint(0, 3, (6,), generator=gen)


def _channels(net, adapter="splora", **options):
    torch.manual_seed(0)
    base = net().eval()
    options_of = {"splora": {"rank": 2}, "sppara": {}}
    model = sparta.wrap(base, adapter, **options_of[adapter]) if adapter else base
    x = net.example(4)
    return model, x, sparta.make_pruner(model, example_inputs=x, **options)


def _drive(pruner: PrunerBase, model, batch, loss_fn, steps: int) -> None:
    """Train-score-step by the protocol only, the same code for both granularities."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-2)
    for _ in range(steps):
        # channels: every batch is checked (and counted), blocks read none
        assert pruner.score([batch], loss_fn) == (pruner.granularity == "channels")
        out = model(batch[0])
        loss = loss_fn(getattr(out, "logits", out), batch[1]) + pruner.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()


# -- the factory --------------------------------------------------------------------------------
@pytest.mark.parametrize("net", CHANNEL_MODELS)
@pytest.mark.parametrize("adapter", ["splora", "sppara", None])
def test_factory_infers_channels_from_every_non_block_model(net, adapter):
    if adapter == "sppara" and net is MLP:
        pytest.skip("sppara adapts convolutions only")
    model, _, pruner = _channels(net, adapter, criterion="l1", target=0.5)
    assert isinstance(pruner, Pruner) and isinstance(pruner, PrunerBase)
    assert pruner.granularity == "channels" and not pruner.needs_scoring and pruner.total == 1
    assert torch.equal(pruner.penalty(), torch.zeros(()))


@pytest.mark.parametrize("criterion", ["taylor", "gradient"])
def test_data_driven_channel_criteria_need_scoring(criterion):
    _, _, pruner = _channels(MLP, criterion=criterion)
    assert pruner.needs_scoring


def test_factory_infers_blocks_from_splopa_and_channels_when_asked():
    model = sparta.wrap(_bert(), "splopa", block=16, prototypes=4)
    pruner = sparta.make_pruner(model, criterion="magnitude", target=0.5, total_steps=3)
    assert isinstance(pruner, BlockPruner) and pruner.granularity == "blocks"
    assert pruner.total == 3 and not pruner.needs_scoring
    ids, _ = _tokens()
    forced = sparta.make_pruner(
        sparta.wrap(_bert(), "splopa", block=16, prototypes=4),
        "channels",
        example_inputs=ids,
        criterion="l1",
    )
    assert isinstance(forced, Pruner)


@pytest.mark.parametrize(
    ("pruner", "options", "message"),
    [
        ("channels", {"total_steps": 3}, r"takes no option 'total_steps' \(an option of pruner='blocks'\)"),
        ("channels", {"criterion": "l1", "lr": 0.1}, r"takes no option 'lr'"),
        ("channels", {"criterion": "random", "lr": 0.1}, r"its options are: .*seed"),
        ("channels", {}, r"needs example_inputs"),
        ("channels", {"criterion": "movement"}, r"unknown criterion 'movement'"),
        ("blocks", {"steps": 3}, r"takes no option 'steps' \(an option of pruner='channels'\)"),
        ("blocks", {"criterion": "movement", "threshold": 0.1}, r"takes no option 'threshold'"),
        ("blocks", {"criterion": "taylor"}, r"unknown block criterion 'taylor'"),
        ("rows", {}, r"pruner must be 'channels', 'blocks' or None"),
    ],
)  # fmt: skip
def test_factory_refuses_what_the_chosen_pruner_does_not_take(pruner, options, message):
    if pruner == "blocks":
        model = sparta.wrap(_bert(), "splopa", block=16, prototypes=4)
    else:
        model = sparta.wrap(MLP().eval(), "splora", rank=2)
        if "total_steps" in options or "lr" in options:
            options = {"example_inputs": MLP.example(), **options}
    with pytest.raises(ConfigError, match=message):
        sparta.make_pruner(model, pruner, **options)


def test_inferred_channels_say_how_to_get_blocks():
    model = sparta.wrap(MLP().eval(), "splora", rank=2)
    with pytest.raises(ConfigError, match=r"inferred from the model: .*pruner='blocks'"):
        sparta.make_pruner(model, example_inputs=MLP.example(), warmup_steps=1)


def test_blocks_need_a_splopa_model():
    with pytest.raises(ConfigError, match="'splopa' adapter"):
        sparta.make_pruner(sparta.wrap(MLP().eval(), "splora", rank=2), "blocks")


# -- criteria registries ------------------------------------------------------------------------
def test_one_registry_per_granularity():
    channels, blocks = sparta.list_criteria(), sparta.list_criteria("blocks")
    assert channels == sparta.list_criteria(granularity="channels")
    assert {"l1", "l2", "taylor", "gradient", "lrp", "random"} <= set(channels)
    assert {"magnitude", "activation", "movement", "soft-movement", "l0"} <= set(blocks)
    assert not set(channels) & set(blocks)
    assert list_block_criteria() == blocks  # the old name stays
    with pytest.raises(ConfigError, match="granularity must be 'channels' or 'blocks'"):
        sparta.list_criteria("heads")


def test_unknown_criterion_lists_the_granularitys_names():
    with pytest.raises(UnknownNameError, match="known block criteria: activation"):
        sparta.make_pruner(sparta.wrap(_bert(), "splopa", block=16), criterion="l1")


# -- the shared interface -----------------------------------------------------------------------
@pytest.mark.parametrize("net", CHANNEL_MODELS)
@pytest.mark.parametrize("criterion", ["l1", "taylor"])
def test_channels_driven_by_the_protocol(net, criterion):
    model, x, pruner = _channels(net, criterion=criterion, target=0.5, steps=2)
    y = torch.randint(0, 3, (len(x),))
    before = pruner.achieved()
    assert tuple(before) == ACHIEVED_KEYS
    assert before["density"] == 1.0 and before["macs"] == 1.0 and before["sparsity"] == 0.0
    _drive(pruner, model, (x, y), nn.functional.cross_entropy, 2)
    after = pruner.achieved()
    assert pruner.done and len(pruner.history) == 2
    assert after["density"] < 1.0 and after["macs"] < 1.0 and after["sparsity"] > 0.0
    assert after["learned"] < before["learned"]
    assert after["learned"] == sparta.learned_parameters(model)
    assert after["learned_paper"] == sparta.learned_parameters(model, accounting="paper")
    json.dumps(pruner.history_dicts())  # plain data
    with pytest.raises(ConfigError, match="steps are done"):
        pruner.step()


@pytest.mark.parametrize("criterion", list_block_criteria())
def test_blocks_driven_by_the_protocol(criterion):
    ids, labels = _tokens()
    model = sparta.wrap(_bert(), "splopa", block=16, prototypes=4).train()
    pruner = sparta.make_pruner(
        model, criterion=criterion, target=0.5, total_steps=4, example_inputs=ids
    )
    before = pruner.achieved()
    assert tuple(before) == ACHIEVED_KEYS
    assert before["density"] == 1.0 and before["macs"] == 1.0 and before["sparsity"] == 0.0
    penalty = pruner.penalty()
    assert penalty.dim() == 0 and bool(torch.isfinite(penalty))
    _drive(pruner, model, (ids, labels), nn.functional.cross_entropy, 4)
    after = pruner.achieved()
    assert pruner.done and len(pruner.history) == 4
    # at most the target: heads / neurons emptied on the way are removed whole
    assert 0.3 < after["density"] <= 0.5 + 1e-9
    assert after["macs"] < 1.0 and after["sparsity"] > 0.3
    assert after["learned"] < before["learned"]
    assert after["learned"] == sparta.learned_parameters(model)
    json.dumps(pruner.history_dicts())
    assert pruner.penalty().item() == 0.0  # detached once final


def test_block_macs_need_example_inputs():
    model = sparta.wrap(_bert(), "splopa", block=16, prototypes=4)
    achieved = sparta.make_pruner(model, criterion="magnitude").achieved()
    assert achieved["macs"] is None and achieved["macs_abs"] is None
    assert achieved["density"] == 1.0


def test_block_step_takes_given_scores():
    """Scores handed to step() (e.g. summed over ranks) decide, not the criterion's own."""
    model = sparta.wrap(_bert(), "splopa", block=16, prototypes=4)
    pruner = sparta.make_pruner(model, criterion="magnitude", target=0.5, total_steps=1)
    given = torch.arange(len(pruner.importance()), dtype=torch.float64)  # keep the last half
    pruner.step(given)
    live = torch.cat([lay.adapter.mask_block.flatten().bool() for lay in pruner.layers])
    assert 0.3 < pruner.density() <= 0.5 + 1e-9
    # the lowest-scored blocks of a global ranking went first: the first layers are emptier
    assert live[: len(live) // 4].float().mean() < live[-len(live) // 4 :].float().mean()
    with pytest.raises(ConfigError, match=r"expected shape \(\d+,\), got \(3,\)"):
        sparta.make_pruner(
            sparta.wrap(_bert(), "splopa", block=16, prototypes=4), total_steps=2
        ).step(torch.zeros(3))


def test_block_score_reads_no_batch():
    model = sparta.wrap(_bert(), "splopa", block=16, prototypes=4)
    pruner = sparta.make_pruner(model, criterion="movement")

    def batches():
        raise AssertionError("read")
        yield

    assert pruner.score(batches(), nn.functional.cross_entropy) == 0
    with pytest.raises(ConfigError, match="progress must be a function"):
        pruner.score([], nn.functional.cross_entropy, progress=3)


def test_exported_block_task_builds_without_example_inputs():
    """With example_inputs the block pruner records the input spec, as the channel one does."""
    ids, labels = _tokens()
    model = sparta.wrap(_bert(), "splopa", block=16, prototypes=4).train()
    pruner = sparta.make_pruner(
        model, criterion="magnitude", target=0.5, total_steps=2, example_inputs=ids
    )
    _drive(pruner, model, (ids, labels), nn.functional.cross_entropy, 2)
    model.eval()
    compact = sparta.build(_bert(), sparta.export(model))
    with torch.no_grad():
        want, got = model(ids).logits, compact(ids).logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
