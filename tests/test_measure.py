"""MacCounter against torch's own FLOP counter (the library as the oracle).

Convention: MacCounter counts the multiply-accumulates of Linear and convolution layers (and
nn.MultiheadAttention's products); torch.utils.flop_counter counts 2 FLOPs per MAC on the
aten ops ``mm``/``addmm``/``convolution``. Models without nn.MultiheadAttention are compared
exactly, including Swin, whose attention reads ``qkv.weight`` without calling the layer.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import sparta
from sparta.measure import MacCounter
from tiny_models import ResidualNet

LAYER_OPS = ("mm", "addmm", "convolution")


def oracle_macs(model, x) -> float:
    """MACs per example of the layer ops, from torch's FLOP counter."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x)
    flops = counter.get_flop_counts()["Global"]
    return sum(v for op, v in flops.items() if str(op).split(".")[1] in LAYER_OPS) / 2 / len(x)


def _wrap(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sparta.SkippedLayerWarning)
        return sparta.wrap(model, rank=2)


@pytest.mark.parametrize(
    "name",
    ["resnet18", "mobilenet_v3_small", "squeezenet1_1", "shufflenet_v2_x0_5", "swin_t"],
)
def test_mac_counter_equals_torch_flop_counter(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    want = oracle_macs(model, x)
    assert MacCounter(model, x).count(model) == pytest.approx(want, rel=1e-9)
    wrapped = _wrap(model)
    assert MacCounter(wrapped, x).count(wrapped) == pytest.approx(want, rel=1e-9)


def test_masked_macs_equal_the_compact_models_flops():
    torch.manual_seed(0)
    base = ResidualNet().eval()
    x = torch.randn(2, 3, 8, 8)
    model = _wrap(base)
    pruner = sparta.Pruner(model, x, criterion="l1", target="density=0.5")
    pruner.step()
    compact = sparta.build(base, sparta.export(model))
    masked = MacCounter(model, x).count(model)
    assert masked < MacCounter(base, x).count(base)
    assert masked == pytest.approx(oracle_macs(compact, x), rel=1e-9)
