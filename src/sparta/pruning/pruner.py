"""``Pruner``: scores coupled groups, ranks them and clears masks, step by step.

The same engine prunes an adapted model (SPA: frozen base, masks on adapters) and a plain one
(the fine-pruning baseline: masks attached to every prunable layer, all weights trainable), so
the two are compared under identical decisions. Nothing here changes a weight: a step only
writes zeros into masks, and never writes a one, so pruned channels cannot regrow.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..heads import protected_layers
from ..inputs import check_nonempty, input_spec
from ..masks import alive_units, attention_kept, kept_weights, resolve_mask
from ..measure import MacCounter, attention_macs
from ..registry import require_modules
from ..utils import NORMS
from . import selection
from .checks import (
    check_batches,
    check_given_scores,
    check_int,
    check_scores,
    check_weights,
)
from .groups import Group, check_inputs, find_groups
from .importance import get_criterion
from .protocol import PrunerBase, check_progress
from .schedules import Levels, Schedule
from .tally import Tally
from .target import Target

#: What each kind of target measures (a key of ``Pruner._totals()``).
_MEASURED = {"density": "filters", "sparsity": "weights", "macs": "macs"}


@dataclass
class StepRecord:
    step: int
    level: float
    criterion: str
    achieved: dict
    pruned: dict[str, list[int]] = field(default_factory=dict)
    scores: dict[str, list[float]] = field(default_factory=dict)


class Pruner(PrunerBase):
    """Iterative structured pruning of ``model`` by editing its masks (``granularity``
    ``"channels"``; the shared protocol is :class:`~sparta.pruning.protocol.PrunerBase`).

    Args:
        model: an adapted model (``sparta.wrap``) or a plain one (fine-pruning).
        example_inputs: a batch the model accepts (tensor, tuple or dict of tensors).
        criterion: a registered importance criterion (``sparta.list_criteria()``).
        target: a :class:`Target`, ``"macs=0.1"``-style text, or a number (density).
        steps: number of pruning steps; ``schedule`` spreads the target over them.
        ignored: module names whose outputs are never pruned (default: the head).
        min_channels: units every group keeps at least.
        round_to: keep a multiple of this many units per group (e.g. 8 for hardware).
        ranking: ``"global"`` (the paper) or ``"local"`` (the same fraction in every group).
        criterion_options: passed to the criterion (e.g. ``seed`` for ``random``).

    Options under which nothing can be pruned (``min_channels`` or ``round_to`` at least every
    group's width) are refused; a target beyond what ``min_channels``, ``round_to`` and the
    ignored layers allow, or more ``steps`` than prunable units, give a warning with the level
    that will be reached. NaN/inf losses, gradients, weights or scores raise
    :class:`~sparta.NonFiniteError` before any mask changes.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs,
        criterion: str = "l1",
        target=0.5,
        steps: int = 1,
        schedule: str | Schedule = "linear",
        ignored: Iterable[str] | None = None,
        min_channels: int = 1,
        round_to: int | None = None,
        ranking: str = "global",
        **criterion_options,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"Pruner expects a torch.nn.Module, got {type(model).__name__}")
        # Everything that can be checked without running the model is checked first.
        spec = input_spec(example_inputs)  # a tensor or a tuple/list/dict of tensors
        check_nonempty(example_inputs, "example_inputs")
        self.target = Target.parse(target)
        check_int("steps", steps, 1)
        check_int("min_channels", min_channels, 1)
        if round_to is not None:
            check_int("round_to", round_to, 1)
        if ranking not in ("global", "local"):
            raise ConfigError(f"ranking must be 'global' or 'local', got {ranking!r}")
        self.levels = Levels(schedule, steps, self.target.level)  # read step by step
        self.criterion_cls = get_criterion(criterion)
        self.criterion_cls(model, [], **criterion_options)  # refuses bad options before tracing
        self.criterion_name, self.criterion_options = criterion, criterion_options
        self.model, self.example_inputs = model, example_inputs
        self.min_channels, self.round_to, self.ranking = min_channels, round_to, ranking
        _check_ignored(ignored)
        check_inputs(model, example_inputs)
        self.ignored = _resolve_ignored(model, ignored, example_inputs)
        self.groups, self.notes = find_groups(model, example_inputs, self.ignored)
        if not self.groups:
            raise ConfigError(
                "found no prunable group of channels in the model: " + "; ".join(self.notes)
            )
        for g in self.groups:  # attach masks to plain members now, before the criterion hooks in
            for m in g.members:
                resolve_mask(model, m.module, m.site)
        self.macs = MacCounter(model, example_inputs)
        # Counts read from the masks alone; the exact path (through the layers) stays as the
        # oracle of the tests, and for masks that share memory.
        self._tally = Tally(model, self.groups, self.macs)
        self._exact = self._tally.aliased
        # Recorded for sparta.export, so that the task can be built without an example batch.
        model.sparta_inputs = spec
        self.initial = self._totals()
        self._check_reachable(steps)
        self.history: list[StepRecord] = []
        self.reset_scores()

    granularity = "channels"

    # -- public API -----------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return len(self.history) >= len(self.levels)

    @property
    def needs_scoring(self) -> bool:
        """Whether the criterion is data-driven (:meth:`score` before every :meth:`step`)."""
        return bool(self.criterion_cls.data_driven)

    @property
    def total(self) -> int:
        return len(self.levels)

    def score(self, batches: Iterable, loss_fn: Callable, progress: Callable | None = None) -> int:
        """Accumulate a data-driven criterion over ``batches`` of ``(inputs, targets)``.

        A batch whose loss, outputs or gradients are NaN/inf raises
        :class:`~sparta.NonFiniteError` and is not counted (the batches before it are)."""
        batches = check_batches(batches, loss_fn)
        check_progress(progress)
        n = 0
        for batch in batches:
            self._criterion.accumulate(batch, loss_fn)
            n += 1
            if progress is not None:
                progress(n)
        return n

    def importance(self) -> dict[str, Tensor]:
        """Raw scores per group from the criterion (data-driven ones need :meth:`score` first)."""
        return {name: s.detach().double().cpu() for name, s in self._criterion.scores().items()}

    @property
    def criterion(self):
        """The criterion instance scoring the current step (a new one after every step)."""
        return self._criterion

    def step(self, scores: dict[str, Tensor] | None = None) -> StepRecord:
        """Prune to the next level of the schedule; returns what was decided.

        ``scores`` (``{group name: one score per unit}``) replaces :meth:`importance`, e.g.
        scores summed over the ranks of a distributed run so that every rank decides alike.

        Non-finite weights of the pruned layers or non-finite scores raise
        :class:`~sparta.NonFiniteError` before any mask changes; the step is not taken.
        """
        if self.done:
            raise ConfigError(f"all {len(self.levels)} pruning steps are done")
        level = self.levels[len(self.history)]
        members = {m.module for g in self.groups for m in g.members}
        check_weights(self.model, members, f"criterion {self.criterion_name!r}")
        given = scores is not None
        scores = check_given_scores(scores, self.groups) if given else self.importance()
        check_scores(scores, self.criterion_name, given)
        alive = self._alive()
        chosen = self._select(level, scores, alive)
        self._apply(chosen)
        record = StepRecord(
            step=len(self.history) + 1,
            level=level,
            criterion=self.criterion_name,
            achieved=self.achieved(),
            pruned={g: units.tolist() for g, units in chosen.items() if len(units)},
            scores={
                g: [round(float(v), 6) for v in scores[g][units]]
                for g, units in chosen.items()
                if len(units)
            },
        )
        self.history.append(record)
        self.reset_scores()
        return record

    def reset_scores(self) -> None:
        """Forget accumulated scores (done after every step: each step scores afresh)."""
        self._criterion = self.criterion_cls(self.model, self.groups, **self.criterion_options)

    def achieved(self) -> dict:
        """Filter density, weight sparsity, MAC fraction (and count per example) and learned
        parameters (``learned``: as stored, ``learned_paper``: as the paper counts) now."""
        now = self._totals()
        return {
            "density": now["filters"] / self.initial["filters"],
            "sparsity": 1.0 - now["weights"] / self.initial["weights"],
            "macs": now["macs"] / self.initial["macs"],
            "macs_abs": now["macs"],
            **self._learned(),
        }

    # -- bookkeeping ----------------------------------------------------------------------------
    def _mask(self, member) -> Tensor:
        return resolve_mask(self.model, member.module, member.site)

    def _alive(self) -> dict[str, Tensor]:
        """Per group, which units are alive (:func:`sparta.masks.alive_units`)."""
        return {g.name: alive_units(self.model, g) for g in self.groups}

    def _sites(self) -> dict[tuple[str, str], Tensor]:
        return {(m.module, m.site): self._mask(m) for g in self.groups for m in g.members}

    def _totals(self) -> dict:
        """Filters (produced units), prunable weights and MACs under the current masks."""
        if self._exact:
            return self._exact_totals()
        return self._tally.totals(self._tally.state())

    def _exact_totals(self, masks: dict | None = None) -> dict:
        """:meth:`_totals` measured through the layers (``MacCounter.count``, the layers' kept
        entries) under ``masks`` (default: now): the oracle of :class:`Tally`."""
        sites = self._sites()
        saved = None
        if masks is not None:  # evaluate a tentative state: swap it in, measure, swap back
            saved = {k: t.clone() for k, t in sites.items()}
            for k, t in masks.items():
                sites[k].copy_(t)
        try:
            filters = sum(
                float(t.count_nonzero())
                for (name, site), t in sites.items()
                if site in ("out", "q", "k", "v") and self._is_layer(name)
            )
            totals = {"filters": filters, "weights": self._prunable_weights()}
            totals["macs"] = self.macs.count(self.model)
        finally:
            for k, t in (saved or {}).items():
                sites[k].copy_(t)
        return totals

    def _is_layer(self, name: str) -> bool:
        return not isinstance(self.model.get_submodule(name), NORMS)

    def _prunable_weights(self) -> float:
        total = 0.0
        for name in {m.module for g in self.groups for m in g.members}:
            module = self.model.get_submodule(name)
            if isinstance(module, nn.MultiheadAttention):  # its kept projection weights
                total += attention_macs(module, attention_kept(module), 1.0, 1.0, products=False)
            elif self._is_layer(name):
                total += kept_weights(module)
        return total

    # -- what the options allow ---------------------------------------------------------------
    def _check_reachable(self, steps: int) -> None:
        """Refuse options under which nothing (or less than one unit per step) can be pruned;
        warn, with the reachable level, when the target lies beyond what they allow."""
        alive = self._alive()
        units = [
            (g.name, int(u))
            for g in self.groups
            for u in alive[g.name].nonzero().flatten()[self._floor(g) :]
        ]
        if not units and self.target.level < 1:
            raise ConfigError(self._nothing_to_prune())
        if steps > max(len(units), 1):
            warnings.warn(
                f"steps={steps} is more than the {len(units)} units that can be pruned in all: "
                f"at least {steps - len(units)} steps will prune nothing; choose steps <= "
                f"{max(len(units), 1)}",
                UserWarning,
                stacklevel=3,
            )
        if self.target.level >= 1:
            return
        lowest = self._level_after(units)
        if lowest > self.target.level + 1e-6:
            kind, sparsity = self.target.kind, self.target.kind == "sparsity"
            reach = 1.0 - lowest if sparsity else lowest
            limits = f"min_channels={self.min_channels}" + (
                f", round_to={self.round_to}" if self.round_to else ""
            )
            warnings.warn(
                f"target {kind}={self.target.value:g} cannot be reached: the "
                f"{'highest' if sparsity else 'lowest'} reachable {kind} is {reach:.4f} "
                f"({limits}; ignored layers: {', '.join(sorted(self.ignored)) or 'none'}; "
                "layers outside every prunable group keep all their channels). Pruning will "
                "stop there; lower min_channels or round_to, or ignore fewer layers, to go on.",
                UserWarning,
                stacklevel=3,
            )

    def _nothing_to_prune(self) -> str:
        widest = max(self.groups, key=lambda g: g.size)
        for option, value in (("min_channels", self.min_channels), ("round_to", self.round_to)):
            if value and value >= widest.size:
                return (
                    f"{option}={value} leaves nothing to prune: every prunable group has at "
                    f"most that many units (the widest, {widest.name!r}, has {widest.size}); "
                    f"choose {option} < {widest.size}"
                )
        return (
            "nothing left to prune: every prunable group is already at its minimum "
            f"(min_channels={self.min_channels}, round_to={self.round_to})"
        )

    # -- selection ------------------------------------------------------------------------------
    def _select(self, level: float, scores, alive) -> dict[str, Tensor]:
        ranked = selection.order(self.groups, scores, alive, self.ranking)
        floors = {g.name: self._floor(g) for g in self.groups}
        units = selection.candidates(ranked, alive, floors)
        n = selection.shortest_prefix(len(units), level, self._prefix_levels(units))
        chosen = self._by_group(units[:n])
        if self.round_to:
            chosen = selection.round_groups(
                self.groups, chosen, alive, ranked, floors, self.round_to
            )
        return chosen

    def _floor(self, g: Group) -> int:
        return selection.floor(g, self.min_channels, self.round_to)

    def _by_group(self, units: list[tuple[str, int]]) -> dict[str, Tensor]:
        return selection.by_group(self.groups, units)

    def _level_after(self, units: list[tuple[str, int]]) -> float:
        """The level reached if ``units`` (``(group name, unit)`` pairs) were pruned now."""
        return self._prefix_levels(units)(len(units))

    def _prefix_levels(self, units: list[tuple[str, int]]) -> Callable[[int], float]:
        """``n -> the level reached if the first n of units were pruned now``. Only the
        target's count is computed, from the masks alone (no weight is built, nothing run)."""
        if self._exact:
            return lambda n: self._exact_level_after(units[:n])
        tally, key = self._tally, _MEASURED[self.target.kind]
        state, ids = tally.state(), tally.ids(units)
        return lambda n: tally.count(key, tally.after(state, ids[:n])) / self.initial[key]

    def _exact_level_after(self, units: list[tuple[str, int]]) -> float:
        state = {k: t.clone() for k, t in self._sites().items()}
        groups = {g.name: g for g in self.groups}
        for name, chosen in self._by_group(units).items():
            for m in groups[name].members:
                hit = torch.isin(m.units, chosen)
                state[(m.module, m.site)][m.idxs[hit].to(state[(m.module, m.site)].device)] = 0
        totals = self._exact_totals(state)
        return self._level_of(totals)

    def _level_of(self, totals: dict) -> float:
        key = _MEASURED[self.target.kind]
        return totals[key] / self.initial[key]

    def _apply(self, chosen: dict[str, Tensor]) -> None:
        groups = {g.name: g for g in self.groups}
        with torch.no_grad():
            for name, units in chosen.items():
                if not len(units):
                    continue
                for m in groups[name].members:
                    mask = self._mask(m)
                    hit = torch.isin(m.units, units)
                    mask[m.idxs[hit].to(mask.device)] = 0


def _check_ignored(ignored) -> None:
    """``ignored`` is None, a module name or an iterable of module names."""
    if ignored is None or isinstance(ignored, str):
        return
    items = list(ignored) if isinstance(ignored, Iterable) else None
    if items is None or not all(isinstance(n, str) for n in items):
        raise ConfigError(
            f"ignored must be a module name or a list of module names, got {ignored!r}"
        )


def _resolve_ignored(model: nn.Module, ignored, example_inputs) -> set[str]:
    names = [n for n, _ in model.named_modules() if n]
    if ignored is None:  # the head and every layer producing the outputs (sparta.heads)
        return protected_layers(model, example_inputs)
    ignored = [ignored] if isinstance(ignored, str) else list(ignored)
    require_modules(ignored, names, "ignored layer")
    return set(ignored)
