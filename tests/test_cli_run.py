"""``sparta run``, ``eval``, ``bench``, ``tasks`` and ``report`` on the built-in digits.

Runs are tiny (one epoch of a few full batches, one pruning step) and shared by the tests of
this module through module-scoped fixtures; expected numbers come from each run's result.json.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import statistics

import pytest
from typer.testing import CliRunner

from sparta.cli import app
from sparta.cli.runs import parse_args
from sparta.config import GridConfig, RunConfig, resolve_config
from test_cli import _one_red_line

runner = CliRunner()

FAST = [
    "--model", "digits_cnn", "--dataset", "digits", "--epochs", "1", "--recovery-epochs", "0",
    "--steps", "1", "--target", "0.5", "--batch-size", "512", "--scoring-batches", "1",
    "--device", "cpu",
]  # fmt: skip


def _ok(result):
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def _result(folder) -> dict:
    return json.loads((folder / "result.json").read_text())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One run from flags only."""
    out = tmp_path_factory.mktemp("single") / "run"
    _ok(runner.invoke(app, ["run", *FAST, "--output-dir", str(out), "--no-progress"]))
    return out


@pytest.fixture(scope="module")
def grid_dir(tmp_path_factory):
    """A grid of two seeds from a YAML file, with a flag overriding the file's epochs."""
    root = tmp_path_factory.mktemp("grid")
    config = root / "grid.yaml"
    config.write_text(
        "model: digits_cnn\ndataset: digits\nepochs: 4\nrecovery_epochs: 0\nsteps: 1\n"
        "target: 0.25\nbatch_size: 512\nscoring_batches: 1\ndevice: cpu\n"
        f"output_dir: {root / 'runs'}\nseeds: [0, 1]\n"
    )
    result = _ok(runner.invoke(app, ["run", str(config), "--epochs", "1", "--no-progress"]))
    assert "run 1/2" in result.stdout and "run 2/2" in result.stdout
    return root


# -- sparta run ---------------------------------------------------------------------------------
def test_run_from_flags_writes_result_and_task(run_dir):
    result = _result(run_dir)
    assert (run_dir / "task.safetensors").is_file()
    config = result["config"]
    assert config["model"] == "digits_cnn" and config["dataset"] == "digits"
    assert config["epochs"] == 1 and config["steps"] == 1 and config["target"] == 0.5
    assert config["batch_size"] == 512 and config["device"] == "cpu"
    assert result["final"]["task_bytes"] == (run_dir / "task.safetensors").stat().st_size


def test_run_resume_returns_the_finished_run(run_dir):
    before = (run_dir / "result.json").read_text()
    args = ["run", *FAST, "--output-dir", str(run_dir), "--resume", "--no-progress"]
    result = _ok(runner.invoke(app, args))
    assert "done before" in result.stdout
    assert (run_dir / "result.json").read_text() == before


def test_grid_from_yaml_with_flag_override(grid_dir):
    runs = sorted(p for p in (grid_dir / "runs").iterdir() if p.is_dir())
    assert [r.name for r in runs] == ["splora-taylor-d0.25-s0", "splora-taylor-d0.25-s1"]
    for seed, folder in enumerate(runs):
        config = _result(folder)["config"]
        assert config["epochs"] == 1  # the flag won over the file's 4
        assert config["seed"] == seed and config["target"] == 0.25
        assert (folder / "task.safetensors").is_file()


def test_running_a_grid_again_continues_it(grid_dir):
    result = _ok(
        runner.invoke(app, ["run", str(grid_dir / "grid.yaml"), "--epochs", "1", "--no-progress"])
    )
    assert result.stdout.count("done before") == 2


def test_parse_args_converts_by_field_type():
    path, overrides, grid = parse_args(
        ["c.yaml", "--lr=0.1", "--download", "--no-cifar-stem", "--no-sync-batchnorm",
         "--image-size", "none", "--target", "macs=0.2", "--seeds", "0,1", "--weights", "DEFAULT",
         "--round-to", "8"]
    )  # fmt: skip
    assert path == "c.yaml"
    assert overrides == {
        "lr": 0.1,
        "download": True,
        "cifar_stem": False,
        "sync_batchnorm": False,
        "image_size": None,
        "target": "macs=0.2",
        "weights": "DEFAULT",
        "round_to": 8,
    }
    assert grid == {"seeds": [0, 1]}
    config = resolve_config(None, {"steps": 3}, {"densities": [0.5, 0.1]})
    assert isinstance(config, GridConfig) and len(config.runs()) == 2
    assert isinstance(resolve_config(None, {"seed": 2}, {}), RunConfig)


def test_every_config_field_is_a_flag_in_the_help():
    result = _ok(runner.invoke(app, ["run", "--help"], env={"COLUMNS": "250"}))
    text = result.stdout
    assert "Example" in text and "sparta run" in text
    for name in RunConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text, name
    assert "default 64" in text  # batch_size's default


@pytest.mark.parametrize(
    ("args", "hint"),
    [
        (["--batch-sise", "8"], "No such option: --batch-sise (Possible options: --batch-size)"),
        (["--epochs", "-1"], "epochs must be >= 0"),
        (["--lr", "fast"], "--lr: expected a number, got 'fast'"),
        (["--momentum", "1.5"], "momentum must be in [0, 1)"),
        (["a.yaml", "b.yaml"], "unexpected extra argument(s) (b.yaml)"),
        (["--method", "splorra"], "did you mean 'splora'"),
        (["missing.yaml"], "cannot read config file"),
        (["--epochs"], "--epochs: expected an integer, got '--output-dir'"),
        (["--seeds", "0,x"], "--seeds: expected an integer, got 'x'"),
        (["--no-lr"], "No such option: --no-lr"),
    ],
)
def test_run_bad_input_exits_2_with_one_line(args, hint, tmp_path):
    line = _one_red_line(runner.invoke(app, ["run", *args, "--output-dir", str(tmp_path)]))
    assert hint in line, line


# -- sparta eval / bench ------------------------------------------------------------------------
def test_eval_defaults_from_the_run_and_matches_its_accuracy(run_dir):
    result = _ok(runner.invoke(app, ["eval", str(run_dir), "--json", "--device", "cpu"]))
    data = json.loads(result.stdout)
    final = _result(run_dir)["final"]
    assert data["dataset"] == "digits" and data["samples"] == 450
    assert data["run_accuracy"] == final["accuracy"]
    # the compact model computes what the masked one did (up to float rounding)
    assert abs(data["accuracy"] - final["accuracy"]) <= 1 / 450
    assert data["params"]["compact"] < data["params"]["base"]


def test_eval_needs_the_same_base(run_dir, tmp_path):
    lone = tmp_path / "task.safetensors"
    shutil.copy(run_dir / "task.safetensors", lone)  # no result.json next to it
    assert "--model is required" in _one_red_line(
        runner.invoke(app, ["eval", str(lone), "--dataset", "digits"])
    )
    args = ["eval", str(lone), "--model", "digits_cnn", "--dataset", "digits", "--device", "cpu"]
    assert "base fingerprints differ" in _one_red_line(runner.invoke(app, [*args, "--seed", "3"]))
    _ok(runner.invoke(app, args))  # seed 0: the run's base
    assert "no such task file" in _one_red_line(runner.invoke(app, ["eval", str(tmp_path / "x")]))


def test_bench_compares_base_and_compact(run_dir):
    args = ["bench", str(run_dir), "--batch-size", "2", "--repeats", "3", "--warmup", "1"]
    data = json.loads(_ok(runner.invoke(app, [*args, "--json", "--device", "cpu"])).stdout)
    assert data["inputs"] == [2, 1, 8, 8]
    assert data["macs"]["compact"] < data["macs"]["base"]
    assert data["macs"]["compact"] == _result(run_dir)["final"]["macs"]  # same batch of 2
    assert data["params"]["compact"] < data["params"]["base"]
    assert data["latency_ms"]["base"] > 0 and data["speedup"] > 0
    table = _ok(runner.invoke(app, [*args, "--image-size", "16", "--device", "cpu"])).stdout
    table = " ".join(table.split())  # rich wraps long lines
    assert "speed-up" in table and "[2, 1, 16, 16]" in table


# -- sparta tasks -------------------------------------------------------------------------------
def test_tasks_add_list_switch_remove(run_dir, grid_dir, tmp_path):
    bank = str(tmp_path / "bank")
    base = ["--model", "digits_cnn"]
    task = str(run_dir / "task.safetensors")
    _ok(runner.invoke(app, ["tasks", "add", bank, "alpha", task, *base]))
    _ok(runner.invoke(app, ["tasks", "add", bank, "beta", str(run_dir), *base]))
    assert "already in the bank" in _one_red_line(
        runner.invoke(app, ["tasks", "add", bank, "beta", task, *base])
    )
    other_seed = str(grid_dir / "runs" / "splora-taylor-d0.25-s1")  # another random base
    assert "base fingerprints differ" in _one_red_line(
        runner.invoke(app, ["tasks", "add", bank, "gamma", other_seed, *base])
    )
    # The first add recorded the base: later commands need no base options.
    saved = json.loads((tmp_path / "bank" / "bank.json").read_text())["base"]
    assert saved["model"] == "digits_cnn" and saved["seed"] == 0 and saved["num_classes"] == 10
    listed = json.loads(_ok(runner.invoke(app, ["tasks", "list", bank, "--json"])).stdout)
    assert [t["name"] for t in listed] == ["alpha", "beta"]
    assert listed[0]["bytes"] == _result(run_dir)["final"]["task_bytes"]
    assert listed[0]["learned_parameters"] == _result(run_dir)["final"]["learned_parameters"]

    switched = _ok(runner.invoke(app, ["tasks", "build", bank, "alpha"])).stdout
    assert "built task alpha in" in switched and " ms" in switched
    assert f"{_result(run_dir)['final']['macs']:,}" in switched

    _ok(runner.invoke(app, ["tasks", "remove", bank, "beta"]))
    assert not (tmp_path / "bank" / "beta.safetensors").exists()
    listed = json.loads(_ok(runner.invoke(app, ["tasks", "list", bank, *base, "--json"])).stdout)
    assert [t["name"] for t in listed] == ["alpha"]
    assert "did you mean 'alpha'" in _one_red_line(
        runner.invoke(app, ["tasks", "build", bank, "alpah", *base])
    )
    empty = str(tmp_path / "empty")
    assert "does not exist" in _one_red_line(runner.invoke(app, ["tasks", "list", empty]))
    assert not (tmp_path / "empty").exists()  # a read-only command creates no folder
    (tmp_path / "empty").mkdir()
    assert "has no bank.json yet" in _one_red_line(runner.invoke(app, ["tasks", "list", empty]))
    (tmp_path / "bank" / "bank.json").write_text("{not json")
    assert "bank.json' is unreadable" in _one_red_line(runner.invoke(app, ["tasks", "list", bank]))


# -- sparta report ------------------------------------------------------------------------------
def test_report_aggregates_seeds_and_writes_files(grid_dir, tmp_path):
    out = tmp_path / "report"
    result = _ok(
        runner.invoke(app, ["report", str(grid_dir), "--format", "csv", "--out", str(out)])
    )
    runs = sorted(p for p in (grid_dir / "runs").iterdir() if p.is_dir())
    finals = [_result(f)["final"] for f in runs]
    (row,) = list(csv.DictReader(io.StringIO((out / "report.csv").read_text())))
    assert result.stdout.startswith("model,dataset,method")
    assert (row["method"], row["criterion"], float(row["target"])) == ("splora", "taylor", 0.25)
    assert int(row["seeds"]) == 2
    accuracies = [f["accuracy"] for f in finals]
    assert float(row["accuracy_mean"]) == pytest.approx(statistics.fmean(accuracies))
    assert float(row["accuracy_std"]) == pytest.approx(statistics.stdev(accuracies))
    for key in ("learned_parameters", "density", "macs"):
        assert float(row[key]) == pytest.approx(statistics.fmean(f[key] for f in finals))
    mean_bytes = statistics.fmean(f["task_bytes"] for f in finals)
    assert float(row["artifact_bytes"]) == pytest.approx(mean_bytes)

    markdown = (out / "report.md").read_text()
    mean, std = 100 * statistics.fmean(accuracies), 100 * statistics.stdev(accuracies)
    assert f"{mean:.2f} ± {std:.2f}" in markdown and "| seeds |" in markdown
    for stem in ("learned_parameters", "density", "macs"):
        png = out / f"accuracy_vs_{stem}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_bad_input(tmp_path):
    assert "no result.json found" in _one_red_line(runner.invoke(app, ["report", str(tmp_path)]))
    missing = str(tmp_path / "nope")
    assert "no such file or folder" in _one_red_line(runner.invoke(app, ["report", missing]))


def test_help_texts_have_examples():
    commands = [
        ["run"], ["eval"], ["bench"], ["report"], ["tasks"], ["tasks", "list"],
        ["tasks", "add"], ["tasks", "remove"], ["tasks", "build"],
    ]  # fmt: skip
    for command in commands:
        result = _ok(runner.invoke(app, [*command, "--help"], terminal_width=200))
        assert "Example" in result.stdout and "sparta " in result.stdout, command
