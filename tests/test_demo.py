"""The offline demo (``sparta.demo``): the cached base, one quick end-to-end run, determinism,
and the claim checks. Quick settings throughout: 1 epoch, 1 pruning step, one density."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console

from sparta import demo, demo_base
from sparta.data import load_dataset
from sparta.demo_report import claim_lines, claims

QUICK = dict(epochs=1, densities=(0.3,), latency_repeats=2)
#: Keys whose values are measured times or paths, which may differ between identical runs.
VOLATILE = {
    "latency_ms",
    "base_latency_ms",
    "latency_min_ms",
    "base_latency_min_ms",
    "first_switch_ms",
    "cached_switch_ms",
    "wall_time_s",
    "train_s",
    "cache_file",
    "cache_hit",
    "files",
    "platform",
}


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=100)


def _stable(tree):
    if isinstance(tree, dict):
        return {k: _stable(v) for k, v in tree.items() if k not in VOLATILE}
    if isinstance(tree, list):
        return [_stable(v) for v in tree]
    return tree


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    console = _quiet()
    results = demo.run_demo(out_dir=out, seed=0, console=console, **QUICK)
    return out, results, console.file.getvalue()


def test_quick_run_writes_everything(quick_run):
    out, results, text = quick_run
    assert [r["key"] for r in results["rows"]] == [
        "finetune",
        "fine-pruning-w0.3",
        "splora-w0.3",
        "sppara-w0.3",
    ]
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(results["rows"]))
    for name in ("accuracy_vs_learned.png", "accuracy_vs_density.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row in results["rows"]:
        path = out / row["artifact_file"]
        assert path.stat().st_size == row["artifact_bytes"] > 0
        assert 0.0 <= row["test_accuracy"] <= 1.0
        assert row["latency_ms"] > 0 and row["base_latency_ms"] > 0
        assert (out / "runs" / row["key"] / "result.json").is_file()
    assert not list(out.glob("**/*.tmp*"))  # atomic writes leave nothing behind
    assert results["base"]["cache_file"].startswith(str(out / "cache"))
    assert "SPLoRA r=4" in text and "TaskBank" in text and "wall time" in text


def test_quick_run_numbers_are_consistent(quick_run):
    _, results, _ = quick_run
    rows = {r["key"]: r for r in results["rows"]}
    full = rows["finetune"]
    assert full["learned_parameters"] == full["compact_parameters"] == results["base"]["params"]
    assert full["weight_density"] == full["filter_density"] == 1.0
    assert full["macs"] == full["base_macs"]
    for key in ("fine-pruning-w0.3", "splora-w0.3", "sppara-w0.3"):
        r = rows[key]
        assert r["target_density"] == 0.3
        assert abs(r["weight_density"] - 0.3) < 0.05  # reached, in whole channels
        assert r["macs"] == r["macs_masked"] < r["base_macs"]  # compact model == masked count
        assert r["compact_parameters"] < full["compact_parameters"]
    # Fine-pruning learns every kept weight: its compact model's parameters.
    fp = rows["fine-pruning-w0.3"]
    assert fp["learned_parameters"] == fp["compact_parameters"]
    assert rows["splora-w0.3"]["learned_parameters"] < rows["sppara-w0.3"]["learned_parameters"]
    assert rows["sppara-w0.3"]["learned_parameters"] < fp["learned_parameters"]
    bank = results["bank"]
    assert bank["outputs_equal"] and bank["base_bit_identical"]
    assert set(bank["first_switch_ms"]) == {"splora-w0.3", "sppara-w0.3"}
    # a first switch builds a compact model (not a cache hit, which add() would leave behind)
    assert all(ms > 0 for ms in bank["first_switch_ms"].values())
    assert set(results["claims"]) == {"lowest_density", "ratio_at_30"}


def test_cached_base_is_reused_and_same_seed_gives_same_numbers(quick_run, tmp_path):
    out, first, _ = quick_run
    again = demo.run_demo(
        out_dir=tmp_path, seed=0, cache_dir=out / "cache", console=_quiet(), **QUICK
    )
    assert again["base"]["cache_hit"] and not first["base"]["cache_hit"]
    assert _stable(again) == _stable(first)


def test_another_seed_gives_other_numbers(quick_run):
    _, first, _ = quick_run
    other = demo.run_demo(seed=1, console=_quiet(), **QUICK)
    assert other["base"]["cache_file"] is None  # no out dir, no cache
    assert _stable(other["rows"]) != _stable(first["rows"])


def test_cache_file_round_trip_and_rejections(tmp_path):
    config = demo.pretrain_config(0, 1, tmp_path / "work")
    key = demo_base.cache_key(config)
    assert "output_dir" not in key and key["seed"] == 0 and key["epochs"] == 1
    model = demo_base.fresh_digits_cnn(5)
    path = demo_base.cache_path(tmp_path / "cache", config)
    assert demo_base.read_cached_base(path, key, model) == (None, None)  # absent
    demo_base.write_cached_base(path, model, key)
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    state, reason = demo_base.read_cached_base(path, key, demo_base.fresh_digits_cnn(5))
    assert reason is None
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    other = demo_base.cache_key(demo.pretrain_config(0, 2, tmp_path))
    assert demo_base.read_cached_base(path, other, model)[1] == "written for other settings"
    three_classes = demo_base.fresh_digits_cnn(3)  # same names, another head shape
    assert "wrong shape" in demo_base.read_cached_base(path, key, three_classes)[1]
    path.write_bytes(b"not a safetensors file")
    assert demo_base.read_cached_base(path, key, model)[1].startswith("unreadable")


def test_cache_name_depends_on_seed_and_settings_not_on_folders(tmp_path):
    configs = [demo.pretrain_config(s, e, tmp_path / f"{s}{e}") for s in (0, 1) for e in (1, 2)]
    names = {demo_base.cache_path(tmp_path, c).name for c in configs}
    assert len(names) == 4
    moved = demo.pretrain_config(0, 1, tmp_path / "elsewhere")
    assert demo_base.cache_path(tmp_path, moved).name in names
    lr = moved.replace(lr=1e-3)
    assert demo_base.cache_path(tmp_path, lr).name not in names


def test_pretrained_base_retrains_over_a_corrupt_cache(tmp_path):
    with demo._threads(demo.DEMO_THREADS):  # as run_demo does: 2 threads are far slower here
        _retrains_over_a_corrupt_cache(tmp_path)


def _retrains_over_a_corrupt_cache(tmp_path):
    source = load_dataset("digits-source", seed=0)
    cache = tmp_path / "cache"
    config = demo.pretrain_config(0, 1, tmp_path / "work")
    model, info = demo_base.pretrained_base(source, config, cache)
    assert not info["cache_hit"] and "cache_rejected" not in info
    path = demo_base.cache_path(cache, config)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # truncated
    again, info = demo_base.pretrained_base(source, config, cache)
    assert not info["cache_hit"] and info["cache_rejected"].startswith("unreadable")
    assert path.read_bytes() == good  # rewritten: training is deterministic
    cached, info = demo_base.pretrained_base(source, config, cache)
    assert info["cache_hit"]
    for k, v in model.state_dict().items():
        assert torch.equal(cached.state_dict()[k], v) and torch.equal(again.state_dict()[k], v)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(epochs=0), ValueError),
        (dict(epochs=1.5), TypeError),
        (dict(seed=-1), ValueError),
        (dict(densities=(0.3, 1.0)), ValueError),
        (dict(densities=()), ValueError),
        (dict(steps=0), ValueError),
        (dict(out_dir="a", out="b"), TypeError),
    ],
)
def test_bad_arguments(kwargs, error):
    with pytest.raises(error):
        demo.run_demo(console=_quiet(), **kwargs)


def _row(method, density, acc, learned, adapters=0):
    row = dict(method=method, target_density=density, test_accuracy=acc)
    row["learned_parameters"] = learned
    if method == "splora":
        row.update(adapter_parameters=adapters, rank=4)
    return row


def test_claims_are_computed_from_the_table():
    results = {
        "densities": [0.5, 0.3, 0.1],
        "rows": [
            _row("fine-pruning", 0.3, 0.95, 7000),
            _row("fine-pruning", 0.1, 0.90, 2400),
            _row("splora", 0.3, 0.93, 640, adapters=340),  # 300 + 85 per unit of rank
            _row("splora", 0.1, 0.90, 360, adapters=200),
        ],
    }
    c = claims(results)
    assert c["lowest_density"]["holds"]  # as accurate (a tie counts), fewer parameters
    ratio = c["ratio_at_30"]
    assert not ratio["holds"] and ratio["ratio"] == pytest.approx(7000 / 640)
    assert ratio["ratio_at_rank"]["1"] == pytest.approx(7000 / 385)
    assert ratio["ratio_bound_any_rank"] == pytest.approx(7000 / 300)
    assert ratio["max_rank_for_required"] == 1  # 300 + 85 r <= 466.7
    results["claims"] = c
    text = "\n".join(claim_lines(results))
    assert "holds." in text and "does not hold here" in text and "needs rank <= 1" in text
    results["rows"][3]["test_accuracy"] = 0.89
    assert not claims(results)["lowest_density"]["holds"]
    results["rows"][2]["learned_parameters"] = 400
    assert claims(results)["ratio_at_30"]["holds"]
