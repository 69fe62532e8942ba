"""Block pruning in a run (``pruner="blocks"``, the default for ``splopa``).

Unlike channel pruning (scored between training phases, recovery after each step), a block
pruner follows training (Sanh et al. 2020): it steps after every optimiser step, from all
blocks at the start to ``target`` (the fraction of blocks kept) along a cubic schedule, with no
pruning in the first ``warmup`` share of the training steps and the final masks fixed for the
last ``cooldown`` share. A run of ``epochs`` epochs is therefore ``epochs`` training stages,
each followed by an evaluation; ``steps``, ``recovery_epochs``, ``criterion`` and
``scoring_batches`` (the channel pruner's settings) are not used. Criteria with a loss term
(soft-movement, l0) add ``penalty * pruner.penalty()`` to every batch's loss (``penalty``
defaults to 1).

A checkpoint holds the pruner's position (steps taken, history, whether the masks are final)
and its criterion's running state (accumulated scores, learned gates and their optimiser), so
a resumed run continues the same schedule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..config import RunConfig
from ..errors import ConfigError


def make_block_pruner(config: RunConfig, model: nn.Module, example, steps_per_epoch: int):
    """The run's block pruner over ``config.epochs * steps_per_epoch`` optimiser steps."""
    from ..pruning import make_pruner

    total = config.epochs * steps_per_epoch
    if total < 1:
        raise ConfigError(
            f"the blocks pruner prunes while training, but this run trains no step (epochs "
            f"{config.epochs}, {steps_per_epoch} batches per epoch): set --epochs >= 1"
        )
    granularity = config.granularity
    if "," in granularity:
        granularity = tuple(granularity.split(","))
    return make_pruner(
        model,
        pruner="blocks",
        criterion=config.block_criterion,
        target=float(config.target),
        total_steps=total,
        warmup_steps=round(config.warmup * total),
        cooldown_steps=round(config.cooldown * total),
        granularity=granularity,
        ranking=config.ranking,
        example_inputs=example,
    )


def penalty_term(config: RunConfig, pruner) -> Callable[[], Tensor] | None:
    """``penalty * pruner.penalty()`` for criteria with a loss term, else ``None``."""
    from ..config.pruning import has_penalty
    from ..pruning.block_criteria import get_block_criterion

    if not has_penalty(get_block_criterion(config.block_criterion)):
        return None
    weight = 1.0 if config.penalty is None else config.penalty
    return lambda: weight * pruner.penalty()


def block_stages(config: RunConfig) -> list[tuple[str, int]]:
    """One training epoch then one evaluation (numbered by the epoch), ``epochs`` times."""
    stages: list[tuple[str, int]] = []
    for epoch in range(1, config.epochs + 1):
        stages += [("train", 0), ("eval", epoch)]
    return stages


# -- checkpoints ---------------------------------------------------------------------------------
def pruner_state(pruner) -> dict:
    """What a resumed run needs of the pruner besides the model's masks."""
    return {
        "history": pruner.history_dicts(),
        "steps_done": pruner.steps_done,
        "final": pruner.final,
        "criterion": _criterion_state(pruner.criterion),
    }


def restore_pruner(pruner, state: dict) -> None:
    """Put ``pruner`` (fresh, on a model whose masks are already restored) where
    :func:`pruner_state` found it."""
    from ..pruning.blocks import BlockStep

    pruner.history = [BlockStep(**d) for d in state["history"]]
    pruner.steps_done = int(state["steps_done"])
    _load_criterion_state(pruner.criterion, state["criterion"])
    pruner._live = pruner._live_blocks()  # the live-block cache follows the restored masks
    if state["final"]:
        pruner.detach()
        pruner.final = True


def _criterion_state(criterion) -> dict:
    """The criterion's tensors (or lists of them) and optimiser state, by attribute name."""
    out: dict = {}
    for key, value in vars(criterion).items():
        if isinstance(value, Tensor):
            out[key] = value.detach().clone()
        elif isinstance(value, list) and value and all(isinstance(t, Tensor) for t in value):
            out[key] = [t.detach().clone() for t in value]
        elif isinstance(value, torch.optim.Optimizer):
            out[key] = value.state_dict()
    return out


def _load_criterion_state(criterion, state: dict) -> None:
    with torch.no_grad():
        for key, value in state.items():
            current = getattr(criterion, key)
            if isinstance(current, torch.optim.Optimizer):
                current.load_state_dict(value)
            elif isinstance(current, Tensor):
                current.copy_(value)
            else:
                for tensor, saved in zip(current, value, strict=True):
                    tensor.copy_(saved)
