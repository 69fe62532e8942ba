"""``SpartaCallback`` for Lightning (``lightning.pytorch.Trainer``).

    from sparta.integrations.lightning import SpartaCallback

    callback = SpartaCallback("splora", module="net", adapter_options={"rank": 8},
                              pruner_options={"criterion": "l1", "target": 0.5, "steps": 2},
                              export_path="task.sparta")
    lightning.pytorch.Trainer(max_epochs=3, callbacks=[callback]).fit(lit_module, loader)

``module`` names the network inside the ``LightningModule`` (``lit_module.net``; default: the
LightningModule itself). It is wrapped in place in ``setup``, before Lightning calls
``configure_optimizers``; a network ``sparta.wrap`` already adapted is taken as it is. Training
batches are ``(inputs, targets)`` pairs or dicts with ``labels`` (else pass ``split_batch``).
Channel pruning steps follow ``every`` / ``unit`` / ``start``; a block pruner steps after every
optimiser step over ``trainer.estimated_stepping_batches``. A criterion's penalty (soft-movement,
l0) is added with ``penalty_weight`` by back-propagating it before each optimiser step (the
same gradient as adding it to the loss). Density, MACs and learned parameters are logged with
``pl_module.log_dict`` (so to ``trainer.logger``) as ``sparta/...``; at the end the task is
written atomically to ``export_path`` by global rank 0. Lightning checkpoints carry the
schedule's position (:meth:`SpartaCallback.state_dict`), so ``fit(..., ckpt_path=...)`` continues
the pruning where it stopped. Importing this module imports
``lightning`` (``pip install 'sparta[lightning]'``); ``import sparta`` does not.
"""

from __future__ import annotations

import inspect
import math

try:
    from lightning.pytorch import Callback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "sparta.integrations.lightning needs the 'lightning' package: "
        "pip install 'sparta[lightning]'"
    ) from exc

from torch import nn

from ..errors import ConfigError
from .core import DriverCallback, driver_signature


class SpartaCallback(DriverCallback, Callback):
    """Wraps, prunes, logs and exports during ``Trainer.fit``; ``module`` is the attribute
    path of the network in the LightningModule, the other arguments are those of
    :class:`~sparta.integrations.core.PruningDriver`. After training, :attr:`pruner` and
    :attr:`task` hold the pruner and the exported task."""

    def __init__(self, adapter: str | None = None, module: str | None = None, *args, **options):
        if module is not None and not isinstance(module, str):
            raise ConfigError(f"module must be an attribute path such as 'net', got {module!r}")
        self.module = module
        super().__init__(adapter, *args, **options)
        self._seen_step, self._pending = 0, False

    __init__.__signature__ = driver_signature(
        inspect.Parameter(
            "module", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation="str | None"
        )
    )

    def network(self, pl_module: nn.Module) -> nn.Module:
        """The module that is wrapped, pruned and exported."""
        if self.module is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.module)
        except AttributeError:
            names = [n for n, _ in pl_module.named_children()]
            raise ConfigError(
                f"module {self.module!r} is not a submodule of {type(pl_module).__name__}; "
                f"its children are: {', '.join(names) or 'none'}"
            ) from None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self.driver.prepare(self.network(pl_module))

    def on_train_start(self, trainer, pl_module) -> None:
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ConfigError(
                "the run's length is unknown (an endless or sized-less training loader): set "
                "max_steps on the Trainer so that the pruning schedule can be laid out"
            )
        total = int(total)
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else total
        self.driver.begin(self.network(pl_module), trainer.train_dataloader, total, epochs)
        self._seen_step = trainer.global_step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.driver.before_optimizer_step()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._seen_step:  # accumulating gradients: no step yet
            return
        self._seen_step = trainer.global_step
        stepped = self.driver.after_optimizer_step(lambda: trainer.train_dataloader)
        if stepped and self.driver.pruner.granularity == "blocks":
            stepped = trainer.global_step % max(trainer.log_every_n_steps, 1) == 0
        if stepped or self._pending or trainer.global_step == 1:
            self._pending = False
            metrics = self.driver.metrics()
            if metrics:
                pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.driver.after_epoch(lambda: trainer.train_dataloader):
            # Lightning takes no step-level log here: the loggers get the new figures now,
            # the LightningModule's logged metrics at the next batch
            metrics = self.driver.metrics()
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            self._pending = True

    def on_train_end(self, trainer, pl_module) -> None:
        self.driver.finish(is_main=trainer.is_global_zero)

    # Lightning keeps these in its checkpoints and hands them back on ``fit(ckpt_path=...)``
    # (after ``setup`` wrapped the network, before ``on_train_start`` makes the pruner).
    def state_dict(self) -> dict:
        return self.driver.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.driver.load_state_dict(state_dict)
