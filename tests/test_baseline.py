"""Baselines as files (``sparta.tasks.baseline``): a fine-tuned or fine-pruned model is saved as
its compact model (every kept weight in safetensors, the structure as the task format's plan),
loaded without unpickling, checked like any task file, and built on any model of the same
architecture; ``sparta run`` saves it, ``eval``/``bench``/``tasks add`` take it."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn
from typer.testing import CliRunner

import sparta
from sparta.cli import app
from sparta.config import BASELINE_METHODS
from sparta.errors import ConfigError
from sparta.tasks import ArtifactError, Task
from sparta.tasks.baseline import export_baseline, is_baseline
from sparta.tasks.manifest import BASELINES
from sparta.tasks.taskfile import manifest_text
from test_train import one_thread  # noqa: F401  (autouse: tiny matrices run faster on 1 thread)

runner = CliRunner()


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 5)
    )


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 24, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 4),
    )  # fmt: skip


FAMILIES = {  # name: (factory, example input)
    "mlp": (_mlp, (4, 12)),
    "cnn-depthwise-bn": (_cnn, (2, 3, 16, 16)),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=7), (2, 3, 32, 32)),
    "mobilenet_v3_small": (
        lambda: torchvision.models.mobilenet_v3_small(num_classes=6),
        (2, 3, 32, 32),
    ),
}


def _trained(factory, shape, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A model of ``factory`` whose every weight moved away from its initialisation (as
    training would move them), with BatchNorm statistics of its own."""
    torch.manual_seed(seed)
    model, x = factory(), torch.randn(*shape)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.train()(x)  # running statistics away from (0, 1)
    return model.eval(), x


def _fine_pruned(name: str, density: float = 0.5):
    factory, shape = FAMILIES[name]
    model, x = _trained(factory, shape)
    sparta.Pruner(model, x, criterion="l1", target=f"density={density}").step()
    return factory, model.eval(), x


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_fine_pruned_model_round_trips_as_its_compact_model(name, tmp_path):
    factory, model, x = _fine_pruned(name)
    task = export_baseline(model, "fine-pruning")
    size = task.save(tmp_path / "fp.safetensors")
    loaded = Task.load(tmp_path / "fp.safetensors")
    assert is_baseline(loaded) and loaded.adapter == "fine-pruning" and loaded.plan is not None
    torch.manual_seed(123)  # another initialisation: a baseline takes only the structure
    compact = sparta.build(factory(), loaded)
    with torch.no_grad():
        want, got = model(x), compact(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    params = sum(p.numel() for p in compact.parameters())
    assert params < sum(p.numel() for p in factory().parameters())
    # what is stored is the compact model: its parameters (plus statistics and mask bits)
    assert loaded.manifest["counts"]["learned_parameters"] == params
    stored = sum(t.numel() for k, t in loaded.tensors.items() if "mask" not in k)
    stats = sum(b.numel() for b in compact.buffers())
    assert stored == params + stats
    # float32 weights, then a manifest entry (shape, checksum) per tensor
    assert 4 * params < size < 4 * (params + stats) + 600 * len(loaded.tensors)


@pytest.mark.parametrize("name", ["mlp", "resnet18"])
def test_a_fine_tuned_model_round_trips_whole(name):
    factory, shape = FAMILIES[name]
    model, x = _trained(factory, shape, seed=3)
    task = Task.from_bytes(export_baseline(model, "finetune", x).to_bytes())
    compact = sparta.build(factory(), task)
    with torch.no_grad():
        assert torch.equal(compact(x), model(x))
    assert task.plan["cuts"] == {} and task.manifest["counts"]["learned_parameters"] == sum(
        p.numel() for p in model.parameters()
    )


def test_the_file_is_safetensors_with_a_json_manifest_and_no_pickle(tmp_path):
    _, model, _ = _fine_pruned("cnn-depthwise-bn")
    path = tmp_path / "fp.safetensors"
    export_baseline(model, "fine-pruning").save(path)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    manifest = json.loads(manifest_text(header["__metadata__"]))  # JSON, deflated (format 4)
    assert manifest["adapter"] == {"name": "fine-pruning", "options": {}}
    assert manifest["adapted"] == [] and manifest["base"]["tensors"] == {}
    assert b"\x80\x04" not in raw[: 8 + n]  # no pickle protocol marker in the header
    assert set(manifest["plan"]["cuts"]) >= {"0", "1", "6"}


def test_a_different_architecture_is_refused():
    _, model, _ = _fine_pruned("cnn-depthwise-bn")
    task = export_baseline(model, "fine-pruning")
    other = _cnn()
    other[0] = nn.Conv2d(3, 16, 5, padding=2)  # same names, another kernel size
    with pytest.raises(ArtifactError):
        sparta.build(other, task)
    with pytest.raises(ArtifactError, match="fingerprints differ"):
        sparta.build(_mlp(), task)


def test_a_crafted_plan_or_tensor_is_refused_and_the_base_is_untouched():
    factory, model, _ = _fine_pruned("cnn-depthwise-bn")
    task = export_baseline(model, "fine-pruning")
    base = factory()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    wide = json.loads(json.dumps(task.manifest))
    first = next(iter(wide["plan"]["cuts"]))
    wide["plan"]["cuts"][first] = [len(wide["plan"]["sets"]), None]  # a set that does not exist
    with pytest.raises(ArtifactError):
        Task.from_bytes(Task(dict(task.tensors), wide).to_bytes())
    for edit in ({"adapted": ["0"]}, {"adapter": {"name": "fine-pruning", "options": {"r": 1}}}):
        with pytest.raises(ArtifactError, match="baseline has no adapter options"):
            Task.from_bytes(Task(dict(task.tensors), {**task.manifest, **edit}).to_bytes())
    tensors = dict(task.tensors)
    key = next(k for k in tensors if k.endswith("original"))
    tensors[key] = tensors[key][:-1]  # one row short of what its masks keep
    with pytest.raises(ArtifactError):
        sparta.build(base, Task(tensors, task.manifest))
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_bad_inputs_are_refused_with_the_reason():
    model = _mlp()
    with pytest.raises(ConfigError, match="one of"):
        export_baseline(model, "splora")
    with pytest.raises(ConfigError, match="sparta.export"):
        export_baseline(sparta.wrap(model, "splora", rank=2), "finetune")
    with pytest.raises(ArtifactError, match="example_inputs"):
        export_baseline(model, "finetune")  # no input shapes: the plan cannot be made
    assert tuple(BASELINES) == tuple(BASELINE_METHODS)


def test_a_bank_serves_a_baseline_next_to_an_adapter_task():
    factory, model, x = _fine_pruned("resnet18", 0.3)
    torch.manual_seed(5)
    base = factory().eval()
    adapted = sparta.wrap(base, "splora", rank=2)
    sparta.Pruner(adapted, x, criterion="l1", target="density=0.3").step()
    bank = sparta.TaskBank(base)
    bank.add("fp", export_baseline(model, "fine-pruning"))
    bank.add("splora", sparta.export(adapted))
    infos = {i.name: i for i in bank.list(measure=True)}
    assert infos["fp"].adapter == "fine-pruning" and infos["splora"].adapter == "splora"
    assert infos["fp"].bytes > 5 * infos["splora"].bytes  # every kept weight vs adapters
    with torch.no_grad():
        assert torch.allclose(bank.model("fp")(x), model(x), rtol=1e-4, atol=1e-4)


# -- the command line -------------------------------------------------------------------------
FAST = [
    "--model", "digits_cnn", "--dataset", "digits", "--epochs", "1", "--recovery-epochs", "0",
    "--steps", "1", "--target", "0.5", "--batch-size", "512", "--scoring-batches", "1",
    "--device", "cpu", "--criterion", "l1", "--no-progress",
]  # fmt: skip


def _ok(result):
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_a_fine_pruning_run_is_evaluated_benchmarked_and_added_to_a_bank(tmp_path):
    out = tmp_path / "fp"
    shown = _ok(
        runner.invoke(
            app,
            ["run", *FAST, "--method", "fine-pruning", "--output-dir", str(out)],
            env={"COLUMNS": "250"},  # one line per row
        )
    )
    result = json.loads((out / "result.json").read_text())
    size = (out / "task.safetensors").stat().st_size
    assert result["files"]["task"] == "task.safetensors" and result["final"]["task_bytes"] == size
    assert f"{size:,} (task.safetensors)" in shown.stdout  # the run table names the real file

    evaluated = json.loads(_ok(runner.invoke(app, ["eval", str(out), "--json"])).stdout)
    assert evaluated["accuracy"] == pytest.approx(result["final"]["accuracy"], abs=1e-6)
    assert evaluated["params"]["compact"] < evaluated["params"]["base"]

    bench = ["bench", str(out), "--repeats", "2", "--warmup", "0", "--json"]
    measured = json.loads(_ok(runner.invoke(app, bench)).stdout)
    assert measured["params"] == evaluated["params"]
    assert measured["macs"]["compact"] < measured["macs"]["base"] / 2  # half the filters kept

    bank = str(tmp_path / "bank")
    added = ["tasks", "add", bank, "fp", str(out), "--model", "digits_cnn"]
    _ok(runner.invoke(app, added))
    listed = json.loads(_ok(runner.invoke(app, ["tasks", "list", bank, "--json"])).stdout)
    assert [(t["name"], t["adapter"], t["bytes"]) for t in listed] == [("fp", "fine-pruning", size)]


def test_an_older_baseline_run_without_a_model_file_says_how_to_get_one(tmp_path):
    old = tmp_path / "fp"
    old.mkdir()
    result = {"format": "sparta.result", "config": {"method": "fine-pruning", "model": "x"}}
    (old / "result.json").write_text(json.dumps(result))
    shown = runner.invoke(app, ["eval", str(old)])
    assert shown.exit_code == 2 and "run it again" in shown.output


@pytest.mark.parametrize("name", ["mlp", "cnn-depthwise-bn"])
def test_apply_task_gives_back_the_fine_pruned_model_to_train_further(name):
    factory, model, x = _fine_pruned(name)
    task = export_baseline(model, "fine-pruning")
    torch.manual_seed(7)
    base = factory().eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    masked = sparta.tasks.apply_task(base, task).eval()
    with torch.no_grad():
        assert torch.equal(masked(x), model(x))
    assert all(p.requires_grad for p in masked.parameters())  # every weight is learned
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    again = export_baseline(masked, "fine-pruning", x)  # masks came back with it
    assert again.plan["cuts"] == task.plan["cuts"]


def test_a_model_no_plan_can_express_is_refused_and_a_run_keeps_its_results(monkeypatch, tmp_path):
    import warnings

    import sparta.tasks.baseline as baseline

    def no_plan(model, task):
        warnings.warn("export: no plan (layer 'x' is cut by the graph only)", stacklevel=2)
        return None

    monkeypatch.setattr(baseline, "plan_of", no_plan)
    _, model, x = _fine_pruned("mlp")
    with pytest.raises(ArtifactError, match="layer 'x' is cut by the graph only"):
        export_baseline(model, "fine-pruning")
    with pytest.warns(UserWarning, match="no compact model file written"):
        saved = baseline.save_baseline(model, tmp_path / "task.safetensors", "fine-pruning", x)
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert saved == {"checkpoint_bytes": state} and not (tmp_path / "task.safetensors").exists()
