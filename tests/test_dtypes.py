"""A base stored in bf16/fp16 goes through the whole loop in its own dtype.

wrap -> train -> prune (l1, taylor) -> export -> save -> load -> build: adapters, masks and the
compact model keep the base's dtype, the compact model matches the masked one within the
dtype's rounding (bf16 keeps 8 significant bits, u = 2**-8), the base stays bit-identical,
and the counts sparta reports are exact (a bf16 sum of 0/1 masks is not, above 256).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import sparta
from sparta.inputs import input_spec, make_inputs
from sparta.masks import ChannelMask
from sparta.tasks import Task, build, export
from test_contract import _options
from tiny_models import AttentionBlock, ResidualNet, tiny_bert

UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _tokens(batch: int = 2):
    ids = torch.randint(0, 60, (batch, 9), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids}


BASES = {
    "residual": (lambda: ResidualNet(image=16), lambda: torch.randn(2, 3, 16, 16)),
    "attention": (AttentionBlock, AttentionBlock.example),
    "bert": (lambda: tiny_bert(vocab_size=60), _tokens),
}
CASES = [
    ("residual", "splora"),
    ("residual", "sppara"),
    ("attention", "splora"),
    ("bert", "splora"),
    ("bert", "splopa"),
]


def _run(model, x):
    out = model(**x) if isinstance(x, dict) else model(x)
    return getattr(out, "logits", out)


def _loss(out, _targets=None):
    return getattr(out, "logits", out).float().square().mean()


def _floating(model: nn.Module) -> set[torch.dtype]:
    tensors = [*model.parameters(), *model.buffers()]
    return {t.dtype for t in tensors if t.is_floating_point()}


def _task_in(dtype, base_name: str, adapter: str, criterion: str, optimiser=torch.optim.Adam):
    """A base in ``dtype``, and its task model after two training steps and one pruning step."""
    make_base, make_x = BASES[base_name]
    torch.manual_seed(0)
    base = make_base().to(dtype).eval()
    x = make_x()
    x = x.to(dtype) if isinstance(x, torch.Tensor) else x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers an adapter does not cover, by design
        model = sparta.wrap(base, adapter, **_options(adapter))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = optimiser(trainable, lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        _loss(_run(model, x)).backward()
        opt.step()
    pruner = sparta.Pruner(model, x, criterion=criterion, target="density=0.5")
    if criterion == "taylor":
        pruner.score([(x, None)], _loss)
    pruner.step()
    return base, model.eval(), x


@pytest.mark.parametrize("criterion", ["l1", "taylor"])
@pytest.mark.parametrize("base_name,adapter", CASES)
def test_bf16_base_round_trip(base_name, adapter, criterion, tmp_path):
    dtype = torch.bfloat16
    make_base, _ = BASES[base_name]
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in make_base().to(dtype).state_dict().items()}
    base, model, x = _task_in(dtype, base_name, adapter, criterion)
    assert _floating(model) == {dtype}, "adapters, masks or trained tensors left the dtype"
    masks = [m for m in model.modules() if isinstance(m, sparta.Adapter | ChannelMask)]
    assert masks and all(m.mask_out.dtype == dtype for m in masks)
    assert any(not bool(m.mask_out.all()) for m in masks), "nothing was pruned"

    export(model).save(tmp_path / "task.safetensors")
    compact = build(base, Task.load(tmp_path / "task.safetensors"))
    assert _floating(compact) == {dtype}
    smaller = sum(p.numel() for p in compact.parameters()) < sum(
        p.numel() for p in base.parameters()
    )
    # torch's MultiheadAttention cannot lose heads: those stay dense, as exact zeros, in fp32 too
    assert smaller or all(g.dense_reason for g in compact.sparta_compact.dense)
    with torch.no_grad():
        want, got = _run(model, x), _run(compact, x)
    assert got.dtype == want.dtype == dtype
    rel = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
    assert rel <= 4 * UNIT[dtype], f"compact vs masked: {rel:.2e}"
    for k, v in base.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), f"the base's {k} changed"
    assert _floating(base) == {dtype}


def test_fp16_base_round_trip(tmp_path):
    # SGD: Adam's default eps (1e-8) is 0 in fp16, so Adam on fp16 parameters divides by 0
    # where a gradient is 0 (the usual fp16 recipe is fp32 parameters under autocast).
    dtype = torch.float16
    base, model, x = _task_in(dtype, "residual", "splora", "taylor", torch.optim.SGD)
    assert _floating(model) == {dtype}
    compact = build(base, export(model))
    assert _floating(compact) == {dtype}
    with torch.no_grad():
        want, got = model(x), compact(x)
    rel = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
    assert got.dtype == dtype and rel <= 4 * UNIT[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_counts_are_exact_in_low_precision(dtype):
    """Counts of a wide layer's masks: a bf16 sum of 511 ones is 512."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 2500), nn.ReLU(), nn.Linear(2500, 600), nn.Linear(600, 3))
    wrapped = {
        d: sparta.wrap(copy.deepcopy(base).to(d), "splora", rank=2) for d in (torch.float32, dtype)
    }
    for model in wrapped.values():
        with torch.no_grad():
            layer = model[2]  # 2500 -> 600
            layer.adapter.mask_out[::7] = 0
            layer.adapter.mask_in[::3] = 0
    reference, low = wrapped[torch.float32], wrapped[dtype]
    assert low[2].adapter.mask_out.dtype == dtype
    assert sparta.learned_parameters(low) == sparta.learned_parameters(reference)
    assert low[2].adapter.kept_entries() == reference[2].adapter.kept_entries()
    assert low[2].adapter.kept_entries() == (600 - 86) * (2500 - 834)
    macs = {
        d: sparta.MacCounter(m, torch.zeros(1, 8, dtype=d)).count(m) for d, m in wrapped.items()
    }
    assert macs[dtype] == macs[torch.float32]


def test_inputs_from_a_spec_follow_the_device_and_dtype():
    spec = input_spec(
        {"x": torch.zeros(2, 3, dtype=torch.bfloat16), "ids": torch.zeros(2, 5, dtype=torch.long)}
    )
    cpu = make_inputs(spec, seed=3)
    assert cpu["x"].dtype == torch.bfloat16 and cpu["ids"].dtype == torch.long
    meta = make_inputs(spec, seed=3, device="meta")  # any device: values made on the CPU, moved
    assert {t.device.type for t in meta.values()} == {"meta"}
    assert torch.equal(make_inputs(spec, seed=3)["x"], cpu["x"])


def test_build_verification_allows_the_dtypes_rounding_only():
    """``build`` verifies compact == masked to 1e-4 in fp32 and to 4 eps in bf16/fp16, where
    every layer rounds its output; a NaN output is never accepted."""
    from sparta.errors import SpartaError
    from sparta.tasks.compact import _compare

    want = torch.linspace(-1, 1, 64)
    for dtype, flip in [(torch.float32, 5e-5), (torch.bfloat16, 2**-7), (torch.float16, 2**-10)]:
        low = want.to(dtype)
        _compare(low, low + flip * low.abs().max())  # one last-bit flip of the largest output
        with pytest.raises(SpartaError, match="differs"):
            _compare(low, low + 8 * torch.finfo(dtype).eps * low.abs().max() + 2e-4)
        with pytest.raises(SpartaError, match="differs"):
            _compare(low, low * float("nan"))
