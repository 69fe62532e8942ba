"""Experiment runner: training loop, the paper's prune-and-recover protocol, resumable
checkpoints and data-parallel (DDP) runs. See :func:`run`; :func:`recipes` lists the named
presets of :class:`~sparta.config.RunConfig` (``RunConfig.from_recipe("paper")``)."""

from ..config import get_recipe, recipes
from .build import adapter_options, build_model, example_inputs, load_datasets, pruner_for_run
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, seed_everything, set_rng_state
from .distributed import DistState, reduce_scores
from .loop import (
    EpochBatchSampler,
    derive_seed,
    evaluate,
    make_loader,
    make_optimizer,
    make_scheduler,
    param_groups,
    train_one_epoch,
    trainable_parameters,
)
from .records import CHECKPOINT, LOG, RESULT, TASK, RunResult
from .runner import run

__all__ = [
    "CHECKPOINT",
    "DistState",
    "EpochBatchSampler",
    "LOG",
    "RESULT",
    "RunResult",
    "TASK",
    "adapter_options",
    "build_model",
    "derive_seed",
    "evaluate",
    "example_inputs",
    "get_recipe",
    "load_checkpoint",
    "load_datasets",
    "make_loader",
    "make_optimizer",
    "make_scheduler",
    "param_groups",
    "pruner_for_run",
    "recipes",
    "reduce_scores",
    "rng_state",
    "run",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
    "train_one_epoch",
    "trainable_parameters",
]
