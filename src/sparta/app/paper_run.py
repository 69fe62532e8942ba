"""Running the trajectories of :mod:`sparta.app.paper`: in this process or in spawned worker
processes (one intra-op thread each), each through :func:`sparta.train.run` with ``resume``,
every failure reported in its outcome. (The split of the learned parameters into adapters and the
rest, which the structural ceiling needs, is in every evaluation record the runner writes.)"""

from __future__ import annotations

import functools
import multiprocessing as mp
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

import torch
from torch import nn

from ..config import RunConfig
from ..errors import ConfigError


@dataclass
class Job:
    """One trajectory (planned by :func:`sparta.app.paper.plan`): the runner config and what
    it stands for."""

    key: str  # "<method>/<criterion>/s<seed>" (criterion "dense" for finetune)
    method: str
    criterion: str | None
    seed: int
    config: RunConfig
    label: str = ""
    rank: int | None = None


_WORKER: dict = {}


def _materialise(thing, is_value: Callable[[object], bool]):
    return thing if is_value(thing) else thing()


def _init_worker(model, datasets, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["model"] = _materialise(model, lambda m: isinstance(m, nn.Module))
    _WORKER["data"] = _materialise(datasets, lambda d: hasattr(d, "train"))


def _run_job(job: Job, resume: bool = True) -> dict:
    """Run one trajectory in this process; the outcome as a plain dict (never raises)."""
    from ..train import run

    started = time.perf_counter()
    outcome = {"key": job.key, "output_dir": job.config.output_dir}
    try:
        result = run(
            job.config,
            model=_WORKER["model"],
            datasets=_WORKER["data"],
            progress=False,
            resume=resume,
        )
        outcome.update(
            status="skipped" if result.skipped else "done",
            resumed=result.resumed,
            result=result.result,
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
