"""``sparta report`` (``sparta.app.results``): runs are averaged only when every setting that
changes a result is equal, a seed is never counted twice, rows that would otherwise merge say
which settings differ, and each adapter row is compared with its baseline's compact file."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sparta.app import results
from sparta.app.grouping import NOT_RESULTS
from sparta.cli import app
from sparta.config import RunConfig

runner = CliRunner()


def _result(folder, *, accuracy: float, size: int | None = 4_000, **config) -> dict:
    """A ``result.json`` as the runner writes it (its config through RunConfig, so every field
    is recorded), written into ``folder``."""
    cfg = RunConfig(
        **{
            "model": "digits_cnn",
            "dataset": "digits",
            "method": "splora",
            "criterion": "l1",
            "target": 0.3,
            "steps": 2,
            "epochs": 3,
            "output_dir": str(folder),
            **config,
        }
    )
    final = {"accuracy": accuracy, "learned_parameters": 100, "density": cfg.target, "macs": 10}
    if size is not None:
        final["task_bytes"] = size
    result = {
        "format": "sparta.result",
        "name": cfg.name,
        "config": cfg.to_dict(),
        "final": final,
        "pruning": [{"step": 1}] if cfg.prunes else [],
        "files": {} if size is None else {"task": "task.safetensors"},
    }
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps(result))
    return result


def _rows(root):
    return results.aggregate(results.load_runs([root]))


def test_runs_differing_in_epochs_or_steps_are_not_averaged(tmp_path):
    _result(tmp_path / "a0", accuracy=0.80, seed=0)
    _result(tmp_path / "a1", accuracy=0.70, seed=1)
    _result(tmp_path / "long", accuracy=0.95, seed=0, epochs=9)
    _result(tmp_path / "steps", accuracy=0.50, seed=0, steps=5)
    rows = _rows(tmp_path)
    by_settings = {r["settings"]: r for r in rows}
    assert len(rows) == 3
    assert by_settings["epochs=3, steps=2"]["seeds"] == 2
    assert by_settings["epochs=3, steps=2"]["accuracy_mean"] == pytest.approx(0.75)
    assert by_settings["epochs=9, steps=2"]["accuracy_mean"] == pytest.approx(0.95)
    assert by_settings["epochs=3, steps=5"]["accuracy_mean"] == pytest.approx(0.50)
    assert sum("kept apart" in n for n in rows.notes) == 3
    table = results.to_markdown(rows)
    assert "| settings |" in table and "epochs=9, steps=2" in table and "Note: " in table


@pytest.mark.parametrize(
    "change", [{"lr": 0.1}, {"batch_size": 32}, {"rank": 4}, {"val_fraction": 0.1}]
)
def test_any_result_changing_setting_splits_a_row(tmp_path, change):
    _result(tmp_path / "a", accuracy=0.8, seed=0)
    _result(tmp_path / "b", accuracy=0.6, seed=1, **change)
    rows = _rows(tmp_path)
    (key,) = change
    assert len(rows) == 2 and all(key in r["settings"] for r in rows)


def test_settings_that_do_not_change_a_result_never_split(tmp_path):
    _result(tmp_path / "a", accuracy=0.8, seed=0, device="cpu", workers=0, data_dir="x")
    _result(tmp_path / "b", accuracy=0.6, seed=1, device="auto", workers=2, data_dir="y")
    (row,) = _rows(tmp_path)
    assert row["seeds"] == 2 and row["settings"] == "" and {"seed", "output_dir"} <= NOT_RESULTS


def test_an_older_result_without_a_newer_field_merges_with_its_default(tmp_path):
    new = _result(tmp_path / "new", accuracy=0.8, seed=0)
    old = _result(tmp_path / "old", accuracy=0.6, seed=1)
    del old["config"]["val_fraction"]  # not recorded by an older sparta: the default then
    (tmp_path / "old" / "result.json").write_text(json.dumps(old))
    assert new["config"]["val_fraction"] == RunConfig().val_fraction
    (row,) = _rows(tmp_path)
    assert row["seeds"] == 2


def test_the_same_settings_and_seed_twice_count_once_with_a_note(tmp_path):
    _result(tmp_path / "grid1" / "run", accuracy=0.8, seed=0)
    _result(tmp_path / "grid2" / "run", accuracy=0.6, seed=0)  # copied or rerun elsewhere
    _result(tmp_path / "grid2" / "seed1", accuracy=0.7, seed=1)
    rows = _rows(tmp_path)
    (row,) = rows
    assert row["seeds"] == 2 and row["accuracy_mean"] == pytest.approx(0.75)  # 0.8 and 0.7
    (note,) = [n for n in rows.notes if "twice" in n]
    assert "seed 0" in note and "counted once" in note and "0.8 vs 0.6" in note
    assert str(tmp_path / "grid1" / "run") in note and str(tmp_path / "grid2" / "run") in note


def test_each_adapter_is_compared_with_its_baselines_compact_file_at_each_density(tmp_path):
    for target, fp_bytes, adapter_bytes in ((0.3, 50_000, 5_000), (0.1, 12_000, 3_000)):
        for method, size in (("fine-pruning", fp_bytes), ("splora", adapter_bytes)):
            folder = tmp_path / f"{method}-{target}"
            _result(folder, accuracy=0.7, method=method, target=target, size=size)
    _result(tmp_path / "ft", accuracy=0.9, method="finetune", steps=7, size=90_000)  # unused
    _result(tmp_path / "unpruned", accuracy=0.8, method="sppara", steps=0, size=9_000)
    rows = _rows(tmp_path)
    ratio = {(r["method"], r["target"]): r["bytes_ratio"] for r in rows}
    assert ratio[("splora", 0.3)] == pytest.approx(10.0)
    assert ratio[("splora", 0.1)] == pytest.approx(4.0)
    assert ratio[("sppara", None)] == pytest.approx(10.0)  # against full fine-tuning
    assert ratio[("fine-pruning", 0.3)] is None
    fp = next(r for r in rows if r["method"] == "fine-pruning" and r["target"] == 0.3)
    assert (fp["artifact"], fp["artifact_file"], fp["artifact_bytes"]) == (
        "compact model",
        "task.safetensors",
        50_000,
    )
    assert "10.0x" in results.to_markdown(rows) and rows.notes == []
    csv_text = results.to_csv(rows)
    assert csv_text.startswith("model,dataset,method") and ",50000.0," in csv_text


def test_an_older_baseline_without_a_model_file_is_not_compared(tmp_path):
    _result(tmp_path / "fp", accuracy=0.7, method="fine-pruning", size=None)
    _result(tmp_path / "sp", accuracy=0.7)
    rows = _rows(tmp_path)
    fp = next(r for r in rows if r["method"] == "fine-pruning")
    assert fp["artifact"] is None and fp["artifact_bytes"] is None
    assert all(r["bytes_ratio"] is None for r in rows)
    assert any("no baseline run" in n and "splora" in n for n in rows.notes)


def test_the_report_command_prints_the_notes_and_the_settings(tmp_path):
    _result(tmp_path / "a", accuracy=0.8, seed=0)
    _result(tmp_path / "b", accuracy=0.8, seed=0, epochs=1)
    _result(tmp_path / "c", accuracy=0.8, seed=0, epochs=1)
    shown = runner.invoke(app, ["report", str(tmp_path)])
    assert shown.exit_code == 0, shown.output
    assert "epochs=1" in shown.stdout and "counted once" in shown.stdout


def test_csv_keeps_stdout_for_the_table_and_puts_the_notes_on_stderr(tmp_path):
    _result(tmp_path / "a", accuracy=0.8, seed=0)
    _result(tmp_path / "b", accuracy=0.8, seed=0)
    shown = runner.invoke(app, ["report", str(tmp_path), "--format", "csv"])
    assert shown.exit_code == 0, shown.output
    assert "note" not in shown.stdout and shown.stdout.count("\n") == 2  # header and one row
    assert "counted once" in shown.stderr
