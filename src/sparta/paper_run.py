"""Running the trajectories of :mod:`sparta.paper`: in this process or in spawned worker
processes (one intra-op thread each), each through :func:`sparta.train.run` with ``resume``,
every failure reported in its outcome; and, for rank-taking adapters, the split of the learned
parameters into adapters and the rest at every pruning step (for the structural ceiling)."""

from __future__ import annotations

import functools
import json
import multiprocessing as mp
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import ConfigError

if TYPE_CHECKING:
    from .paper import Job

STRUCTURE = "structure.json"
ACCOUNTINGS = ("stored", "paper")


_WORKER: dict = {}


def _materialise(thing, is_value: Callable[[object], bool]):
    return thing if is_value(thing) else thing()


def _init_worker(model, datasets, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["model"] = _materialise(model, lambda m: isinstance(m, nn.Module))
    _WORKER["data"] = _materialise(datasets, lambda d: hasattr(d, "train"))


def _run_job(job: Job, resume: bool = True) -> dict:
    """Run one trajectory in this process; the outcome as a plain dict (never raises)."""
    from .train import run

    started = time.perf_counter()
    outcome = {"key": job.key, "output_dir": job.config.output_dir}
    try:
        probe = _StructureProbe(job, _WORKER["model"])
        result = run(
            job.config,
            model=_WORKER["model"],
            datasets=_WORKER["data"],
            progress=False,
            resume=resume,
            on_checkpoint=probe,
        )
        probe.finish(result)
        outcome.update(
            status="skipped" if result.skipped else "done",
            resumed=result.resumed,
            result=result.result,
            structure=probe.read(),
        )
    except Exception as exc:  # reported in the outcome, shown by the caller
        outcome.update(
            status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()
        )
    outcome["wall_s"] = round(time.perf_counter() - started, 2)
    return outcome


def run_jobs(
    jobs: Sequence[Job],
    model,
    datasets,
    workers: int = 2,
    resume: bool = True,
    threads: int = 1,
    on_outcome: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Run ``jobs`` and return their outcomes in the jobs' order.

    ``model`` and ``datasets`` are the objects (a ``nn.Module``; an object with ``train``,
    ``test`` and ``num_classes``) or picklable zero-argument factories of them (module-level
    functions or ``functools.partial``), built once per worker. ``workers > 1`` runs that many
    spawned processes with ``threads`` intra-op threads each; ``workers == 1`` runs in this
    process (its thread count restored afterwards). ``on_outcome`` is called as each run ends.
    Each outcome has ``status`` ``"done"``, ``"skipped"`` (read back finished) or ``"failed"``
    (with ``error`` and ``traceback``).
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be a positive integer, got {workers!r}")
    outcomes: dict[int, dict] = {}

    def done(item):
        index, outcome = item
        outcomes[index] = outcome
        if on_outcome is not None:
            on_outcome(outcome)

    work = functools.partial(_run_indexed, resume=resume)
    if workers == 1 or len(jobs) <= 1:
        previous = torch.get_num_threads()
        try:
            _init_worker(model, datasets, threads)
            for item in enumerate(jobs):
                done(work(item))
        finally:
            torch.set_num_threads(previous)
            _WORKER.clear()
    else:
        _in_workers(jobs, work, done, min(workers, len(jobs)), (model, datasets, threads))
    return [outcomes[i] for i in range(len(jobs))]


def _in_workers(jobs: Sequence[Job], work, done, workers: int, initargs: tuple) -> None:
    """``work`` on every job in ``workers`` spawned processes; a process that dies (killed, out
    of memory) fails the runs it had, with that reason, instead of hanging the pool."""
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(workers, ctx, _init_worker, initargs) as pool:
        futures = {pool.submit(work, item): item for item in enumerate(jobs)}
        for future in as_completed(futures):
            index, job = futures[future]
            try:
                done(future.result())
            except Exception as exc:  # BrokenProcessPool and the like: the worker is gone
                error = f"worker process failed: {type(exc).__name__}: {exc}"
                done((index, {"key": job.key, "output_dir": job.config.output_dir,
                              "status": "failed", "error": error, "traceback": "",
                              "wall_s": 0.0}))  # fmt: skip


def _run_indexed(item: tuple[int, Job], resume: bool) -> tuple[int, dict]:
    index, job = item
    return index, _run_job(job, resume)


class _StructureProbe:
    """For a rank-taking adapter (SPLoRA), the split of the learned parameters at every
    pruning step: adapters (``rank * sum of kept (in + out)``) and the rest (head, norms,
    biases), in both accountings. Read from the checkpoint written after each pruning step,
    kept in ``structure.json`` beside the run (so a resumed run keeps the earlier steps)."""

    def __init__(self, job: Job, base: nn.Module):
        self.job, self.base = job, base
        self.path = Path(job.config.output_dir) / STRUCTURE
        self.active = job.rank is not None
        self.model: nn.Module | None = None
        self.seen = -1
        self.data = self.read() if self.active else {}

    def read(self) -> dict:
        if not self.path.is_file():
            return {}
        return json.loads(self.path.read_text(encoding="utf-8"))

    def __call__(self, n: int, path: Path) -> None:
        if not self.active:
            return
        from .train import load_checkpoint

        state = load_checkpoint(path)
        step = len(state["pruner"]["history"])
        if step == self.seen or str(step) in self.data:
            self.seen = step
            return
        self.seen = step
        model = self._model()
        model.load_state_dict(state["model"])
        self._record(step, model)

    def finish(self, result) -> None:
        if self.active and result.model is not None:
            self._record(len(result.result.get("pruning", [])), result.model)

    def _model(self) -> nn.Module:
        """The run's model as the runner builds it (wrapped, with the pruner's masks on norms
        and head), to load checkpoints into."""
        if self.model is None:
            from .train import build_model, example_inputs, make_pruner
            from .train.distributed import DistState

            c = self.job.config
            self.model = build_model(c, self.base, _WORKER["data"], DistState())
            make_pruner(c, self.model, example_inputs(_WORKER["data"].train, torch.device("cpu")))
        return self.model

    def _record(self, step: int, model: nn.Module) -> None:
        from .train.report import write_json

        self.data[str(step)] = adapter_split(model)
        write_json(self.data, self.path)


def adapter_split(model: nn.Module) -> dict:
    """Of a wrapped model's learned parameters: the adapters' and the rest, per accounting,
    and for rank-taking adapters the adapters' cost per unit of rank."""
    from .adapters.base import Adapter

    layers = [
        m
        for m in model.modules()
        if isinstance(m, Adapter) and any(p.requires_grad for p in m.parameters())
    ]
    adapters = sum(m.num_learned() for m in layers)
    ranks = {getattr(m, "rank", None) for m in layers}
    rank = ranks.pop() if len(ranks) == 1 else None
    out = {"adapter_parameters": adapters, "rank": rank}
    out["adapter_per_rank"] = adapters / rank if rank else None
    for name in ACCOUNTINGS:
        total = _learned(model, name)
        out[f"rest_{name}"] = None if total is None else total - adapters
    return out


def _learned(model: nn.Module, accounting: str) -> int | None:
    from .measure import learned_parameters

    if accounting == "stored":
        return learned_parameters(model)
    try:
        return learned_parameters(model, accounting=accounting)
    except TypeError:  # an installed sparta without the paper accounting
        return None
