"""Adapted models under the optimisers users train with: a fused optimiser
(``AdamW(fused=True)``, the Hugging Face Trainer's default) updates the parameters without
incrementing their version counters, which is how an adapted layer knew that its cached fused
weight was stale. Whatever the optimiser, the forward without gradients (evaluation,
inference, export's checks) must be the trained model's."""

from __future__ import annotations

import pytest
import torch

import sparta
from test_train import one_thread  # noqa: F401  (autouse: tiny matrices run faster on 1 thread)
from tiny_models import MLP, AttentionBlock, Conv2dNet

OPTIMISERS = {
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=0.05, fused=True),
    "adam-foreach": lambda ps: torch.optim.Adam(ps, lr=0.05, foreach=True),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
}
#: (model, adapter, options): linear, convolution and attention adapters
MODELS = [
    (MLP, "splora", {"rank": 2}),
    (Conv2dNet, "sppara", {}),
    (AttentionBlock, "splora", {"rank": 2}),
    (MLP, "splopa", {"block": 4, "prototypes": 2}),
]


@pytest.mark.parametrize("optimiser", sorted(OPTIMISERS))
@pytest.mark.parametrize(("net", "adapter", "options"), MODELS)
def test_forward_without_gradients_follows_every_optimiser_step(net, adapter, options, optimiser):
    torch.manual_seed(0)
    model = sparta.wrap(net(), adapter, **options)
    x = net.example(4)
    opt = OPTIMISERS[optimiser]([p for p in model.parameters() if p.requires_grad])
    for _ in range(3):
        with torch.no_grad():
            model.eval()(x)  # fills the layers' caches
        model.train()
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        model.eval()
        with torch.no_grad():
            cached = model(x)
        exact = model(x).detach()  # gradients on: computed afresh from the parameters
        assert float((cached - exact).abs().max()) <= 1e-5 * float(exact.abs().max())
    fused = sparta.fuse(model)
    with torch.no_grad():
        assert torch.allclose(fused(x), model(x), atol=1e-5)
