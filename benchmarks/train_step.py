"""Training-step cost of SPLoRA vs full fine-tuning, measured side by side in one run.

    python benchmarks/train_step.py [--model resnet50] [--batch 8] [--size 128] [--rank 16]

Prints three ratios (issue #2 targets in brackets):
  * one training step (forward, backward, AdamW step), SPLoRA / full fine-tuning   [<= 0.75x]
  * eval-mode forward under no_grad, wrapped model / plain model                   [<= 1.05x]
  * peak resident memory of training (weights, gradients, optimiser state and activations),
    SPLoRA / full fine-tuning, each measured in a fresh subprocess                 [< 1x]

Timings alternate between the two models round by round and report medians, so drift in a
shared machine's load hits both alike.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time

import torch
import torchvision

import sparta


def build(args, method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None, num_classes=10)
    if method == "splora":
        model = sparta.wrap(model, "splora", rank=args.rank)
    return model


def make_step(model, args):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(fns: dict, rounds: int, warmup: int = 2) -> dict[str, float]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            samples[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in samples.items()}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_memory_child(args) -> None:
    """Runs in a subprocess: peak resident memory while building and training one model,
    above the process's resident memory before the model existed (MiB). A thread samples
    /proc every millisecond; torch kernels release the GIL, so it samples during them."""
    base, peak, done = _rss_mib(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    model = build(args, args.child)
    model.train()
    step = make_step(model, args)
    for _ in range(3):
        step()
    done.set()
    sampler.join()
    print(json.dumps({"peak_mib": max(peak[0], _rss_mib()) - base}))


def peak_memory(method: str) -> float:
    cmd = [sys.executable, __file__, *sys.argv[1:], "--child", method]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return peak_memory_child(args)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.model} "
        f"batch {args.batch} at {args.size}px, SPLoRA r={args.rank}, AdamW"
    )
    full, lora = build(args, "full"), build(args, "splora")
    full.train(), lora.train()
    t = compare({"full": make_step(full, args), "splora": make_step(lora, args)}, args.rounds)
    print(
        f"train step: full fine-tuning {t['full'] * 1e3:8.1f} ms | SPLoRA {t['splora'] * 1e3:8.1f}"
        f" ms | ratio {t['splora'] / t['full']:.3f}x  (target <= 0.75x)"
    )

    full.eval(), lora.eval()
    x = torch.randn(args.batch, 3, args.size, args.size)

    def infer(model):
        def run():
            with torch.no_grad():
                model(x)

        return run

    t = compare({"plain": infer(full), "wrapped": infer(lora)}, args.rounds * 2)
    print(
        f"eval forward: plain {t['plain'] * 1e3:8.1f} ms | wrapped {t['wrapped'] * 1e3:8.1f} ms"
        f" | ratio {t['wrapped'] / t['plain']:.3f}x  (target <= 1.05x)"
    )

    if args.skip_memory:
        return
    mem = {m: peak_memory(m) for m in ("full", "splora")}
    print(
        f"peak training memory: full fine-tuning {mem['full']:7.1f} MiB | SPLoRA "
        f"{mem['splora']:7.1f} MiB | ratio {mem['splora'] / mem['full']:.3f}x  (target < 1x)"
    )


if __name__ == "__main__":
    main()
