"""``sparta.masks.alive_units``: the one definition of which units of a coupled group are alive,
and the call sites that use it (the pruner, the block pruner's promotion, the compact build)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import sparta
from sparta.masks import alive_units, resolve_mask
from sparta.pruning.pruner import Pruner
from tiny_models import TINY_MODELS, ResidualNet, perturb, tiny_bert


def _wrapped(model: nn.Module, **kw) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sparta.SkippedLayerWarning)
        return sparta.wrap(model, **kw)


def _bert_inputs():
    return {"input_ids": torch.randint(0, 50, (2, 7)), "attention_mask": torch.ones(2, 7).long()}


#: name -> (model factory, example inputs); wrapped (SPA) and plain (fine-pruning) models.
FAMILY = {
    **{
        f"{k}-splora": (lambda c=c: _wrapped(c(), rank=2), c.example)
        for k, c in TINY_MODELS.items()
    },
    "residual-splora": (lambda: _wrapped(ResidualNet(), rank=2), lambda: torch.randn(2, 3, 8, 8)),
    "residual-sppara": (
        lambda: _wrapped(ResidualNet(), adapter="sppara"),
        lambda: torch.randn(2, 3, 8, 8),
    ),
    "residual-plain": (ResidualNet, lambda: torch.randn(2, 3, 8, 8)),
    "mlp-plain": (TINY_MODELS["mlp"], TINY_MODELS["mlp"].example),
    "bert-splora": (lambda: _wrapped(tiny_bert(), rank=2), _bert_inputs),
}


def _pruner(name: str, seed: int = 0) -> Pruner:
    torch.manual_seed(seed)
    make, example = FAMILY[name]
    model = make().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Pruner(model, example(), criterion="l1", target=0.5)


def _mask_randomly(pruner: Pruner, seed: int) -> set[tuple[str, int]]:
    """Clear whole units on their produced side only (consumers keep their entries, as after
    a block pruner or a hand edit) and random single produced entries elsewhere; returns the
    units cleared whole."""
    gen = torch.Generator().manual_seed(seed)
    killed = set()
    with torch.no_grad():
        for g in pruner.groups:
            units = torch.randperm(g.size, generator=gen)[: g.size // 2]
            killed |= {(g.name, int(u)) for u in units}
            for m in g.outputs() or g.members:
                mask = resolve_mask(pruner.model, m.module, m.site)
                partial = torch.rand(len(m.idxs), generator=gen) < 0.3
                mask[m.idxs[torch.isin(m.units, units) | partial]] = 0
    return killed


def _by_loops(model: nn.Module, group) -> list[bool]:
    """The definition read literally, one unit at a time."""
    produced = group.outputs() or group.members
    alive = []
    for u in range(group.size):
        hit = False
        for m in produced:
            mask = resolve_mask(model, m.module, m.site, create=False)
            entries = m.idxs[m.units == u]
            hit |= mask is None and len(entries) > 0
            hit |= mask is not None and bool((mask[entries] != 0).any())
        alive.append(hit)
    return alive


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_alive_units_matches_the_definition_and_the_pruner(name):
    pruner = _pruner(name)
    assert pruner.groups
    killed = _mask_randomly(pruner, seed=len(name))
    by_pruner = pruner._alive()
    for g in pruner.groups:
        alive = alive_units(pruner.model, g)
        assert alive.dtype == torch.bool and alive.shape == (g.size,)
        assert alive.tolist() == _by_loops(pruner.model, g), g.name
        assert torch.equal(by_pruner[g.name], alive), g.name
        for u in range(g.size):  # a unit cleared whole is dead
            if (g.name, u) in killed:
                assert not alive[u], (g.name, u)
    # Some unit partly masked must stay alive somewhere in the family member, or the random
    # masking would test nothing but whole units.
    assert any(alive_units(pruner.model, g).any() for g in pruner.groups)


@pytest.mark.parametrize("name", ["residual-splora", "residual-plain", "attention-splora"])
def test_clearing_dead_units_everywhere_changes_no_output(name):
    """What compaction does with a dead unit (drop every entry of it, consumers included)
    leaves the outputs as they are: dead by this definition is dead in the model."""
    pruner = _pruner(name, seed=1)
    model = pruner.model
    perturb(model)
    _mask_randomly(pruner, seed=5)
    x = FAMILY[name][1]()
    with torch.no_grad():
        before = model(x)
        dropped = 0
        for g in pruner.groups:
            dead = (~alive_units(model, g)).nonzero().flatten()
            for m in g.members:
                mask = resolve_mask(model, m.module, m.site)
                hit = m.idxs[torch.isin(m.units, dead)]
                dropped += int(mask[hit].count_nonzero())
                mask[hit] = 0
        after = model(x)
    assert dropped > 0  # consumer entries of dead units were still set
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


def test_alive_units_reads_without_attaching_masks():
    """A plain model whose members were never masked: every unit alive, no mask attached."""
    torch.manual_seed(0)
    model = ResidualNet().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = Pruner(copy.deepcopy(model), torch.randn(2, 3, 8, 8), target=0.5).groups
    for g in groups:
        assert bool(alive_units(model, g).all()), g.name
    assert not any(n.endswith("parametrizations") for n, _ in model.named_modules())
