"""Experiment tracking: a run's scalars written for TensorBoard (``sparta run --tensorboard``).

Tags (the step axis is the optimiser step counted over the whole run):

- ``train/loss``, ``train/accuracy``: every training batch (this rank's; task loss only);
- ``train/block_density``: every step of a block pruner (fraction of blocks kept);
- ``eval/accuracy``, ``eval/loss`` (test split), ``eval/val_accuracy``, ``eval/val_loss`` (with
  a validation split), ``eval/density`` (filters or blocks kept), ``eval/macs``,
  ``eval/macs_fraction``, ``eval/learned_parameters`` (what the task file stores) and
  ``eval/learned_parameters_paper`` (as the paper's Table 1 counts): every evaluation.

The events go to ``<output_dir>/tensorboard/`` (``tensorboard --logdir <output_dir>``), written
by ``torch.utils.tensorboard``, which needs the ``tensorboard`` package (``pip install
'sparta[tensorboard]'``). Only the main process writes.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import ConfigError

FOLDER = "tensorboard"
#: The fields of an evaluation record written under ``eval/``.
EVAL_KEYS = (
    "accuracy",
    "loss",
    "val_accuracy",
    "val_loss",
    "density",
    "macs",
    "macs_fraction",
    "learned_parameters",
    "learned_parameters_paper",
)


class Tracker:
    """Writes scalars to ``log_dir`` (TensorBoard event files). A closed tracker, or one made
    with ``enabled=False``, writes nothing. ``fresh=True`` (a run started afresh, not resumed)
    first removes the event files an earlier run left in ``log_dir``."""

    def __init__(self, log_dir: str | Path, enabled: bool = True, fresh: bool = False):
        self.writer = None
        if enabled:
            if fresh and Path(log_dir).is_dir():
                for old in Path(log_dir).glob("events.out.tfevents.*"):
                    old.unlink(missing_ok=True)
            self.writer = _writer(Path(log_dir))

    def scalar(self, tag: str, value, step: int) -> None:
        if self.writer is None or value is None:
            return
        value = float(value)
        if math.isfinite(value):
            self.writer.add_scalar(tag, value, int(step))

    def train_step(self, step: int, stats: dict) -> None:
        """One training batch: its ``loss`` and ``accuracy``."""
        self.scalar("train/loss", stats.get("loss"), step)
        self.scalar("train/accuracy", stats.get("accuracy"), step)

    def evaluation(self, step: int, record: dict) -> None:
        """One evaluation record of the runner (see :data:`EVAL_KEYS`)."""
        for key in EVAL_KEYS:
            self.scalar(f"eval/{key}", record.get(key), step)
        self.flush()

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "--tensorboard (tensorboard=True) needs the tensorboard package, not installed: "
            "pip install 'sparta[tensorboard]' (or pip install tensorboard), or drop the option"
        ) from None
    return SummaryWriter(log_dir=str(log_dir))
