"""A pruning step counts from the masks alone (``sparta.pruning.tally``), with the same numbers
and the same decisions as measuring through the layers (the exact path, kept as the oracle).

Behaviour, not timing: the timing is ``benchmarks/prune_step.py``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

import sparta
from sparta import masks as masks_module
from sparta.pruning.pruner import Pruner
from sparta.pruning.tally import KINDS, _overlapping
from tiny_models import TINY_MODELS, ResidualNet, tiny_bert


def _tiny_resnet():
    """A torchvision ResNet (BasicBlock, one block per stage) with narrow widths."""
    model = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    model.fc = nn.Linear(512, 4)
    return model, torch.randn(2, 3, 32, 32)


def _mobilenet():
    """Depthwise (groups = channels) and pointwise convs, inverted residuals."""
    return torchvision.models.mobilenet_v2(width_mult=0.35, num_classes=4), torch.randn(
        2, 3, 32, 32
    )


def _bert():
    pytest.importorskip("transformers")
    model = tiny_bert()
    return model, {"input_ids": torch.randint(0, 50, (2, 7))}


class SelfAttention(nn.Module):
    """Packed q/k/v self-attention and an FFN: heads of a plain MultiheadAttention can be
    masked (those of a cross-attention with kdim/vdim != embed_dim only once wrapped)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head((h + self.ffn(h)).mean(1))


def _tiny(name):
    def make():
        cls = TINY_MODELS[name]
        return cls(), cls.example()

    return make


MODELS = {
    "residual": lambda: (ResidualNet(), torch.randn(2, 3, 8, 8)),
    "conv1d": _tiny("conv1d"),
    "conv2d": _tiny("conv2d"),
    "conv3d": _tiny("conv3d"),
    "mlp": _tiny("mlp"),
    "attention": _tiny("attention"),
    "self_attention": lambda: (SelfAttention(), torch.randn(2, 5, 6)),
    "resnet": _tiny_resnet,
    "mobilenet_v2": _mobilenet,
    "bert": _bert,
}
ADAPTERS = {  # None: the plain model (fine-pruning); splopa counts the exact way (block masks)
    "plain": None,
    "splora": dict(adapter="splora", rank=2),
    "sppara": dict(adapter="sppara"),
    "splopa": dict(adapter="splopa", block=4, prototypes=2),
}


def _build(name, adapter, **kw):
    torch.manual_seed(0)
    model, example = MODELS[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if ADAPTERS[adapter] is not None:
            try:
                model = sparta.wrap(model, **ADAPTERS[adapter])
            except sparta.SpartaError as exc:  # e.g. SPLoPA on convolutions
                pytest.skip(f"{adapter} does not adapt {name}: {exc}")
        try:
            pruner = Pruner(model, example, **kw)
        except sparta.NotAdaptableError as exc:  # the same before the counts came from masks
            pytest.skip(f"the Pruner refuses {adapter} {name}: {exc}")
    return model, example, pruner


def _scramble(pruner: Pruner, seed: int, fraction: float = 0.3) -> None:
    """Zero a random ``fraction`` of the entries of every mask the counts read, unit-aligned
    or not (the counts must hold for any mask state)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mask in pruner._tally._resolve().values():  # the masks now (none is None here)
            drop = torch.rand(mask.shape, generator=gen) < fraction
            mask[drop.to(mask.device)] = 0


def _random_units(pruner: Pruner, seed: int, fraction: float) -> list[tuple[str, int]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (g.name, u)
        for g in pruner.groups
        for u in range(g.size)
        if float(torch.rand((), generator=gen)) < fraction
    ]


CONVS = ("residual", "conv1d", "conv2d", "conv3d", "resnet", "mobilenet_v2")
CASES = (
    [(name, "plain") for name in MODELS if name != "attention"]  # refused unwrapped, as before
    + [(name, "splora") for name in MODELS]
    + [(name, "sppara") for name in CONVS]  # SPPaRA adapts convolutions only
    + [(name, "splopa") for name in ("mlp", "self_attention", "bert")]  # and SPLoPA linear ones
)


@pytest.mark.parametrize("name,adapter", CASES)
def test_counts_from_masks_equal_the_exact_counts(name, adapter):
    _, _, pruner = _build(name, adapter, target=0.5)
    tally = pruner._tally
    assert not pruner._exact  # the fast path is the one in use
    assert pruner.initial == pruner._exact_totals()
    for seed in range(3):
        if seed:
            _scramble(pruner, seed)
        exact = pruner._exact_totals()
        fast = pruner._totals()
        assert fast == exact, f"{name}/{adapter}, masks {seed}"
        assert isinstance(fast["macs"], int)
        assert 0 < fast["filters"] and 0 < fast["weights"] and 0 < fast["macs"]
        # tentative states: what the level search evaluates
        units = _random_units(pruner, seed, 0.4)
        state = tally.state()
        for kind, target_kind in zip(KINDS, ("density", "sparsity", "macs")):
            pruner.target = sparta.Target(target_kind, 0.5)
            want = pruner._exact_level_after(units)
            assert tally.count(kind, tally.after(state, tally.ids(units))) == pytest.approx(
                want * pruner.initial[kind], rel=1e-12, abs=0
            )
            assert pruner._level_after(units) == want
        assert pruner._totals() == exact  # a tentative state never touches the masks


def _history(pruner: Pruner, model, example, seed: int):
    gen = torch.Generator().manual_seed(seed)
    while not pruner.done:
        scores = {
            g.name: torch.rand(g.size, generator=gen, dtype=torch.float64) for g in pruner.groups
        }
        pruner.step(scores)
    return pruner.history_dicts()


@pytest.mark.parametrize(
    "name,adapter,target,options",
    [
        ("residual", "plain", "density=0.4", {}),
        ("residual", "splora", "sparsity=0.6", {"ranking": "local"}),
        ("mobilenet_v2", "plain", "macs=0.3", {}),
        ("mobilenet_v2", "plain", "density=0.3", {"round_to": 4}),
        ("resnet", "plain", "sparsity=0.7", {}),
        ("attention", "splora", "macs=0.5", {}),
        ("self_attention", "plain", "sparsity=0.5", {}),
        ("bert", "plain", "density=0.25", {}),
        ("mlp", "splopa", "sparsity=0.5", {}),
    ],
)
def test_decisions_are_those_of_the_exact_path(name, adapter, target, options):
    """Same model, same scores, every step: the same units pruned and the same achievements."""
    model, example, fast = _build(name, adapter, target=target, steps=4, **options)
    model2, example2, exact = _build(name, adapter, target=target, steps=4, **options)
    exact._exact = True
    assert fast.initial == exact.initial
    got = _history(fast, model, example, seed=1)
    want = _history(exact, model2, example2, seed=1)
    assert got == want
    assert any(r["pruned"] for r in got)
    assert fast._exact_totals() == fast._totals()


def test_counting_builds_no_weight(monkeypatch):
    """The level search and ``achieved()`` of a plain model read masks only: no masked weight
    is rebuilt (each rebuild is a pass over the whole tensor; a step used to rebuild every one
    of them for each of the ~14 levels its search tried)."""
    _, _, pruner = _build("resnet", "plain", target="density=0.5", steps=2)
    built = []
    forward = masks_module.ChannelMask.forward
    monkeypatch.setattr(
        masks_module.ChannelMask, "forward", lambda self, t: built.append(1) or forward(self, t)
    )
    units = _random_units(pruner, 0, 0.3)
    for kind in ("density", "sparsity", "macs"):
        pruner.target = sparta.Target(kind, 0.5)
        pruner._level_after(units)
    pruner.achieved()
    pruner._exact_totals()  # nor does the exact path: it reads the weights' shapes only
    pruner.macs.count(pruner.model)
    assert built == []
    assert pruner.model.conv1.weight.shape == (64, 3, 7, 7)  # reading a weight builds it
    assert built == [1]


def test_counts_follow_masks_moved_to_another_dtype():
    """Moving the model replaces its mask tensors: the counts read the new ones."""
    model, example, pruner = _build("residual", "plain", target="density=0.4", steps=2)
    pruner.step()
    model.double()
    before = pruner._totals()
    _scramble(pruner, 5)
    assert pruner._totals() == pruner._exact_totals()
    assert pruner._totals()["weights"] < before["weights"]  # the new masks were read
    record = pruner.step()
    assert record.achieved["density"] <= 0.4 + 1e-9


def test_overlapping_masks_are_detected():
    t = torch.ones(10)
    assert _overlapping([t[:4], t[3:6]])
    assert not _overlapping([t[:4], t[4:], torch.ones(3)])


def test_weight_check_reads_sums_but_confirms_entry_by_entry():
    """The per-step weight check sums each tensor (no bool copy): a sum that overflows with
    finite entries is no error, a NaN or inf entry still is."""
    from sparta.pruning.checks import all_finite, check_weights

    model = nn.Sequential(nn.Linear(4, 3).double())
    with torch.no_grad():
        model[0].weight.fill_(1e300)  # finite, but far beyond float32: the sum reads inf
    assert not all_finite([model[0].weight])
    check_weights(model, ["0"], "criterion 'l1'")  # confirmed entry by entry: finite
    for bad in (float("nan"), float("inf")):
        with torch.no_grad():
            model[0].weight[1, 2] = bad
        with pytest.raises(sparta.NonFiniteError, match=r"0\.weight \(1 (NaN|inf) of 12\)"):
            check_weights(model, ["0"], "criterion 'l1'")
    assert all_finite([torch.ones(3, dtype=torch.bfloat16), torch.zeros(2)])
