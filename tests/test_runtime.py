"""``sparta.deploy``: every runtime reproduces the model it serves, at other batch sizes too,
never changes the model, and refuses what it cannot serve with sparta's errors."""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import sparta
from sparta.errors import ConfigError, UnknownNameError
from sparta.runtime import RUNTIMES, DeployError
from tiny_models import TINY_MODELS, ResidualNet, perturb, tiny_bert

HAVE_ORT = all(importlib.util.find_spec(m) for m in ("onnxruntime", "onnx", "onnxscript"))
ORT = [pytest.param("onnxruntime", marks=pytest.mark.skipif(not HAVE_ORT, reason="onnx extra"))]
ALL = ["eager", "torchscript", *ORT]


def _tokens(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 60, (batch, 9), generator=g)}


def _compact():
    """A compact model from ``sparta.build`` of a pruned tiny task (adapters and BatchNorm
    statistics perturbed so a wrong deployment would show)."""
    torch.manual_seed(0)
    base = ResidualNet(image=16).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sparta.wrap(base, "splora", rank=2)
    perturb(model)
    x = torch.randn(2, 3, 16, 16)
    sparta.Pruner(model, x, criterion="l1", target="density=0.5").step()
    return sparta.build(base, sparta.export(model.eval()))


def _images(batch: int, size: int = 16):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))


def _resnet18():
    model = torchvision.models.resnet18(num_classes=10)
    perturb(model)
    return model


# name -> (make the model, make inputs for a batch size)
MODELS = {name: (cls, cls.example) for name, cls in TINY_MODELS.items()}
MODELS["compact"] = (_compact, _images)
MODELS["resnet18"] = (_resnet18, lambda b: _images(b, 32))
MODELS["bert"] = (lambda: tiny_bert(vocab_size=60), _tokens)


def _call(model, x):
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    return getattr(out, "logits", out)


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def models():
    made = {}

    def get(name):
        if name not in made:
            if name == "bert":
                pytest.importorskip("transformers")
            torch.manual_seed(0)
            made[name] = MODELS[name][0]().eval()
        return made[name]

    return get


@pytest.mark.parametrize("runtime", ALL)
@pytest.mark.parametrize("name", list(MODELS))
def test_runtime_reproduces_model_at_other_batch_sizes(models, name, runtime):
    model, inputs = models(name), MODELS[name][1]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deployed = sparta.deploy(model, inputs(2), runtime=runtime)
    assert deployed.runtime == runtime and deployed.error <= 1e-4
    assert deployed.output == ("logits" if name == "bert" else None)
    for batch in (1, 5):  # the export's batch axis is dynamic
        x = inputs(batch)
        got = deployed(**x) if isinstance(x, dict) else deployed(x)
        want = _call(model, x)
        assert isinstance(got, torch.Tensor) and got.shape == want.shape
        assert _rel(got, want) <= 1e-4, (batch, _rel(got, want))
    after = model.state_dict()  # the model is never changed: same tensors, bit for bit
    assert all(torch.equal(before[k], after[k]) for k in before) and before.keys() == after.keys()


def test_eager_folds_batchnorm_into_convolutions(models):
    model = models("resnet18")
    deployed = sparta.deploy(model, _images(2, 32))
    norms = [m for m in deployed.module.modules() if isinstance(m, nn.BatchNorm2d)]
    assert not norms and "BatchNorm folded into 20 layers" in deployed.notes
    assert "channels_last" in deployed.notes
    conv = next(m for m in deployed.module.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    # the model's own layers keep their BatchNorm and memory format
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 20
    assert model.conv1.weight.is_contiguous()
    plain = sparta.deploy(model, _images(2, 32), fold_bn=False, channels_last=False)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in plain.module.modules()) == 20
    assert plain.notes == []
    # TorchScript lays out its convolutions itself (MKLDNN): channels last is not its default
    assert "channels_last" not in sparta.deploy(model, _images(2, 32), runtime="torchscript").notes


class SharedConv(nn.Module):
    """One convolution used twice, once before a BatchNorm: folding it would change the other
    use, so the fold is not exact and must not happen."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        perturb(self)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


def test_eager_keeps_batchnorm_where_folding_is_not_exact():
    model, x = SharedConv().eval(), torch.randn(2, 4, 6, 6)
    deployed = sparta.deploy(model, x)
    assert any(isinstance(m, nn.BatchNorm2d) for m in deployed.module.modules())
    assert _rel(deployed(x), _call(model, x)) <= 1e-6


class Structured(nn.Module):
    """Two positional inputs, a keyword one, and a tuple-with-dict output."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(5, 3)

    def forward(self, x, y, scale=None):
        h = self.a(x) + self.b(y)
        return h, {"double": 2 * h, "scaled": h * scale}


@pytest.mark.parametrize("runtime", ALL)
def test_tuple_and_dict_inputs_and_outputs_keep_their_structure(runtime):
    torch.manual_seed(0)
    model = Structured().eval()
    x = {"x": torch.randn(2, 4), "y": torch.randn(2, 5), "scale": torch.randn(2, 3)}
    deployed = sparta.deploy(model, x, runtime=runtime)
    x3 = {"scale": torch.randn(3, 3), "y": torch.randn(3, 5), "x": torch.randn(3, 4)}
    got, want = deployed(**x3), model(**x3)  # keyword order does not matter
    assert isinstance(got, tuple) and set(got[1]) == {"double", "scaled"}
    assert _rel(got[0], want[0]) < 1e-5 and _rel(got[1]["scaled"], want[1]["scaled"]) < 1e-5
    positional = sparta.deploy(model, (x["x"], x["y"], x["scale"]), runtime=runtime)
    assert _rel(positional(x3["x"], x3["y"], x3["scale"])[1]["double"], want[1]["double"]) < 1e-5
    with pytest.raises(ConfigError, match="positional"):
        deployed(x3["x"], x3["y"])  # not the structure it was made for


def test_missing_onnxruntime_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'sparta\[onnx\]'"):
        sparta.deploy(nn.Linear(3, 2), torch.randn(1, 3), runtime="onnxruntime")


@pytest.mark.parametrize("runtime", ORT)
def test_onnxruntime_threads_and_no_files_left(tmp_path, monkeypatch, runtime):
    monkeypatch.chdir(tmp_path)
    deployed = sparta.deploy(nn.Linear(3, 2), torch.randn(1, 3), runtime=runtime, threads=1)
    options = deployed.session.get_session_options()
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    assert options.graph_optimization_level.name == "ORT_ENABLE_ALL"
    # by default threads spin between the operators of a call, and stop when it returns
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    assert "threads spin within a call" in deployed.notes
    sleeping = sparta.deploy(nn.Linear(3, 2), torch.randn(1, 3), runtime=runtime, spin=False)
    entry = sleeping.session.get_session_options().get_session_config_entry
    assert entry("session.intra_op.allow_spinning") == "0"
    assert not any("spin" in note for note in sleeping.notes)
    assert list(tmp_path.iterdir()) == []


class Widths(nn.Module):
    """A stem on 3 image channels, a dense, a depthwise and a grouped convolution of the given
    widths, at 8x8 pixels after the stem."""

    def __init__(self, stem: int, wide: int, groups: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, stem, 3, stride=2, padding=1)
        self.dense = nn.Conv2d(stem, wide, 1)
        self.depthwise = nn.Conv2d(wide, wide, 3, padding=1, groups=wide)
        self.grouped = nn.Conv2d(wide, wide, 1, groups=groups)
        self.head = nn.Linear(wide, 3)

    def forward(self, x):
        y = self.grouped(self.depthwise(self.dense(self.stem(x))))
        return self.head(y.mean((2, 3)))


def _padded_macs(stem: int, wide: int, groups: int, block: int = 16) -> tuple[int, int]:
    """Counted by hand: 64 pixels per layer; the stem reads 3 channels unpadded, the dense
    layer pads both sides once ``stem`` reaches a block, the depthwise one its channels, the
    grouped one nothing."""

    def up(n):
        return -(-n // block) * block

    pad_in = up(stem) if stem >= block else stem
    real = 64 * (9 * 3 * stem + stem * wide + 9 * wide + wide * wide // groups)
    padded = 64 * (9 * 3 * up(stem) + pad_in * up(wide) + 9 * up(wide) + wide * wide // groups)
    return real, padded


@pytest.mark.parametrize("stem, wide", [(24, 40), (16, 48), (8, 20), (32, 64), (13, 100)])
def test_blocked_padding_counts_what_onnxruntime_pads(stem, wide):
    from sparta.onnx_session import blocked_padding, padding_note

    model, x = Widths(stem, wide).eval(), torch.randn(2, 3, 16, 16)
    with blocked_padding(model) as counts, torch.no_grad():
        model(x)
    real, padded = _padded_macs(stem, wide, 4)
    assert (counts["macs"], counts["padded"]) == (2 * real, 2 * padded)  # a batch of 2
    assert counts["layers"] == 4 and not model.stem._forward_hooks  # hooks removed
    note = padding_note(counts)
    if padded < 1.01 * real:
        assert note is None
    else:
        assert f"{padded / real - 1:.0%} more MACs" in note and "round_to=16" in note


@pytest.mark.parametrize("runtime", ORT)
def test_onnxruntime_notes_padded_channels(runtime):
    x = torch.randn(2, 3, 16, 16)
    odd = sparta.deploy(Widths(24, 40).eval(), x, runtime=runtime)
    assert any("not multiples of 16" in note for note in odd.notes), odd.notes
    even = sparta.deploy(Widths(32, 64).eval(), x, runtime=runtime)
    assert not any("multiples" in note for note in even.notes), even.notes
    eager = sparta.deploy(Widths(24, 40).eval(), x)  # a note about ONNX Runtime's kernels only
    assert not any("multiples" in note for note in eager.notes)


@pytest.mark.skipif(not HAVE_ORT, reason="onnx extra")
def test_onnx_session_writes_a_per_operator_profile_when_asked(tmp_path):
    from sparta.onnx_session import load_onnxruntime, onnx_session

    model, x = Widths(16, 32).eval(), torch.randn(1, 3, 16, 16)
    session, run = onnx_session(
        model, (x,), 1, load_onnxruntime(), lambda run: None, profile=str(tmp_path / "p")
    )
    run([x])
    path = session.end_profiling()
    events = json.loads(Path(path).read_text())
    ops = {e["args"]["op_name"] for e in events if e.get("cat") == "Node"}
    assert Path(path).parent == tmp_path and "Conv" in ops, ops


def test_deploy_leaves_a_training_model_training():
    model = ResidualNet(image=8).train()
    deployed = sparta.deploy(model, torch.randn(2, 3, 8, 8), runtime="torchscript")
    assert model.training and all(m.training for m in model.modules())
    assert model.bn.num_batches_tracked.item() == 0  # not even its statistics moved
    assert deployed(torch.randn(1, 3, 8, 8)).shape == (1, 5)


def test_threads_apply_per_call_and_are_restored():
    threads = torch.get_num_threads()
    deployed = sparta.deploy(nn.Linear(3, 2), torch.randn(1, 3), threads=threads + 1)
    deployed(torch.randn(4, 3))
    assert torch.get_num_threads() == threads and deployed.threads == threads + 1


class Counter(nn.Module):
    """Python state read at trace time: tracing bakes the count in, so the traced model
    differs from the eager one on the same inputs."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * self.calls


class DataDependent(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else -x


class ReturnsText(nn.Module):
    def forward(self, x):
        return x, "text"


def test_bad_requests_raise_sparta_errors():
    x = torch.randn(2, 3)
    with pytest.raises(UnknownNameError, match="onnxruntime"):
        sparta.deploy(nn.Linear(3, 2), x, runtime="onnx")
    with pytest.raises(ConfigError, match="got function"):
        sparta.deploy(lambda t: t, x)
    with pytest.raises(ConfigError, match="str"):
        sparta.deploy(nn.Linear(3, 2), "images")
    with pytest.raises(ConfigError, match="threads"):
        sparta.deploy(nn.Linear(3, 2), x, threads=0)
    with pytest.raises(ConfigError, match="spin must be True or False, got 'no'"):
        sparta.deploy(nn.Linear(3, 2), x, runtime="onnxruntime", spin="no")
    with pytest.raises(DeployError, match="fails on the example inputs"):
        sparta.deploy(nn.Linear(4, 2), x)
    with pytest.raises(DeployError, match="does not reproduce the model"):
        sparta.deploy(Counter(), x, runtime="torchscript")
    with pytest.raises(DeployError, match="tensors"):
        sparta.deploy(ReturnsText(), x, runtime="torchscript")


@pytest.mark.parametrize("runtime", ORT)
def test_a_model_that_does_not_export_says_so(runtime):
    with pytest.raises(DeployError, match="runtime='eager'"):
        sparta.deploy(DataDependent(), torch.randn(2, 3), runtime=runtime)
    # tracing fixes the branch taken on the example, and says so
    traced = sparta.deploy(DataDependent(), torch.ones(2, 3), runtime="torchscript")
    assert "tracer warnings" in traced.notes[-1]
    assert list(RUNTIMES) == ["eager", "torchscript", "onnxruntime"]


# -- a bank serving its tasks through a runtime ------------------------------------------------
def _bank_of_two(tmp_path):
    torch.manual_seed(0)
    base = ResidualNet(image=16).eval()
    x = torch.randn(2, 3, 16, 16)
    bank = sparta.TaskBank(base, tmp_path, cache_size=1)
    for i, density in enumerate((0.5, 0.3)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = sparta.wrap(base, "splora", rank=2)
        perturb(model, seed=i)
        sparta.Pruner(model, x, criterion="l1", target=f"density={density}").step()
        bank.add(f"t{i}", sparta.export(model.eval()))
    return bank


@pytest.mark.parametrize("runtime", ALL)
def test_bank_serves_each_task_through_a_runtime(tmp_path, runtime):
    bank = _bank_of_two(tmp_path)
    x = _images(3)
    outputs = {}
    for name in ("t0", "t1"):
        served = bank.deployed(name, runtime=runtime)
        want = bank.model(name)(x)
        assert _rel(served(x), want) < 1e-4
        outputs[name] = want
    assert _rel(outputs["t0"], outputs["t1"]) > 1e-3  # two different tasks were served
    # cache_size=1: t1 is the one kept; asking again for it returns the same deployment
    assert bank.deployed("t1", runtime=runtime) is bank.deployed("t1", runtime=runtime)
    bank.remove("t1")
    with pytest.raises(UnknownNameError):
        bank.deployed("t1", runtime=runtime)


def test_bank_deployed_refuses_an_unknown_runtime(tmp_path):
    bank = _bank_of_two(tmp_path)
    with pytest.raises(UnknownNameError, match="runtime"):
        bank.deployed("t0", runtime="tensorrt")


def test_outputs_difference_over_structures_nan_and_dtypes():
    from sparta.outputs import RTOL, difference, tolerance_of

    a = torch.tensor([1.0, -4.0, 2.0])
    assert difference(a, a) == 0.0
    assert difference(a + torch.tensor([0.0, 0.0, 0.4]), a) == pytest.approx(0.1)  # 0.4 / 4
    nested = (a, {"b": 2 * a})  # the largest entry of any leaf is the scale
    shifted = (a, {"b": 2 * a + torch.tensor([0.8, 0.0, 0.0])})
    assert difference(shifted, nested) == pytest.approx(0.1)
    assert difference((a,), nested) == float("inf")  # another structure
    assert difference(a[:2], a) == float("inf")  # another shape
    nan = torch.tensor([float("nan"), 1.0])
    assert difference(nan, nan) == 0.0  # NaN where the model has NaN is reproduced
    assert difference(torch.tensor([0.0, 1.0]), nan) == float("inf")
    assert tolerance_of(a) == RTOL and tolerance_of(a.half()) == 8 * torch.finfo(torch.half).eps
    inf = torch.tensor([float("inf"), 2.0])
    assert difference(inf, inf) == 0.0 and difference(torch.tensor([1.0, 2.0]), inf) == float("inf")
    assert difference(torch.tensor([float("inf"), 2.2]), inf) == pytest.approx(0.1)
