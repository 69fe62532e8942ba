"""Write README.md's MiniLM-on-BBC-News figures from the JSON ``benchmarks/text_bbc.py`` wrote.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/text_bbc.py``, then
``.venv/bin/python benchmarks/readme_text.py [benchmarks/results/text_bbc.json]``. The block sits
between ``<!-- text:start -->`` and ``<!-- text:end -->`` in the section "Text models and
block-SPA". Nothing is measured here: every figure, the machine, the threads, the load and the
spread over timing rounds come from the JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from readme_block import README, replace_block  # noqa: E402

START, END = "<!-- text:start -->", "<!-- text:end -->"
DEFAULT = Path(__file__).resolve().parent / "results" / "text_bbc.json"
SECTION = "## Text models and block-SPA"


def _row(r: dict) -> str:
    b1, b16 = r["batch_1"], r["batch_16"]
    speed = " / ".join(
        f"{b['speedup_median']:.2f}x ({b['speedup_range'][0]:.2f}-{b['speedup_range'][1]:.2f})"
        for b in (b1, b16)
    )
    params = r["params"]["compact"] / r["params"]["base"]
    macs = b16["macs"]["compact"] / b16["macs"]["base"]
    return (
        f"| {r['method']} | {100 * r['accuracy']:.1f} | {r['density']:.3f} ({r['density_kind']}) "
        f"| {r['learned_parameters']:,} | {r['learned_parameters_paper']:,} "
        f"| {r['task_bytes']:,} | {params:.2f} | {macs:.2f} | {speed} |"
    )


def _budget(r: dict) -> str:
    c = r["config"]
    if c["method"] == "splopa":
        return f"{r['method']} {c['epochs']} epoch(s), the block pruner stepping every batch"
    return (
        f"{r['method']} {c['epochs']} epoch(s), then {c['steps']} pruning step(s) with "
        f"{c['recovery_epochs']} recovery epoch(s) each"
    )


def _latency(r: dict) -> str:
    ms = r["batch_16"]["latency_ms"]
    base, compact = statistics.median(ms["base"]), statistics.median(ms["compact"])
    return f"{r['method']} {base:.0f} ms -> {compact:.0f} ms"


def _minutes(rows: list[dict]) -> str:
    times = [r.get("train_seconds") for r in rows]
    if any(t is None for t in times):
        return "unrecorded"
    return " / ".join(f"{t / 60:.0f}" for t in times)


def section(d: dict) -> str:
    rows = d["rows"]
    c = rows[0]["config"]
    lines = [
        START,
        f"Measured by `benchmarks/text_bbc.py`{' (--quick)' if d['quick'] else ''}: "
        f"all-MiniLM-L6-v2 on BBC News, {c['max_length']} tokens per article, seed "
        f"{c['seed']}, one run each ({'; '.join(_budget(r) for r in rows)}); "
        f"{d['machine']}, torch {d['torch']}; training {_minutes(rows)} min (each run's "
        f"result.json); timed on {d['threads']} thread(s), load average "
        f"{d['load_average'][0]:.1f} at the start and {d['load_average'][-1]:.1f} at the end. "
        "Speed-up: base over compact latency in eager PyTorch at batch 1 / 16, the median over "
        "timing rounds (range in brackets); params and MACs: compact over base.",
        "",
        "| method | test acc % | density | learned (stored) | learned (paper) | task file bytes "
        "| params | MACs | speed-up (batch 1 / 16) |",
        "|---|---|---|---|---|---|---|---|---|",
        *(_row(r) for r in rows),
        "",
        "Median latency at batch 16, base -> compact: "
        + "; ".join(_latency(r) for r in rows)
        + (
            ". A --quick run on a loaded machine shows the mechanics, not the result: "
            "`benchmarks/text_bbc.py` without --quick runs the example configs as written."
            if d["quick"]
            else "."
        ),
        END,
        "",  # a blank line before the next heading
    ]
    return "\n".join(lines)


def update(readme: str, d: dict) -> str:
    return replace_block(readme, section(d), START, END, after=SECTION)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args()
    d = json.loads(args.results.read_text(encoding="utf-8"))
    args.readme.write_text(update(args.readme.read_text(encoding="utf-8"), d), encoding="utf-8")
    print(f"{args.readme}: text block written from {args.results}")


if __name__ == "__main__":
    main()
