"""Cost of one ``Pruner.step``: a fine-pruned (plain, masks as parametrisations) model against
the same model adapted with SPLoRA r=8, measured side by side in one run (issue #12, item 7).

Models: torchvision ResNet-50 (random weights: a step's cost does not depend on the values,
10 classes) plain and wrapped, and MobileNetV2 plain, all on a 64 px example batch of 1. Each
step removes 5% of the original filters (``Target("density", ...)``, linear schedule), ranked
by the ``l1`` criterion, the paper's global ranking; the figure is the whole ``step()``
(weight checks, scoring, the level search, the mask update and ``achieved()``), median and
range over the steps timed. Pruner construction (tracing the groups, recording positions) is
printed apart: it is paid once per run.

    .venv/bin/python benchmarks/prune_step.py [--quick] [--steps 6] [--threads 1]

Target: a fine-pruning step on ResNet-50 in about the time of a wrapped one, <= 1 s on 2 cores.
Numbers are measured, never assumed; a busy machine makes them noisy (the load is printed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
import torchvision

import sparta

SIZE = 64


def models(quick: bool) -> dict:
    """Name -> a function building the model to prune (fresh for every measurement)."""

    def resnet50():
        return torchvision.models.resnet50(weights=None, num_classes=10)

    def wrapped():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return sparta.wrap(resnet50(), "splora", rank=8)

    def mobilenet():
        return torchvision.models.mobilenet_v2(weights=None, num_classes=10)

    out = {"ResNet-50, fine-pruning (plain)": resnet50, "ResNet-50, SPLoRA r=8": wrapped}
    if not quick:
        out["MobileNetV2, fine-pruning (plain)"] = mobilenet
    return out


def measure(build, steps: int) -> tuple[float, list[float], dict]:
    """Construction seconds, seconds per step, and what the last step achieved."""
    torch.manual_seed(0)
    model = build()
    x = torch.randn(1, 3, SIZE, SIZE)
    start = time.perf_counter()
    # 20 steps of 5% down to 0% would be the whole schedule; only the first `steps` are timed.
    pruner = sparta.Pruner(model, x, criterion="l1", target="density=0.05", steps=19)
    built = time.perf_counter() - start
    times = []
    record = None
    for _ in range(steps):
        start = time.perf_counter()
        record = pruner.step()
        times.append(time.perf_counter() - start)
    return built, times, record.achieved


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 steps each, no MobileNetV2")
    parser.add_argument("--steps", type=int, default=6, help="steps timed per model")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = 2 if args.quick else args.steps
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load average {load} (1, 5, 15 min); {SIZE} px, batch 1, l1, steps of 5% of filters"
    )
    start = time.perf_counter()
    import torch_pruning  # noqa: F401  (the tracer: imported by the first Pruner of a process)

    print(
        f"  importing torch-pruning (once per process, not in the figures): "
        f"{time.perf_counter() - start:.2f} s"
    )
    rows = []
    for name, build in models(args.quick).items():
        built, times, achieved = measure(build, steps)
        rows.append((name, built, times))
        print(
            f"  {name:<34}: step median {statistics.median(times):6.3f} s (min "
            f"{min(times):.3f}, max {max(times):.3f}, {len(times)} steps), construction "
            f"{built:6.2f} s; after them: filter density {achieved['density']:.3f}, weight "
            f"density {1 - achieved['sparsity']:.3f}, MACs {achieved['macs']:.3f}"
        )
    plain = statistics.median(rows[0][2])
    adapted = statistics.median(rows[1][2])
    print(
        f"fine-pruning / SPLoRA step time on ResNet-50: {plain / adapted:.2f}x "
        f"(target: about 1x, and <= 1 s); load average now "
        + ", ".join(f"{v:.2f}" for v in os.getloadavg())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
