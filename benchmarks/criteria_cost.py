"""Cost of scoring one batch with each importance criterion, as a multiple of one forward and
backward pass of the same adapted model, measured side by side in one run.

    python benchmarks/criteria_cost.py [--model resnet50] [--batch 8] [--size 128]

Target (issue #3): lrp and taylor <= 2x per batch once set up (a criterion scores many batches
per pruning step; its one-off set-up, e.g. LRP's plain copy of the model, is printed apart).
Magnitude and random criteria read weights only: their figure is one call of ``importance()``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torchvision

import sparta
from sparta.pruning.importance import list_criteria
from sparta.pruning.pruner import Pruner


def median_time(fn, rounds: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
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

    def forward_backward():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    print(
        f"{args.model}, batch {args.batch} at {args.size}px, SPLoRA r=8, {torch.get_num_threads()} threads"
    )
    base = median_time(forward_backward, args.rounds)
    print(f"{'forward+backward':>18}: {base * 1e3:8.1f} ms  1.00x")
    for name in list_criteria():
        pruner = Pruner(model, x[:1], criterion=name, target=0.5)
        start = time.perf_counter()
        if pruner.criterion_cls.data_driven:  # first batch: includes one-off set-up (LRP's copy)
            pruner.score([(x, y)], loss_fn)
        first = time.perf_counter() - start

        def score(pruner=pruner):
            if pruner.criterion_cls.data_driven:
                pruner.score([(x, y)], loss_fn)
            else:
                pruner.importance()

        t = median_time(score, args.rounds)
        print(
            f"{name:>18}: {t * 1e3:8.1f} ms  {t / base:.2f}x   (first batch incl. set-up {first * 1e3:.0f} ms)"
        )


if __name__ == "__main__":
    main()
