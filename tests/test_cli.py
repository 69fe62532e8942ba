"""The ``sparta`` command line and the demo behind ``sparta demo``.

Expected parameter counts are computed here from the model itself, independently of
``sparta.learned_parameters``.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torchvision
from rich.console import Console
from torch import nn
from typer.testing import CliRunner

import sparta
from sparta.app.demo import run_demo
from sparta.cli import app

runner = CliRunner()


def _resnet18_parts():
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    # The counts below assume what holds for ResNet-18: plain, bias-free, ungrouped convs.
    assert all(c.groups == 1 and c.bias is None for c in convs)
    norms = sum(2 * m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    head = model.fc.weight.numel() + model.fc.bias.numel()
    total = sum(p.numel() for p in model.parameters())
    return convs, norms + head, total


def expected_splora(rank: int) -> int:
    """Paper count: r * (in + out) per conv, plus BatchNorm affine parameters and the head."""
    convs, rest, _ = _resnet18_parts()
    return sum(rank * (c.in_channels + c.out_channels) for c in convs) + rest


def expected_sppara() -> int:
    """Paper count: in x out per conv (a full pointwise matrix), plus norms and the head."""
    convs, rest, _ = _resnet18_parts()
    return sum(c.in_channels * c.out_channels for c in convs) + rest


def _one_red_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"sparta {sparta.__version__}"


def test_python_dash_m_runs_the_same_app():
    result = subprocess.run(
        [sys.executable, "-m", "sparta", "--version"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"sparta {sparta.__version__}"


def test_help_has_examples():
    for command in (["--help"], ["inspect", "--help"], ["demo", "--help"], ["adapters", "--help"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 0
        assert "Example" in result.stdout and "sparta " in result.stdout


def test_adapters_lists_every_adapter_with_kinds_and_defaults():
    result = runner.invoke(app, ["adapters"])
    assert result.exit_code == 0, result.output
    for name in sparta.list_adapters():
        assert name in result.stdout
    assert {"splora", "sppara"} <= set(sparta.list_adapters())
    assert "rank=8" in result.stdout
    assert "linear, conv, attention" in result.stdout


def test_inspect_resnet18_prints_the_learned_count():
    result = runner.invoke(app, ["inspect", "resnet18", "--rank", "8"])
    assert result.exit_code == 0, result.output
    _, _, total = _resnet18_parts()
    assert f"{expected_splora(8):,}" in result.stdout
    assert f"{total:,}" in result.stdout
    assert "adapted 20 layers" in result.stdout
    assert "head (plain, trainable): fc" in result.stdout


def test_inspect_json_is_machine_readable():
    result = runner.invoke(app, ["inspect", "resnet18", "--rank", "4", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    _, _, total = _resnet18_parts()
    assert data["params"]["learned"] == expected_splora(4)
    assert data["params"]["base_total"] == data["params"]["full_finetune"] == total
    assert data["options"]["rank"] == 4
    assert data["report"]["head"] == ["fc"] and len(data["report"]["adapted"]) == 20


def test_inspect_sppara_takes_no_rank():
    result = runner.invoke(app, ["inspect", "resnet18", "--adapter", "sppara", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert "rank" not in data["options"]
    assert data["params"]["learned"] == expected_sppara()


def test_inspect_include_exclude_patterns():
    args = ["inspect", "resnet18", "--json", "--include", "layer4*", "--exclude", "*.downsample.*"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    adapted = json.loads(result.stdout)["report"]["adapted"]
    assert adapted and all(n.startswith("layer4") and "downsample" not in n for n in adapted)


@pytest.mark.parametrize(
    "args, hint",
    [
        (["inspect", "resnet5"], "resnet50"),
        (["inspect", "not_a_model_at_all"], "resnet50"),
        (["inspect", "resnet18", "--adapter", "lora"], "splora"),
        (["inspect", "resnet18", "--rank", "0"], "rank must be a positive integer, got 0"),
        (["inspect", "resnet18", "--num-classes", "0"], "num-classes"),
        (["inspect", "resnet18", "--include", "layer9*"], "layer4"),
        (["demo", "--epochs", "0"], "epochs"),
    ],
)
def test_bad_input_exits_2_with_one_helpful_line(args, hint):
    line = _one_red_line(runner.invoke(app, args))
    assert hint in line


def test_demo_writes_results(tmp_path, monkeypatch):
    import dataclasses

    import sparta.app.demo

    # The toy at one pruning step keeps the command quick (the CLI has no such flags).
    tiny = dataclasses.replace(sparta.app.demo.TOY, densities=(0.5,), step_fraction=0.5,
                               recovery_epochs=1)  # fmt: skip
    monkeypatch.setattr(sparta.app.demo, "TOY", tiny)
    monkeypatch.delenv(sparta.app.demo.CACHE_ENV, raising=False)
    out = tmp_path / "out"
    args = ["demo", "--toy", "--epochs", "1", "--workers", "1", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "SPLoRA" in result.stdout and "TaskBank" in result.stdout
    assert "does not hold" in result.stdout or "holds" in result.stdout
    names = {p.name for p in out.iterdir()}
    assert names == {
        "results.json",
        "accuracy_vs_learned.png",
        "accuracy_vs_mflops.png",
        "runs",
        "pretrain",
        "cache",
    }
    data = json.loads((out / "results.json").read_text())
    rows = {(a["method"], a["target_density"]): a for a in data["aggregated"]}
    splora, fp = rows["splora-r4", 0.5], rows["fine-pruning", 0.5]
    assert splora["learned_parameters"] < fp["learned_parameters"]
    assert rows["sppara", 0.5]["learned_parameters"] < rows["finetune", 1.0]["learned_parameters"]
    for path in data["files"]["task_files"]:
        assert (out / path).is_file()
    assert data["deployment"]["bank"]["outputs_equal"] and data["deployment"]["base_bit_identical"]
    # A second run reads the cached base and the finished runs.
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert json.loads((out / "results.json").read_text())["base_info"]["cache_hit"]


def test_demo_is_deterministic_given_the_seed():
    quiet = Console(file=io.StringIO())
    tiny = dict(epochs=1, densities=(0.5,), step_fraction=0.5, recovery_epochs=1, workers=1)
    runs = [run_demo(seed=3, toy=True, latency_repeats=2, console=quiet, **tiny) for _ in range(2)]
    for key in ("base_info", "aggregated", "claims"):
        a, b = (_without_timings(r[key]) for r in runs)
        assert a == b


def _without_timings(tree):
    if isinstance(tree, dict):
        return {
            k: _without_timings(v)
            for k, v in tree.items()
            if not k.endswith(("_ms", "_s")) and k != "cache_file"
        }
    if isinstance(tree, list):
        return [_without_timings(v) for v in tree]
    return tree


# -- sparta bench --runtime, and the base rebuilt behind eval / bench / tasks ---------------------
@pytest.fixture(scope="module")
def digits_task(tmp_path_factory):
    """A pruned SPLoRA task on the seed-0 random digits_cnn base, saved to a file."""
    import torch

    from sparta.train.rebuild import BaseSpec

    base = BaseSpec(model="digits_cnn", num_classes=10).create()
    model = sparta.wrap(base, "splora", rank=2)
    sparta.Pruner(model, torch.randn(2, 1, 8, 8), criterion="l1", target=0.5).step()
    path = tmp_path_factory.mktemp("bench") / "task.safetensors"
    sparta.export(model.eval()).save(path)
    return path


def _ort_ready() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("onnxruntime", "onnx", "onnxscript"))


@pytest.mark.parametrize(
    "runtime",
    [
        "torchscript",
        pytest.param(
            "onnxruntime", marks=pytest.mark.skipif(not _ort_ready(), reason="onnx extra")
        ),
    ],
)
def test_bench_runtime_deploys_both_models_and_keeps_their_counts(
    digits_task, runtime, monkeypatch
):
    import sparta.train.compare

    deployed = []
    real = sparta.train.compare.deploy

    def spy(model, inputs, runtime="eager", **kw):
        served = real(model, inputs, runtime=runtime, **kw)
        deployed.append((runtime, tuple(inputs.shape), served.error))
        return served

    monkeypatch.setattr(sparta.train.compare, "deploy", spy)
    common = ["bench", str(digits_task), "--model", "digits_cnn", "--batch-size", "3"]
    common += ["--repeats", "2", "--warmup", "1", "--device", "cpu", "--json"]
    eager = json.loads(runner.invoke(app, common).stdout)
    assert eager["runtime"] == "eager" and deployed == []  # the default times the models as built
    result = runner.invoke(app, [*common, "--runtime", runtime])
    assert result.exit_code == 0, result.output
    served = json.loads(result.stdout)
    # base and compact, each served by the runtime and checked on the benchmark batch
    assert [(r, s) for r, s, _ in deployed] == [(runtime, (3, 1, 8, 8))] * 2
    assert all(error is not None and error <= 1e-4 for *_, error in deployed)
    assert served["runtime"] == runtime
    assert served["macs"] == eager["macs"] and served["params"] == eager["params"]
    assert served["macs"]["compact"] < served["macs"]["base"]
    assert served["latency_ms"]["base"] > 0 and served["latency_ms"]["compact"] > 0


def test_bench_unknown_runtime_is_one_line(digits_task):
    args = ["bench", str(digits_task), "--model", "digits_cnn", "--runtime", "tensorrt"]
    line = _one_red_line(runner.invoke(app, [*args, "--repeats", "1", "--device", "cpu"]))
    assert "tensorrt" in line and "onnxruntime" in line


def test_base_options_win_over_the_run_config_and_the_head_sets_the_classes(digits_task):
    from sparta.train.rebuild import resolve_base

    task = sparta.Task.load(digits_task)
    run = {"model": "resnet18", "weights": "DEFAULT", "cifar_stem": True, "seed": 4, "lr": 0.1}
    spec = resolve_base(run, {"model": "digits_cnn", "weights": None, "seed": 0}, task)
    assert (spec.model, spec.weights, spec.cifar_stem, spec.seed) == (
        "digits_cnn",
        "DEFAULT",
        True,
        0,
    )
    assert spec.num_classes == 10  # from the task's head: the run config has no head size
    with pytest.raises(sparta.ConfigError, match="--model is required"):
        resolve_base({}, {"seed": 1})
    with pytest.raises(sparta.ConfigError, match="unknown base options.*'lr'"):
        resolve_base(run, {"lr": 0.1})


def test_an_unreadable_run_result_is_ignored_with_a_warning(tmp_path):
    from sparta.train.rebuild import run_accuracy, run_config

    task = tmp_path / "task.safetensors"
    (tmp_path / "result.json").write_text('{"config": {"model": "digits_cnn"}, "final": {"accur')
    with pytest.warns(UserWarning, match="ignoring unreadable"):
        assert run_config(task) == {}
    (tmp_path / "result.json").write_text('{"config": {"seed": 3}, "final": {"accuracy": 0.5}}')
    assert run_config(task) == {"seed": 3} and run_accuracy(task) == 0.5
