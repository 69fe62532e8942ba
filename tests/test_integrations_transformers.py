"""``sparta.integrations.transformers.SpartaCallback`` (issue #14, item 2): a tiny BERT made
from a config, fine-tuned with ``transformers.Trainer`` on CPU on a synthetic text task, ends
in a task file that ``sparta.build`` turns into a compact model equal to the masked one."""

from __future__ import annotations

import copy

import pytest
import torch

import sparta
from sparta.errors import ConfigError
from test_train import one_thread  # noqa: F401  (autouse: tiny matrices run faster on 1 thread)

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from sparta.integrations.transformers import SpartaCallback, SpartaTrainer  # noqa: E402

VOCAB, LENGTH = 60, 12


def _base(seed: int = 0):
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=LENGTH,
        num_labels=2,
    )
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(cfg)


def _data(n: int = 48, seed: int = 0):
    """Label 1 where token 7 occurs (a made-up task a tiny BERT can learn)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, VOCAB, (n, LENGTH), generator=gen)
    ids[: n // 2, 3] = 7
    labels = (ids == 7).any(1).long()
    return ids, [{"input_ids": i, "labels": y} for i, y in zip(ids, labels)]


def _train(tmp_path, callback, epochs: int = 3, model=None, trainer_cls=None, before=(), **args):
    base = _base()
    ids, data = _data()
    options = dict(
        num_train_epochs=epochs,
        per_device_train_batch_size=16,
        learning_rate=2e-3,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    options.update(args)
    trainer = (trainer_cls or transformers.Trainer)(
        model=model if model is not None else copy.deepcopy(base),
        args=transformers.TrainingArguments(str(tmp_path / "out"), **options),
        train_dataset=data,
        callbacks=[*before, callback],
    )
    trainer.train()
    return base, trainer, ids


def _check_task(base, trainer, ids, path):
    """The exported task builds (from the file) into a compact model equal to the masked one."""
    model = trainer.model.eval()
    compact = sparta.build(base, sparta.Task.load(path))
    with torch.no_grad():
        want, got = model(ids[:8]).logits, compact(ids[:8]).logits
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 1e-4 * scale
    return compact


@pytest.mark.parametrize(
    ("criterion", "unit", "every", "start"),
    [("taylor", "epochs", 1, 1), ("l1", "steps", 2, 2), ("gradient", "steps", 3, 1)],
)
def test_channel_pruning_with_trainer_builds_exactly(tmp_path, criterion, unit, every, start):
    path = tmp_path / "task.sparta"
    callback = SpartaCallback(
        "splora",
        adapter_options={"rank": 4},
        pruner_options={"criterion": criterion, "target": 0.5, "steps": 2},
        every=every,
        unit=unit,
        start=start,
        scoring_batches=2,
        export_path=path,
    )
    base, trainer, ids = _train(tmp_path, callback)
    assert callback.pruner.done and callback.pruner.granularity == "channels"
    achieved = callback.pruner.achieved()
    assert achieved["density"] < 1.0 and achieved["macs"] < 1.0
    compact = _check_task(base, trainer, ids, path)
    # physically smaller: the FFN and attention lost units
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in base.parameters())
    # every log carries the figures; density falls step by step and never rises
    logged = [h["sparta/density"] for h in trainer.state.log_history if "sparta/density" in h]
    assert logged[-1] == pytest.approx(achieved["density"])
    assert logged[0] == 1.0 or start * (unit == "steps") == 1  # pruned before the first log
    assert all(b <= a for a, b in zip(logged, logged[1:]))
    last = trainer.state.log_history[-1]
    assert last["sparta/learned"] == sparta.learned_parameters(trainer.model)
    assert last["sparta/pruning_steps"] == 2


@pytest.mark.parametrize(("criterion", "weight"), [("movement", 0.0), ("soft-movement", 1.0)])
def test_block_pruning_with_trainer_builds_exactly(tmp_path, criterion, weight):
    path = tmp_path / "task.sparta"
    callback = SpartaCallback(
        "splopa",
        adapter_options={"block": 8, "prototypes": 4},
        pruner_options={
            "criterion": criterion,
            "target": 0.5,
            "warmup_steps": 1,
            "cooldown_steps": 2,
            "granularity": ("heads", "neurons"),
        },
        penalty_weight=weight,
        export_path=path,
    )
    base, trainer, ids = _train(tmp_path, callback)
    pruner = callback.pruner
    assert pruner.granularity == "blocks" and pruner.done
    assert pruner.total == trainer.state.max_steps  # one step per optimiser step
    assert 0 < pruner.achieved()["density"] <= 0.5 + 1e-9
    _check_task(base, trainer, ids, path)


def test_already_wrapped_model_is_taken_as_it_is(tmp_path):
    model = sparta.wrap(_base(), "splora", rank=2)
    adapters = [n for n, _ in model.named_modules() if n.endswith("adapter")]
    callback = SpartaCallback(pruner_options={"criterion": "l1", "target": 0.6})
    _, trainer, _ = _train(tmp_path, callback, epochs=1, model=model)
    assert trainer.model is model
    assert [n for n, _ in model.named_modules() if n.endswith("adapter")] == adapters
    assert callback.pruner.achieved()["density"] < 1.0


def test_too_short_a_run_is_refused_before_training(tmp_path):
    callback = SpartaCallback(
        "splora", adapter_options={"rank": 2}, pruner_options={"steps": 3}, every=2, unit="epochs"
    )
    with pytest.raises(ConfigError, match=r"too short for 3 pruning steps.*has 2 epochs"):
        _train(tmp_path, callback, epochs=2)


def test_channel_criteria_have_no_penalty(tmp_path):
    callback = SpartaCallback("splora", pruner_options={"criterion": "l1"}, penalty_weight=0.1)
    with pytest.raises(ConfigError, match="channel criteria have none"):
        _train(tmp_path, callback, epochs=1)


class Recorder(transformers.TrainerCallback):
    """Stands for a reporter (TensorBoard, W&B): called before the SpartaCallback."""

    def __init__(self):
        self.seen = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs))


@pytest.mark.parametrize("trainer_cls", [None, SpartaTrainer])
def test_sparta_trainer_shows_the_figures_to_earlier_callbacks(tmp_path, trainer_cls):
    recorder = Recorder()
    callback = SpartaCallback("splora", pruner_options={"criterion": "l1", "target": 0.5})
    _, trainer, _ = _train(tmp_path, callback, 2, trainer_cls=trainer_cls, before=[recorder])
    seen = [log.get("sparta/density") for log in recorder.seen]
    if trainer_cls is None:  # a plain Trainer: only log_history and later callbacks have them
        assert seen and all(d is None for d in seen)
    else:
        assert all(d is not None for d in seen) and seen[-1] < 1.0
    assert trainer.state.log_history[-1]["sparta/density"] < 1.0
