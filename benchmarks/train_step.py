"""Training-step cost of SPLoRA vs full fine-tuning, measured side by side in one run.

    python benchmarks/train_step.py [--model resnet50] [--batch 8] [--size 128] [--rank 16]
        [--optimizers sgd,adamw] [--layouts nchw,channels_last] [--threads N] [--no-floor]
        [--json [benchmarks/results/train_step.json]]

Prints (issue #14 targets in brackets):
  * one training step (forward, backward, optimiser step), SPLoRA / full fine-tuning, for SGD
    with momentum 0.9 (the paper's optimiser) and AdamW (foreach), in NCHW and channels-last
    layouts, and best layout vs best layout                                         [<= 0.70x]
  * the floor, timed alongside: the same wrapped model with its adapters frozen (no adapter
    gradient at all), / full fine-tuning: what the frozen network's own backward costs
  * eval-mode forward under no_grad, wrapped model / plain model                   [<= 1.05x]
  * peak resident memory of training (weights, gradients, optimiser state and activations),
    SPLoRA / full fine-tuning, each measured in a fresh subprocess                 [< 1x]

Timings alternate between the two models round by round and report medians of wall time, the
spread (min-max) of the per-round ratios, and the ratio of process CPU time (less sensitive to
other processes on a shared machine); the load average is printed before and after.
``--json`` records every printed figure, each round's times, the machine, torch, threads and
the load average; ``benchmarks/readme_train.py`` writes README.md's block from it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torchvision

import sparta

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_record import add_json_option, environment, load_average, write  # noqa: E402


def build(args, method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None, num_classes=10)
    if method in ("splora", "frozen"):
        model = sparta.wrap(model, "splora", rank=args.rank)
    if method == "frozen":  # the floor: the wrapped model without any adapter gradient
        for name, param in model.named_parameters():
            if ".adapter." in f".{name}":
                param.requires_grad_(False)
    return model


def make_optimizer(model, name: str):
    """Over the trainable parameters only (a frozen base has no optimiser state)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=True)
    return torch.optim.AdamW(params, lr=1e-4, foreach=True)


def make_step(model, args, optimizer: str = "adamw", layout: str = "nchw"):
    opt = make_optimizer(model, optimizer)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(fns: dict, rounds: int, warmup: int = 2, samples: dict | None = None):
    """Median wall time per function, alternating round by round; ``samples`` (if given)
    receives every round's ``(wall, cpu)`` per function."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples = {} if samples is None else samples
    for k in fns:
        samples[k] = []
    for _ in range(rounds):
        for k, fn in fns.items():
            cpu = time.process_time()
            wall = timed(fn)
            samples[k].append((wall, time.process_time() - cpu))
    return {k: statistics.median(w for w, _ in v) for k, v in samples.items()}


def _ratio(samples: dict, model: str) -> dict:
    """``model`` / full fine-tuning: ratio of median wall times, the per-round ratios (their
    min-max is the spread) and the ratio of median process CPU times."""
    wall = {m: statistics.median(w for w, _ in samples[m]) for m in ("full", model)}
    cpu = {m: statistics.median(c for _, c in samples[m]) for m in ("full", model)}
    return {
        "ratio": wall[model] / wall["full"],
        "ratio_per_round": [a / b for (a, _), (b, _) in zip(samples[model], samples["full"])],
        "cpu_ratio": cpu[model] / cpu["full"],
    }


def train_ratios(args, models: dict) -> dict:
    """Step time of SPLoRA (and of the frozen-adapter floor) / full fine-tuning for each
    optimiser and layout, side by side; the figures, by ``"optimizer layout"``."""
    best, out = {}, {}
    for opt in args.optimizers.split(","):
        for layout in args.layouts.split(","):
            fns = {m: make_step(_in_layout(models[m], layout), args, opt, layout) for m in models}
            samples: dict = {}
            t = compare(fns, args.rounds, samples=samples)
            row = {
                "optimizer": opt,
                "layout": layout,
                "ms": {m: [w * 1e3 for w, _ in samples[m]] for m in samples},
                "cpu_ms": {m: [c * 1e3 for _, c in samples[m]] for m in samples},
                "median_ms": {m: t[m] * 1e3 for m in t},
                "splora": _ratio(samples, "splora"),
            }
            r = row["splora"]
            line = (
                f"train step [{opt:5s} {layout:13s}]: full {t['full'] * 1e3:7.1f} ms | SPLoRA "
                f"{t['splora'] * 1e3:7.1f} ms | ratio {r['ratio']:.3f}x (rounds "
                f"{min(r['ratio_per_round']):.3f}-{max(r['ratio_per_round']):.3f}; CPU time "
                f"{r['cpu_ratio']:.3f}x)  (target <= 0.70x)"
            )
            if "frozen" in models:
                row["floor"] = f = _ratio(samples, "frozen")
                line += (
                    f"\n{'':22s}floor (adapters frozen) {t['frozen'] * 1e3:7.1f} ms | ratio "
                    f"{f['ratio']:.3f}x (rounds {min(f['ratio_per_round']):.3f}-"
                    f"{max(f['ratio_per_round']):.3f}; CPU time {f['cpu_ratio']:.3f}x)"
                )
            print(line)
            out[f"{opt} {layout}"] = row
            for m in t:
                best[opt, m] = min(best.get((opt, m), float("inf")), t[m])
    for opt in args.optimizers.split(","):
        ratio = best[opt, "splora"] / best[opt, "full"]
        out[f"{opt} best"] = {"optimizer": opt, "layout": "best", "ratio": ratio}
        print(f"train step [{opt:5s} best layout vs best layout]: ratio {ratio:.3f}x")
    for m in models.values():
        _in_layout(m, "nchw")
    return out


def _in_layout(model, layout: str):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return model.to(memory_format=fmt)


def _load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg()) + f" on {os.cpu_count()} cores"


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
    p.add_argument("--optimizers", default="sgd,adamw", help="sgd (momentum 0.9), adamw")
    p.add_argument("--layouts", default="nchw,channels_last", help="nchw, channels_last")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument(
        "--floor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the wrapped model with its adapters frozen alongside (default: on)",
    )
    add_json_option(p, "train_step")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return peak_memory_child(args)

    load_start = load_average()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.model} "
        f"batch {args.batch} at {args.size}px, SPLoRA r={args.rank}, "
        f"{args.rounds} rounds; load average {_load()}"
    )
    models = {m: build(args, m) for m in ("full", "splora", "frozen")[: 3 if args.floor else 2]}
    for model in models.values():
        model.train()
    train = train_ratios(args, models)
    full, lora = models["full"], models["splora"]

    full.eval(), lora.eval()
    x = torch.randn(args.batch, 3, args.size, args.size)

    def infer(model):
        def run():
            with torch.no_grad():
                model(x)

        return run

    samples: dict = {}
    t = compare({"plain": infer(full), "wrapped": infer(lora)}, args.rounds * 2, samples=samples)
    per_round = [w / p for (w, _), (p, _) in zip(samples["wrapped"], samples["plain"])]
    evaluation = {
        "ms": {m: [w * 1e3 for w, _ in samples[m]] for m in samples},
        "median_ms": {m: t[m] * 1e3 for m in t},
        "ratio": t["wrapped"] / t["plain"],
        "ratio_per_round": per_round,
    }
    print(
        f"eval forward: plain {t['plain'] * 1e3:8.1f} ms | wrapped {t['wrapped'] * 1e3:8.1f} ms"
        f" | ratio {t['wrapped'] / t['plain']:.3f}x (rounds {min(per_round):.3f}-"
        f"{max(per_round):.3f})  (target <= 1.05x)"
    )

    load_timed = load_average()
    print(f"load average after timing: {_load()}")
    memory = None
    if not args.skip_memory:
        mem = {m: peak_memory(m) for m in ("full", "splora")}
        memory = {"peak_mib": mem, "ratio": mem["splora"] / mem["full"]}
        print(
            f"peak training memory: full fine-tuning {mem['full']:7.1f} MiB | SPLoRA "
            f"{mem['splora']:7.1f} MiB | ratio {mem['splora'] / mem['full']:.3f}x  (target < 1x)"
        )
    if args.json:
        config = {k: v for k, v in vars(args).items() if k not in ("json", "child")}
        write(
            args.json,
            {
                "benchmark": "train_step.py",
                "args": config,
                "env": environment(),
                "load_average": {
                    "start": load_start,
                    "after_timing": load_timed,
                    "end": load_average(),
                },
                "train_step": train,
                "eval_forward": evaluation,
                "memory": memory,
            },
        )


if __name__ == "__main__":
    main()
