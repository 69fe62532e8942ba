"""Cost of scoring one batch with each importance criterion, as a multiple of one forward and
backward pass of the same adapted model, measured side by side in one run.

    python benchmarks/criteria_cost.py [--model resnet50] [--batch 8] [--size 128] [--rounds 5]
        [--json [benchmarks/results/criteria_cost.json]]

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

``--json`` records every printed figure, each round's times, the per-round ratios, the machine,
torch, threads and the load average at start and end; ``benchmarks/readme_criteria.py`` writes
README.md's block from it.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision

import sparta
from sparta.pruning.importance import list_criteria
from sparta.pruning.pruner import Pruner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_record import add_json_option, environment, load_average, write  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def load() -> str:
    avg = load_average()
    return f"{avg[0]:.1f}" if avg else "n/a"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--criteria", default="", help="comma-separated subset (default: all)")
    add_json_option(p, "criteria_cost")
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

    start_avg = load_average()
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
    end_avg = load_average()
    fb = samples["forward+backward"]
    base, best = statistics.median(fb), min(fb)
    figures = {}
    for key, ts in samples.items():
        med = statistics.median(ts)
        per_round = [t / f for t, f in zip(ts, fb)]
        figures[key] = {
            "ms": [t * 1e3 for t in ts],
            "median_ms": med * 1e3,
            "min_ms": min(ts) * 1e3,
            "max_ms": max(ts) * 1e3,
            "ratio_median": med / base,
            "ratio_min": min(ts) / best,
            "ratio_per_round": per_round,
            "setup_ms": first[key] * 1e3 if key in first else None,
        }
        extra = f"   (first batch incl. set-up {first[key] * 1e3:.0f} ms)" if key in first else ""
        print(
            f"{key:>18}: {med * 1e3:8.1f} ms  (min-max {min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f})"
            f"  {med / base:.2f}x median, {min(ts) / best:.2f}x min"
            f" (rounds {min(per_round):.2f}-{max(per_round):.2f}x){extra}"
        )
    end_load = f"{end_avg[0]:.1f}" if end_avg else "n/a"
    print(
        f"{args.rounds} interleaved rounds; load average {start_load} at start, {end_load} at end"
    )
    if args.json:
        config = {k: v for k, v in vars(args).items() if k != "json"}
        config["criteria"] = names
        config["adapter"] = "splora"
        config["rank"] = 8
        write(
            args.json,
            {
                "benchmark": "criteria_cost.py",
                "args": config,
                "env": environment(),
                "load_average": {"start": start_avg, "end": end_avg},
                "figures": figures,
            },
        )


if __name__ == "__main__":
    main()
