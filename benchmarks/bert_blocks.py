"""Block pruning of a SPLoPA-wrapped BERT: the compact model's latency next to the dense base.

A BERT-base-wide encoder built from a config (hidden 768, 12 heads of 64, FFN 3072) with
4 layers instead of 12, so that the run takes about a minute on 2 CPU cores; random weights
(speed does not depend on them). SPLoPA with 32 x 32 blocks; a few training steps on random
tokens with movement pruning of whole heads and FFN neurons (granularity heads + neurons, cubic
schedule) down to half of their blocks; then ``sparta.export`` -> ``sparta.build`` and both
models timed interleaved in one run (``sparta.measure.latency``).

    .venv/bin/python benchmarks/bert_blocks.py [--layers 4] [--seq 128] [--batch 4]
        [--rounds 5] [--json benchmarks/results/bert_blocks.json]

The latency is measured in ``--rounds`` rounds of ``--repeats`` interleaved calls; the figure
is the median of the round medians with their spread (min-max). ``--json`` records every figure
with the machine, threads and load average; ``benchmarks/readme_bench.py`` writes README.md's
block from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import sparta
from sparta.measure import latency
from sparta.pruning import BlockPruner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--target", type=float, default=0.5, help="fraction of blocks kept")
    parser.add_argument("--granularity", default="heads,neurons", help="blocks | heads,neurons")
    parser.add_argument("--steps", type=int, default=4, help="training steps while pruning")
    parser.add_argument("--repeats", type=int, default=10)
    # One thread by default: on a shared 2-core machine two spinning threads time noise.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    parser.add_argument("--rounds", type=int, default=5, help="latency rounds (for the spread)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    load_start = os.getloadavg()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=768,
        num_hidden_layers=args.layers,
        num_attention_heads=12,
        intermediate_size=3072,
        num_labels=2,
    )
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(cfg).eval()
    start = time.perf_counter()
    model = sparta.wrap(base, "splopa", block=32, prototypes=64).train()
    granularity = tuple(args.granularity.split(",")) if "," in args.granularity else "blocks"
    pruner = BlockPruner(
        model, "movement", target=args.target, total_steps=args.steps, warmup_steps=1,
        granularity=granularity,
    )  # fmt: skip
    ids = torch.randint(0, cfg.vocab_size, (2, 64))
    labels = torch.randint(0, 2, (2,))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(args.steps):
        nn.functional.cross_entropy(model(ids).logits, labels).backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
    summary = pruner.summary()
    example = torch.randint(0, cfg.vocab_size, (1, 16))
    task = sparta.export(model.eval(), example_inputs=example)
    compact = sparta.build(base, task)
    prepared = time.perf_counter() - start

    def count(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    def encoder(m: nn.Module) -> int:
        return count(m.bert.encoder)

    inputs = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    rounds = [
        latency({"dense base": base, "compact": compact}, inputs, args.repeats, warmup=2)
        for _ in range(args.rounds)
    ]
    times = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    speedups = [r["dense base"] / r["compact"] for r in rounds]
    print(
        f"BERT encoder: {args.layers} layers, hidden 768, 12 heads, FFN 3072; SPLoPA 32x32, "
        f"movement, {args.granularity}, {args.steps} steps (wrap+train+export+build "
        f"{prepared:.1f} s), torch threads {torch.get_num_threads()}"
    )
    print(
        f"blocks kept {summary['blocks_kept']}/{summary['blocks_total']}: density "
        f"{summary['density']:.3f} of the pruned scope, "
        f"{summary['density_all_layers']:.3f} of all adapted layers"
    )
    print(
        f"heads removed {summary['heads_removed']}/{summary['heads_total']}, FFN neurons removed "
        f"{summary['neurons_removed']}/{summary['neurons_total']}"
    )
    print(
        f"parameters: base {count(base):,} (encoder {encoder(base):,}), compact "
        f"{count(compact):,} (encoder {encoder(compact):,}, "
        f"{encoder(compact) / encoder(base):.2f} of the base's)"
    )
    dense, small = times["dense base"], times["compact"]
    print(
        f"latency, batch {args.batch} x {args.seq} tokens, median of {args.repeats}: dense base "
        f"{dense * 1e3:.1f} ms, compact {small * 1e3:.1f} ms, speed-up {dense / small:.2f}x "
        f"(over {args.rounds} rounds: {min(speedups):.2f}-{max(speedups):.2f}x)"
    )
    if args.json is not None:
        record = {
            "benchmark": "bert_blocks",
            "args": vars(args) | {"json": str(args.json)},
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_average": [round(x, 2) for x in (*load_start[:1], *os.getloadavg()[:1])],
            "summary": {
                k: summary[k]
                for k in (
                    "heads_removed",
                    "heads_total",
                    "neurons_removed",
                    "neurons_total",
                    "density",
                )
            },  # fmt: skip
            "encoder_params": {"base": encoder(base), "compact": encoder(compact)},
            "latency_ms": {
                k: [round(1e3 * r[k], 2) for r in rounds] for k in ("dense base", "compact")
            },
            "speedup": [round(x, 3) for x in speedups],
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
