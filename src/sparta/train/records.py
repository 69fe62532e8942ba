"""What a run records: the files of its folder, one record per evaluation, ``result.json``
and the :class:`RunResult` handed back (also for a run found complete and read back)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..config import RunConfig, get_recipe
from ..measure import adapter_parameters, learned_parameters
from .report import LOGGER

#: The files of a run's folder.
CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"
TASK = "task.safetensors"
LOG = "run.log"


@dataclass
class RunResult:
    """What :func:`~sparta.train.run` produced. ``model`` is the trained (pruned) model on
    this rank, or ``None`` for a run found complete (``skipped``) and read back from
    ``result.json``."""

    config: RunConfig
    output_dir: Path
    final: dict
    steps: list[dict]
    result: dict
    model: nn.Module | None = None
    skipped: bool = False
    resumed: bool = False
    files: dict[str, Path] = field(default_factory=dict)


def read_back(config: RunConfig, out: Path) -> RunResult:
    """The :class:`RunResult` of the complete run in ``out`` (from its ``result.json``)."""
    result = json.loads((out / RESULT).read_text(encoding="utf-8"))
    files = {k: out / v for k, v in result.get("files", {}).items()}
    return RunResult(
        config, out, result["final"], result["steps"], result, skipped=True, files=files
    )


def evaluation_record(
    model: nn.Module, pruner, macs, metrics: dict, val: dict | None, step: int, epochs: int
) -> dict:
    """One evaluation of ``model`` after pruning step ``step`` (0: before pruning):
    ``metrics`` on the test split, ``val`` on the validation split (``None`` without one), and
    the model's filter density, weight sparsity, MACs (``macs``: its MAC counter) and learned
    parameters in both accountings."""
    achieved = (
        pruner.achieved()
        if pruner
        else {"density": 1.0, "sparsity": 0.0, "macs": 1.0, "macs_abs": None}
    )
    last = pruner.history[-1] if pruner and pruner.history else None
    record = {
        "step": step,
        "level": last.level if last else 1.0,
        "density": achieved["density"],  # filters kept
        "sparsity": achieved["sparsity"],  # prunable weights removed
        "macs_fraction": achieved["macs"],
        "macs": macs.count(model),
        "learned_parameters": learned_parameters(model),
        "learned_parameters_paper": learned_parameters(model, accounting="paper"),
        "adapter_parameters": adapter_parameters(model),  # the adapters' share of both
        "accuracy": metrics["accuracy"],  # test
        "loss": metrics["loss"],
        "val_accuracy": val["accuracy"] if val else None,
        "val_loss": val["loss"] if val else None,
        "epochs_trained": epochs,
    }
    LOGGER.info(
        "evaluation after step %d: test accuracy %.4f, loss %.4f, %s %s density %.4f, "
        "learned parameters %d stored / %d as the paper counts, MACs %d",
        step,
        record["accuracy"],
        record["loss"],
        f"val accuracy {val['accuracy']:.4f}," if val else "",
        "block" if getattr(pruner, "granularity", "channels") == "blocks" else "filter",
        record["density"],
        record["learned_parameters"],
        record["learned_parameters_paper"],
        record["macs"],
    )
    return record


def result_record(config: RunConfig, **parts) -> dict:
    """The content of ``result.json``: format, versions, the config and its recipe, then
    ``parts`` (data sizes, steps, pruning history, final record, timings, files, ...)."""
    return {
        "format": "sparta.result",
        "version": 1,
        "sparta_version": __version__,
        "torch_version": torch.__version__,
        "name": config.name,
        "config": config.to_dict(),
        "recipe": recipe_record(config),
        **parts,
    }


def recipe_record(config: RunConfig) -> dict | None:
    """The recipe the run started from, with the preset's values (``None`` without one)."""
    if config.recipe is None:
        return None
    return {"name": config.recipe, "values": get_recipe(config.recipe).values}
