"""``SpartaCallback`` for the Hugging Face ``transformers.Trainer``.

    from sparta.integrations.transformers import SpartaCallback

    callback = SpartaCallback("splora", adapter_options={"rank": 8},
                              pruner_options={"criterion": "taylor", "target": 0.5, "steps": 2},
                              export_path="task.sparta")
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()            # wraps, prunes every epoch after the first, exports at the end

The model is wrapped in place when the trainer is made (``on_init_end``), before the trainer
makes its optimiser; a model ``sparta.wrap`` already adapted is taken as it is. Channel
pruning steps follow ``every`` / ``unit`` / ``start``; a block pruner steps after every
optimiser step over the run's ``max_steps``. A criterion's penalty (soft-movement, l0) is added
with ``penalty_weight``: the callback cannot change the trainer's loss, so it back-propagates
``penalty_weight * pruner.penalty()`` before each optimiser step, which adds the same gradient
(no ``Trainer`` subclass is needed). Density, MACs and learned parameters go into every log
(``logs`` of ``on_log`` and ``trainer.state.log_history``) as ``sparta/...``; the reporters
of ``report_to`` (TensorBoard, W&B, ...) are called before user callbacks, so to have them
record these too, train with :class:`SpartaTrainer` (or mix :class:`SpartaTrainerMixin` into
your own ``Trainer`` subclass), which puts them in each log before anyone sees it. At the end the
task is written atomically to ``export_path`` by the main process.

Checkpoints (``save_strategy``) get the schedule's position in ``checkpoint-<step>/``
:data:`STATE_FILE` (the masks are in the model's weights), and ``train(resume_from_checkpoint=...)``
continues the pruning from it; a checkpoint without it (written without the callback) is
refused rather than resumed with a restarted schedule. Importing this module imports
``transformers`` (``pip install 'sparta[hf]'``); ``import sparta`` does not.
"""

from __future__ import annotations

try:
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "sparta.integrations.transformers needs the 'transformers' package: "
        "pip install 'sparta[hf]'"
    ) from exc

import os
from pathlib import Path

from ..errors import ConfigError
from ..train.checkpoint import load_checkpoint, save_checkpoint
from .core import DriverCallback

#: The callback's state in each checkpoint folder the Trainer writes.
STATE_FILE = "sparta_callback.pt"


class SpartaCallback(DriverCallback, TrainerCallback):
    """Wraps, prunes, logs and exports during ``Trainer.train()``; the arguments are those of
    :class:`~sparta.integrations.core.PruningDriver` (``unit`` counts ``"epochs"`` or
    optimiser ``"steps"``). After training, :attr:`pruner` and :attr:`task` hold the pruner
    and the exported task."""

    def prepare(self, model):
        """Wrap ``model`` now (in place) if the trainer's optimiser is made before
        ``on_init_end``, e.g. passed to ``Trainer(optimizers=...)``."""
        return self.driver.prepare(model)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.driver.prepare(model)

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kw):
        if self.driver.penalty_weight and not hasattr(TrainerCallback, "on_pre_optimizer_step"):
            raise ConfigError(
                "penalty_weight needs transformers >= 4.43 (the on_pre_optimizer_step event, "
                "where the penalty's gradient is added): pip install -U transformers"
            )
        if state.global_step > 0:  # resumed: the Trainer loaded a checkpoint's state
            self.driver.load_state_dict(load_checkpoint(_state_file(args, state))["driver"])
        self.driver.begin(model, train_dataloader, state.max_steps, int(state.num_train_epochs))
        self._loader = train_dataloader

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            save_checkpoint(folder / STATE_FILE, {"driver": self.driver.state_dict()})

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.driver.before_optimizer_step()

    def on_step_end(self, args, state, control, **kwargs):
        if self.driver.after_optimizer_step(lambda: self._loader):
            control.should_log = True  # the new density is logged at once

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.driver.after_epoch(lambda: self._loader):
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        metrics = self.driver.metrics()
        if logs is not None:
            logs.update(metrics)
        if state.log_history:  # the trainer appended a copy of ``logs`` before calling us
            state.log_history[-1].update(metrics)

    def on_train_end(self, args, state, control, **kwargs):
        self.driver.finish(is_main=state.is_world_process_zero)


def _state_file(args, state) -> Path:
    """The callback's state in the checkpoint the Trainer resumed from: the folder of its
    step under ``output_dir`` (what ``resume_from_checkpoint=True`` picks), or
    ``args.resume_from_checkpoint`` when that names a folder."""
    folders = [Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"]
    if isinstance(args.resume_from_checkpoint, str | os.PathLike):
        folders.insert(0, Path(args.resume_from_checkpoint))
    for folder in folders:
        if (folder / STATE_FILE).is_file():
            return folder / STATE_FILE
    raise ConfigError(
        f"training resumes at step {state.global_step}, but no {STATE_FILE} (the pruning "
        f"schedule's position) is in {' or '.join(str(f) for f in folders)}: the checkpoint was "
        "written without the SpartaCallback or moved; resume from a checkpoint of a run with "
        "the callback (a checkpoint elsewhere: also pass TrainingArguments("
        "resume_from_checkpoint=<its folder>)), or train from the start"
    )


class SpartaTrainerMixin:
    """Mixed into a ``Trainer`` subclass (``class MyTrainer(SpartaTrainerMixin, Trainer)``):
    every log gets the ``sparta/...`` figures of its :class:`SpartaCallback` before any
    callback sees it, so the reporters of ``report_to`` (TensorBoard, W&B) record them too."""

    def log(self, logs, *args, **kwargs):
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, SpartaCallback):
                logs.update(callback.driver.metrics())
        return super().log(logs, *args, **kwargs)


class SpartaTrainer(SpartaTrainerMixin, Trainer):
    """``transformers.Trainer`` whose logs carry the :class:`SpartaCallback` figures for every
    reporter; otherwise the same."""
