"""Block pruning of SPLoPA adapters: which p x q blocks of each adapted weight stay.

:class:`BlockPruner` runs alongside training (Sanh et al. 2020, "Movement Pruning"): call
``pruner.step()`` after every optimiser step; it follows a schedule (by default cubic with
initial and final warm-up) from all blocks to ``target``, the fraction of blocks kept, and
writes zeros into each adapter's ``mask_block``. It never writes a one, so pruned blocks cannot
regrow. Block criteria are registered by name (:func:`list_block_criteria`):

* ``magnitude``: Frobenius norm of the block of ``W + delta``;
* ``activation``: the block's output energy on the data seen, ``sqrt(sum W'^2 E[x^2])``
  (Wanda, Sun et al. 2023, per block): needs no gradient, so it is the one to use when the
  model is distilled from its own original, whose gradients are all zero at the start;
* ``movement``: first-order movement scores, ``S = -sum_t sum_block (W + delta) * dL/dW'``
  accumulated over the training steps from the gradient of the effective weight
  ``W' = (W + delta) * M`` (what the straight-through top-k of Sanh et al. feeds the scores,
  taken with plain SGD at rate 1; ranking is scale-free);
* ``soft-movement``: learned scores ``S`` gate the blocks in the forward (``1[S > threshold]``,
  straight-through); ``penalty()`` is the mean ``sigmoid(S)`` over live blocks (Sanh's L1);
* ``l0``: hard-concrete gates per block (Louizos et al. 2018); ``penalty()`` is the expected
  fraction of open gates. Once the final level is reached the gates leave the forward and the
  kept blocks run at full weight: the masks are then deterministic.

Learned scores and gates are trained by the pruner's own Adam (``lr`` option) from the
gradients of the caller's ``backward``. Granularity ``heads`` / ``neurons`` prunes whole
Hugging Face attention heads (their q/k/v rows and output columns) or FFN neurons. Whatever the
granularity, heads and neurons whose contribution is exactly zero are then marked dead in the
channel masks (:func:`promote_dead_units`), so ``sparta.build`` removes them physically (the
"hybrid filled" model of Lagunas et al. 2021); partly pruned weights keep their zero blocks.

Gates act on the training (gradient) path only: a forward under ``torch.no_grad()`` sees every
live block at full weight, which is what the model computes once the pruner has detached.
Only SPLoPA adapters of ``nn.Linear`` layers are pruned (SPLoPA adapts no convolution; those
inside ``nn.MultiheadAttention`` parametrisations are left alone).
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..adapters.splopa import SPLoPA
from ..errors import ConfigError
from ..inputs import check_nonempty, input_spec
from ..masks import alive_units, kept_weights
from ..measure import MacCounter
from .block_criteria import PrunerHook, get_block_criterion
from .block_select import choose_units, given_scores
from .block_units import block_units, splopa_layers, structured_units
from .checks import bad_count, check_int, check_weights, finite, nonfinite
from .groups import _transformer_groups
from .promotion import promote_dead_units
from .protocol import PrunerBase, check_progress
from .schedules import Schedule, get_schedule, level_at

GRANULARITIES = ("blocks", "heads", "neurons")


# -- the pruner ----------------------------------------------------------------------------------
@dataclass
class BlockStep:
    step: int
    level: float  # scheduled fraction of blocks kept (of the granularity's scope)
    density: float  # reached fraction of live blocks (of the same scope)
    pruned: int  # blocks pruned at this step
    promoted: dict  # {heads/FFN group: units cleared in the channel masks}


class BlockPruner(PrunerBase):
    """Prunes the blocks of every SPLoPA-adapted ``nn.Linear`` of ``model`` during training
    (the protocol's ``"blocks"`` pruner; see :class:`~sparta.pruning.protocol.PrunerBase`).

    Args:
        model: a model wrapped by ``sparta.wrap(..., "splopa")``.
        criterion: a block criterion (:func:`list_block_criteria`).
        target: fraction of blocks kept at the end, in (0, 1], over every pruned layer
            (``granularity="blocks"``) or over the blocks of the heads / FFN neurons.
        total_steps, warmup_steps, cooldown_steps: the training steps (``step()`` calls) the
            schedule spans; no pruning during the first ``warmup_steps``, the target reached
            ``cooldown_steps`` before the end (Sanh et al. 2020).
        schedule: a name or function of :mod:`~sparta.pruning.schedules` (default cubic).
        granularity: ``"blocks"``, ``"heads"``, ``"neurons"`` or ``("heads", "neurons")``.
        ranking: ``"global"`` (one ranking of all units) or ``"local"`` (the same fraction
            in every layer, attention module or FFN). Every group keeps at least one unit.
        example_inputs: a batch the model accepts (optional): with it, :meth:`achieved`
            counts MACs (else ``macs`` is None) and ``sparta.export`` records the input spec.
        criterion_options: e.g. ``lr``, ``init``, ``threshold`` (soft-movement), ``beta`` (l0).

    Use: ``loss = task_loss + lam * pruner.penalty(); loss.backward(); opt.step();
    pruner.step()``. Once the final level is reached the pruner detaches from the model
    (``final``); the masks then say everything, ``sparta.export`` and ``sparta.build`` apply.
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: str = "movement",
        target: float = 0.5,
        total_steps: int = 1,
        warmup_steps: int = 0,
        cooldown_steps: int = 0,
        schedule: str | Schedule = "cubic",
        granularity: str | tuple[str, ...] = "blocks",
        ranking: str = "global",
        example_inputs=None,
        **criterion_options,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"BlockPruner expects a torch.nn.Module, got {type(model).__name__}")
        if isinstance(target, bool) or not isinstance(target, numbers.Real) or not 0 < target <= 1:
            raise ConfigError(f"target (fraction of blocks kept) must be in (0, 1], got {target!r}")
        if ranking not in ("global", "local"):
            raise ConfigError(f"ranking must be 'global' or 'local', got {ranking!r}")
        items = [granularity] if isinstance(granularity, str) else granularity
        items = list(items) if isinstance(items, tuple | list) else [None]
        kinds = set(items) if all(isinstance(k, str) for k in items) else set()
        if not kinds or not kinds <= set(GRANULARITIES) or ("blocks" in kinds and len(kinds) > 1):
            raise ConfigError(
                f"granularity must be 'blocks', 'heads', 'neurons' or ('heads', 'neurons'), "
                f"got {granularity!r}"
            )
        check_int("total_steps", total_steps, 1)
        check_int("warmup_steps", warmup_steps, 0)
        check_int("cooldown_steps", cooldown_steps, 0)
        cls = get_block_criterion(criterion)
        self.model, self.target, self.ranking = model, float(target), ranking
        self.total_steps, self.warmup, self.cooldown = total_steps, warmup_steps, cooldown_steps
        self.schedule = get_schedule(schedule)
        level_at(1, total_steps, self.target, self.schedule, warmup_steps, cooldown_steps)
        self.layers = splopa_layers(model)
        self.groups = _transformer_groups(model)
        self._structured = kinds != {"blocks"}
        if kinds == {"blocks"}:
            self.units = block_units(self.layers)
        else:
            self.units = structured_units(self.layers, self.groups, kinds)
        self._scope = torch.zeros(sum(lay.count for lay in self.layers), dtype=torch.bool)
        self._scope[self.units.block_of] = True
        self._warn_unreachable()
        self.criterion = cls(self.layers, **criterion_options)
        self.macs = self._mac_counter(example_inputs)  # before any hook: a clean forward
        self._initial = self._totals()
        self.steps_done, self.history, self.final = 0, [], False
        self._live = self._live_blocks()
        if self.criterion.uses_hook:
            self._attach()
        self.criterion.attach()

    granularity = "blocks"

    # -- public API -------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """All ``total_steps`` steps taken."""
        return self.steps_done >= self.total_steps

    @property
    def needs_scoring(self) -> bool:
        """False: every block criterion learns from the training batches themselves (hooks
        on the forward and backward passes) or reads weights only."""
        return False

    @property
    def total(self) -> int:
        return self.total_steps

    def score(self, batches, loss_fn, progress=None) -> int:
        """Nothing to score apart from training (:attr:`needs_scoring` is False): returns 0
        without reading ``batches``; kept so that both pruners are driven alike."""
        check_progress(progress)
        return 0

    def importance(self) -> Tensor:
        """The criterion's raw scores, one per block of every pruned layer (float64, CPU)."""
        return self.criterion.scores()

    def achieved(self) -> dict:
        """Block density (live blocks over those the target counts), weight sparsity of the
        pruned layers, MAC fraction and count per example (None without ``example_inputs``)
        and learned parameters (``learned``: as stored, ``learned_paper``: as the paper)."""
        now = self._totals()
        macs = now["macs"]
        return {
            "density": self.density(),
            "sparsity": 1.0 - now["weights"] / self._initial["weights"],
            "macs": None if macs is None else macs / self._initial["macs"],
            "macs_abs": macs,
            **self._learned(),
        }

    def step(self, scores: Tensor | None = None) -> BlockStep:
        """One training step done: update learned scores, prune to the scheduled level.

        From step ``total_steps - cooldown_steps`` on the masks are final: the pruner has
        detached from the model and later steps only count (the cool-down trains the kept
        blocks under the fixed masks).

        NaN/inf met since the last step (gradients, inputs, weights, scores) raise
        :class:`~sparta.NonFiniteError` before any mask changes; the step is not counted.

        ``scores`` (one per block, as :meth:`importance`) replace the criterion's, e.g.
        scores summed over the ranks of a distributed run so that every rank decides alike."""
        if self.done:
            raise ConfigError(f"all {self.total_steps} block pruning steps are done")
        if scores is not None:
            scores = given_scores(scores, self.criterion.total)
        t = self.steps_done + 1
        level = level_at(
            t, self.total_steps, self.target, self.schedule, self.warmup, self.cooldown
        )
        pruned, promoted = 0, {}
        if not self.final:
            self.criterion.check()  # before the criterion learns from bad numbers
            self.criterion.update()
            if level < 1:
                pruned = self._prune(level, self._checked_scores(scores))
            promoted = promote_dead_units(self.model, self.groups)
            self._live = self._live_blocks()
            if t >= self.total_steps - self.cooldown:
                self.detach()
                self.final = True
        self.steps_done = t
        record = BlockStep(t, level, self.density(), pruned, promoted)
        self.history.append(record)
        return record

    def penalty(self) -> Tensor:
        """The criterion's regulariser over live blocks (0 for magnitude and movement): add
        ``lam * pruner.penalty()`` to the loss for soft-movement (L1) and l0 (expected L0)."""
        if self.final:
            return torch.zeros((), device=self.criterion.device)
        return self.criterion.penalty(self._live)

    def parameters(self) -> list[nn.Parameter]:
        """The criterion's learned scores or gates (trained by the pruner's own optimiser)."""
        return self.criterion.parameters()

    def density(self, scope: bool = True) -> float:
        """Live blocks over the blocks the target counts (those of the heads / FFN neurons
        for those granularities), or over every block of the adapted layers (``scope=False``)."""
        live = self._live[self._scope] if scope else self._live
        return float(live.double().mean())

    def summary(self) -> dict:
        heads = [g for g in self.groups if g.kind == "heads"]
        neurons = [g for g in self.groups if g.kind == "neurons"]
        return {
            "blocks_kept": int(self._live.sum()),
            "blocks_total": len(self._live),
            "density": self.density(),
            "density_all_layers": self.density(scope=False),
            "heads_removed": sum(g.size - int(alive_units(self.model, g).sum()) for g in heads),
            "heads_total": sum(g.size for g in heads),
            "neurons_removed": sum(g.size - int(alive_units(self.model, g).sum()) for g in neurons),
            "neurons_total": sum(g.size for g in neurons),
        }

    def detach(self) -> None:
        """Take the criterion's hooks (gates, gradient readers) off the model; the masks stay."""
        for lay in self.layers:
            if lay.adapter.__dict__.get("factors_hook") is not None:
                del lay.adapter.factors_hook
        self.criterion.release()

    # -- internals --------------------------------------------------------------------------
    def _warn_unreachable(self) -> None:
        """Every layer (attention module, FFN) keeps a unit: say so when that is above the
        target, with the fraction of blocks it leaves."""
        u = self.units
        size = torch.bincount(u.unit_of, minlength=len(u.group_of))  # a unit's blocks
        smallest = torch.full((len(u.names),), int(size.max())).scatter_reduce(
            0, torch.tensor(u.group_of), size, "amin"
        )
        lowest = float(smallest.sum()) / float(self._scope.sum())
        if lowest > self.target + 1e-9:
            warnings.warn(
                f"target {self.target:g} (fraction of blocks kept) cannot be reached: every one "
                f"of the {len(u.names)} pruned groups keeps at least one unit, which leaves "
                f"{lowest:.4f} of the blocks; pruning will stop there",
                UserWarning,
                stacklevel=3,
            )

    def _attach(self) -> None:
        index = {lay.adapter: lay for lay in self.layers}
        criterion = self.criterion

        def hook(adapter: SPLoPA, masked: Tensor) -> Tensor:
            lay = index.get(adapter)  # a model sharing this hook some other way: not pruned
            return masked if lay is None else criterion.hook(lay, masked)

        for lay in self.layers:
            if lay.adapter.factors_hook is not None:
                raise ConfigError(f"{lay.name!r} is already driven by another BlockPruner")
            lay.adapter.factors_hook = PrunerHook(hook, passthrough=1)

    def _live_blocks(self) -> Tensor:
        return torch.cat([lay.adapter._live_blocks().flatten().cpu() for lay in self.layers])

    def _mac_counter(self, example_inputs) -> MacCounter | None:
        if example_inputs is None:
            return None
        check_nonempty(example_inputs, "example_inputs")
        spec = input_spec(example_inputs)
        counter = MacCounter(self.model, example_inputs)
        self.model.sparta_inputs = spec  # for sparta.export, as the channel Pruner records it
        return counter

    def _totals(self) -> dict:
        """Kept weight entries of the pruned layers; MACs per example (None if unknown)."""
        weights = sum(kept_weights(lay.layer) for lay in self.layers)
        return {
            "weights": weights,
            "macs": None if self.macs is None else self.macs.count(self.model),
        }

    def _checked_scores(self, given: Tensor | None = None) -> Tensor:
        """The criterion's scores (or ``given`` ones); NaN/inf in them or in the pruned
        layers' weights (which a criterion that reads only gradients or gates would not see)
        are refused."""
        name = f"block criterion {self.criterion.name!r}"
        check_weights(self.model, [lay.name for lay in self.layers], name)
        scores = self.criterion.scores() if given is None else given.clone()
        if finite(scores):
            return scores
        parts = [(lay, scores[lay.offset : lay.offset + lay.count]) for lay in self.layers]
        nonfinite(
            f"{name}: the block scores",
            [f"{lay.name!r} ({bad_count(p)})" for lay, p in parts if not finite(p)],
        )

    def _block_scores(self, live: Tensor, scores: Tensor) -> Tensor:
        # Scale each layer's scores to RMS 1 where units are compared across layers: in a
        # global ranking, and in heads / neurons, whose blocks sit in several layers.
        if self.criterion.normalise and (self.ranking == "global" or self._structured):
            for lay in self.layers:
                part = scores[lay.offset : lay.offset + lay.count]
                kept = part[live[lay.offset : lay.offset + lay.count]]
                part /= kept.square().mean().sqrt() + 1e-12 if len(kept) else 1.0
        return scores

    def _prune(self, level: float, scores: Tensor) -> int:
        u, live = self.units, self._live_blocks()
        n_units = len(u.group_of)
        live_e = live[u.block_of].double()
        cost = torch.zeros(n_units, dtype=torch.float64).index_add_(0, u.unit_of, live_e)
        size = torch.zeros(n_units, dtype=torch.float64).index_add_(
            0, u.unit_of, torch.ones_like(live_e)
        )
        # A unit's score: the mean over its live blocks, or over those that take its output
        # for criteria that measure what a unit passes on (activation).
        weight_e = live_e * u.consumer.double() if self.criterion.consumer_side else live_e
        score_e = self._block_scores(live, scores)[u.block_of] * weight_e
        score = torch.zeros(n_units, dtype=torch.float64).index_add_(0, u.unit_of, score_e)
        weight = torch.zeros(n_units, dtype=torch.float64).index_add_(0, u.unit_of, weight_e)
        score /= weight.clamp(min=1)
        closed = self.criterion.closed()
        shut = torch.zeros(n_units, dtype=torch.bool)
        if closed is not None:
            open_e = (live & ~closed)[u.block_of].double()
            opened = torch.zeros(n_units, dtype=torch.float64).index_add_(0, u.unit_of, open_e)
            shut = (cost > 0) & (opened == 0)
        group = torch.tensor(u.group_of)
        sets = [torch.arange(n_units)] if self.ranking == "global" else [
            (group == i).nonzero().flatten() for i in range(len(u.names))
        ]  # fmt: skip
        kept = torch.zeros(len(u.names), dtype=torch.long).index_add_(0, group, (cost > 0).long())
        chosen = []
        for members in sets:
            chosen += choose_units(
                members, level, self.target, cost, size, score, shut, kept, group
            )
        if not chosen:
            return 0
        blocks = u.block_of[torch.isin(u.unit_of, torch.tensor(chosen))]
        with torch.no_grad():
            for lay in self.layers:
                local = blocks[(blocks >= lay.offset) & (blocks < lay.offset + lay.count)]
                lay.adapter.mask_block.view(-1)[
                    (local - lay.offset).to(lay.adapter.mask_block.device)
                ] = 0
        return int(live[blocks].sum())
