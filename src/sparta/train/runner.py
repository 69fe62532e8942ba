"""``run(config)``: one experiment of the paper's protocol, resumable and data-parallel.

The protocol (Hedegaard et al., Sec. 4): build the model with a new head; ``finetune`` trains
every weight; ``fine-pruning`` trains every weight, then prunes iteratively with masks on the
plain model; an adapter method (``splora``, ``sppara``, any registered one) wraps the model
(frozen base), trains, then prunes iteratively. Pruning step ``k`` scores ``scoring_batches``
training batches, clears masks to the schedule's level, and is followed by ``recovery_epochs``
of training and an evaluation. Every training phase (the initial one and each recovery) starts
a fresh optimiser whose learning rate follows ``lr_schedule`` over that phase (adapter
parameters at ``lr * adapter_lr_scale``). With ``val_fraction > 0`` a seeded, stratified
validation split is carved from the training data (never from the test data): training and
scoring use the rest, and every evaluation records ``val_accuracy`` next to the test
``accuracy``. Each evaluation record also holds the filter ``density``, the weight
``sparsity``, ``macs`` and both parameter counts: ``learned_parameters`` (what the task file
stores) and ``learned_parameters_paper`` (as the paper's Table 1 counts).

Block pruning (``pruner="blocks"``, the default for ``splopa``) follows training instead: the
block pruner steps after every optimiser step and every epoch is followed by an evaluation
(see :mod:`~sparta.train.block_run`). Inputs may be tensors (images) or dicts of tensors
(tokenised text for ``hf:`` models); ``tensorboard=True`` writes the run's scalars for
TensorBoard (:mod:`~sparta.train.tracking`).

The run is a fixed list of stages (train epoch, prune step, evaluate). A checkpoint after every
train and prune stage holds the model (masks included), optimiser, scheduler, RNG states,
pruner history, per-step metrics and the number of stages done; ``resume=True`` continues from
it. The data order of epoch ``e`` depends only on ``(seed, e)``, and the global RNGs are reseeded
from ``(seed, e, rank)`` at every epoch, so a resumed run ends with the same masks and metrics
as an uninterrupted one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..config import RunConfig
from ..errors import ConfigError
from ..measure import MacCounter
from ..pruning.pruner import StepRecord
from . import distributed as D
from .block_run import (
    block_stages,
    make_block_pruner,
    penalty_term,
    pruner_state,
    restore_pruner,
)
from .build import build_model, example_inputs, load_datasets, pruner_for_run, split_train
from .checkpoint import (
    RESUMABLE_CHANGES,  # noqa: F401 (re-exported)
    check_same_run,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from .loop import (
    EpochBatchSampler,
    derive_seed,
    evaluate,
    make_loader,
    make_optimizer,
    make_scheduler,
    param_groups,
    to_device,
    train_one_epoch,
)
from .records import (
    CHECKPOINT,
    LOG,
    RESULT,
    TASK,
    RunResult,
    evaluation_record,
    read_back,
    result_record,
)
from .report import LOGGER, Bars, log_file, write_json
from .tracking import FOLDER, Tracker

_SCORING_STREAM = 2  # a key of derive_seed: the scoring order, apart from training orders


def run(
    config: RunConfig | dict,
    model: nn.Module | None = None,
    datasets=None,
    progress: bool = True,
    resume: bool = False,
    on_checkpoint: Callable[[int, Path], None] | None = None,
) -> RunResult:
    """Run one experiment; see the module docstring.

    Args:
        config: a :class:`RunConfig` (or its dict).
        model: the base model with its head for the task (default: ``sparta.models.create``);
            it is copied, never changed.
        datasets: an object with ``train`` and ``test`` datasets of ``(input, label)`` and
            ``num_classes`` (default: ``sparta.data.load_dataset``).
        progress: show progress bars (rank 0).
        resume: continue from the output folder's checkpoint; a run whose ``result.json``
            exists is returned as it is. Without it, a run starts afresh (a checkpoint and
            result already in the folder are replaced; ``run.log`` is appended to).
        on_checkpoint: called as ``on_checkpoint(n, path)`` after the ``n``-th checkpoint of this
            call is written (rank 0).
    """
    if isinstance(config, dict):
        config = RunConfig.from_dict(config)
    if not isinstance(config, RunConfig):
        raise TypeError(f"run expects a RunConfig or a dict, got {type(config).__name__}")
    out = Path(config.output_dir)
    if resume and (out / RESULT).exists():
        done = read_back(config, out)  # only this config's result: never another run's figures
        if done.result.get("config") is not None:
            check_same_run(config, done.result["config"], f"the finished run in {out}")
        return done
    state = D.setup(config.device)
    caller_rng = rng_state()  # the run reseeds the global generators; the caller's come back
    try:
        if state.is_main:
            out.mkdir(parents=True, exist_ok=True)
        D.barrier(state)
        with (
            log_file(out / LOG if state.is_main else None),
            Bars(progress and state.is_main) as bars,
        ):
            runner = _Runner(config, state, model, datasets, bars, on_checkpoint)
            return runner.execute(resume)
    finally:
        set_rng_state(caller_rng)
        D.teardown(state)


class _Runner:
    def __init__(self, config: RunConfig, dist, model, datasets, bars: Bars, on_checkpoint):
        self.config, self.dist, self.bars, self.on_checkpoint = config, dist, bars, on_checkpoint
        self.out, self.device = Path(config.output_dir), dist.device
        if dist.enabled and config.batch_size % dist.world_size:
            raise ConfigError(
                f"batch_size {config.batch_size} must be a multiple of the {dist.world_size} "
                "processes (each takes an equal slice of every batch)"
            )
        seed_everything(config.seed)
        self.data = datasets if datasets is not None else load_datasets(config)
        self.train_set, self.val_set = split_train(config, self.data.train)
        self.model = build_model(config, model, self.data, dist)
        self.example = example_inputs(self.train_set, self.device)
        self.train_sampler = EpochBatchSampler(
            len(self.train_set), config.batch_size, config.seed, dist.rank, dist.world_size
        )
        if len(self.train_sampler) == 0:
            raise ConfigError(
                f"batch_size {config.batch_size} is larger than the training set "
                f"({len(self.train_set)} examples): no full batch to train on"
            )
        self.blocks, self.penalty = config.prunes_blocks, None
        if self.blocks:
            if dist.enabled:
                raise ConfigError(
                    "block pruning runs in one process (its criteria learn from each rank's "
                    "own gradients); run it without torchrun, or use --pruner channels"
                )
            steps = len(self.train_sampler)
            self.pruner = make_block_pruner(config, self.model, self.example, steps)
            self.penalty = penalty_term(config, self.pruner)
        else:
            self.pruner = (
                pruner_for_run(config, self.model, self.example) if config.prunes else None
            )
        self.macs = self.pruner.macs if self.pruner else MacCounter(self.model, self.example)
        self.tracker = Tracker(self.out / FOLDER, enabled=False)  # see execute
        self.stages = block_stages(config) if self.blocks else _stages(config)
        self.cursor, self.epoch, self.phase, self.saves = 0, 0, None, 0
        self.optimizer = self.scheduler = None
        self.records: list[dict] = []
        self.timings: dict[str, float] = {}
        self.resumed = False
        self.ddp: nn.Module = self.model

    # -- driving --------------------------------------------------------------------------------
    def execute(self, resume: bool) -> RunResult:
        path = self.out / CHECKPOINT
        if resume and path.exists():
            self._restore(load_checkpoint(path))
        elif self.dist.is_main:
            path.unlink(missing_ok=True)
            (self.out / RESULT).unlink(missing_ok=True)
        enabled = self.config.tensorboard and self.dist.is_main
        self.tracker = Tracker(self.out / FOLDER, enabled, fresh=not self.resumed)
        self.ddp = D.wrap_ddp(self.model, self.dist, self.config.find_unused_parameters)
        LOGGER.info(
            "%s run %s: %d of %d stages done, %d process(es) on %s",
            "resuming" if self.resumed else "starting",
            self.config.name,
            self.cursor,
            len(self.stages),
            self.dist.world_size,
            self.device,
        )
        self.bars.start_run(len(self.stages), self.cursor)
        started = time.perf_counter()
        try:
            while self.cursor < len(self.stages):
                kind, index = self.stages[self.cursor]
                t0 = time.perf_counter()
                info = getattr(self, f"_{kind}")(index)
                self._time(kind, time.perf_counter() - t0)
                self.cursor += 1
                self.bars.stage_done(info)
                if kind != "eval":
                    self._save()
            self._time("run", time.perf_counter() - started)
            return self._finish()
        finally:
            self.tracker.close()

    def _time(self, key: str, seconds: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + seconds

    # -- stages ---------------------------------------------------------------------------------
    def _train(self, phase: int) -> str:
        c = self.config
        if self.phase != phase:
            self._new_phase(phase)
        seed_everything(derive_seed(c.seed, self.epoch, self.dist.rank))
        self.train_sampler.set_epoch(self.epoch)
        loader = make_loader(self.train_set, self.train_sampler, c.workers, self._pin())
        self.bars.start(f"epoch {self.epoch + 1}", len(self.train_sampler))
        stats = train_one_epoch(
            self.ddp,
            loader,
            self.optimizer,
            self.scheduler,
            self.device,
            on_batch=lambda n, loss: self.bars.advance(f"loss {loss:.3f}"),
            penalty=self.penalty,
            after_step=self._after_step if self.blocks or self.tracker.writer else None,
        )
        D.sync_buffers(self.model, self.dist)
        LOGGER.info(
            "epoch %d (phase %d): train loss %.4f, accuracy %.4f, %.1f s",
            self.epoch + 1,
            phase,
            stats["loss"],
            stats["accuracy"],
            stats["seconds"],
        )
        self.epoch += 1
        return f"epoch {self.epoch} loss {stats['loss']:.3f}"

    def _after_step(self, stats: dict) -> None:
        """After every optimiser step: the block pruner's step, the tracked scalars."""
        step = self._global_step(stats["batch"])
        if self.blocks and not self.pruner.done:
            self.pruner.step()
            self.tracker.scalar("train/block_density", self.pruner.density(), step)
        self.tracker.train_step(step, stats)

    def _global_step(self, batch: int = 0) -> int:
        """Optimiser steps of the whole run: ``batch`` steps into the current epoch."""
        return self.epoch * len(self.train_sampler) + batch

    def _new_phase(self, phase: int, optimizer_state=None, scheduler_state=None) -> None:
        c = self.config
        epochs = c.epochs if phase == 0 else c.recovery_epochs
        groups = param_groups(self.model, c.lr, c.adapter_lr_scale)
        self.optimizer = make_optimizer(groups, c.optimizer, c.lr, c.weight_decay, c.momentum)
        self.scheduler = make_scheduler(
            self.optimizer, c.lr_schedule, epochs * len(self.train_sampler)
        )
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)
            self.scheduler.load_state_dict(scheduler_state)
        self.phase = phase

    def _prune(self, step: int) -> str:
        pruner, c = self.pruner, self.config
        if pruner.criterion_cls.data_driven:
            t0 = time.perf_counter()
            loader = self._scoring_loader(step)
            self.bars.start(f"scoring for step {step}", len(loader))
            batches = ((to_device(x, self.device), y.to(self.device)) for x, y in loader)
            pruner.score(batches, nn.functional.cross_entropy, lambda n: self.bars.advance())
            scores = D.reduce_scores(pruner, self.dist)
            self._time("score", time.perf_counter() - t0)
        else:
            scores = None
        record = pruner.step(scores)
        units = sum(len(v) for v in record.pruned.values())
        LOGGER.info(
            "pruning step %d/%d (%s): level %.4f, pruned %d units, filter density %.4f, MACs %.4f",
            step,
            c.steps,
            c.criterion,
            record.level,
            units,
            record.achieved["density"],
            record.achieved["macs"],
        )
        return f"step {step} density {record.achieved['density']:.3f}"

    def _scoring_loader(self, step: int) -> DataLoader:
        """This rank's share of the first ``scoring_batches`` global batches of an order that
        depends on ``(seed, step)`` only (whole batches, dealt round-robin over ranks)."""
        c = self.config
        order = EpochBatchSampler(
            len(self.train_set), c.batch_size, derive_seed(c.seed, _SCORING_STREAM)
        )
        order.set_epoch(step)
        batches = order.global_batches()[: c.scoring_batches]
        mine = [batches[i].tolist() for i in D.scoring_share(len(batches), self.dist)]
        gen = torch.Generator().manual_seed(derive_seed(c.seed, _SCORING_STREAM, step, 1))
        return DataLoader(self.train_set, batch_sampler=mine, num_workers=c.workers, generator=gen)

    def _measure(self, dataset) -> dict:
        """Accuracy and loss on ``dataset`` (sharded over ranks, in dataset order)."""
        c = self.config
        sampler = EpochBatchSampler(
            len(dataset),
            c.batch_size,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            shuffle=False,
            drop_last=False,
        )
        loader = make_loader(dataset, sampler, c.workers, self._pin())
        return evaluate(
            self.model, loader, self.device, reduce=lambda t: D.all_reduce_sum(t, self.dist)
        )

    def _eval(self, step: int) -> str:
        metrics = self._measure(self.data.test)
        val = self._measure(self.val_set) if self.val_set is not None else None
        record = evaluation_record(
            self.model, self.pruner, self.macs, metrics, val, step, self.epoch
        )
        self.records.append(record)
        self.tracker.evaluation(self._global_step(), record)
        return f"accuracy {record['accuracy']:.3f}"

    def _pin(self) -> bool:
        return self.device.type == "cuda"

    # -- checkpoints ----------------------------------------------------------------------------
    def _save(self) -> None:
        if not self.dist.is_main:
            return
        state = {
            "config": self.config.to_dict(),
            "cursor": self.cursor,
            "epoch": self.epoch,
            "phase": self.phase,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "rng": rng_state(),
            "pruner": self._pruner_state(),
            "records": self.records,
            "timings": self.timings,
            "world_size": self.dist.world_size,
        }
        path = save_checkpoint(self.out / CHECKPOINT, state)
        self.saves += 1
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.saves, path)

    def _pruner_state(self) -> dict:
        if self.blocks:
            return pruner_state(self.pruner)
        return {"history": self.pruner.history_dicts() if self.pruner else []}

    def _restore(self, ckpt: dict) -> None:
        check_same_run(self.config, ckpt["config"])
        self.model.load_state_dict(ckpt["model"])
        self.cursor, self.epoch = int(ckpt["cursor"]), int(ckpt["epoch"])
        self.records, self.timings = list(ckpt["records"]), dict(ckpt["timings"])
        if self.blocks:
            restore_pruner(self.pruner, ckpt["pruner"])
        elif self.pruner is not None:
            self.pruner.history = [StepRecord(**d) for d in ckpt["pruner"]["history"]]
        if ckpt["phase"] is not None:
            self._new_phase(int(ckpt["phase"]), ckpt["optimizer"], ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        self.resumed = True

    # -- the end --------------------------------------------------------------------------------
    def _finish(self) -> RunResult:
        c, final = self.config, dict(self.records[-1])
        files: dict[str, Path] = {}
        if self.dist.is_main:
            t0 = time.perf_counter()
            if c.adapter is not None:
                from ..tasks import export

                files["task"] = self.out / TASK
                final["task_bytes"] = export(self.model).save(files["task"])
            else:  # a baseline stores its compact model (sparta.tasks.baseline)
                from ..tasks.baseline import save_baseline

                final.update(save_baseline(self.model, self.out / TASK, c.method, self.example))
                if "task_bytes" in final:
                    files["task"] = self.out / TASK
            self._time("export", time.perf_counter() - t0)
        result = result_record(
            c,
            data={
                "train": len(self.train_set),
                "val": len(self.val_set) if self.val_set is not None else 0,
                "test": len(self.data.test),
            },
            world_size=self.dist.world_size,
            device=str(self.device),
            steps=self.records,
            pruning=self.pruner.history_dicts() if self.pruner else [],
            final=final,
            timings={f"{k}_s": round(v, 3) for k, v in self.timings.items()},
            files={k: p.name for k, p in files.items()},
        )
        if self.dist.is_main:
            files["result"] = write_json(result, self.out / RESULT)
            (self.out / CHECKPOINT).unlink(missing_ok=True)  # complete: result.json says so
            LOGGER.info("finished: accuracy %.4f, files %s", final["accuracy"], result["files"])
        D.barrier(self.dist)
        return RunResult(
            c, self.out, final, self.records, result, self.model, resumed=self.resumed, files=files
        )


# -- building --------------------------------------------------------------------------------------
def _stages(config: RunConfig) -> list[tuple[str, int]]:
    """``("train", phase)`` per epoch, ``("prune", step)``, ``("eval", step)``, in order."""
    stages = [("train", 0)] * config.epochs + [("eval", 0)]
    for step in range(1, config.steps + 1 if config.prunes else 1):
        stages += [("prune", step)] + [("train", step)] * config.recovery_epochs
        stages.append(("eval", step))
    return stages
