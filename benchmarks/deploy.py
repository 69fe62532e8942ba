"""Deployment benchmark: what a task costs to run, to switch to and to store (issue #4).

Side by side in one run, on CPU, for torchvision ResNet-50 (10 classes, random weights: speed
and sizes do not depend on the values) adapted with SPLoRA r=8:

1. latency of the compact model of a task pruned to about 10x fewer MACs vs the unpruned base,
   at batch 1 and batch 32 (224 px), interleaved, median of several runs, in three deployments
   applied to both models alike (eager; eager with channels_last; TorchScript frozen and
   optimised for inference, which folds BatchNorm); the MAC ratio is the limit a perfect
   implementation would reach;
2. time to switch tasks in a TaskBank whose cache holds one model, so every switch loads the
   task file and builds its compact model;
3. artifact bytes vs a fine-pruned checkpoint of the same masks, for SPLoRA r=8 at 30% weight
   density (70% of the prunable weights removed) and at the paper's 30% filter density; learned
   parameters as stored and as the paper counts them (every norm and the whole head).

Run: ``.venv/bin/python benchmarks/deploy.py`` (about 3 minutes on 2 cores; ``--quick`` for a
short smoke run). Numbers are measured, never assumed; a busy machine makes them noisy.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torchvision

import sparta
from sparta.export import Builder, Task
from sparta.measure import latency

SIZE = 224


def pruned_task(base, target: str, rank: int = 8, steps: int = 4):
    """A SPLoRA task on ``base`` pruned to ``target`` (L1 criterion: speed and size only
    depend on how many channels are kept, not on which)."""
    x = torch.randn(1, 3, SIZE, SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sparta.wrap(base, "splora", rank=rank)
    pruner = sparta.Pruner(model, x, criterion="l1", target=target, steps=steps, round_to=8)
    while not pruner.done:
        pruner.step()
    return model.eval(), pruner.achieved()


def _channels_last(model):
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def _frozen(model):
    """TorchScript, frozen and optimised for inference (BatchNorm folded into convolutions):
    the same deployment treatment for both models."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(copy.deepcopy(model).eval())
        return torch.jit.optimize_for_inference(torch.jit.freeze(scripted))


def switch_times(base, tasks: list[Path], switches: int) -> list[float]:
    """Seconds per task switch: load the file, build the compact model (base checks and
    groups cached by the bank's builder, as in ``TaskBank``)."""
    builder = Builder(base)
    builder.build(Task.load(tasks[0]), verify=False)  # first use: digests and groups
    out = []
    for i in range(switches):
        start = time.perf_counter()
        builder.build(Task.load(tasks[(i + 1) % len(tasks)]), verify=False)
        out.append(time.perf_counter() - start)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, no batch 32")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ResNet-50, {SIZE} px")
    base = torchvision.models.resnet50(num_classes=10).eval()

    print("\n1. latency: compact task model (about 10x fewer MACs) vs the unpruned base")
    model, achieved = pruned_task(base, "macs=0.1")
    compact = sparta.build(base, sparta.export(model))
    x1 = torch.randn(1, 3, SIZE, SIZE)
    base_macs = sparta.MacCounter(base, x1).count(base)
    compact_macs = sparta.MacCounter(compact, x1).count(compact)
    mac_ratio = base_macs / compact_macs
    print(f"   MACs per image: base {base_macs / 1e9:.3f} G, compact {compact_macs / 1e9:.3f} G")
    print(f"   MAC ratio (the limit): {mac_ratio:.2f}x; filter density {achieved['density']:.3f}")
    last = torch.channels_last
    variants = {  # both models, their input's memory format
        "eager": (base, compact, torch.contiguous_format),
        "eager, channels_last": (_channels_last(base), _channels_last(compact), last),
        "TorchScript, frozen": (_frozen(base), _frozen(compact), torch.contiguous_format),
    }
    for batch, repeats in ((1, 15 if args.quick else 40), (32, 0 if args.quick else 4)):
        if not repeats:
            continue
        x = torch.randn(batch, 3, SIZE, SIZE)
        for label, (b, c, fmt) in variants.items():
            t = latency({"base": b, "compact": c}, x.contiguous(memory_format=fmt), repeats, 2)
            print(
                f"   batch {batch:>2}, {label:<21}: base {t['base'] * 1e3:8.1f} ms, compact "
                f"{t['compact'] * 1e3:7.1f} ms, speed-up {t['base'] / t['compact']:.2f}x "
                f"(limit {mac_ratio:.2f}x)"
            )

    print("\n2. task switch (load + build, one cached model in the bank)")
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, target in enumerate(("macs=0.1", "density=0.5")):
            task_model, _ = pruned_task(base, target, steps=1)
            paths.append(Path(tmp) / f"task{i}.safetensors")
            sparta.export(task_model).save(paths[-1])
        t = switch_times(base, paths, 6 if args.quick else 12)
        print(
            f"   median {statistics.median(t) * 1e3:.1f} ms, min {min(t) * 1e3:.1f} ms, "
            f"max {max(t) * 1e3:.1f} ms over {len(t)} switches (target <= 100 ms)"
        )

    print("\n3. artifact bytes vs a fine-pruned checkpoint of the same masks (SPLoRA r=8)")
    for label, target in (
        ("30% weight density", "sparsity=0.7"),
        ("30% filter density (paper)", "density=0.3"),
    ):
        task_model, achieved = pruned_task(base, target, steps=1)
        row = sparta.report(base, sparta.export(task_model)).rows[0]
        print(
            f"   {label}: task {row.task_bytes / 1e6:.3f} MB ({row.learned_parameters:,} "
            f"learned stored, {row.learned_parameters_paper:,} as the paper counts), fine-pruned "
            f"{row.finepruned_bytes / 1e6:.3f} MB ({row.finepruned_learned:,} / "
            f"{row.finepruned_learned_paper:,} learned): {row.bytes_ratio:.1f}x smaller, "
            f"{row.learned_ratio:.1f}x fewer learned stored, {row.learned_ratio_paper:.1f}x as "
            f"the paper counts (weights kept {1 - achieved['sparsity']:.3f}, filters kept "
            f"{achieved['density']:.3f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
