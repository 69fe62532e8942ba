"""``SpartaCallback`` with ``transformers.Trainer`` over the Hugging Face architectures a user
brings (tiny random-weight models made from configs, never downloaded), and the Trainer's
features around it: gradient accumulation, ``max_steps``, evaluation, bf16 on CPU,
checkpoints and ``resume_from_checkpoint``. Every exported task builds into a compact model
equal to the trained, masked one (<= 1e-4 relative)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import sparta
from sparta.errors import ConfigError
from test_train import one_thread  # noqa: F401  (autouse: tiny matrices run faster on 1 thread)

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from sparta.integrations.core import own_forward  # noqa: E402
from sparta.integrations.transformers import STATE_FILE, SpartaCallback  # noqa: E402

VOCAB, LENGTH = 60, 12
SIZES = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _config(arch: str):
    t, labels = transformers, {"vocab_size": VOCAB, "num_labels": 3}
    if arch == "bert":
        return t.BertConfig(hidden_size=32, max_position_embeddings=LENGTH, **SIZES, **labels)
    if arch == "distilbert":
        return t.DistilBertConfig(
            dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=LENGTH, **labels
        )
    if arch == "roberta":  # positions start after the padding index
        return t.RobertaConfig(
            hidden_size=32, max_position_embeddings=LENGTH + 2, pad_token_id=1, **SIZES, **labels
        )
    if arch == "albert":  # one layer's weights shared by both layers
        return t.AlbertConfig(
            embedding_size=16, hidden_size=32, max_position_embeddings=LENGTH, **SIZES, **labels
        )
    if arch == "electra":  # embeddings narrower than the encoder: a projection between
        return t.ElectraConfig(
            embedding_size=16, hidden_size=32, max_position_embeddings=LENGTH, **SIZES, **labels
        )
    if arch == "deberta-v2":
        return t.DebertaV2Config(hidden_size=32, max_position_embeddings=LENGTH, **SIZES, **labels)
    if arch == "llama":  # a decoder classifying at its last token; grouped key/value heads
        return t.LlamaConfig(
            hidden_size=32, num_key_value_heads=2, max_position_embeddings=LENGTH,
            pad_token_id=0, **SIZES, **labels,
        )  # fmt: skip
    if arch == "gpt2":
        return t.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, n_positions=LENGTH, pad_token_id=0, **labels
        )
    raise AssertionError(arch)


def _base(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return transformers.AutoModelForSequenceClassification.from_config(_config(arch))


def _data(n: int = 48):
    """Label = how many of the tokens 7 and 9 occur (a made-up 3-class task)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, VOCAB, (n, LENGTH), generator=gen)
    ids[::2, 3], ids[::3, 5] = 7, 9
    labels = (ids == 7).any(1).long() + (ids == 9).any(1).long()
    return ids, [{"input_ids": i, "labels": y} for i, y in zip(ids, labels)]


CHANNELS = dict(
    adapter_options={"rank": 4},
    pruner_options={"criterion": "taylor", "target": 0.5, "steps": 2},
    unit="steps",
    every=2,
    scoring_batches=2,
)
BLOCKS = dict(
    adapter_options={"block": 8, "prototypes": 4},
    pruner_options={"criterion": "movement", "target": 0.5, "warmup_steps": 1, "cooldown_steps": 2},
)


def _trainer(tmp_path, model, callbacks, eval_data=None, **args):
    options = dict(
        num_train_epochs=2,
        per_device_train_batch_size=8,
        learning_rate=2e-3,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    options.update(args)
    return transformers.Trainer(
        model=model,
        args=transformers.TrainingArguments(str(tmp_path / "out"), **options),
        train_dataset=_data()[1],
        eval_dataset=eval_data,
        callbacks=callbacks,
    )


def _train(tmp_path, arch, adapter, options, **args):
    base, path = _base(arch), tmp_path / "task.sparta"
    callback = SpartaCallback(adapter, **options, export_path=path)
    trainer = _trainer(tmp_path, copy.deepcopy(base), [callback], **args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an export without its compact plan warns: a failure
        trainer.train()
    return base, trainer, callback, path


def _check_task(base, trainer, path):
    """The task file builds into a compact model equal to the trained, masked one."""
    ids = _data()[0][:8]
    model = trainer.model.eval()
    compact = sparta.build(base.eval(), sparta.Task.load(path))
    with torch.no_grad(), own_forward(model):
        want, got = model(ids).logits, compact(ids).logits
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())
    return compact


def _size(model) -> int:
    return sum(p.numel() for p in model.parameters())


# -- the architectures ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch", ["bert", "distilbert", "roberta", "albert", "electra", "deberta-v2"]
)
def test_channel_pruning_builds_exactly_on_each_encoder(tmp_path, arch):
    """The Trainer's default optimiser is fused AdamW, which updates the parameters without
    bumping their version counters: the adapted layers' cached fused weights went stale, so
    the evaluated (and exported) model was not the trained one (DistilBERT, ELECTRA and
    DeBERTa-v2 differed from their compact models by 2-15%)."""
    base, trainer, callback, path = _train(tmp_path, arch, "splora", CHANNELS)
    assert trainer.args.optim == "adamw_torch_fused"
    assert callback.pruner.done and callback.pruner.achieved()["density"] < 0.75
    compact = _check_task(base, trainer, path)
    assert _size(compact) < _size(base)


@pytest.mark.parametrize("arch", ["bert", "distilbert", "albert", "deberta-v2", "llama"])
def test_block_pruning_builds_exactly_on_each_architecture(tmp_path, arch):
    base, trainer, callback, path = _train(tmp_path, arch, "splopa", BLOCKS)
    assert callback.pruner.done and callback.pruner.granularity == "blocks"
    assert 0 < callback.pruner.achieved()["density"] <= 0.5 + 1e-9
    _check_task(base, trainer, path)


@pytest.mark.parametrize("adapter", ["splora", "splopa"])
def test_a_vision_transformer_classifier_builds_exactly(tmp_path, adapter):
    """``ViTForImageClassification``: batches of ``pixel_values``, patches from a conv."""
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_labels=3, **SIZES
    )
    torch.manual_seed(0)
    base = transformers.ViTForImageClassification(config)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 16, 16, generator=gen)
    y = (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1].mean((1, 2)) > 0).long()
    path = tmp_path / "task.sparta"
    options = CHANNELS if adapter == "splora" else BLOCKS
    callback = SpartaCallback(adapter, **options, export_path=path)
    trainer = _trainer(tmp_path, copy.deepcopy(base), [callback])
    trainer.train_dataset = [{"pixel_values": a, "labels": b} for a, b in zip(x, y)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.train()
    assert callback.pruner.done and callback.pruner.achieved()["density"] <= 0.5 + 1e-9
    compact = sparta.build(base.eval(), sparta.Task.load(path))
    model = trainer.model.eval()
    with torch.no_grad():
        want, got = model(x[:8]).logits, compact(x[:8]).logits
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())
    if adapter == "splora":
        assert _size(compact) < _size(base)


def test_llama_prunes_its_gated_mlps_and_names_what_it_leaves(tmp_path):
    """Llama's bias-free projections fold their inputs with a view before the matmul; behind
    a gated product or RMSNorm (several inputs, no known layer) the grouping could not tell
    the channels' layout and refused every group. Inputs that agree now give the layout:
    the MLPs prune, the attention (heads reshaped, rotary halves swapped) stays whole."""
    base, trainer, callback, path = _train(tmp_path, "llama", "splora", CHANNELS)
    pruner = callback.pruner
    assert sorted(g.name for g in pruner.groups) == [
        f"model.layers.{i}.mlp.up_proj" for i in range(2)
    ]
    assert any("self_attn" in n and "rearranges the channels" in n for n in pruner.notes)
    compact = _check_task(base, trainer, path)
    mlp = compact.model.layers[0].mlp
    assert mlp.up_proj.out_features == mlp.gate_proj.out_features == mlp.down_proj.in_features
    assert mlp.up_proj.out_features < 64 and _size(compact) < _size(base)


@pytest.mark.parametrize(
    ("arch", "adapter", "message"),
    [
        ("gpt2", "splora", "its layers with weight matrices are Conv1D"),
        ("bert", "sppara", "adapter 'sppara' adapts conv layers, not linear"),
    ],
)
def test_what_cannot_be_adapted_is_refused_when_the_trainer_is_made(
    tmp_path, arch, adapter, message
):
    callback = SpartaCallback(adapter, pruner_options={"criterion": "l1"})
    with pytest.raises(ConfigError, match=message):
        _trainer(tmp_path, _base(arch), [callback])


# -- the Trainer's features ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "steps"),
    [({"gradient_accumulation_steps": 2}, 6), ({"max_steps": 5, "num_train_epochs": 1}, 5)],
)
def test_schedule_counts_optimiser_steps(tmp_path, args, steps):
    base, trainer, callback, path = _train(tmp_path, "bert", "splora", CHANNELS, **args)
    assert trainer.state.global_step == steps
    assert [r.step for r in callback.pruner.history] == [1, 2]
    _check_task(base, trainer, path)


def test_evaluation_during_training_sees_the_trained_model(tmp_path):
    """Evaluation runs without gradients, through the cached fused weights: after the
    training it must equal the compact model's loss on the same data."""
    eval_data = _data()[1][:16]
    options = dict(eval_strategy="steps", eval_steps=3, per_device_eval_batch_size=8)
    base, trainer, _, path = _train(tmp_path, "distilbert", "splora", CHANNELS, **options,
                                    eval_data=eval_data)  # fmt: skip
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 4
    compact = _check_task(base, trainer, path)
    ids = torch.stack([d["input_ids"] for d in eval_data])
    labels = torch.stack([d["labels"] for d in eval_data])
    with torch.no_grad():
        want = float(torch.nn.functional.cross_entropy(compact(ids).logits, labels))
    assert trainer.evaluate()["eval_loss"] == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize(("adapter", "options"), [("splora", CHANNELS), ("splopa", BLOCKS)])
def test_bf16_on_cpu_exports_a_task_with_its_compact_plan(tmp_path, adapter, options):
    """accelerate's mixed precision wraps ``model.forward`` in autocast; the export checked
    the bf16 forward against the fp32 compact model, found them apart and wrote the task
    without its compact plan (a warning, made an error here)."""
    base, trainer, callback, path = _train(tmp_path, "bert", adapter, options, bf16=True)
    assert "forward" in vars(trainer.model)  # accelerate's wrapper is still on the model
    assert callback.pruner.done
    _check_task(base, trainer, path)
    assert sparta.Task.load(path).plan is not None


# -- checkpoints and resuming --------------------------------------------------------------------
class Stop(transformers.TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _resume_run(tmp_path, adapter, options, stop):
    """(uninterrupted trainer, resumed trainer, their callbacks); checkpoints every 2 steps."""
    saving = dict(save_strategy="steps", save_steps=2, num_train_epochs=3)
    base = _base("bert")
    whole = SpartaCallback(adapter, **options)
    reference = _trainer(tmp_path / "a", copy.deepcopy(base), [whole], **saving)
    reference.train()
    first = SpartaCallback(adapter, **options)
    stopped = _trainer(tmp_path / "b", copy.deepcopy(base), [first, Stop(stop)], **saving)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # training ended before the schedule did
        stopped.train()
    assert (tmp_path / "b" / "out" / f"checkpoint-{stop}" / STATE_FILE).is_file()
    second = SpartaCallback(adapter, **options, export_path=tmp_path / "task.sparta")
    resumed = _trainer(tmp_path / "b", copy.deepcopy(base), [second], **saving)
    resumed.train(resume_from_checkpoint=True)
    return base, reference, resumed, whole, second


@pytest.mark.parametrize(
    ("adapter", "options", "stop"), [("splora", CHANNELS, 2), ("splopa", BLOCKS, 4)]
)
def test_resumed_training_ends_as_the_uninterrupted_one(tmp_path, adapter, options, stop):
    """The checkpoint carries the schedule's position, and the masked head's and norms'
    tensors load (the Trainer loads leniently, and dropped them: the resumed head restarted
    from its initial weights) with the masks they are stored under."""
    base, reference, resumed, whole, second = _resume_run(tmp_path, adapter, options, stop)
    assert second.pruner.done and len(second.pruner.history) == len(whole.pruner.history)
    want, got = _state(reference.model), _state(resumed.model)
    assert want.keys() == got.keys()
    for key in want:
        if "mask" in key:
            assert torch.equal(got[key], want[key]), key
        else:
            assert torch.allclose(got[key], want[key], atol=1e-5), key
    _check_task(base, resumed, tmp_path / "task.sparta")


def test_resuming_from_a_checkpoint_without_the_callback_state_is_refused(tmp_path):
    saving = dict(save_strategy="steps", save_steps=2, num_train_epochs=3)
    plain = _trainer(tmp_path, sparta.wrap(_base("bert"), "splora", rank=4), [Stop(2)], **saving)
    plain.train()
    callback = SpartaCallback(pruner_options={"criterion": "l1", "target": 0.5})
    trainer = _trainer(tmp_path, plain.model, [callback], **saving)
    with pytest.raises(ConfigError, match=rf"resumes at step 2, but no {STATE_FILE}.*checkpoint-2"):
        trainer.train(resume_from_checkpoint=True)


@pytest.mark.parametrize("problem", ["regression", "multi_label_classification"])
def test_regression_and_multi_label_classifiers_prune_and_build(tmp_path, problem):
    """Scoring used cross-entropy on their float labels and failed."""
    n = 1 if problem == "regression" else 3
    config = _config("bert")
    config.num_labels, config.problem_type = n, problem
    torch.manual_seed(0)
    base = transformers.AutoModelForSequenceClassification.from_config(config)
    ids, data = _data()
    for row in data:
        hits = torch.stack([(row["input_ids"] == t).any() for t in (7, 9, 11)]).float()
        row["labels"] = hits.sum() if n == 1 else hits
    path = tmp_path / "task.sparta"
    callback = SpartaCallback("splora", **CHANNELS, export_path=path)
    trainer = _trainer(tmp_path, copy.deepcopy(base), [callback])
    trainer.train_dataset = data
    trainer.train()
    assert callback.pruner.done and callback.pruner.achieved()["density"] < 0.75
    _check_task(base, trainer, path)
