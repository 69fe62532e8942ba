"""Cost of scoring one batch with each importance criterion, as a multiple of one forward and
backward pass of the same adapted model, measured side by side in one run.

    python benchmarks/criteria_cost.py [--model resnet50] [--batch 8] [--size 128] [--rounds 5]

Targets: lrp <= 1.5x (issue #14; 2.68x with zennit's hooks), taylor <= 2x (issue #3), per batch
once set up (a criterion scores many batches per pruning step; its one-off set-up, e.g. LRP's
plain copy of the model, is printed apart). Magnitude and random criteria read weights only:
their figure is one call of ``importance()``.

The rounds interleave: each round times the forward+backward pass and then every criterion, so
that load from other processes falls on all of them alike. Printed: median ms, the spread
(min-max) over the rounds, the ratio of medians and of minima (the least disturbed round of
each); with the threads and the load average. The forward+backward pass runs on a copy of the
adapted model in train mode: its BatchNorm updates would otherwise invalidate LRP's cached
plain copy every round (within one scoring step, over its batches, the copy is reused).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings

import torch
import torchvision

import sparta
from sparta.pruning.importance import list_criteria
from sparta.pruning.pruner import Pruner


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def load() -> str:
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--criteria", default="", help="comma-separated subset (default: all)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sparta.SkippedLayerWarning)
        model = sparta.wrap(torchvision.models.get_model(args.model, num_classes=10), rank=8)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    loss_fn = torch.nn.functional.cross_entropy
    names = [n for n in args.criteria.split(",") if n] or list_criteria()

    trained = copy.deepcopy(model).train()

    def forward_backward():
        trained.zero_grad(set_to_none=True)
        loss_fn(trained(x), y).backward()
        trained.zero_grad(set_to_none=True)

    start_load = load()
    print(
        f"{args.model}, batch {args.batch} at {args.size}px, SPLoRA r=8, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, load {start_load}"
    )
    jobs, first = {"forward+backward": forward_backward}, {}
    for name in names:
        pruner = Pruner(model, x[:1], criterion=name, target=0.5)
        driven = pruner.criterion_cls.data_driven

        def score(pruner=pruner, driven=driven):
            if driven:
                pruner.score([(x, y)], loss_fn)
            else:
                pruner.importance()

        first[name] = timed(score)  # includes one-off set-up (LRP's plain copy)
        jobs[name] = score
    forward_backward()  # warm-up
    samples: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(args.rounds):
        for key, fn in jobs.items():
            samples[key].append(timed(fn))
    base = statistics.median(samples["forward+backward"])
    best = min(samples["forward+backward"])
    for key, ts in samples.items():
        med = statistics.median(ts)
        extra = f"   (first batch incl. set-up {first[key] * 1e3:.0f} ms)" if key in first else ""
        print(
            f"{key:>18}: {med * 1e3:8.1f} ms  (min-max {min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f})"
            f"  {med / base:.2f}x median, {min(ts) / best:.2f}x min{extra}"
        )
    print(f"{args.rounds} interleaved rounds; load average {start_load} at start, {load()} at end")


if __name__ == "__main__":
    main()
