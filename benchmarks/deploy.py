"""Deployment benchmark: what a task costs to switch to, to run and to store (issue #13).

Side by side in one run, on CPU, for torchvision ResNet-50 (10 classes, random weights: speed
and sizes do not depend on the values) adapted with SPLoRA r=8:

1. task switch: load the task file and build its compact model (``Task.load`` +
   ``Builder.build``, as a ``TaskBank`` with a cache of one does on every switch), median and
   max over >= 20 switches, for a task pruned to about 10x fewer MACs saved in the current
   format (manifest v3 with the compact plan inside, in file format 4: the manifest deflated)
   and the same task saved without its plan (``Task.without_plan()``, the old format); the two
   interleaved. Target: <= 10 ms median.
2. latency of the compact model vs the unpruned base at batch 1 and 32 (224 px) in each variant
   of ``VARIANTS``, all through ``sparta.deploy`` and printed with the settings it used: eager
   PyTorch (BatchNorm folded, channels last), frozen TorchScript (``optimize_for_inference``),
   ONNX Runtime (NCHWc graph, threads spinning within a call and stopping when it returns) and
   ONNX Runtime with sleeping threads; base and compacts timed interleaved within a variant;
   then each side in its best variant. The MAC ratio is the limit; targets: batch 1 >= 0.9 x
   and batch 32 >= 0.8 x the MAC ratio, best variant on both sides. The task keeps channel
   counts in multiples of 16 (``round_to=16``): ONNX Runtime's blocked kernels compute 16
   channels at a time on AVX-512 (8 on AVX2) and pad the rest; the same target pruned with
   ``round_to=8`` runs beside it to show what that costs.
2b. where the time goes (``deploy_profile.py``): ONNX Runtime's per-operator profile of base
   and compacts at batch 1 on 1 and 2 threads: operators per call, convolution MACs as counted
   and as padded, GMAC/s, the executor's cost per operator and what a second thread costs per
   convolution, and the speed-up each leaves of the MAC ratio.
3. artifact bytes vs a fine-pruned checkpoint of the same masks at the paper's 30% *filter*
   density (``target="density=0.3"``; target >= 17x), with the learned-parameter ratio as the
   task file stores them and as the paper counts them (every norm and the whole head).

It prints torch's threads and the load average (start and end), medians with the spread over
repeats (min-max); with ``--json`` it writes every figure to ``benchmarks/results/deploy.json``
(atomically), the file ``make readme`` renders; without it nothing is written, so a casual run
leaves the committed figures alone.

Run: ``.venv/bin/python benchmarks/deploy.py`` (about 7 minutes on 2 quiet cores; ``--quick``:
batch 1 only, fewer repeats, about 3 minutes). Numbers are measured, never assumed; a busy
machine makes them noisy (the spread says how noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torchvision

import sparta
from bench_record import add_json_option
from deploy_profile import profile_section
from sparta.io import atomic_write
from sparta.tasks import Builder, Task
from sparta.utils import call

SIZE = 224
#: Latency variants: label -> ``sparta.deploy`` options (each prints the settings it used).
VARIANTS = {
    "eager": {"runtime": "eager"},  # BatchNorm folded, channels last
    "torchscript": {"runtime": "torchscript"},  # traced, frozen, optimize_for_inference
    "onnxruntime": {"runtime": "onnxruntime"},  # NCHWc graph; threads spin within a call
    "onnxruntime, no spin": {"runtime": "onnxruntime", "spin": False},  # threads sleep
}
ROUND_TO = 16  # ONNX Runtime's channel block on AVX-512 (8 on AVX2): see the module notes
TARGETS = {1: 0.9, 32: 0.8}  # fraction of the MAC ratio the best-vs-best speed-up must reach
SWITCH_TARGET_MS = 10.0
BYTES_TARGET = 17.0


def pruned_task(base, target: str, steps: int, rank: int = 8, round_to: int = ROUND_TO):
    """A SPLoRA task on ``base`` pruned to ``target`` (L1 criterion: speed and size depend on how
    many channels are kept, not which), kept counts multiples of ``round_to``."""
    x = torch.randn(1, 3, SIZE, SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sparta.wrap(base, "splora", rank=rank)
    pruner = sparta.Pruner(model, x, criterion="l1", target=target, steps=steps, round_to=round_to)
    while not pruner.done:
        pruner.step()
    return model.eval(), pruner.achieved()


def spread(seconds: list[float]) -> dict:
    ms = [s * 1e3 for s in seconds]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "n": len(ms)}


def timed(models: dict, inputs, repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Seconds per call of every model, interleaved one call each in turn (so load on a shared
    machine hits them alike); all samples kept for the spread (``measure.latency`` keeps only
    the median). Models of one runtime only: ONNX Runtime's worker threads spin after a call
    and OpenMP's too, so interleaving runtimes would slow each by the other's spinning."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(warmup):
            for model in models.values():
                call(model, inputs)
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                call(model, inputs)
                times[name].append(time.perf_counter() - start)
    return {name: spread(t) for name, t in times.items()}


# -- 1. task switch -------------------------------------------------------------------------------
def switch_section(base, task: Task, switches: int, folder: Path) -> dict:
    """Median, min and max of ``switches`` task switches (``Task.load`` + ``Builder.build``)
    per format and torch thread count (1 and 2), all interleaved: one switch of each in turn,
    so machine load hits them alike; plus the torch ops one build runs (torch.profiler)."""
    formats = {"format 4 (plan inside)": task}
    if hasattr(Task, "without_plan"):
        formats["old format (no plan)"] = task.without_plan()
    else:
        print("   (Task.without_plan is not there yet: old-format row skipped)")
    paths, builders = {}, {}
    for i, (label, t) in enumerate(formats.items()):
        paths[label] = folder / f"task{i}.safetensors"
        t.save(paths[label])
        builders[label] = Builder(base)  # one bank per format; first use pays the base checks
        builders[label].build(Task.load(paths[label]), verify=False)
    threads_before = torch.get_num_threads()
    counts = (1, 2)
    times: dict[tuple, list[float]] = {(label, n): [] for label in formats for n in counts}
    try:
        for _ in range(switches):
            for label, n in times:
                torch.set_num_threads(n)
                start = time.perf_counter()
                builders[label].build(Task.load(paths[label]), verify=False)
                times[label, n].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads_before)
    ops = {label: _ops(builders[label], paths[label]) for label in formats}
    out = {}
    for (label, n), t in times.items():
        s = spread(t)
        met = s["median_ms"] <= SWITCH_TARGET_MS
        row = s | {"met": met, "file_bytes": paths[label].stat().st_size}
        out[f"{label}, {n} thread{'s' if n > 1 else ''}"] = row | {"threads": n, "ops": ops[label]}
        print(
            f"   {label:<21} {n} thread{'s' if n > 1 else ' '}: median {s['median_ms']:6.1f} ms, "
            f"min {s['min_ms']:6.1f}, max {s['max_ms']:6.1f} over {s['n']} switches "
            f"({row['file_bytes'] / 1e6:.2f} MB file, {ops[label]:,} torch ops per build); "
            f"target <= {SWITCH_TARGET_MS:.0f} ms median: {_met(met)}"
        )
    return out


def _ops(builder: Builder, path: Path) -> int:
    """Top-level torch ops of one build of the task at ``path`` (its load excluded)."""
    from torch.profiler import ProfilerActivity, profile

    loaded = Task.load(path)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        builder.build(loaded, verify=False)
    return sum(1 for e in prof.events() if e.cpu_parent is None)


# -- 2. latency -----------------------------------------------------------------------------------
def latency_section(models: dict, mac_ratios: dict, batches: dict[int, int]) -> dict:
    """Every model of ``models`` (``"base"`` first) in every variant of :data:`VARIANTS`; per
    batch, each compact model's speed-up over the base variant by variant, and best vs best."""
    x1 = torch.randn(1, 3, SIZE, SIZE)
    deployed, settings = {}, {}
    for label, options in VARIANTS.items():
        start = time.perf_counter()
        deployed[label] = {side: sparta.deploy(m, x1, **options) for side, m in models.items()}
        settings[label] = {side: d.notes for side, d in deployed[label].items()}
        print(
            f"   {label:<20}: deployed all in {time.perf_counter() - start:4.1f} s (checked); "
            f"settings: {'; '.join(deployed[label]['compact'].notes) or 'as the model is'}"
        )
    for side, notes in settings["onnxruntime"].items():
        padding = [n for n in notes if "multiples" in n]
        print(f"   {side}: {padding[0] if padding else 'no channel padding in ONNX Runtime'}")
    out = {}
    for batch, repeats in batches.items():
        x = torch.randn(batch, 3, SIZE, SIZE)
        rows = {label: timed(deployed[label], x, repeats) for label in VARIANTS}
        for label, row in rows.items():  # base and compacts interleaved within a variant
            row |= {f"speedup{_suffix(s)}": _speedup(row, s) for s in models if s != "base"}
            row["settings"] = settings[label]
            print(f"   batch {batch:>2}, {label:<20}: " + _row(row, models, mac_ratios))
        out[str(batch)] = _best(rows, models, mac_ratios, batch) | {"runtimes": rows}
        out[str(batch)]["repeats"] = repeats
    return out


def _best(rows: dict, models: dict, mac_ratios: dict, batch: int) -> dict:
    """Each side in its fastest variant (median); the first compact's figures are the
    section's (the JSON keys readme_deploy.py reads), the others' under their suffix."""
    fraction = TARGETS.get(batch, TARGETS[32])
    best_base = min(rows, key=lambda v: rows[v]["base"]["median_ms"])
    out: dict = {"target_fraction": fraction}
    for side in (s for s in models if s != "base"):
        best = min(rows, key=lambda v: rows[v][side]["median_ms"])
        speedup = rows[best_base]["base"]["median_ms"] / rows[best][side]["median_ms"]
        got = speedup / mac_ratios[side]
        suffix = _suffix(side)
        out[f"best{suffix}"] = {"base": best_base, "compact": best, "speedup": speedup}
        out[f"fraction_of_mac_ratio{suffix}"] = got
        out[f"met{suffix}"] = got >= fraction
        print(
            f"   batch {batch:>2}, best vs best, {side}: base {best_base}, compact {best}: "
            f"{speedup:.2f}x = {got:.2f} of its MAC ratio {mac_ratios[side]:.2f}x; target >= "
            f"{fraction} x: {_met(got >= fraction)}"
        )
    return out


def _suffix(side: str) -> str:
    """JSON key suffix of a compact model: none for the first ("compact"), else its options."""
    return "" if side == "compact" else "_" + side.split(", ", 1)[-1].replace("=", "")


def _speedup(row: dict, side: str) -> float:
    return row["base"]["median_ms"] / row[side]["median_ms"]


def _row(row: dict, models: dict, mac_ratios: dict) -> str:
    parts = [f"base {_ms(row['base'])}"]
    for side in (s for s in models if s != "base"):
        parts.append(
            f"{side} {_ms(row[side])}: {_speedup(row, side):5.2f}x (limit {mac_ratios[side]:.2f}x)"
        )
    return ", ".join(parts)


# -- 3. artifact bytes ----------------------------------------------------------------------------
def bytes_section(base) -> dict:
    model, achieved = pruned_task(base, "density=0.3", steps=1, round_to=8)
    row = sparta.report(base, sparta.export(model)).rows[0]
    stored = sparta.learned_parameters(model, accounting="stored")
    paper = sparta.learned_parameters(model, accounting="paper")
    met = row.bytes_ratio >= BYTES_TARGET
    print(
        f"   30% filter density (kept {achieved['density']:.3f} of the filters, "
        f"{1 - achieved['sparsity']:.3f} of the weights): task file {row.task_bytes / 1e6:.3f} "
        f"MB vs fine-pruned checkpoint {row.finepruned_bytes / 1e6:.3f} MB: "
        f"{row.bytes_ratio:.1f}x smaller; target >= {BYTES_TARGET:.0f}x: {_met(met)}"
    )
    print(
        f"   learned parameters, stored: {stored:,} vs fine-pruned {row.finepruned_learned:,} "
        f"({row.learned_ratio:.1f}x fewer); as the paper counts (every norm, whole head): "
        f"{paper:,} vs {row.finepruned_learned_paper:,} ({row.learned_ratio_paper:.1f}x fewer)"
    )
    return {
        "filter_density": achieved["density"],
        "weight_density": 1 - achieved["sparsity"],
        "task_bytes": row.task_bytes,
        "finepruned_bytes": row.finepruned_bytes,
        "bytes_ratio": row.bytes_ratio,
        "met": met,
        "learned": {
            "stored": {"task": stored, "finepruned": row.finepruned_learned},
            "paper": {"task": paper, "finepruned": row.finepruned_learned_paper},
            "ratio_stored": row.learned_ratio,
            "ratio_paper": row.learned_ratio_paper,
        },
    }


def _ms(s: dict) -> str:
    return f"{s['median_ms']:8.1f} ms ({s['min_ms']:.1f}-{s['max_ms']:.1f})"


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 only, fewer repeats")
    add_json_option(parser, "deploy")
    args = parser.parse_args()
    torch.manual_seed(0)
    began = time.perf_counter()
    env = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_start": os.getloadavg(),
        "quick": args.quick,
    }
    print(
        f"torch {env['torch']}, {env['threads']} threads, load average {_load()}, ResNet-50, "
        f"{SIZE} px, SPLoRA r=8{' (--quick)' if args.quick else ''}"
    )
    base = torchvision.models.resnet50(num_classes=10).eval()
    steps = 1 if args.quick else 4
    model, achieved = pruned_task(base, "macs=0.1", steps=steps)
    task = sparta.export(model)
    models = {"base": base, "compact": sparta.build(base, task)}
    rounded, _ = pruned_task(base, "macs=0.1", steps=steps, round_to=8)  # what 16 gives over 8
    models["compact, round_to=8"] = sparta.build(base, sparta.export(rounded))
    x1 = torch.randn(1, 3, SIZE, SIZE)
    macs = {name: sparta.MacCounter(m, x1).count(m) for name, m in models.items()}
    ratios = {name: macs["base"] / n for name, n in macs.items()}
    mac_ratio = ratios["compact"]
    print(
        f"task: {achieved['density']:.3f} of the filters kept, counts multiples of {ROUND_TO}; "
        f"MACs per image base {macs['base'] / 1e9:.3f} G, compact {macs['compact'] / 1e9:.3f} G: "
        f"ratio {mac_ratio:.2f}x (the same target with round_to=8: "
        f"{ratios['compact, round_to=8']:.2f}x)"
    )
    results = {"env": env, "mac_ratio": mac_ratio, "base_macs": macs["base"]}
    results |= {"compact_macs": macs["compact"], "macs": macs, "round_to": ROUND_TO}

    print("\n1. task switch: Task.load + Builder.build (a TaskBank with a cache of one)")
    with tempfile.TemporaryDirectory() as tmp:
        results["switch"] = switch_section(base, task, 20 if args.quick else 40, Path(tmp))

    print("\n2. latency through sparta.deploy: base vs compacts, interleaved, median (min-max)")
    batches = {1: 10} if args.quick else {1: 40, 32: 5}
    results["latency"] = latency_section(models, ratios, batches)

    print("\n2b. where the time goes: ONNX Runtime per-operator profiles at batch 1")
    results["profile"] = profile_section(models, macs, 5 if args.quick else 20)

    print("\n3. artifact bytes vs a fine-pruned checkpoint of the same masks (SPLoRA r=8)")
    results["bytes"] = bytes_section(base)

    env["load_end"] = os.getloadavg()
    env["seconds"] = time.perf_counter() - began
    print(f"\nload average at the end {_load()}; {env['seconds']:.0f} s in all")
    if args.json is None:
        print("figures not written (--json writes them to benchmarks/results/deploy.json)")
        return 0
    with atomic_write(args.json, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=float)
    print(f"figures written to {args.json}")
    return 0


def _load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg()) + " (1/5/15 min)"


if __name__ == "__main__":
    sys.exit(main())
