"""Text models in ``sparta.train.run``: a tiny BERT (``hf:<folder>``) on CSV / JSONL files,
block-SPA (SPLoPA with the blocks pruner) and channel-SPA (SPLoRA with the channel pruner), each
ending in a task file that ``sparta.build`` turns into a compact model computing the same
outputs; adapter and block-pruning options checked by the config."""

from __future__ import annotations

import json

import pytest
import torch

import sparta
from sparta.config import RunConfig
from sparta.errors import ConfigError
from sparta.train import CHECKPOINT, RESULT, run
from sparta.train.rebuild import BaseSpec
from text_tiny import examples, tiny_bert, write_csv, write_jsonl


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    bert = tiny_bert(root / "bert")
    write_csv(root / "train.csv", examples(96, seed=1))
    write_csv(root / "test.csv", examples(32, seed=2))
    write_jsonl(root / "all.jsonl", examples(80, ("neg", "pos", "mid"), seed=3))
    return root, bert


def _config(files, out, **changes) -> RunConfig:
    root, bert = files
    options = dict(
        model=f"hf:{bert}", dataset="text", data_dir=str(root), max_length=12, epochs=2,
        batch_size=16, optimizer="adamw", lr=3e-3, device="cpu", output_dir=str(out),
        scoring_batches=2, seed=0,
    )  # fmt: skip
    return RunConfig(**{**options, **changes})


def _run(config, **kwargs):
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        return run(config, progress=False, **kwargs)


def _batch(config):
    from sparta.train.build import load_datasets

    data = load_datasets(config)
    loader = torch.utils.data.DataLoader(data.test, batch_size=8)
    return next(iter(loader))[0]


def _check_builds_exactly(result) -> tuple[int, int]:
    """The task builds on a freshly rebuilt base into a compact model whose logits equal the
    trained masked model's; returns (compact, base) parameter counts."""
    c = result.config
    num_classes = result.model.classifier.out_features
    base = BaseSpec(model=c.model, num_classes=num_classes, seed=c.seed).create()
    task = sparta.Task.load(result.files["task"])
    compact = sparta.build(base, task)
    x = _batch(c)
    with torch.no_grad():
        want = result.model.eval()(**x).logits
        got = compact.eval()(**x).logits
    assert float((got - want).norm() / want.norm()) <= 1e-4
    count = sum(p.numel() for p in compact.parameters())
    return count, sum(p.numel() for p in base.parameters())


@pytest.mark.parametrize("granularity", ["blocks", "heads,neurons"])
def test_block_spa_run_prunes_blocks_while_training_and_builds(files, tmp_path, granularity):
    config = _config(
        files, tmp_path / "blocks", method="splopa", block=8, prototypes=4,
        block_criterion="movement", target=0.5, granularity=granularity, warmup=0.1,
        cooldown=0.2,
    )  # fmt: skip
    assert config.prunes_blocks and config.name == "splopa-movement-d0.5-s0"
    r = _run(config)
    steps = r.result["steps"]
    assert [s["step"] for s in steps] == [1, 2]  # one evaluation per epoch
    history = r.result["pruning"]
    assert [h["step"] for h in history] == list(range(1, 2 * 6 + 1))  # every optimiser step
    # no pruning in the warm-up step (round(0.1 * 12) = 1), then down to the target
    density = [h["density"] for h in history]
    assert density[0] == 1.0 and all(a >= b for a, b in zip(density, density[1:]))
    assert abs(r.final["density"] - 0.5) <= 0.13  # fraction of blocks kept, whole units
    assert r.final["density"] == density[-1] < 1.0
    assert r.final["learned_parameters"] < steps[0]["learned_parameters"] * 1.01
    assert r.final["macs"] <= steps[0]["macs"]
    compact, base = _check_builds_exactly(r)
    if granularity == "heads,neurons":  # whole heads and neurons leave the compact model
        assert compact < base and r.final["macs_fraction"] < 1.0


def test_channel_spa_run_of_an_hf_model_on_jsonl_builds_a_smaller_model(files, tmp_path):
    root, _ = files
    config = _config(
        files, tmp_path / "channels", data_dir=str(root / "all.jsonl"), method="splora",
        rank=2, criterion="taylor", target=0.5, steps=2, recovery_epochs=1, val_fraction=0.25,
    )  # fmt: skip
    assert not config.prunes_blocks
    r = _run(config)
    assert r.result["data"] == {"train": 48, "val": 16, "test": 16}  # 80 = 64 + 16, 64 = 48 + 16
    assert all(s["val_accuracy"] is not None for s in r.result["steps"])
    assert r.final["density"] == pytest.approx(0.5, abs=0.1)
    assert [s["step"] for s in r.result["steps"]] == [0, 1, 2]
    compact, base = _check_builds_exactly(r)
    assert compact < 0.8 * base


def test_the_penalty_joins_the_loss_of_every_step_and_dict_batches_train():
    """train_one_epoch adds ``penalty()`` before the backward pass: with plain SGD, a penalty
    ``c * sum(w)`` moves every weight by exactly ``-lr * c`` more per step."""
    from sparta.train import make_optimizer, train_one_epoch

    class DictModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, features, scale):
            return self.fc(features * scale)

    torch.manual_seed(0)
    x = {"features": torch.randn(6, 4), "scale": torch.full((6, 1), 2.0)}
    batches = [(x, torch.tensor([0, 1, 2, 0, 1, 2]))] * 2
    weights = []
    for c in (0.0, 0.5):
        torch.manual_seed(1)
        model = DictModel()
        opt = make_optimizer(model.parameters(), "sgd", lr=0.1, momentum=0.0)
        seen = []
        stats = train_one_epoch(
            model, batches, opt, penalty=lambda m=model, c=c: c * m.fc.weight.sum(),
            after_step=seen.append,
        )  # fmt: skip
        assert [s["batch"] for s in seen] == [1, 2] and stats["batches"] == 2
        weights.append(model.fc.weight.detach())
    assert torch.allclose(weights[0] - weights[1], torch.full((3, 4), 2 * 0.1 * 0.5), atol=1e-6)


def test_soft_movement_runs_with_its_penalty_and_builds(files, tmp_path):
    config = _config(
        files, tmp_path / "soft", method="splopa", block=8, prototypes=4, target=0.5, epochs=1,
        block_criterion="soft-movement", penalty=5.0,
    )  # fmt: skip
    r = _run(config)
    assert r.result["config"]["penalty"] == 5.0
    assert abs(r.final["density"] - 0.5) <= 0.13
    _check_builds_exactly(r)


def test_a_resumed_block_run_ends_as_an_uninterrupted_one(files, tmp_path):
    common = dict(method="splopa", block=8, prototypes=4, target=0.5, epochs=3, warmup=0.0)
    ref = _run(_config(files, tmp_path / "ref", **common))
    config = _config(files, tmp_path / "cut", **common)

    def stop(n, path):
        if n == 1:
            raise Stop

    with pytest.raises(Stop):
        _run(config, on_checkpoint=stop)
    assert (tmp_path / "cut" / CHECKPOINT).exists()
    resumed = _run(config, resume=True)
    assert resumed.resumed
    got = json.loads((tmp_path / "cut" / RESULT).read_text())
    want = json.loads((tmp_path / "ref" / RESULT).read_text())
    assert got["steps"] == want["steps"] and got["pruning"] == want["pruning"]
    a, b = resumed.model.state_dict(), ref.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(method="splora", block=4), "method 'splora' takes no option 'block'"),
        (dict(method="fine-pruning", prototypes=8), "takes no option 'prototypes'"),
        (dict(method="splopa", penalty=1.0), "'movement' has no penalty"),
        (dict(method="splopa", target="macs=0.5"), "fraction of blocks kept"),
        (dict(method="splopa", granularity="rows"), "unknown granularity 'rows'"),
        (dict(method="splopa", block_criterion="taylor"), "unknown block criterion"),
        (dict(method="splora", pruner="blocks"), "method 'splora' has none"),
        (dict(method="splopa", pruner="filters"), "unknown pruner 'filters'"),
        (dict(method="splopa", warmup=0.6, cooldown=0.5), "warmup .* \\+ cooldown"),
    ],
)
def test_options_that_do_not_fit_are_refused(files, tmp_path, changes, match):
    with pytest.raises(ConfigError, match=match):
        _config(files, tmp_path, **changes)


def test_a_block_run_without_training_steps_is_refused(files, tmp_path):
    config = _config(files, tmp_path, method="splopa", block=8, prototypes=4, epochs=0)
    with pytest.raises(ConfigError, match="prunes while training.*--epochs >= 1"):
        _run(config)


def test_splopa_with_the_channel_pruner_prunes_heads_between_phases(files, tmp_path):
    config = _config(
        files, tmp_path / "splopa-channels", method="splopa", block=8, prototypes=4,
        pruner="channels", criterion="l1", target=0.5, steps=1, recovery_epochs=0, epochs=1,
    )  # fmt: skip
    assert not config.prunes_blocks
    r = _run(config)
    assert r.final["density"] == pytest.approx(0.5, abs=0.1)
    _check_builds_exactly(r)


def test_full_fine_tuning_learns_the_cue_words(files, tmp_path):
    """The tokens reach the model with their labels: a fine-tuned tiny BERT separates the
    classes by their cue words (chance is 0.5)."""
    config = _config(
        files, tmp_path / "finetune", method="finetune", steps=0, epochs=5, batch_size=8,
        lr_schedule="constant",
    )  # fmt: skip
    r = _run(config)
    assert r.result["steps"][-1]["accuracy"] >= 0.9
    assert r.result["steps"][-1]["loss"] < 0.3


def test_a_block_run_under_several_processes_is_refused_before_training(files, tmp_path):
    """Block criteria learn from each rank's own gradients, so the masks would differ between
    ranks: a distributed block run stops with a clear message (nothing trained)."""
    from sparta.train.distributed import DistState
    from sparta.train.report import Bars
    from sparta.train.runner import _Runner

    config = _config(files, tmp_path / "ddp", method="splopa", block=8, prototypes=4)
    with pytest.raises(ConfigError, match="block pruning runs in one process.*--pruner channels"):
        _Runner(config, DistState(world_size=2), None, None, Bars(False), None)
    assert not (tmp_path / "ddp" / CHECKPOINT).exists()
