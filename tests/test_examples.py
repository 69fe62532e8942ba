"""Every config in ``examples/`` (the ones README.md uses) runs, each with a tiny budget set
from the test (epochs, steps, and for the real-data example a subset of the images); what each
example is for is checked on its result (a grid's runs and report, a pretrained base really
loaded, the paper recipe's values). ``examples/text_*.yaml`` are run by the text tests."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from sparta.cli import app
from sparta.config import GridConfig, resolve_config
from sparta.train import run
from test_train import one_thread  # noqa: F401  (autouse: tiny matrices run faster on 1 thread)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
TINY = {"epochs": 1, "steps": 1, "recovery_epochs": 0, "scoring_batches": 1, "device": "cpu"}
runner = CliRunner()


def _config(name: str, tmp_path, **changes):
    return resolve_config(EXAMPLES / name, {**TINY, "output_dir": str(tmp_path), **changes})


def test_every_example_is_a_valid_config_and_has_a_test():
    names = sorted(p.name for p in EXAMPLES.glob("*.yaml") if not p.name.startswith("text_"))
    assert names == ["digits_pretrained.yaml", "grid.yaml", "paper_recipe.yaml",
                     "pretrained_base.yaml"]  # fmt: skip
    for name in names:
        resolve_config(EXAMPLES / name)  # raises on any unknown key or bad value
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "sparta run examples/grid.yaml --seeds 0,1,2" in readme
    assert all(f"examples/{n}" in readme for n in names)


def test_the_grid_runs_every_method_and_density_and_reports_against_fine_pruning(tmp_path):
    grid = _config("grid.yaml", tmp_path / "grid", batch_size=256)
    assert isinstance(grid, GridConfig)
    configs = grid.runs()
    assert {(c.method, c.target) for c in configs} == {
        (m, d) for m in ("fine-pruning", "splora", "sppara") for d in (0.3, 0.1)
    }
    for config in configs:
        run(config, progress=False)
    shown = runner.invoke(app, ["report", str(tmp_path / "grid"), "--format", "csv"])
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.strip().splitlines()
    assert len(lines) == 1 + 6  # one row per method and density
    adapters = [line for line in lines[1:] if ",fine-pruning," not in line]
    assert all("task.safetensors" in line for line in lines[1:])
    assert len(adapters) == 4 and all(",compact model," not in line for line in adapters)


def test_the_digits_example_runs_on_the_demos_cached_pretrained_base(tmp_path):
    from sparta.app.demo_base import pretrain_config, pretrained_base
    from sparta.data import load_dataset
    from sparta.models.checkpoint import read_state_dict

    source = load_dataset("digits-source")
    _, info = pretrained_base(source, pretrain_config(0, 2, tmp_path / "pre"), tmp_path / "cache")
    cached = info["cache_file"]  # what `sparta demo --toy` leaves in sparta-demo-toy/cache/
    result = run(_config("digits_pretrained.yaml", tmp_path / "run", checkpoint=cached))
    state = read_state_dict(cached)
    frozen = {k.replace(".base.", "."): v for k, v in result.model.state_dict().items()}
    # the frozen layer weights are the cached base's (norms and biases are trained by the task)
    trunk = [k for k in state if not k.startswith("head.") and state[k].dim() > 1]
    assert trunk and all(torch.equal(frozen[k], state[k]) for k in trunk if k in frozen)
    assert all(k in frozen for k in trunk)
    assert (
        result.config.dataset == "digits-target"
        and (tmp_path / "run" / "task.safetensors").is_file()
    )


def test_the_paper_recipe_example_applies_the_recipe(tmp_path):
    config = _config("paper_recipe.yaml", tmp_path)
    assert (config.optimizer, config.momentum, config.weight_decay) == ("sgd", 0.9, 5e-4)
    assert config.val_fraction == 0.1 and config.lr_schedule == "step"
    full = resolve_config(EXAMPLES / "paper_recipe.yaml")
    assert full.steps == 14  # 5% of the filters per step down to 30%
    result = run(config, progress=False)
    recorded = json.loads((tmp_path / "result.json").read_text())
    assert recorded["recipe"]["name"] == "paper" and "val_accuracy" in result.final


@pytest.mark.pretrained
def test_the_pretrained_example_trains_on_the_imagenet_base(tmp_path):
    import torchvision

    from sparta.data import load_dataset, subset

    config = _config("pretrained_base.yaml", tmp_path, batch_size=32)
    try:
        weights = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
        reference = torchvision.models.mobilenet_v2(weights=weights).state_dict()
        data = load_dataset("fashion-mnist", data_dir=REPO / "data", image_size=config.image_size)
    except Exception as exc:  # not installed here: `make assets`
        pytest.skip(f"the offline MobileNetV2 weights or Fashion-MNIST are missing ({exc})")
    small = SimpleNamespace(
        train=subset(data.train, 128, seed=0), test=subset(data.test, 64, seed=0), num_classes=10
    )
    result = run(config, datasets=small, progress=False)
    frozen = {k.replace(".base.", "."): v for k, v in result.model.state_dict().items()}
    key = "features.0.0.weight"  # the stem: frozen, so exactly ImageNet's
    assert torch.equal(frozen[key], reference[key])
    assert (tmp_path / "task.safetensors").is_file() and result.final["density"] < 1
