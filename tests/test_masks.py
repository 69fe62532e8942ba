"""``sparta.masks.alive_units``: the one definition of which units of a coupled group are alive,
and the call sites that use it (the pruner, the block pruner's promotion, the compact build)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import sparta
from sparta.adapters.splopa import SPLoPA
from sparta.masks import alive_units, resolve_mask
from sparta.pruning.groups import _transformer_groups
from sparta.pruning.promotion import _silenced_units, promote_dead_units
from sparta.pruning.pruner import Pruner
from sparta.tasks import Builder
from tiny_models import TINY_MODELS, ResidualNet, perturb, tiny_bert


def _wrapped(model: nn.Module, **kw) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sparta.SkippedLayerWarning)
        return sparta.wrap(model, **kw)


def _bert_inputs():
    return {"input_ids": torch.randint(0, 50, (2, 7)), "attention_mask": torch.ones(2, 7).long()}


#: name -> (base factory, wrap options or None for a plain fine-pruned model, example inputs).
FAMILY = {
    **{f"{k}-splora": (c, {"rank": 2}, c.example) for k, c in TINY_MODELS.items()},
    "residual-splora": (ResidualNet, {"rank": 2}, lambda: torch.randn(2, 3, 8, 8)),
    "residual-sppara": (ResidualNet, {"adapter": "sppara"}, lambda: torch.randn(2, 3, 8, 8)),
    "residual-plain": (ResidualNet, None, lambda: torch.randn(2, 3, 8, 8)),
    "mlp-plain": (TINY_MODELS["mlp"], None, TINY_MODELS["mlp"].example),
    "bert-splora": (tiny_bert, {"rank": 2}, _bert_inputs),
}


def _pruner(name: str, seed: int = 0) -> Pruner:
    torch.manual_seed(seed)
    make, options, example = FAMILY[name]
    base = make().eval()
    model = base if options is None else _wrapped(base, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = Pruner(model, example(), criterion="l1", target=0.5)
    pruner.base = base
    return pruner


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
    x = FAMILY[name][2]()
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


@pytest.mark.parametrize("name", ["residual-splora", "attention-splora", "bert-splora"])
def test_the_compact_build_keeps_exactly_the_alive_units(name):
    """Export and build (``Builder``): per group, the compact model keeps the units
    ``alive_units`` calls alive, and removes or zeroes the others."""
    pruner = _pruner(name, seed=2)
    perturb(pruner.model)
    _mask_randomly(pruner, seed=11)
    expected = {g.name: int(alive_units(pruner.model, g).sum()) for g in pruner.groups}
    x = FAMILY[name][2]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task = sparta.export(pruner.model.eval(), x)
        _, report = Builder(pruner.base).build(task, verify=True)
    got = {o.name: o.alive for o in report.groups}
    assert got == expected
    assert any(n < pruner.groups[i].size for i, n in enumerate(expected.values()))


# -- the block variant: promotion of units the block masks silence -------------------------------
def _splopa_bert():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    base = tiny_bert(
        vocab_size=40, hidden_size=64, intermediate_size=128, max_position_embeddings=16
    )
    return base, _wrapped(base, adapter="splopa", block=16, prototypes=4).eval()


def test_promotion_clears_what_the_blocks_silence_and_alive_units_then_agrees():
    base, model = _splopa_bert()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SPLoPA):
                m.mask_block.mul_((torch.rand(m.mask_block.shape, generator=gen) > 0.4).float())
        for name, p in model.named_parameters():  # biases: some zero, some not
            if name.endswith("bias") and p.dim() == 1:
                keep = torch.rand(p.shape, generator=gen) > 0.5
                p.copy_(torch.randn(p.shape, generator=gen) * keep)
    groups = _transformer_groups(model)
    modules = dict(model.named_modules())
    before = {g.name: alive_units(model, g) for g in groups}
    silenced = {g.name: _silenced_units(model, g, modules) for g in groups}
    ids = torch.randint(0, 40, (3, 10), generator=gen)
    with torch.no_grad():
        out = model(ids).logits
        done = promote_dead_units(model, groups)
        assert torch.equal(model(ids).logits, out)  # promotion changes no output
    assert sum(done.values()) > 0
    for g in groups:
        expected = before[g.name].clone()
        expected[silenced[g.name]] = False
        assert torch.equal(alive_units(model, g), expected), g.name
        assert done.get(g.name, 0) == int((before[g.name] & ~expected).sum())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, report = Builder(base).build(sparta.export(model, ids), verify=True)
    alive = {g.name: int(alive_units(model, g).sum()) for g in groups}
    assert {o.name: o.alive for o in report.groups if o.name in alive} == alive
