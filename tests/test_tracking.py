"""``tensorboard=True`` (``sparta run --tensorboard``): a run's scalars as TensorBoard events,
read back with tensorboard's own ``EventAccumulator``."""

from __future__ import annotations

import builtins
import json

import pytest
import torch

from sparta.errors import ConfigError
from sparta.train import RESULT, run
from sparta.train.tracking import EVAL_KEYS, FOLDER, Tracker
from test_train import small_config, tiny_cnn, tiny_data

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def channel_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tracked")
    config = small_config(out, tensorboard=True)
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        r = run(config, tiny_cnn(), tiny_data(), progress=False)
    return r, json.loads((out / RESULT).read_text()), _scalars(out / FOLDER)


def test_every_evaluation_is_written_with_its_values(channel_run):
    r, result, scalars = channel_run
    steps = result["steps"]
    for key in EVAL_KEYS:
        values = [s[key] for s in steps if s[key] is not None]
        if not values:  # no validation split: nothing written
            assert f"eval/{key}" not in scalars
            continue
        written = [v for _, v in scalars[f"eval/{key}"]]
        assert written == pytest.approx(values, rel=1e-6), key  # float32 in the event file
    # evaluations sit at increasing optimiser steps, one per evaluation record
    at = [s for s, _ in scalars["eval/accuracy"]]
    assert len(at) == len(steps) and at == sorted(at) and at[0] > 0
    assert [v for _, v in scalars["eval/density"]][-1] < 1.0  # pruned


def test_every_training_batch_is_written(channel_run):
    r, result, scalars = channel_run
    loss, acc = scalars["train/loss"], scalars["train/accuracy"]
    epochs = r.config.epochs + r.config.steps * r.config.recovery_epochs
    per_epoch = len(loss) // epochs
    assert per_epoch >= 1 and len(loss) == epochs * per_epoch == len(acc)
    assert [s for s, _ in loss] == list(range(1, len(loss) + 1))  # one per optimiser step
    assert all(0.0 <= v <= 1.0 for _, v in acc)
    assert all(v > 0 for _, v in loss)
    # the last evaluation is logged at the run's last optimiser step
    assert scalars["eval/accuracy"][-1][0] == len(loss)


def test_a_block_run_writes_its_block_density_every_step(tmp_path):
    from test_text_run import _config, _run
    from text_tiny import examples, tiny_bert, write_csv

    bert = tiny_bert(tmp_path / "bert")
    write_csv(tmp_path / "train.csv", examples(48, seed=1))
    write_csv(tmp_path / "test.csv", examples(16, seed=2))
    config = _config(
        (tmp_path, bert), tmp_path / "run", method="splopa", block=8, prototypes=4, target=0.5,
        epochs=1, tensorboard=True,
    )  # fmt: skip
    r = _run(config)
    scalars = _scalars(tmp_path / "run" / FOLDER)
    density = scalars["train/block_density"]
    history = r.result["pruning"]
    assert [s for s, _ in density] == [h["step"] for h in history] == [1, 2, 3]
    assert [v for _, v in density] == pytest.approx([h["density"] for h in history])
    assert scalars["eval/density"][-1][1] == pytest.approx(r.final["density"])
    assert scalars["eval/learned_parameters"][-1][1] == r.final["learned_parameters"]


def test_missing_tensorboard_is_a_config_error_naming_the_extra(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith(("tensorboard", "torch.utils.tensorboard")):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ConfigError, match=r"pip install 'sparta\[tensorboard\]'"):
        Tracker(tmp_path / "tb")
    Tracker(tmp_path / "off", enabled=False).scalar("x", 1.0, 0)  # disabled: no import
    assert not (tmp_path / "off").exists()


def test_a_fresh_run_replaces_the_events_of_an_earlier_one(tmp_path):
    config = small_config(tmp_path, tensorboard=True, epochs=1, steps=1, recovery_epochs=0)
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        for _ in range(2):
            run(config, tiny_cnn(), tiny_data(), progress=False)
    assert len(list((tmp_path / FOLDER).glob("events.out.tfevents.*"))) == 1
    scalars = _scalars(tmp_path / FOLDER)
    assert len(scalars["eval/accuracy"]) == 2  # one run's two evaluations, not four
