"""``sparta.build``, ``TaskBank`` and ``sparta.report``: the deployed side of a task.

Round trip train -> prune -> export -> save -> load -> build on torchvision resnet18, resnet50,
vgg16_bn, vit_b_16 and a BERT from a config; the compact model is plain, smaller, shares no
storage with the base, and survives state-dict, TorchScript and ONNX export.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torchvision
from safetensors.torch import load as st_load
from torch import nn

import sparta
from sparta.adapters.layer import AdaptedLayer
from sparta.masks import ChannelMask
from sparta.measure import MacCounter
from sparta.tasks import ArtifactError, Builder, Task, TaskBank, build, export
from tiny_models import ResidualNet, tiny_bert

transformers = pytest.importorskip("transformers")


def _images(size: int):
    def make(seed: int = 0):
        return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))

    return make


def _tokens(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 60, (2, 9), generator=g)}


BASES = {  # the real torchvision classes, at input sizes that keep two CPU cores fast
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), _images(64)),
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=10), _images(64)),
    "vgg16_bn": (lambda: torchvision.models.vgg16_bn(num_classes=10), _images(32)),
    "vit_b_16": (lambda: torchvision.models.vit_b_16(image_size=64, num_classes=10), _images(64)),
    "bert": (lambda: tiny_bert(vocab_size=60), _tokens),
    "residual": (lambda: ResidualNet(image=16), _images(16)),
}


def run(model, x):
    out = model(**x) if isinstance(x, dict) else model(x)
    return getattr(out, "logits", out)


def make_task(name: str, seed: int = 0, adapter: str = "splora", target="density=0.5", **opts):
    """A base and a trained (two steps, non-trivial adapters) and pruned task model on it."""
    make_base, make_x = BASES[name]
    torch.manual_seed(seed)
    base = make_base().eval()
    x = make_x(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if adapter == "splora":
            opts.setdefault("rank", 4)
        model = sparta.wrap(base, adapter, **opts)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        run(model, x).square().mean().backward()
        opt.step()
    sparta.Pruner(model, x, criterion="l1", target=target).step()
    return base, model.eval(), x


def rel_diff(a, b) -> float:
    return ((a - b).abs().max() / (b.abs().max() + 1e-12)).item()


@pytest.fixture(scope="module")
def tasks():
    cache = {}

    def get(name: str, **kw):
        key = (name, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = make_task(name, **kw)
        return cache[key]

    return get


def _storages(model: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in model.state_dict().values() if t.numel()}


HEAVY = pytest.mark.slow  # 30-40 s each on two cores: 138M / 86M parameters


@pytest.mark.parametrize(
    "name",
    [
        "resnet18",
        "resnet50",
        pytest.param("vgg16_bn", marks=HEAVY),
        pytest.param("vit_b_16", marks=HEAVY),
        "bert",
    ],
)
def test_round_trip_reproduces_the_task(name, tasks, tmp_path):
    base, model, x = tasks(name)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    export(model).save(tmp_path / "task.safetensors")
    compact = build(base, Task.load(tmp_path / "task.safetensors"))
    with torch.no_grad():
        want, got = run(model, x), run(compact, x)
    assert got.shape == want.shape
    assert rel_diff(got, want) < 1e-5
    # Plain torch modules only, physically smaller, the base untouched and not shared.
    assert not any(isinstance(m, AdaptedLayer | ChannelMask) for m in compact.modules())
    assert not any(nn.utils.parametrize.is_parametrized(m) for m in compact.modules())
    params = sum(p.numel() for p in compact.parameters())
    assert params < sum(p.numel() for p in base.parameters())
    assert params == compact.sparta_compact.params_after
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    assert not _storages(compact) & _storages(base)
    # The mask-aware MAC count of the masked model is what the compact model really costs
    # (exactly, where every dead unit is removed: no group kept dense).
    if not compact.sparta_compact.dense:
        assert MacCounter(compact, x).count(compact) == MacCounter(model, x).count(model)


def test_compact_model_saves_scripts_and_traces(tasks, tmp_path):
    base, model, x = tasks("resnet18")
    task = export(model)
    compact = build(base, task)
    with torch.no_grad():
        want = compact(x)
    # State dict: into a second build of the same task (same architecture), same outputs.
    path = tmp_path / "compact.pt"
    torch.save(compact.state_dict(), path)
    other = build(base, task, verify=False)
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    other.load_state_dict(torch.load(path, weights_only=True))
    scripted = torch.jit.script(compact)
    traced = torch.jit.trace(compact, x)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    reloaded = torch.jit.load(buffer)
    with torch.no_grad():
        for m in (other, scripted, traced, reloaded):
            assert rel_diff(m(x), want) < 1e-6


def test_compact_model_exports_to_onnx(tasks, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    base, model, x = tasks("residual")
    compact = build(base, export(model))
    path = tmp_path / "compact.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(compact, (x,), str(path), input_names=["x"], dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        assert rel_diff(torch.from_numpy(got), model(x)) < 1e-5


def test_residual_concat_depthwise_flatten_cut_exactly(tasks):
    base, model, x = tasks("residual")
    compact = build(base, export(model))
    with torch.no_grad():
        assert rel_diff(compact(x), model(x)) < 1e-5
    assert compact.sparta_compact.params_after < compact.sparta_compact.params_before


def test_sppara_task_builds_too(tasks):
    base, model, x = tasks("resnet18", adapter="sppara", target="macs=0.3")
    compact = build(base, export(model))
    with torch.no_grad():
        assert rel_diff(compact(x), model(x)) < 1e-5


def test_build_refuses_another_base_and_needs_inputs(tasks):
    base, model, x = tasks("resnet18")
    task = export(model)
    other = torchvision.models.resnet18(num_classes=10)
    with pytest.raises(ArtifactError, match="another base"):
        build(other, task)
    task.manifest.pop("inputs")
    with pytest.raises(sparta.ConfigError, match="example_inputs"):
        build(base, task)
    compact = build(base, task, example_inputs=x)  # given explicitly, it works again
    with torch.no_grad():
        assert rel_diff(compact(x), model(x)) < 1e-5
    with pytest.raises(TypeError, match="Task"):
        build(base, "not a task")
    with pytest.raises(sparta.ConfigError, match="plain base"):
        build(model, task)


def test_task_records_input_shapes(tasks):
    _, model, x = tasks("bert")
    spec = export(model).manifest["inputs"]
    assert spec == {"dict": {"input_ids": {"tensor": {"shape": [2, 9], "dtype": "int64"}}}}


# -- TaskBank ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_tasks():
    """Two different tasks trained on one resnet18 base."""
    base, m1, x = make_task("resnet18", seed=0)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m2 = sparta.wrap(base, "sppara")
    with torch.no_grad():
        for p in m2.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    sparta.Pruner(m2, x, criterion="l2", target="macs=0.4").step()
    return base, {"a": m1.eval(), "b": m2.eval()}, x


def test_bank_switches_tasks_without_touching_base_or_each_other(two_tasks, tmp_path):
    base, models, x = two_tasks
    before = {k: v.clone() for k, v in base.state_dict().items()}
    bank = TaskBank(base, tmp_path / "bank", cache_size=1)
    for name, m in models.items():
        info = bank.add(name, export(m))
        assert info.bytes == (tmp_path / "bank" / f"{name}.safetensors").stat().st_size
        assert info.learned_parameters == sparta.learned_parameters(m)
    assert bank.names == ["a", "b"] and len(bank) == 2 and "a" in bank
    with torch.no_grad():
        out_a = bank.model("a")(x)
        assert rel_diff(out_a, models["a"](x)) < 1e-5
        assert rel_diff(bank.model("b")(x), models["b"](x)) < 1e-5
        assert bank.cached == ["b"]  # size bound 1: building b evicted a
        assert torch.equal(bank.model("a")(x), out_a)  # rebuilt identically
    assert bank.model("a") is bank.model("a")  # cached
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    assert not _storages(bank.model("a")) & _storages(bank.model("b"))
    # A bank reopened on the directory finds the tasks; removal deletes the file.
    again = TaskBank(base, tmp_path / "bank")
    assert again.names == ["a", "b"]
    again.remove("b")
    assert again.names == ["a"] and not (tmp_path / "bank" / "b.safetensors").exists()


def test_bank_lists_sizes_parameters_macs_and_density(two_tasks):
    base, models, x = two_tasks
    bank = TaskBank(base)
    for name, m in models.items():
        bank.add(name, export(m))
    unmeasured = bank.list()  # built (to verify) when added, but MACs are not counted yet
    assert all(i.macs is None and i.params is not None for i in unmeasured)
    for info in bank.list(measure=True):
        m = models[info.name]
        assert info.macs == MacCounter(m, x).count(m)
        assert info.params == sum(p.numel() for p in bank.model(info.name).parameters())
        assert 0 < info.density < 1


def test_bank_refuses_bad_input(two_tasks, tmp_path):
    base, models, _ = two_tasks
    bank = TaskBank(base)
    bank.add("a", export(models["a"]))
    with pytest.raises(sparta.ConfigError, match="already in the bank"):
        bank.add("a", export(models["a"]))
    bank.add("a", export(models["a"]), overwrite=True)
    with pytest.raises(sparta.UnknownNameError, match="known tasks: a"):
        bank.model("nope")
    for bad in ("../x", "", "a/b", 3):
        with pytest.raises(sparta.ConfigError, match="task name"):
            bank.add(bad, export(models["a"]))
    with pytest.raises(sparta.ConfigError, match="cache_size"):
        TaskBank(base, cache_size=0)
    other = TaskBank(torchvision.models.resnet18(num_classes=10))
    with pytest.raises(ArtifactError, match="another base"):
        other.add("a", export(models["a"]))
    assert other.names == []


# -- accounting ----------------------------------------------------------------------------------
def test_report_counts_match_independent_counts(two_tasks, tmp_path):
    base, models, x = two_tasks
    paths = {}
    for name, m in models.items():
        paths[name] = tmp_path / f"{name}.safetensors"
        export(m).save(paths[name])
    report = sparta.report(base, paths)
    assert [r.name for r in report.rows] == ["a", "b"]
    for row in report.rows:
        m = models[row.name]
        compact = Builder(base).build(Task.load(paths[row.name]))[0]
        params = sum(p.numel() for p in compact.parameters())
        assert row.learned_parameters == sparta.learned_parameters(m)
        assert row.task_bytes == paths[row.name].stat().st_size
        assert row.params == row.finepruned_learned == params
        assert row.macs == MacCounter(m, x).count(m)
        assert row.base_macs == MacCounter(base, x).count(base)
        assert row.base_params == sum(p.numel() for p in base.parameters())
        # The fine-pruned checkpoint holds every tensor of the compact model in fp32.
        stored = st_load(_checkpoint_bytes(compact))
        assert sum(t.numel() for t in stored.values()) >= params
        assert row.finepruned_bytes >= 4 * params
        assert row.learned_ratio == row.finepruned_learned / row.learned_parameters
    table = report.to_markdown()
    assert table.count("\n") == 3 and "| a | splora |" in table


def _checkpoint_bytes(model: nn.Module) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in model.state_dict().items()})


def test_latency_times_models_side_by_side():
    from sparta.measure import latency

    small, big = nn.Linear(8, 8), nn.Sequential(*[nn.Linear(256, 256) for _ in range(20)])
    seen = []
    t = latency(
        {"small": small, "big": nn.Sequential(nn.Linear(8, 256), big)},
        torch.randn(64, 8),
        repeats=5,
        warmup=1,
        progress=lambda r: seen.append(r) or r,
    )
    assert set(t) == {"small", "big"} and all(v > 0 for v in t.values())
    assert t["big"] > t["small"] and len(seen) == 1
    with pytest.raises(sparta.ConfigError, match="repeats"):
        latency({"small": small}, torch.randn(2, 8), repeats=0)
