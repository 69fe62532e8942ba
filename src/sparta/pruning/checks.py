"""Bad numbers stop a pruning step; they never decide it.

A NaN ranks arbitrarily (every comparison with it is false) and an inf swamps the per-group
normalisation, so a step taken on non-finite losses, scores or weights would remove channels at
random and record it as a decision. The checks here run before any mask changes and raise
:class:`~sparta.errors.NonFiniteError` naming the criterion, the layers and the count of bad
values. Empty example batches, wrong loss types and failures of the caller's model or loss on
a scoring batch become one clear :class:`~sparta.errors.ConfigError` naming the input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from ..errors import ConfigError, NonFiniteError, SpartaError
from ..inputs import describe, tensors
from ..utils import call

ADVICE = (
    "Training has diverged or the data holds NaN/inf: lower the learning rate, clip the "
    "gradients, check the inputs, targets and loss for NaN/inf, or reload the last good "
    "checkpoint."
)
_SHOWN = 6  # names listed in a message before "and N more"
# What a user's model or loss raises on malformed input (SpartaError passes through as it is).
_INPUT_ERRORS = (RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError)
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", MemoryError)


def bad_count(t: Tensor) -> str:
    """``"3 NaN and 1 inf of 64"`` for the non-finite entries of ``t``."""
    t = t.detach()
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    parts = ([f"{nan} NaN"] if nan else []) + ([f"{inf} inf"] if inf else [])
    return " and ".join(parts) + f" of {t.numel()}"


def finite(t: Tensor) -> bool:
    return not t.is_floating_point() or bool(torch.isfinite(t.detach()).all())


def all_finite(ts: Iterable[Tensor]) -> bool:
    """Whether every floating tensor of ``ts`` is finite, with one host sync per device.

    Read from sums (a NaN or inf entry makes the sum non-finite; a sum is one pass without
    the bool copy ``isfinite`` writes: 30x faster on a CPU). A sum can also overflow, so
    ``False`` only means "look entry by entry" (as :func:`check_weights` does)."""
    sums: dict = {}
    for t in ts:
        if t.is_floating_point():
            sums.setdefault(t.device, []).append(t.detach().sum(dtype=torch.float32))
    return all(bool(torch.isfinite(torch.stack(s)).all()) for s in sums.values())


def all_zero(ts: Iterable) -> bool:
    """Whether every count in ``ts`` (tensors or ints) is 0, with one host sync per device."""
    flags: dict = {}
    for t in ts:
        t = torch.as_tensor(t)
        flags.setdefault(t.device, []).append(t.reshape(()))
    return not any(bool(torch.stack(f).any()) for f in flags.values())


def listing(items: list[str]) -> str:
    more = len(items) - _SHOWN
    return ", ".join(items[:_SHOWN]) + (f" and {more} more" if more > 0 else "")


def nonfinite(subject: str, items: list[str], recovery: str = "No mask was changed.") -> None:
    """Raise the one error for bad numbers: what they are in, where, how many, what to do."""
    raise NonFiniteError(f"{subject} hold non-finite values: {listing(items)}. {recovery} {ADVICE}")


# -- options ------------------------------------------------------------------------------------
def check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


# -- the pieces a criterion reads ----------------------------------------------------------------
def check_weights(model: nn.Module, modules: Iterable[str], who: str) -> None:
    """Every parameter and floating buffer of ``modules`` (base weight, bias, adapter factors,
    norm statistics) is finite."""
    named = [
        (f"{name}.{key}" if name else key, t)
        for name in sorted(set(modules))
        for key, t in (
            *model.get_submodule(name).named_parameters(),
            *model.get_submodule(name).named_buffers(),
        )
    ]
    if all_finite(t for _, t in named):  # the usual case: one check per device
        return
    bad = [f"{key} ({bad_count(t)})" for key, t in named if not finite(t)]
    if bad:
        nonfinite(f"{who}: the weights of the pruned layers", bad)


def check_scores(scores: dict[str, Tensor], criterion: str, given: bool) -> None:
    bad = [f"group {k!r} ({bad_count(v)})" for k, v in scores.items() if not finite(v)]
    if bad:
        origin = "the scores passed to step()" if given else f"criterion {criterion!r}: scores"
        nonfinite(origin, bad)


def check_entries(entries: dict, criterion: str, batch: int) -> None:
    """Per-channel activations/gradients of one scoring batch, before they are added up."""
    bad = [f"{m!r} ({bad_count(v)})" for (m, _), v in entries.items() if not finite(v)]
    if bad:
        nonfinite(
            f"criterion {criterion!r}: the activations or gradients of scoring batch {batch}",
            bad,
            "The batch was not counted and no mask was changed.",
        )


def check_loss(loss, criterion: str, batch: int) -> Tensor:
    """The scalar, finite, differentiable loss of a scoring batch."""
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        got = (
            f"a tensor of shape {tuple(loss.shape)}"
            if isinstance(loss, Tensor)
            else type(loss).__name__
        )
        raise ConfigError(
            f"loss_fn must return a scalar tensor, got {got} on scoring batch {batch} "
            f"(criterion {criterion!r}); reduce it to one value, e.g. with a mean over the batch"
        )
    if not finite(loss):
        raise NonFiniteError(
            f"criterion {criterion!r}: the loss of scoring batch {batch} is "
            f"{float(loss.detach())}. The batch was not counted and no mask was changed. {ADVICE}"
        )
    if not loss.requires_grad:
        raise ConfigError(
            f"criterion {criterion!r}: the loss of scoring batch {batch} does not depend on the "
            "model's outputs (it has no gradient); loss_fn(outputs, targets) must compute it "
            "from `outputs` without detaching them or converting them to numbers"
        )
    return loss.reshape(())


def check_outputs(outputs, criterion: str, batch: int) -> None:
    bad = [f"output {describe(t)} ({bad_count(t)})" for t in tensors(outputs) if not finite(t)]
    if bad:
        nonfinite(
            f"criterion {criterion!r}: the model's outputs on scoring batch {batch}",
            bad,
            "The batch was not counted and no mask was changed.",
        )


# -- the caller's code on a scoring batch --------------------------------------------------------
def guarded(fn: Callable, what: str):
    """``fn()``; an error of the caller's model or loss on bad input becomes a ConfigError
    saying ``what`` failed (the original is chained)."""
    try:
        return fn()
    except (SpartaError, _OUT_OF_MEMORY):  # already clear, or not about the input: as is
        raise
    except _INPUT_ERRORS as exc:
        raise ConfigError(f"{what}: {type(exc).__name__}: {exc}") from exc


def run_model(model: nn.Module, inputs, batch: int):
    what = f"the model failed on scoring batch {batch} (inputs {describe(inputs)})"
    return guarded(lambda: call(model, inputs), what)


def run_loss(loss_fn: Callable, outputs, targets, batch: int):
    what = (
        f"loss_fn failed on scoring batch {batch} (outputs {describe(outputs)}, targets "
        f"{describe(targets)})"
    )
    return guarded(lambda: loss_fn(outputs, targets), what)


def check_batches(batches, loss_fn) -> Iterable:
    """``iter(batches)`` after checking that ``batches`` and ``loss_fn`` can be used."""
    if not callable(loss_fn):
        raise ConfigError(
            f"loss_fn must be a function (outputs, targets) -> scalar loss tensor, got "
            f"{type(loss_fn).__name__}"
        )
    if isinstance(batches, Tensor | dict) or not isinstance(batches, Iterable):
        raise ConfigError(
            "batches must be an iterable of (inputs, targets) pairs (a list or a DataLoader), "
            f"got {type(batches).__name__}"
        )
    return iter(batches)


def check_given_scores(scores, groups) -> dict[str, Tensor]:
    """Scores from the caller (``Pruner.step(scores)``) as float64 tensors, checked to hold one
    number per unit of every group of ``groups``."""
    if not isinstance(scores, Mapping):
        raise ConfigError(
            f"scores must be a dict {{group name: one score per unit}}, got {type(scores).__name__}"
        )
    out = {}
    for k, v in scores.items():
        try:
            out[k] = torch.as_tensor(v).detach().double().cpu()
        except (TypeError, ValueError, RuntimeError):
            raise ConfigError(
                f"scores[{k!r}] must be numbers, one per unit, got {type(v).__name__}"
            ) from None
    expected = {g.name: g.size for g in groups}
    wrong = sorted(set(expected) ^ set(out))
    wrong += [k for k in expected if k in out and tuple(out[k].shape) != (expected[k],)]
    if wrong:
        detail = ", ".join(
            f"{k!r}: expected {expected[k] if k in expected else 'no entry'}, got "
            + (str(tuple(out[k].shape)) if k in out else "none")
            for k in wrong[:5]
        )
        raise ConfigError(
            f"scores must give one score per unit of every group ({len(expected)} groups); "
            f"got {len(out)} entries ({detail})"
        )
    return out
