"""torch.compile of wrapped and masked models (issue #14, item 4).

A wrapped model must compile into one graph whatever its depth: no graph break per adapted layer
(Python-side caches, ``.item()``, data-dependent branches). Breaks are counted with
``torch._dynamo.explain`` at two depths of each family, and outputs and gradients of the compiled
model are compared with eager. The default suite uses the ``aot_eager`` backend (the same
autograd graph as inductor, without its C++ compile, which takes minutes on two cores); one
inductor run is marked slow.

Tolerances: ``aot_eager`` runs the same kernels as eager, so outputs and gradients agree to
1e-5 relative (of the largest entry of the tensor compared; 1e-6 of the largest gradient of the
model for tensors whose gradient is zero in exact arithmetic, such as a conv bias followed by
batch norm). Inductor fuses and reorders sums: 1e-4 relative.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sparta
from sparta.masks import can_mask, ensure_masks
from tiny_models import ResidualNet

torch._dynamo.config.cache_size_limit = 64  # several small models per process


def _cnn(depth: int) -> nn.Module:
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
    for i in range(depth):
        stride = 2 if i == 0 else 1
        layers += [nn.Conv2d(8, 8, 3, stride=stride, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
        layers += [nn.Conv2d(8, 8, 1), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)]
    return nn.Sequential(*layers)


def _mlp(depth: int) -> nn.Module:
    layers = [nn.Linear(6, 8), nn.GELU()]
    for _ in range(depth):
        layers += [nn.Linear(8, 8), nn.LayerNorm(8), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(8, 3))


def _fine_pruning(model: nn.Module) -> nn.Module:
    """The fine-pruning form: channel masks (parametrisations) on every prunable plain layer."""
    for module in list(model.modules()):
        if can_mask(module) and not isinstance(module, nn.MultiheadAttention):
            ensure_masks(module)
    return model


#: family -> (build(depth), example input)
FAMILIES = {
    "splora": (lambda d: sparta.wrap(_cnn(d), "splora", rank=2), (2, 3, 8, 8)),
    "sppara": (lambda d: sparta.wrap(_cnn(d), "sppara"), (2, 3, 8, 8)),
    "splopa": (lambda d: sparta.wrap(_mlp(d), "splopa", block=2, prototypes=3), (4, 6)),
    "fine-pruning": (lambda d: _fine_pruning(_cnn(d)), (2, 3, 8, 8)),
}


def _build(family: str, depth: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    make, shape = FAMILIES[family]
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sppara leaves Linear layers frozen, by design
        model = make(depth)
    _prune_some(model)
    return model, torch.randn(shape)


def _prune_some(model: nn.Module) -> None:
    """Clear the first channel of every mask, so the masked paths are the ones compiled."""
    with torch.no_grad():
        for m in model.modules():
            mask = getattr(m, "mask_out", None)
            if isinstance(mask, torch.Tensor) and mask.numel() > 2:
                mask[0] = 0


def _breaks(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    return explained.graph_count, explained.graph_break_count


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(model: nn.Module, x: torch.Tensor, call=None) -> tuple[torch.Tensor, dict]:
    """Output and parameter gradients of one forward/backward of ``call`` (default ``model``;
    a compiled ``model``), named as ``model`` names them."""
    model.zero_grad(set_to_none=True)
    y = (model if call is None else call)(x)
    (y.square().sum() + y.sum()).backward()
    return y.detach(), _grads(model)


def _assert_same(got, want, rel: float) -> None:
    y_got, g_got = got
    y_want, g_want = want
    torch.testing.assert_close(y_got, y_want, rtol=rel, atol=rel * y_want.abs().max().item())
    assert set(g_got) == set(g_want)
    scale = max(g.abs().max().item() for g in g_want.values())
    for name, g in g_want.items():
        tol = max(rel * g.abs().max().item(), 1e-6 * scale)
        err = (g_got[name] - g).abs().max().item()
        assert err <= tol, f"gradient of {name} differs by {err:.3g} (tolerance {tol:.3g})"


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("grad", [True, False], ids=["train", "inference"])
def test_one_graph_at_any_depth(family, grad):
    """No graph break at depth 1 or 3: nothing per adapted layer leaves the graph."""
    for depth in (1, 3):
        model, x = _build(family, depth)
        model.train(grad)
        with torch.set_grad_enabled(grad):
            graphs, breaks = _breaks(model, x)
        assert (graphs, breaks) == (1, 0), (
            f"{family} depth {depth}: {graphs} graphs, {breaks} breaks"
        )


@pytest.mark.parametrize("family", list(FAMILIES))
def test_compiled_training_matches_eager(family):
    model, x = _build(family, 2)
    model.train()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    want = _step(model, x)
    _assert_same(_step(model, x, compiled), want, 1e-5)


def test_compiled_model_follows_optimiser_steps_and_mask_edits():
    """The compiled graph reads the adapters and masks as tensors: after an optimiser step and
    a pruning edit it computes the new function, without recompiling."""
    from torch._dynamo.utils import counters

    model, x = _build("splora", 2)
    model.train()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    _step(model, x, compiled)
    graphs = counters["stats"]["unique_graphs"]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        _step(model, x, compiled)
        opt.step()
        with torch.no_grad():
            adapters = [m for m in model.modules() if isinstance(m, sparta.Adapter)]
            adapters[1].mask_out[1] = 0
            adapters[2].mask_in[3] = 0
        _assert_same(_step(model, x, compiled), _step(model, x), 1e-5)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] - graphs <= 1  # eval mode: one more graph


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["splora", "sppara"])
def test_inductor_training_and_inference_match_eager(adapter):
    torch.manual_seed(0)
    model = sparta.wrap(ResidualNet(), adapter, **({"rank": 2} if adapter == "splora" else {}))
    _prune_some(model)
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(model, fullgraph=True)
    _assert_same(_step(model, x, compiled), _step(model, x), 1e-4)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_branch_form_compiles_into_one_graph_and_matches_eager(channels_last, monkeypatch):
    """The low-rank delta's branch form (late layers of a real CNN take it; the tiny ones here
    would not) compiles without a break and trains as in eager, in both layouts."""
    from sparta.adapters import delta_fn

    def branch(geom, x, weight, right):
        offsets_ok = min(geom.centre_offsets(), default=0) >= 0
        return right is not None and geom.groups == 1 and offsets_ok

    monkeypatch.setattr(delta_fn, "_branch_form", branch)
    model, x = _build("splora", 2)
    model.train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    assert _breaks(model, x) == (1, 0)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    _assert_same(_step(model, x, compiled), _step(model, x), 1e-5)
