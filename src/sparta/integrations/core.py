"""What the trainer callbacks share: wrap, schedule, score, step, penalise, measure, export.

:class:`PruningDriver` knows nothing of Hugging Face or Lightning; each callback calls it from
its trainer's hooks:

* :meth:`prepare` wraps the model in place before the optimiser is made (or accepts a model
  that ``sparta.wrap`` already adapted, or a plain one for fine-pruning);
* :meth:`begin` makes the pruner (``sparta.make_pruner``) from the first training batch, once
  the trainer knows how many optimiser steps and epochs it will run;
* :meth:`before_optimizer_step` adds ``penalty_weight * pruner.penalty()`` to the gradients
  (exactly what adding it to the loss does: the gradient of a sum is the sum of gradients;
  the trainers' callbacks cannot change their loss, so the term is back-propagated alone);
* :meth:`after_optimizer_step` / :meth:`after_epoch` take the pruning steps that are due:
  a block pruner steps after every optimiser step (its own schedule has warm-up and
  cool-down); a channel pruner scores ``scoring_batches`` training batches and steps every
  ``every`` units (``"steps"`` or ``"epochs"``) after the first ``start``, with recovery
  training in between;
* :meth:`metrics` is what the callbacks log; :meth:`finish` exports the task atomically;
* :meth:`state_dict` / :meth:`load_state_dict` carry the schedule's position through the
  trainers' checkpoints (the masks travel in the model's own state): units counted, the
  pruner's history, and a block pruner's steps, final flag and criterion state (accumulated
  scores, learned gates and their optimiser), so that a resumed run continues the schedule.
  The pruner masks plain layers (norms, the head) by parametrising their weights, which
  renames them in the model's state (``norm.parametrizations.weight.original``); a resumed
  model has no pruner yet, so :meth:`prepare` gives it a ``load_state_dict`` pre-hook that
  first adds the masks a loaded state holds (:func:`add_saved_masks`); without it the Trainer
  (which loads leniently) silently dropped those tensors, and Lightning refused the checkpoint.

Distributed runs decide alike on every rank, as ``sparta run`` does
(:mod:`sparta.train.distributed`): a channel criterion's scores are summed over the ranks; a
block criterion's accumulated scores too, and its learned gates get their gradients averaged
over the ranks before its own optimiser steps (they are not the model's, so DDP leaves them).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from .. import export, make_pruner, wrap
from ..adapters import AdaptedLayer
from ..errors import ConfigError
from ..masks import ensure_masks, submodule
from ..pruning import StepRecord
from ..pruning.factory import infer_granularity
from ..train.block_run import pruner_state, restore_pruner
from ..train.distributed import DistState, all_reduce_sum, reduce_scores, scoring_share
from ..utils import evaluating

UNITS = ("epochs", "steps")


def default_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """The loss of the targets' kind, as Hugging Face's classifiers choose it from their labels
    (``problem_type``): integer targets, cross-entropy over the last dimension of ``logits``
    (any leading shape, e.g. tokens; targets equal to -100 are ignored); float targets, mean
    squared error for a single output (regression) or binary cross-entropy on each output
    (multi-label, targets shaped like ``logits``)."""
    if not targets.is_floating_point():
        flat = logits.reshape(-1, logits.shape[-1])
        return nn.functional.cross_entropy(flat, targets.reshape(-1))
    if logits.shape[-1] == 1 and logits.numel() == targets.numel():
        return nn.functional.mse_loss(logits.reshape(-1), targets.reshape(-1).to(logits.dtype))
    if logits.shape == targets.shape:
        return nn.functional.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))
    raise ConfigError(
        f"the default loss takes integer class targets, float targets for one output "
        f"(regression) or float targets shaped like the outputs (multi-label); got outputs "
        f"{tuple(logits.shape)} and {targets.dtype} targets {tuple(targets.shape)}: pass "
        "loss_fn=<function (outputs, targets) -> loss>"
    )


def default_split(batch) -> tuple:
    """``(inputs, targets)`` of a training batch: a pair as it is, or a dict of model inputs
    whose ``labels`` (or ``label``) entry is the target (Hugging Face's convention)."""
    if isinstance(batch, tuple | list) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, dict):
        key = "labels" if "labels" in batch else "label" if "label" in batch else None
        if key is not None:
            return {k: v for k, v in batch.items() if k != key}, batch[key]
    kind = f"dict with keys {sorted(batch)}" if isinstance(batch, dict) else type(batch).__name__
    raise ConfigError(
        f"a training batch must be a pair (inputs, targets) or a dict with a 'labels' entry, "
        f"got a {kind}; pass split_batch=<function batch -> (inputs, targets)>"
    )


def is_wrapped(model: nn.Module) -> bool:
    return getattr(model, "sparta_report", None) is not None and any(
        isinstance(m, AdaptedLayer) for m in model.modules()
    )


class PruningDriver:
    """The pruning part of a training run (see the module docstring).

    Args:
        adapter: adapter name for ``sparta.wrap`` (e.g. ``"splora"``, ``"splopa"``), or None
            to take the model as it is (already wrapped, or plain for fine-pruning).
        adapter_options: options of ``sparta.wrap`` (``rank``, ``block``, ``include``, ...).
        pruner: ``"channels"``, ``"blocks"`` or None (inferred from the adapter).
        pruner_options: options of the pruner (``criterion``, ``target``, ``steps``, ...; for
            blocks ``total_steps`` defaults to the run's optimiser steps).
        every, unit, start: channel pruning steps every ``every`` units (``"epochs"`` or
            ``"steps"``, i.e. optimiser steps), the first after ``start`` units (default
            ``every``); the units between steps are the recovery training.
        scoring_batches: training batches a data-driven channel criterion scores per step.
        loss_fn: ``loss_fn(logits, targets)`` for scoring (default: cross-entropy).
        split_batch: ``batch -> (inputs, targets)`` (default: a pair, or a dict with labels).
        penalty_weight: ``lam`` of ``loss + lam * pruner.penalty()`` (soft-movement, l0).
        export_path: where the task file is written at the end (atomically), or None.
    """

    def __init__(
        self,
        adapter: str | None = None,
        adapter_options: dict | None = None,
        pruner: str | None = None,
        pruner_options: dict | None = None,
        every: int = 1,
        unit: str = "epochs",
        start: int | None = None,
        scoring_batches: int = 4,
        loss_fn: Callable | None = None,
        split_batch: Callable | None = None,
        penalty_weight: float = 0.0,
        export_path: str | Path | None = None,
    ):
        if adapter is not None and not isinstance(adapter, str):
            raise ConfigError(f"adapter must be an adapter name or None, got {adapter!r}")
        for name, value in (
            ("adapter_options", adapter_options),
            ("pruner_options", pruner_options),
        ):
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{name} must be a dict of options, got {value!r}")
        if unit not in UNITS:
            raise ConfigError(f"unit must be 'epochs' or 'steps', got {unit!r}")
        _check_count("every", every, 1)
        _check_count("start", every if start is None else start, 0)
        _check_count("scoring_batches", scoring_batches, 1)
        number = isinstance(penalty_weight, int | float) and not isinstance(penalty_weight, bool)
        if not (number and math.isfinite(penalty_weight) and penalty_weight >= 0):
            raise ConfigError(
                f"penalty_weight must be a finite number >= 0, got {penalty_weight!r}"
            )
        for name, fn in (("loss_fn", loss_fn), ("split_batch", split_batch)):
            if fn is not None and not callable(fn):
                raise ConfigError(f"{name} must be a function, got {fn!r}")
        self.adapter, self.adapter_options = adapter, dict(adapter_options or {})
        self.granularity, self.options = pruner, dict(pruner_options or {})
        self.every, self.unit = every, unit
        self.start = every if start is None else start
        self.scoring_batches, self.penalty_weight = scoring_batches, float(penalty_weight)
        self.loss_fn = loss_fn or default_loss
        self.split = split_batch or default_split
        self.export_path = None if export_path is None else Path(export_path)
        self.pruner = None
        self.model: nn.Module | None = None
        self.units = 0  # epochs or optimiser steps done
        self.task = None
        self._metrics: dict = {}
        self._resume: dict | None = None
        self._hooked: nn.Module | None = None

    # -- before training ----------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        """Wrap ``model`` in place with the adapter (a wrapped model is taken as it is) and
        return it. Call before the optimiser is made: it must see the adapters' parameters."""
        if not isinstance(model, nn.Module):
            raise ConfigError(f"expected the model to train (an nn.Module), got {model!r}")
        if self.adapter is not None and not is_wrapped(model):
            wrap(model, self.adapter, inplace=True, **self.adapter_options)
        elif self.adapter is not None and model.sparta_report.adapter != self.adapter:
            raise ConfigError(
                f"the model is already wrapped with {model.sparta_report.adapter!r}, not "
                f"{self.adapter!r}: pass adapter=None to take it as it is, or the plain model"
            )
        elif self.adapter_options and not is_wrapped(model):
            raise ConfigError(
                f"adapter_options {sorted(self.adapter_options)} were given without an adapter; "
                "pass adapter='splora' (or another from sparta.list_adapters())"
            )
        if self.export_path is not None and not is_wrapped(model):
            raise ConfigError(
                "export_path needs a model wrapped by sparta.wrap (give adapter=...): a plain, "
                "fine-pruned model has no adapters for sparta.export to store"
            )
        if self._hooked is not model:
            model.register_load_state_dict_pre_hook(_masks_before_load)
            self._hooked = model
        self.model = model
        return model

    def begin(self, model: nn.Module, batches: Iterable, total_steps: int, epochs: int) -> None:
        """Make the pruner, once the run's length is known (``total_steps`` optimiser steps
        over ``epochs`` epochs); ``batches`` gives the example batch (the first one)."""
        if self.model is not model:
            self.prepare(model)
        if self.pruner is not None:
            return
        example, _ = self.split(_first(in_order(batches)))
        example = _to_device(example, _device(model))
        options = dict(self.options)
        kind = self.granularity
        if kind == "blocks" or (kind is None and _has_blocks(model)):
            options.setdefault("total_steps", max(int(total_steps), 1))
        if self._resume is None:
            self.pruner = make_pruner(model, kind, example_inputs=example, **options)
            if self.pruner.granularity == "channels":
                self._check_length(total_steps, epochs)
        else:  # made on the unpruned model, as in the run that wrote the checkpoint
            with unpruned(model):
                self.pruner = make_pruner(model, kind, example_inputs=example, **options)
            self._restore(self._resume)
        self._check_penalty()
        self._metrics = self._measure()

    def _check_length(self, total_steps: int, epochs: int) -> None:
        length = epochs if self.unit == "epochs" else total_steps
        needed = self.start + (self.pruner.total - 1) * self.every
        if needed > length:
            raise ConfigError(
                f"the run is too short for {self.pruner.total} pruning steps: they happen after "
                f"{self.unit} {self.start}, then every {self.every} (the last after {needed}), "
                f"but the run has {length} {self.unit}; train longer, or lower every/start or "
                "the pruner's steps"
            )

    def _check_penalty(self) -> None:
        if self.penalty_weight and self.pruner.granularity == "channels":
            raise ConfigError(
                "penalty_weight applies to block criteria with a regulariser (soft-movement, "
                "l0); channel criteria have none: leave penalty_weight at 0"
            )

    # -- during training ----------------------------------------------------------------------
    def before_optimizer_step(self) -> None:
        """Add ``penalty_weight * d penalty / d theta`` to the gradients (once per step)."""
        if not self.penalty_weight or self.pruner is None or self.pruner.done:
            return
        penalty = self.pruner.penalty()
        if penalty.requires_grad:
            (self.penalty_weight * penalty).backward()

    def after_optimizer_step(self, batches: Callable[[], Iterable]) -> bool:
        """One optimiser step done; returns whether the pruner stepped."""
        if self.pruner is None or self.pruner.done:
            return False
        if self.pruner.granularity == "blocks":
            self._step_blocks()
            return True
        return self._unit_done("steps", batches)

    def after_epoch(self, batches: Callable[[], Iterable]) -> bool:
        """One epoch done; returns whether the pruner stepped."""
        if self.pruner is None or self.pruner.done or self.pruner.granularity == "blocks":
            return False
        return self._unit_done("epochs", batches)

    def _unit_done(self, unit: str, batches: Callable[[], Iterable]) -> bool:
        if unit != self.unit:
            return False
        self.units += 1
        if self.units < self.start or (self.units - self.start) % self.every:
            return False
        state = _dist_state(self.model)
        if self.pruner.needs_scoring:
            scored = self.pruner.score(self._scoring(in_order(batches()), state), self.loss_fn)
            if not scored and not state.enabled:
                raise ConfigError("the training data gave no batch to score")
        self.pruner.step(reduce_scores(self.pruner, state))
        self._metrics = self._measure()
        return True

    def _scoring(self, loader: Iterable, state: DistState) -> Iterator:
        """This rank's share of the first ``scoring_batches`` batches (whole batches dealt
        round-robin, as ``sparta run`` deals them), on the model's device."""
        device, mine = _device(self.model), set(scoring_share(self.scoring_batches, state))
        for i, batch in enumerate(loader):
            if i >= self.scoring_batches:
                return
            if i not in mine:
                continue
            inputs, targets = self.split(batch)
            yield _to_device(inputs, device), _to_device(targets, device)

    def _step_blocks(self) -> None:
        state = _dist_state(self.model)
        scores = None
        if state.enabled:
            with torch.no_grad():
                for p in self.pruner.parameters():  # learned gates: one mean gradient
                    if p.grad is not None:
                        p.grad.copy_(all_reduce_sum(p.grad, state) / state.world_size)
            if not self.pruner.parameters():  # accumulated scores: summed over ranks
                scores = all_reduce_sum(self.pruner.importance(), state)
        self.pruner.step(scores)
        self._metrics = {}

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The schedule's position (see the module docstring); tensors, numbers and strings
        only, so a checkpoint holding it loads with ``torch.load(weights_only=True)``."""
        if self.pruner is None:
            return {"units": self.units, "granularity": None, "pruner": None}
        if self.pruner.granularity == "blocks":
            pruner = pruner_state(self.pruner)
        else:
            pruner = {"history": self.pruner.history_dicts()}
        return {"units": self.units, "granularity": self.pruner.granularity, "pruner": pruner}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` (the model's masks restored by the trainer): now if
        the pruner exists, else when :meth:`begin` makes it."""
        if not isinstance(state, dict) or not {"units", "granularity", "pruner"} <= set(state):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ConfigError(
                f"not a sparta callback state: expected the keys units, granularity and pruner, "
                f"got {got}; resume from a checkpoint written with the SpartaCallback"
            )
        self._resume = state
        if self.pruner is not None:
            self._restore(state)

    def _restore(self, state: dict) -> None:
        saved, now = state["granularity"], self.pruner.granularity
        if saved is not None and saved != now:
            raise ConfigError(
                f"the checkpoint holds a {saved} pruner's state but this run prunes {now}: "
                "resume with the pruner settings the checkpoint was written with"
            )
        self.units = int(state["units"])
        if state["pruner"] is not None and now == "blocks":
            restore_pruner(self.pruner, state["pruner"])
        elif state["pruner"] is not None:
            self.pruner.history = [StepRecord(**d) for d in state["pruner"]["history"]]
        self._resume, self._metrics = None, {}

    # -- measuring and the end ----------------------------------------------------------------
    def metrics(self) -> dict:
        """``{"sparta/density", "sparta/macs", "sparta/learned", ...}`` of the model now."""
        if self.pruner is None:
            return {}
        if not self._metrics:
            self._metrics = self._measure()
        return dict(self._metrics)

    def _measure(self) -> dict:
        achieved = self.pruner.achieved()
        out = {f"sparta/{k}": float(v) for k, v in achieved.items() if v is not None}
        out["sparta/pruning_steps"] = float(len(self.pruner.history))
        return out

    def finish(self, is_main: bool = True):
        """Take the pruner off the model, say if its schedule was cut short, and export the
        task (on the main process) to ``export_path``; returns the task (None if no path)."""
        if self.pruner is None:
            return None
        if not self.pruner.done:
            warnings.warn(
                f"training ended after {len(self.pruner.history)} of {self.pruner.total} pruning "
                f"steps: the target was not reached (achieved: {self.pruner.achieved()})",
                UserWarning,
                stacklevel=3,
            )
        if hasattr(self.pruner, "detach"):
            self.pruner.detach()  # a block pruner's gates and hooks leave the forward
        if self.export_path is None or not is_main:
            return None
        with evaluating(self.model), own_forward(self.model):
            self.task = export(self.model)
        self.task.save(self.export_path)
        return self.task


def driver_signature(*own: inspect.Parameter) -> inspect.Signature:
    """The signature of :class:`PruningDriver` with a callback's ``own`` parameters after
    ``adapter`` (Lightning's ``module``): what ``help`` and ``inspect`` show for a callback."""
    self_, adapter, *rest = inspect.signature(PruningDriver.__init__).parameters.values()
    return inspect.Signature([self_, adapter, *own, *rest])


class DriverCallback:
    """What the trainer callbacks share: their options are those of :class:`PruningDriver`
    (in its order, or by name), which does the work; :attr:`pruner` and :attr:`task` are the
    driver's (after training: the pruner and the exported task)."""

    def __init__(self, *args, **options):
        self.driver = PruningDriver(*args, **options)

    @property
    def pruner(self):
        return self.driver.pruner

    @property
    def task(self):
        return self.driver.task


DriverCallback.__init__.__signature__ = driver_signature()


@contextmanager
def own_forward(model: nn.Module):
    """The model's own ``forward`` meanwhile: accelerate's mixed precision (the Trainer's
    ``bf16`` / ``fp16``) puts an autocast wrapper on the instance (keeping the original as
    ``_original_forward``), and the export checks the compact model against the fp32 forward."""
    patched = "forward" in vars(model) and hasattr(model, "_original_forward")
    wrapper = vars(model).pop("forward") if patched else None
    try:
        yield model
    finally:
        if patched:
            model.forward = wrapper


#: The state key of a plain layer's channel mask (``ensure_masks``): ``<module>`` + this.
MASK_KEY = ".parametrizations.weight.0.mask_out"
#: The names of channel mask buffers (adapters' and plain layers' alike).
MASK_NAMES = ("mask_out", "mask_in")


def add_saved_masks(model: nn.Module, keys: Iterable[str], prefix: str = "") -> list[str]:
    """Give ``model`` the channel masks of plain layers that a saved state (its ``keys``, each
    under ``prefix``) holds and it lacks, so that the state loads; returns their modules."""
    added = []
    for key in keys:
        if not (key.startswith(prefix) and key.endswith(MASK_KEY)):
            continue
        name = key[len(prefix) : -len(MASK_KEY)]
        try:
            module = submodule(model, name)
        except AttributeError:
            raise ConfigError(
                f"the checkpoint masks a layer {name!r} that the model lacks: resume with the "
                "model (and adapter) the checkpoint was written with"
            ) from None
        if ensure_masks(module, create=False)[0] is None:
            ensure_masks(module)
            added.append(name)
    return added


@contextmanager
def unpruned(model: nn.Module):
    """Every channel mask of ``model`` set to ones meanwhile, then put back: a pruner made on
    a resumed model must count the channels it started from (its levels are fractions of
    them), not those the checkpoint kept."""
    masks = [b for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] in MASK_NAMES]
    saved = [m.clone() for m in masks]
    with torch.no_grad():
        for m in masks:
            m.fill_(1)
    try:
        yield model
    finally:
        with torch.no_grad():
            for m, value in zip(masks, saved):
                m.copy_(value)


def _masks_before_load(module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    """A ``load_state_dict`` pre-hook: the masks of the state come first (see the module)."""
    add_saved_masks(module, state_dict, prefix)


def in_order(loader: Iterable) -> Iterable:
    """The batches of ``loader``'s dataset in order, from a plain ``DataLoader`` of its own
    (same batch size and collate function): reading them draws nothing from the random
    generators and leaves the trainer's loader (and a distributed sampler's shard) alone. A
    loader that cannot be rebuilt so (an iterable dataset, no batch size) is read as it is."""
    dataset = getattr(loader, "dataset", None)
    size = getattr(loader, "batch_size", None)
    size = size or getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    if dataset is None or not size or isinstance(dataset, IterableDataset):
        return loader
    # a generator of its own: a DataLoader draws a seed for its workers at every iteration
    own = torch.Generator().manual_seed(0)
    return DataLoader(
        dataset, batch_size=size, shuffle=False, collate_fn=loader.collate_fn, generator=own
    )


def _check_count(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def _first(batches: Iterable):
    for batch in batches:
        return batch
    raise ConfigError("the training data is empty: the pruner needs one batch to trace the model")


def _device(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def _to_device(value, device: torch.device):
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _has_blocks(model: nn.Module) -> bool:
    return infer_granularity(model) == "blocks"


def _dist_state(model: nn.Module) -> DistState:
    """The process group the trainer set up (one process when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistState()
    return DistState(rank=dist.get_rank(), world_size=dist.get_world_size(), device=_device(model))
