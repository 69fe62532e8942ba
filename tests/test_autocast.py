"""Mixed precision: every registered adapter trains under ``torch.autocast`` (bf16 and fp16, CPU).

Tolerances. A dtype with ``m`` stored mantissa bits rounds with unit ``u = 2**-(m + 1)``:
bf16 keeps 7 (u = 2**-8 ~ 3.9e-3), fp16 keeps 10 (u = 2**-11 ~ 4.9e-4). Under autocast every
layer rounds its input, its weight and its output once, so a gradient of a few layers carries
a few u of relative error, more where its sum cancels (random tiny models do). Gradients are
compared by norm (``|g - ref| / |ref|``), in eval mode (batch statistics in train mode make
the gradient of a bias before a norm exactly 0 in fp32, so any rounding is an infinite ratio):

* against torch's own autocast of the same function (each adapted layer run as a plain layer
  with the weight ``W + delta``: ``fused_weight()`` with autograd), the gradients of the
  training kernel must agree within ``TIGHT = 16 u``;
* against the fp32 gradients, within ``16 u`` or 1.5 times the error of torch's own autocast,
  whichever is larger: the kernel is as accurate as autocast itself, and within the dtype's
  tolerance wherever the model's conditioning allows autocast to be.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import sparta
from sparta.adapters import AdaptedLayer, SPLoPA
from test_contract import CASES, _options, _perturb, _wrapped
from tiny_models import tiny_bert

DTYPES = [torch.bfloat16, torch.float16]
UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
TIGHT = 16  # in units of u (see the module docstring)


def _bert(adapter: str, seed: int = 0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sparta.wrap(tiny_bert(vocab_size=60), adapter, **_options(adapter))
    ids = torch.randint(0, 60, (2, 7), generator=torch.Generator().manual_seed(seed))
    return model, {"input_ids": ids}


BERT_CASES = [a for a in sparta.list_adapters() if "linear" in sparta.get_adapter(a).kinds]


def _run(model, x):
    out = model(**x) if isinstance(x, dict) else model(x)
    return getattr(out, "logits", out)


def _perturb_blocks(model, seed: int = 2) -> None:
    """Prune a few SPLoPA blocks too, so block masks take part."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ad in model.modules():
            if isinstance(ad, SPLoPA):
                flat = ad.mask_block.view(-1)
                flat[torch.randperm(flat.numel(), generator=gen)[: flat.numel() // 4]] = 0


def _grads(model, x, weights, dtype):
    """Output and ``{name: gradient}`` of ``sum(weights * output)`` for every trainable
    tensor and for a floating input, under autocast to ``dtype`` (``None``: fp32)."""
    model.zero_grad(set_to_none=True)
    if isinstance(x, torch.Tensor):
        x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype or torch.bfloat16, enabled=dtype is not None):
        y = _run(model, x)
    (y.float() * weights).sum().backward()
    out = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    if isinstance(x, torch.Tensor):
        out["<input>"] = x.grad
    return y, out


def _plain_layer_forward(self, x):
    """An adapted layer as torch's own autocast runs it: a plain layer call on the
    differentiable weight ``(W + delta) * M`` (no custom autograd kernel)."""
    return self.geometry.layer(self._pad(x), *self.fused_weight())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _check_gradients(model, x, dtype, monkeypatch):
    model.eval()
    weights = torch.randn(_run(model, x).shape, generator=torch.Generator().manual_seed(7))
    _, fp32 = _grads(model, x, weights, None)
    y, got = _grads(model, x, weights, dtype)
    with monkeypatch.context() as m:
        m.setattr(AdaptedLayer, "forward", _plain_layer_forward)
        _, torch_autocast = _grads(model, x, weights, dtype)
    assert y.dtype == dtype, "the output is not in the autocast dtype"
    params = dict(model.named_parameters())
    tight = TIGHT * UNIT[dtype]
    assert set(got) == set(fp32) and len(got) > 1
    for name, g in got.items():
        ref = fp32[name]
        assert g is not None and ref is not None, f"{name} got no gradient"
        like = x if name == "<input>" else params[name]
        assert g.dtype == like.dtype, f"{name}: gradient {g.dtype}, tensor {like.dtype}"
        assert torch.isfinite(g).all(), name
        if ref.norm() == 0:
            assert g.norm() == 0, f"{name}: the fp32 gradient is 0, autocast's is not"
            continue
        assert _rel(g, torch_autocast[name]) <= tight, (
            f"{name}: {_rel(g, torch_autocast[name]):.2e} from torch's autocast of the same "
            f"function, allowed {tight:.2e}"
        )
        allowed = max(tight, 1.5 * _rel(torch_autocast[name], ref))
        assert _rel(g, ref) <= allowed, f"{name}: {_rel(g, ref):.2e} from fp32 > {allowed:.2e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("adapter,model_name", CASES)
def test_gradients_under_autocast_match_fp32(adapter, model_name, dtype, monkeypatch):
    _, model, x = _wrapped(adapter, model_name)
    _perturb(model)
    _perturb_blocks(model)
    _check_gradients(model, x, dtype, monkeypatch)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("adapter", BERT_CASES)
def test_bert_gradients_under_autocast_match_fp32(adapter, dtype, monkeypatch):
    model, x = _bert(adapter)
    _perturb(model, mask=False)
    _check_gradients(model, x, dtype, monkeypatch)


def _layer_outputs(model, x, dtype) -> dict[str, torch.dtype]:
    """The output dtype of every Linear/ConvNd/attention module called (adapted or not) under
    autocast, by module name (an adapted layer under its base layer's name)."""
    kinds = (AdaptedLayer, nn.Linear, nn.MultiheadAttention, nn.modules.conv._ConvNd)
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen[name] = (output[0] if isinstance(output, tuple) else output).dtype

        return hook

    hooks = [
        m.register_forward_hook(record(n)) for n, m in model.named_modules() if isinstance(m, kinds)
    ]
    with torch.autocast("cpu", dtype):
        _run(model, x)
    for h in hooks:
        h.remove()
    return {n.removesuffix(".base"): d for n, d in seen.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("adapter,model_name", CASES)
def test_layer_outputs_take_the_dtype_plain_layers_do(adapter, model_name, dtype):
    base, model, x = _wrapped(adapter, model_name)
    base.eval(), model.eval()
    for grad in (True, False):  # training kernel, then the cached fused path
        with torch.set_grad_enabled(grad):
            plain, wrapped = _layer_outputs(base, x, dtype), _layer_outputs(model, x, dtype)
        assert wrapped == plain
        assert dtype in set(wrapped.values())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("adapter,model_name", CASES)
def test_fused_path_under_autocast(adapter, model_name, dtype):
    """No-grad/eval under autocast: the autocast dtype, close to fp32, and the cached fused
    weights it leaves behind are the fp32 ones (a later fp32 call is unchanged)."""
    _, model, x = _wrapped(adapter, model_name)
    _perturb(model)
    _perturb_blocks(model)
    model.eval()
    fresh = copy.deepcopy(model)  # caches are not copied: computed in fp32 on first use
    with torch.no_grad():
        with torch.autocast("cpu", dtype):
            low = model(x)
        after = model(x)
        want = fresh(x)
    assert low.dtype == dtype
    assert torch.equal(after, want), "a cache filled under autocast changed fp32 outputs"
    assert _rel(low, want) <= TIGHT * UNIT[dtype]


@pytest.mark.parametrize("adapter", sparta.list_adapters())
def test_grad_scaler_fp16_training_steps(adapter):
    """GradScaler-style fp16 training: scaled loss, unscaled gradients close to fp32, finite
    steps that change the adapters and leave the base bit-identical."""
    model_name = next(m for a, m in CASES if a == adapter)
    base, model, x = _wrapped(adapter, model_name)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model.eval()  # running statistics: the gradient of a bias before a norm is not 0 (docstring)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    model(x).square().mean().backward()
    fp32 = [p.grad.clone() for p in trainable]
    start = [p.detach().clone() for p in trainable]
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.float16):
            loss = model(x).float().square().mean()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        if step == 0:
            for p, ref in zip(trainable, fp32):
                assert p.grad.dtype == torch.float32
                if ref.norm() > 0:
                    assert _rel(p.grad, ref) <= 0.05, "unscaled fp16 gradient far from fp32"
        scaler.step(opt)
        scaler.update()
        assert torch.isfinite(loss)
    assert scaler.get_scale() == 2.0**12, "a step overflowed and was skipped"
    assert any(not torch.equal(p, s) for p, s in zip(trainable, start))
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("criterion", ["movement", "activation"])
def test_block_pruning_under_autocast(criterion):
    """SPLoPA block pruning trained under bf16 autocast reaches its target and the compact
    model equals the masked one (the criteria read fp32 factors and add up in fp32)."""
    from sparta.pruning import BlockPruner

    torch.manual_seed(0)
    base = tiny_bert(vocab_size=60, hidden_size=64, intermediate_size=128)
    model = sparta.wrap(base, "splopa", block=16, prototypes=8)
    pruner = BlockPruner(model, criterion, target=0.5, total_steps=4, warmup_steps=1)
    ids = torch.randint(0, 60, (4, 9), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(4) % 3
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(4):
        with torch.autocast("cpu", torch.bfloat16):
            logits = model(input_ids=ids).logits
        assert logits.dtype == torch.bfloat16
        nn.functional.cross_entropy(logits.float(), labels).backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
    assert pruner.density() <= 0.5 + 1e-9
    model.eval()
    compact = sparta.build(base, sparta.export(model, example_inputs=ids))
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, compact(input_ids=ids).logits
    assert _rel(got, want) <= 1e-5


ZOO = ["mobilenet_v3_small", "regnet_x_400mf", "shufflenet_v2_x0_5", "convnext_tiny", "swin_t"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_torchvision_models_train_under_bf16_autocast(name, monkeypatch):
    """Depthwise/grouped convs, squeeze-excitation, channel shuffle, LayerNorm2d, and Swin's
    attention reading ``qkv.weight`` of an adapted layer: same contract as the tiny models."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    base = torchvision.models.get_model(name, weights=None, num_classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sparta.wrap(base, "splora", rank=4)
    _perturb(model, mask=False)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    _check_gradients(model, x, torch.bfloat16, monkeypatch)
