"""benchmarks/deploy_profile.py reads ONNX Runtime's per-operator profile: operators per call,
the convolutions' MACs as the blocked kernels run them (which must agree with
``sparta.onnx_session.blocked_padding``'s independent count) and the call's time split."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("onnxruntime", "onnx", "onnxscript")),
    reason="onnx extra",
)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def _net(stem: int, wide: int, depthwise: bool) -> nn.Module:
    layers = [nn.Conv2d(3, stem, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(stem, wide, 1)]
    groups = wide if depthwise else 1
    layers += [nn.BatchNorm2d(wide), nn.ReLU(), nn.Conv2d(wide, wide, 3, padding=1, groups=groups)]
    torch.manual_seed(0)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(wide, 4)).eval()


@pytest.mark.parametrize(
    "stem, wide, depthwise", [(24, 40, False), (32, 48, False), (13, 20, False), (24, 40, True)]
)
def test_profile_counts_operators_and_padded_macs(tmp_path, stem, wide, depthwise):
    from deploy_profile import profile
    from sparta.onnx_session import blocked_padding

    model, x = _net(stem, wide, depthwise), torch.randn(1, 3, 32, 32)
    got = profile(model, x, threads=1, repeats=3, folder=str(tmp_path))
    assert got["repeats"] == 3 and got["convs"] == 3 and got["nodes"] >= 3
    assert 0 < got["conv_ms"] <= got["operators_median_ms"] <= got["run_median_ms"]
    assert got["operators_min_ms"] <= got["operators_median_ms"]
    counts = {}
    for block in (1, 8, 16):  # no blocking (e.g. ARM), AVX2, AVX-512
        with blocked_padding(model, block=block) as c, torch.no_grad():
            model(x)
        counts[block] = c["padded"]
    assert got["conv_padded_macs"] in counts.values(), (got["conv_padded_macs"], counts)
    assert list(tmp_path.iterdir()) == []  # the profile file is read and removed
