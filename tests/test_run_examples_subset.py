"""``train_examples`` / ``test_examples``: a run on a seeded, class-balanced part of its data
(what a CPU walk through examples/pretrained_base.yaml needs; the demo's subsets as run
settings): the sizes the runner trains and evaluates on, balance, determinism, a too-large
value refused in one line, and `sparta eval` scoring a run on the test subset it used."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from sparta.cli import app
from sparta.config import RunConfig
from sparta.data import dataset_labels
from sparta.errors import ConfigError
from sparta.train import load_datasets, run
from test_train import small_config


def _labels(part) -> torch.Tensor:
    return dataset_labels(part)


@pytest.mark.parametrize("n_train,n_test", [(200, 90), (57, 13), (None, 40)])
def test_subsets_have_the_asked_sizes_and_balance(n_train, n_test):
    full = load_datasets(RunConfig(dataset="digits"))
    cut = load_datasets(
        RunConfig(dataset="digits", train_examples=n_train, test_examples=n_test, seed=3)
    )
    assert len(cut.train) == (n_train if n_train else len(full.train))
    assert len(cut.test) == n_test
    for part, n in ((cut.train, n_train), (cut.test, n_test)):
        if n is None:
            continue
        counts = torch.bincount(_labels(part), minlength=10)
        assert counts.max() - counts.min() <= 1  # 10 classes, every one well stocked
    again = load_datasets(
        RunConfig(dataset="digits", train_examples=n_train, test_examples=n_test, seed=3)
    )
    assert torch.equal(_labels(again.test), _labels(cut.test))
    other = load_datasets(RunConfig(dataset="digits", test_examples=n_test, seed=4))
    assert other.test.indices != cut.test.indices  # the seed draws another subset


def test_too_many_examples_is_one_clear_error():
    with pytest.raises(
        ConfigError, match=r"train_examples=100000 is more than the 1,347 examples of the train set"
    ):
        load_datasets(RunConfig(dataset="digits", train_examples=100_000))
    with pytest.raises(ConfigError, match="test_examples"):
        RunConfig(dataset="digits", test_examples=0)


def test_a_run_trains_and_evaluates_on_its_subsets_and_eval_reuses_them(tmp_path):
    out = tmp_path / "run"
    config = small_config(out, model="digits_cnn", dataset="digits", steps=1, epochs=1,
                          recovery_epochs=0, train_examples=160, test_examples=70,
                          val_fraction=0.25)  # fmt: skip
    result = run(config, progress=False)
    saved = json.loads((out / "result.json").read_text())
    assert saved["data"] == {"train": 120, "val": 40, "test": 70}  # 160 = 120 + 40 held out
    assert result.final["accuracy"] == saved["final"]["accuracy"]
    assert saved["config"]["train_examples"] == 160 and saved["config"]["test_examples"] == 70
    res = CliRunner().invoke(app, ["eval", str(out), "--format", "json"])
    assert res.exit_code == 0, res.output
    record = json.loads(res.stdout)
    assert record["samples"] == 70
    assert record["accuracy"] == pytest.approx(record["run_accuracy"], abs=1e-6)


def test_the_cli_takes_the_fields_as_options(tmp_path):
    res = CliRunner().invoke(app, ["run", "--help"])
    assert "--train-examples" in res.output and "--test-examples" in res.output
    res = CliRunner().invoke(
        app,
        ["run", "--model", "digits_cnn", "--dataset", "digits", "--train-examples", "99999",
         "--epochs", "0", "--output-dir", str(tmp_path / "big")],
    )  # fmt: skip
    assert res.exit_code == 2
    assert "train_examples=99999 is more than" in res.output
    assert "Traceback" not in res.output
