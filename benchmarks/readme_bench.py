"""Write README.md's block-pruned BERT figures from the JSON ``benchmarks/bert_blocks.py`` wrote.

Run: ``.venv/bin/python benchmarks/bert_blocks.py --json benchmarks/results/bert_blocks.json``,
then ``.venv/bin/python benchmarks/readme_bench.py [that file] [--readme README.md]``. The block
sits between ``<!-- bert:start -->`` and ``<!-- bert:end -->``. Nothing is measured here: every
figure, the machine, the threads, the load and the spread over rounds come from the JSON.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from readme_block import write_block  # noqa: E402

START, END = "<!-- bert:start -->", "<!-- bert:end -->"
DEFAULT = Path(__file__).resolve().parent / "results" / "bert_blocks.json"


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ms ({min(values):.0f}-{max(values):.0f})"


def section(d: dict) -> str:
    a, s, ms = d["args"], d["summary"], d["latency_ms"]
    enc = d["encoder_params"]["compact"] / d["encoder_params"]["base"]
    load = d["load_average"]
    speed = d["speedup"]
    text = (
        f"`bert_blocks.py` (BERT-base width, {a['layers']} layers, random weights, SPLoPA "
        f"32x32, movement pruning of {a['granularity'].replace(',', ' and ')} to "
        f"{a['target']:g} of the blocks, batch {a['batch']} x {a['seq']} tokens; "
        f"{d['machine']}, torch {d['torch']}, {d['threads']} thread(s), load average "
        f"{load[0]:g} at the start and {load[-1]:g} at the end): {s['heads_removed']} of "
        f"{s['heads_total']} heads and {s['neurons_removed']:,} of {s['neurons_total']:,} FFN "
        f"neurons removed, encoder parameters {enc:.2f} of the base's; dense base "
        f"{_ms(ms['dense base'])} vs compact {_ms(ms['compact'])}, medians of {len(speed)} "
        f"rounds of {a['repeats']} interleaved calls (min-max over the rounds): "
        f"**{statistics.median(speed):.1f}x** faster ({min(speed):.2f}-{max(speed):.2f}x). "
        "Pruning blocks alone (`--granularity blocks`) leaves dense weights with zero blocks "
        "and no speed-up on CPU, as expected."
    )
    return f"{START}\n{text}\n{END}\n"


def main(argv: list[str] | None = None) -> None:
    description = __doc__.splitlines()[0]
    what = "block-pruned BERT figures"
    write_block(argv, description, DEFAULT, section, START, END, what)


if __name__ == "__main__":
    main()
