"""The demo's deployment step (:mod:`sparta.app.demo`): every adapter task at the lowest
density built compact (``sparta.build``), its task file bytes, MACs and latency next to the
base's, and with two or more adapter tasks a ``TaskBank`` switching between them."""

from __future__ import annotations

import time
from pathlib import Path

import torch

#: Latency: a batch of this many test images.
LATENCY_BATCH = 32


def deploy(base, results: dict, data, repeats: int) -> dict:
    """Every adapter task at the lowest density: its compact model (``sparta.build``,
    verified against the masked model), task file bytes, MACs and latency next to the base;
    with two or more tasks, a ``TaskBank`` switching between them."""
    from ..measure import MacCounter
    from ..tasks import Task, build

    example = torch.stack([data.test[i][0] for i in range(min(LATENCY_BATCH, len(data.test)))])
    before = {k: v.detach().clone() for k, v in base.state_dict().items()}
    tasks, out = {}, {"tasks": {}, "base_macs": MacCounter(base, example).count(base)}
    for job in results["jobs"]:
        path = Path(job["output_dir"]) / "task.safetensors"
        if job["adapter"] is None or not path.is_file():
            continue
        compact = build(base, Task.load(path))
        tasks[job["method"]] = path
        out["tasks"][job["method"]] = {
            "label": job["label"],
            "task_file": str(path),
            "task_bytes": path.stat().st_size,
            "compact_parameters": sum(p.numel() for p in compact.parameters()),
            "macs": MacCounter(compact, example).count(compact),
            **paired_latency(base, compact, example, repeats),
        }
    out["base_parameters"] = sum(p.numel() for p in base.parameters())
    out["latency_batch"], out["latency_repeats"] = len(example), repeats
    if len(tasks) >= 2:
        out["bank"] = switch_tasks(base, tasks, example)
    out["base_bit_identical"] = all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    return out


@torch.no_grad()
def paired_latency(base, model, x, repeats: int) -> dict:
    """Forward time in ms of ``base`` and ``model`` on ``x``: median of ``repeats`` calls each,
    timed alternately (so that load on a shared machine hits both alike), after warm-up."""
    base.eval(), model.eval()
    for _ in range(2):
        base(x), model(x)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for m, t in zip((base, model), times, strict=True):
            t0 = time.perf_counter()
            m(x)
            t.append(1e3 * (time.perf_counter() - t0))
    b, c = (sorted(t)[len(t) // 2] for t in times)
    return {"latency_ms": round(c, 3), "base_latency_ms": round(b, 3)}


def switch_tasks(base, tasks: dict[str, Path], x) -> dict:
    """Serve ``tasks`` (name -> task file) from one ``TaskBank`` on ``base``: the first switch
    (building the compact model) and the later, cached ones, timed; the served outputs compared
    with a separately built compact model of the same task."""
    from ..tasks import Task, TaskBank, build

    bank = TaskBank(base, cache_size=len(tasks))
    first, later, diffs = {}, {n: [] for n in tasks}, {}
    for name, path in tasks.items():
        bank.add(name, path, overwrite=True)
        t0 = time.perf_counter()
        bank.builder.build(bank.task(name), verify=False)
        first[name] = round(1e3 * (time.perf_counter() - t0), 2)
    for _ in range(5):
        for name in tasks:
            t0 = time.perf_counter()
            bank.model(name)
            later[name].append(1e3 * (time.perf_counter() - t0))
    with torch.no_grad():
        for name, path in tasks.items():
            own = build(base, Task.load(path), verify=False)(x)
            diffs[name] = float((bank.model(name)(x) - own).abs().max())
    return {
        "first_switch_ms": first,
        "cached_switch_ms": {n: round(sorted(t)[len(t) // 2], 4) for n, t in later.items()},
        "max_abs_diff": diffs,
        "outputs_equal": all(d <= 1e-5 for d in diffs.values()),
    }
