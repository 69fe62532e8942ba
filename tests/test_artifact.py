"""The per-task artifact: export -> save -> load -> apply_task reproduces the task exactly.

Round trips run train (one step) -> prune -> export -> save -> load -> apply on resnet18, a
small torchvision VisionTransformer (``vit_b_16`` itself runs under ``-m slow``) and a tiny
BERT. Damaged, foreign and malicious files must be refused with ``ArtifactError``.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import time
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save as st_save
from torch import nn

import sparta
from sparta.tasks.artifact import (
    CHECKSUM_KEY,
    MANIFEST_KEY,
    VERSION,
    ArtifactError,
    Task,
    _pack_masks,
    apply_task,
    export,
    fingerprint,
)
from tiny_models import TINY_MODELS, tiny_bert

transformers = pytest.importorskip("transformers")


def _small_vit():
    # vit_b_16's own class and module layout, narrowed so the test stays fast on two cores.
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=96
    )


def _images(seed: int = 0):
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _tokens(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 50, (2, 8), generator=g)}


MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(weights=None), _images),
    "vit": (_small_vit, _images),
    "bert": (tiny_bert, _tokens),
}


def run(model, x):
    out = model(**x) if isinstance(x, dict) else model(x)
    return getattr(out, "logits", out)


def build(name: str, seed: int = 0, make=None, adapter="splora", **options):
    """A trained (one step) and pruned task on a fresh base: ``(base, task_model, inputs)``."""
    make_base, make_x = MODELS[name]
    torch.manual_seed(seed)
    base = (make or make_base)()
    x = make_x(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if adapter == "splora":
            options.setdefault("rank", 8)
        model = sparta.wrap(base, adapter, **options)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    run(model, x).square().mean().backward()
    opt.step()
    sparta.Pruner(model, x, criterion="l1", target=0.5).step()
    return base, model.eval(), x


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = build(name)
        return cache[name]

    return get


def check_round_trip(base, model, x, path: Path) -> Task:
    before = {k: v.clone() for k, v in base.state_dict().items()}
    task = export(model)
    size = task.save(path)
    assert size == path.stat().st_size
    loaded = Task.load(path)
    assert loaded.manifest == task.manifest
    assert all(torch.equal(loaded.tensors[k], t) for k, t in task.tensors.items())
    rebuilt = apply_task(base, loaded).eval()
    with torch.no_grad():
        assert torch.equal(run(rebuilt, x), run(model, x))
    # The base is untouched, and the rebuilt model is the same task model.
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    assert not any(nn.utils.parametrize.is_parametrized(m) for m in base.modules())
    assert rebuilt.sparta_report.adapted == model.sparta_report.adapted
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in rebuilt.named_parameters() if p.requires_grad} == trainable
    assert sparta.learned_parameters(rebuilt) == task.manifest["counts"]["learned_parameters"]
    assert fingerprint(rebuilt) == fingerprint(model) == task.fingerprint
    return task


@pytest.mark.parametrize("name", ["resnet18", "vit", "bert"])
def test_round_trip_reproduces_outputs(name, built, tmp_path):
    base, model, x = built(name)
    task = check_round_trip(base, model, x, tmp_path / "task.sparta")
    kinds = {e["kind"] for e in task.manifest["tensors"].values()}
    assert {"param", "mask"} <= kinds
    masks = [k for k, e in task.manifest["tensors"].items() if e["kind"] == "mask"]
    assert all(task.tensors[k].dtype == torch.bool for k in masks)
    assert any(not bool(task.tensors[k].all()) for k in masks), "pruning left no trace"
    frozen = [k for k in model.state_dict() if k.endswith("base.weight")]
    assert frozen and not set(frozen) & set(task.tensors), "frozen base weights were stored"


@pytest.mark.slow
def test_round_trip_vit_b_16(tmp_path):
    base, model, x = build("vit", make=lambda: torchvision.models.vit_b_16(image_size=32))
    check_round_trip(base, model, x, tmp_path / "task.sparta")


def _tiny(name: str):
    cls = TINY_MODELS[name]
    return cls, lambda seed: (torch.manual_seed(seed), cls.example())[1]


MODELS.update({f"tiny-{n}": _tiny(n) for n in TINY_MODELS})
CONFIGS = [
    ("bert", "splora", {"rank": 2, "train_norms": False, "train_biases": False}),
    ("vit", "splora", {"rank": 2, "exclude": "*self_attention"}),  # plain attention, masked
    *[(f"tiny-{n}", "splora", {"rank": 2}) for n in TINY_MODELS],
    *[(f"tiny-{n}", "sppara", {}) for n in ("conv1d", "conv2d", "conv3d")],
]


@pytest.mark.parametrize("name, adapter, options", CONFIGS)
def test_round_trip_other_configurations(name, adapter, options, tmp_path):
    base, model, x = build(name, adapter=adapter, **options)
    task = check_round_trip(base, model, x, tmp_path / "task.sparta")
    assert task.adapter == adapter


def test_batchnorm_statistics_are_task_tensors(built):
    _, model, _ = built("resnet18")
    task = export(model)
    assert task.manifest["tensors"]["bn1.running_mean"]["kind"] == "stat"
    assert task.tensors["bn1.num_batches_tracked"].dtype == torch.int64


def test_pruned_channels_are_not_stored(built):
    _, model, _ = built("resnet18")
    task = export(model)
    key = "layer1.0.conv1.adapter.B"
    entry = task.manifest["tensors"][key]
    mask = model.layer1[0].conv1.adapter.mask_out.bool()
    assert entry["rows"] == "layer1.0.conv1.adapter.mask_out" and not bool(mask.all())
    assert list(task.tensors[key].shape) == [int(mask.sum()), 8]
    full = task.full_tensors()[key]
    assert torch.equal(full[mask], model.layer1[0].conv1.adapter.B[mask].detach())
    assert not full[~mask].any()
    fc = task.manifest["tensors"]["fc.parametrizations.weight.original"]
    assert fc["cols"] == "fc.parametrizations.weight.0.mask_in" and fc["stored"][1] < 512


def test_fingerprint_of_wrapped_equals_plain_base(built):
    for name in ("resnet18", "vit", "bert"):
        base, model, _ = built(name)
        task = export(model)
        assert fingerprint(model) == fingerprint(base, task) == task.fingerprint
        assert len(task.fingerprint) == 64
    with pytest.raises(sparta.ConfigError, match="needs names"):
        fingerprint(base)


def test_file_is_much_smaller_than_the_model(built, tmp_path):
    base, model, _ = built("resnet18")
    size = export(model).save(tmp_path / "t.sparta")
    full = sum(t.numel() * t.element_size() for t in base.state_dict().values())
    ratio = size / full
    print(f"resnet18 SPLoRA r=8 task file: {size} bytes, state_dict {full} bytes, {ratio:.4f}")
    assert ratio < 0.1


def test_different_base_is_refused(built):
    _, model, _ = built("resnet18")
    task = export(model)
    torch.manual_seed(1)
    other = torchvision.models.resnet18(weights=None)
    with pytest.raises(ArtifactError, match=r"fingerprints differ.*conv1\.weight"):
        apply_task(other, task)
    with pytest.raises(ArtifactError):
        apply_task(torchvision.models.resnet34(weights=None), task)


def test_save_is_atomic(built, tmp_path, monkeypatch):
    _, model, _ = built("bert")
    task = export(model)
    path = tmp_path / "t.sparta"
    task.save(path)
    good = path.read_bytes()

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr("os.fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        task.save(path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["t.sparta"], "temp file left behind"


def test_truncated_files_are_refused(built, tmp_path):
    _, model, _ = built("bert")
    path = tmp_path / "t.sparta"
    export(model).save(path)
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    for cut in sorted({0, 3, 8, 9, header // 2, header - 1, header, header + 1, len(data) - 1}):
        path.write_bytes(data[:cut])
        with pytest.raises(ArtifactError, match="t.sparta"):
            Task.load(path)


def test_random_byte_corruption_never_escapes(built, tmp_path):
    _, model, _ = built("bert")
    path = tmp_path / "t.sparta"
    task = export(model)
    task.save(path)
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    rng = random.Random(1234)
    start, outcomes = time.monotonic(), {"refused": 0, "identical": 0}
    for trial in range(300):
        damaged = bytearray(data)
        # Half the flips land in the header (where most structure is), half anywhere.
        span = header if trial % 2 else len(data)
        for _ in range(rng.choice((1, 1, 2, 8))):
            damaged[rng.randrange(span)] ^= rng.randrange(1, 256)
        try:
            loaded = Task.from_bytes(bytes(damaged), "damaged")
        except ArtifactError:
            outcomes["refused"] += 1
            continue
        assert loaded.manifest == task.manifest
        assert loaded.tensors.keys() == task.tensors.keys()
        assert all(torch.equal(loaded.tensors[k], t) for k, t in task.tensors.items())
        outcomes["identical"] += 1
    assert outcomes["refused"] > 250, outcomes
    assert time.monotonic() - start < 30


def _write_raw(path: Path, tensors: dict, manifest: dict) -> None:
    text = json.dumps(manifest, sort_keys=True)
    meta = {MANIFEST_KEY: text, CHECKSUM_KEY: hashlib.sha256(text.encode()).hexdigest()}
    path.write_bytes(st_save(_pack_masks(tensors, manifest), meta))  # as Task.save writes them


def test_future_format_version_is_refused(built, tmp_path):
    _, model, _ = built("bert")
    task = export(model)
    task.manifest["version"] = VERSION + 1
    task.save(tmp_path / "future.sparta")
    with pytest.raises(ArtifactError, match=rf"version {VERSION + 1}.*version {VERSION}"):
        Task.load(tmp_path / "future.sparta")


def test_manifest_schema_is_checked(built, tmp_path):
    _, model, _ = built("bert")
    task = export(model)
    broken = json.loads(json.dumps(task.manifest))
    del broken["adapted"]
    _write_raw(tmp_path / "a.sparta", task.tensors, broken)
    with pytest.raises(ArtifactError, match="'adapted'"):
        Task.load(tmp_path / "a.sparta")
    broken = json.loads(json.dumps(task.manifest))
    next(iter(broken["tensors"].values()))["dtype"] = ["float32"]
    _write_raw(tmp_path / "b.sparta", task.tensors, broken)
    with pytest.raises(ArtifactError, match="schema"):
        Task.load(tmp_path / "b.sparta")
    path = tmp_path / "c.sparta"
    path.write_bytes(st_save({"x": torch.zeros(2)}, {"other": "data"}))
    with pytest.raises(ArtifactError, match="not a sparta task"):
        Task.load(path)


def test_wrong_shapes_are_refused(built, tmp_path):
    base, model, _ = built("bert")
    task = export(model)
    key = "classifier.parametrizations.weight.original"
    tensors = dict(task.tensors)
    tensors[key] = torch.zeros(4, 32)
    _write_raw(tmp_path / "t.sparta", tensors, task.manifest)
    with pytest.raises(ArtifactError, match=r"classifier.*\[4, 32\].*manifest says"):
        Task.load(tmp_path / "t.sparta")
    # Consistent file, but the tensor does not fit the base.
    bad = Task(tensors, json.loads(json.dumps(task.manifest)))
    entry = bad.manifest["tensors"][key]
    entry["shape"] = [4, 32]
    for field in ("stored", "rows", "cols"):
        entry.pop(field, None)
    entry["sha256"] = hashlib.sha256(tensors[key].numpy().tobytes()).hexdigest()
    bad.save(tmp_path / "u.sparta")
    with pytest.raises(ArtifactError, match=r"classifier.*\[4, 32\].*expects \[3, 32\]"):
        apply_task(base, Task.load(tmp_path / "u.sparta"))


class _Evil:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_pickle_files_are_refused_without_running_them(writer, tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "task.sparta"
    payload = {"state": _Evil(str(marker))}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(ArtifactError, match="never unpickles"):
        Task.load(path)
    assert not marker.exists()
    # The file is a real threat: unpickling it does create the marker.
    if writer == "pickle":
        pickle.loads(path.read_bytes())
        assert marker.exists()


def test_export_needs_a_wrapped_model():
    with pytest.raises(sparta.ConfigError, match="sparta.wrap"):
        export(nn.Linear(3, 4))
