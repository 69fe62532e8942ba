"""The demo (``sparta.app.demo``): the toy end to end at a tiny budget (filter densities, both
accountings, claims, deployment, a rerun that reads finished runs back), the real path on a
tiny stand-in for MobileNetV2 with Fashion-MNIST files written in the real IDX format, the
missing-assets message, the toy's cached base, and a ``pretrained`` smoke on the real assets."""

from __future__ import annotations

import gzip
import io
import json
import struct

import numpy as np
import pytest
import torch
from rich.console import Console

from sparta.app import demo, demo_base
from sparta.data import load_dataset
from sparta.errors import ConfigError
from sparta.models import digits_cnn

#: One epoch, one pruning step to 50% of the filters: a few seconds per method.
TINY = dict(epochs=1, recovery_epochs=1, densities=(0.5,), step_fraction=0.5, workers=1,
            latency_repeats=2)  # fmt: skip


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    console = _quiet()
    results = demo.run_demo(out_dir=out, toy=True, console=console, **TINY)
    return out, results, console.file.getvalue()


def test_toy_runs_every_method_at_filter_density_and_writes_everything(toy):
    out, results, text = toy
    assert not results["failed"]
    assert [o["status"] for o in results["runs"]] == ["done"] * 4
    assert results["density_meaning"] == "fraction of filters (output channels) kept"
    by = {(a["method"], a["target_density"]): a for a in results["aggregated"]}
    assert set(by) == {("finetune", 1.0)} | {
        (m, d) for m in ("fine-pruning", "splora-r4", "sppara") for d in (1.0, 0.5)
    }
    for m in ("fine-pruning", "splora-r4", "sppara"):
        pruned = by[m, 0.5]
        assert pruned["filter_density"] == pytest.approx(0.5, abs=0.02)  # filters, not weights
        assert pruned["weight_density"] < 0.4  # both sides of a layer lose channels
        assert pruned["learned_parameters_paper"] >= pruned["learned_parameters"]
    assert (
        by["splora-r4", 0.5]["learned_parameters"] < by["fine-pruning", 0.5]["learned_parameters"]
    )
    configs = results["configs"]
    splora = configs["splora-r4/taylor/s0"]
    assert splora["recipe"] == "paper" and splora["optimizer"] == "sgd"
    assert splora["adapter_lr_scale"] > 1 and splora["target"] == 0.5 and splora["steps"] == 1
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["aggregated"] == json.loads(json.dumps(results["aggregated"]))
    for name in on_disk["files"]["plots"]:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob("**/*.sparta-tmp"))
    assert "filters" in text and "structural ceiling" in text and "wall time" in text


def test_toy_claims_and_deployment(toy):
    _, results, _ = toy
    checks = results["claims"]["checks"]
    assert {(c["claim"], c["accounting"]) for c in checks} == {
        ("lowest", "stored"),
        ("lowest", "paper"),
    }
    for c in checks:
        assert c["ratio"] == pytest.approx(c["fine_pruning_learned"] / c["splora_learned"])
    d = results["deployment"]
    assert set(d["tasks"]) == {"splora-r4", "sppara"}
    for t in d["tasks"].values():
        assert t["macs"] < d["base_macs"] and t["compact_parameters"] < d["base_parameters"]
        assert t["task_bytes"] > 0 and t["latency_ms"] > 0
    assert d["bank"]["outputs_equal"] and d["base_bit_identical"]


def test_a_rerun_reads_finished_runs_back(toy):
    out, first, _ = toy
    again = demo.run_demo(out_dir=out, toy=True, console=_quiet(), **TINY)
    assert [o["status"] for o in again["runs"]] == ["skipped"] * 4
    assert again["base_info"]["cache_hit"]
    assert again["aggregated"] == first["aggregated"]


# -- the real path on stand-ins ----------------------------------------------------------------
def _write_idx(raw, split: str, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
    for i, y in enumerate(labels):
        images[i, 2 * y : 2 * y + 6] += 150
    raw.mkdir(parents=True, exist_ok=True)
    blobs = {
        f"{split}-images-idx3-ubyte": struct.pack(">4i", 2051, n, 28, 28) + images.tobytes(),
        f"{split}-labels-idx1-ubyte": struct.pack(">2i", 2049, n) + labels.tobytes(),
    }
    for name, blob in blobs.items():
        (raw / f"{name}.gz").write_bytes(gzip.compress(blob))


def _stand_in_base(seed: int):
    """A tiny CNN in MobileNetV2's place: 3-channel input, 10 classes."""
    torch.manual_seed(seed)
    return digits_cnn(num_classes=10, in_channels=3)


def test_real_path_on_a_stand_in_network_and_idx_files(tmp_path, monkeypatch):
    _write_idx(tmp_path / "data" / "FashionMNIST" / "raw", "train", 200, 0)
    _write_idx(tmp_path / "data" / "FashionMNIST" / "raw", "t10k", 100, 1)
    monkeypatch.setattr(demo, "real_base", _stand_in_base)
    results = demo.run_demo(out_dir=tmp_path / "out", data_dir=tmp_path / "data",
                            console=_quiet(), image_size=16, train_size=120, test_size=60,
                            **TINY)  # fmt: skip
    assert results["profile"]["name"] == "real" and not results["failed"]
    assert results["data"] == {"train": 120, "test": 60, "input_shape": [3, 16, 16]}
    methods = {a["method"] for a in results["aggregated"]}
    assert methods == {"fine-pruning", "splora-r8"}
    assert {c["claim"] for c in results["claims"]["checks"]} == {"lowest"}
    assert set(results["deployment"]["tasks"]) == {"splora-r8"}
    assert "bank" not in results["deployment"]  # one adapter task: nothing to switch
    assert all(0 <= a["accuracy"] <= 1 for a in results["aggregated"])


def test_missing_assets_say_make_assets(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "real_base", _stand_in_base)
    with pytest.raises(ConfigError, match="make assets") as info:
        demo.run_demo(data_dir=tmp_path / "nothing", console=_quiet(), **TINY)
    assert "Fashion-MNIST" in str(info.value) and "MobileNetV2" not in str(info.value)

    def no_weights(seed):
        raise ConfigError("cannot load weights MobileNet_V2_Weights.IMAGENET1K_V1: no network")

    monkeypatch.setattr(demo, "real_base", no_weights)
    with pytest.raises(ConfigError, match="MobileNetV2 ImageNet weights: cannot load") as info:
        demo.run_demo(data_dir=tmp_path / "nothing", console=_quiet(), **TINY)
    assert "dataset-fashion-mnist" in str(info.value) and "--toy" in str(info.value)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(epochs=0), ValueError),
        (dict(epochs=1.5), TypeError),
        (dict(seed=-1), ValueError),
        (dict(workers=0), ValueError),
        (dict(train_sizes=10), TypeError),  # unknown setting
        (dict(out_dir="a", out="b"), TypeError),
    ],
)
def test_bad_arguments(kwargs, error):
    with pytest.raises(error):
        demo.run_demo(console=_quiet(), toy=True, **kwargs)


@pytest.mark.pretrained
def test_real_demo_on_the_real_assets_at_a_tiny_budget(tmp_path):
    try:
        results = demo.run_demo(out_dir=tmp_path, console=_quiet(), image_size=32,
                                train_size=100, test_size=50, **TINY)  # fmt: skip
    except ConfigError as exc:
        if "make assets" in str(exc):
            pytest.skip(f"offline assets missing: {exc}")
        raise
    assert not results["failed"] and results["base_info"]["params"] > 2_000_000
    dense = next(a for a in results["aggregated"] if a["method"] == "fine-pruning")
    assert dense["learned_parameters"] == results["base_info"]["params"]  # all of MobileNetV2


# -- the toy's cached base ---------------------------------------------------------------------
def test_cache_file_round_trip_and_rejections(tmp_path):
    config = demo_base.pretrain_config(0, 1, tmp_path / "work")
    key = demo_base.cache_key(config)
    assert "output_dir" not in key and key["seed"] == 0 and key["epochs"] == 1
    model = demo_base.fresh_digits_cnn(5)
    path = demo_base.cache_path(tmp_path / "cache", config)
    assert demo_base.read_cached_base(path, key, model) == (None, None)  # absent
    demo_base.write_cached_base(path, model, key)
    state, reason = demo_base.read_cached_base(path, key, demo_base.fresh_digits_cnn(5))
    assert reason is None
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    other = demo_base.cache_key(demo_base.pretrain_config(0, 2, tmp_path))
    assert demo_base.read_cached_base(path, other, model)[1] == "written for other settings"
    three_classes = demo_base.fresh_digits_cnn(3)  # same names, another head shape
    assert "wrong shape" in demo_base.read_cached_base(path, key, three_classes)[1]
    path.write_bytes(b"not a safetensors file")
    assert demo_base.read_cached_base(path, key, model)[1].startswith("unreadable")


def test_pretrained_base_retrains_over_a_corrupt_cache(tmp_path):
    with demo._threads(demo.DEMO_THREADS):
        source = load_dataset("digits-source", seed=0)
        cache = tmp_path / "cache"
        config = demo_base.pretrain_config(0, 1, tmp_path / "work")
        model, info = demo_base.pretrained_base(source, config, cache)
        assert not info["cache_hit"] and "cache_rejected" not in info
        path = demo_base.cache_path(cache, config)
        good = path.read_bytes()
        path.write_bytes(good[: len(good) // 2])  # truncated
        again, info = demo_base.pretrained_base(source, config, cache)
        assert info["cache_rejected"].startswith("unreadable")
        assert path.read_bytes() == good  # rewritten: training is deterministic
        cached, info = demo_base.pretrained_base(source, config, cache)
        assert info["cache_hit"]
        for k, v in model.state_dict().items():
            assert torch.equal(cached.state_dict()[k], v)


def test_readme_section_is_generated_from_results(toy):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "readme_demo.py"
    spec = importlib.util.spec_from_file_location("readme_demo", path)
    readme_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(readme_demo)
    _, results, _ = toy
    text = readme_demo.section(json.loads(json.dumps(results)))
    assert text.startswith(readme_demo.START) and text.endswith(readme_demo.END)
    acc = next(a for a in results["aggregated"] if a["method"] == "splora-r4")["accuracy"]
    assert f"{100 * acc:.1f}" in text and "structural ceiling" in text
    readme = "# x\n\n## The demo\n\nold text\n\n## Command line\n\nkept\n"
    once = readme_demo.rewrite(readme, text)
    assert "old text" not in once and once.endswith("## Command line\n\nkept\n")
    assert readme_demo.rewrite(once, text) == once  # between the markers from then on


@pytest.mark.parametrize(("flags", "folder"), [([], "sparta-demo"), (["--toy"], "sparta-demo-toy")])
def test_the_toy_and_the_real_demo_write_to_their_own_folders(monkeypatch, flags, folder):
    # one folder for both would let `sparta demo --toy` read the real demo's fine-pruning runs
    # back as its own (same run folder names) and replace its results.json
    from typer.testing import CliRunner

    from sparta.cli import app

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda **kwargs: seen.update(kwargs))
    done = CliRunner().invoke(app, ["demo", *flags])
    assert done.exit_code == 0, done.output
    assert str(seen["out_dir"]) == folder and seen["toy"] == bool(flags)
