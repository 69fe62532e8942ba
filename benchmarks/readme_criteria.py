"""Write README.md's criterion-cost figures from the JSON ``benchmarks/criteria_cost.py`` wrote.

Run: ``.venv/bin/python benchmarks/criteria_cost.py --threads 2 --json``, then
``.venv/bin/python benchmarks/readme_criteria.py [benchmarks/results/criteria_cost.json]``. The
block sits between ``<!-- criteria:start -->`` and ``<!-- criteria:end -->``. Nothing is measured
here: every figure, the machine, the threads, the load and the spread over rounds come from the
JSON.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from readme_block import write_block  # noqa: E402

START, END = "<!-- criteria:start -->", "<!-- criteria:end -->"
DEFAULT = Path(__file__).resolve().parent / "results" / "criteria_cost.json"
#: per-batch targets of the data-driven criteria (criteria_cost.py's docstring)
TARGETS = {"lrp": 1.5, "taylor": 2.0}
ORDER = ("lrp", "taylor", "gradient", "l1", "l2", "random")


def _load(values: list[float] | None) -> str:
    return "n/a" if not values else f"{values[0]:g}"


def _row(name: str, f: dict) -> str:
    rounds = f["ratio_per_round"]
    target = TARGETS.get(name)
    verdict = ""
    if target is not None:
        verdict = f"<= {target:g}x: " + ("met" if f["ratio_median"] <= target else "**not met**")
        if min(rounds) <= target <= max(rounds):
            verdict += ", the rounds span it"
    setup = "" if f["setup_ms"] is None else f"{f['setup_ms']:.0f}"
    return (
        f"| {name} | {f['median_ms']:.1f} ({f['min_ms']:.1f}-{f['max_ms']:.1f}) "
        f"| **{f['ratio_median']:.2f}x** | {min(rounds):.2f}-{max(rounds):.2f}x "
        f"| {f['ratio_min']:.2f}x | {setup} | {verdict} |"
    )


def section(d: dict) -> str:
    a, env, load, figs = d["args"], d["env"], d["load_average"], d["figures"]
    names = [n for n in ORDER if n in figs] + sorted(set(figs) - set(ORDER) - {"forward+backward"})
    fb = figs["forward+backward"]
    head = (
        f"`criteria_cost.py` ({a['model']}, SPLoRA "
        f"r={a['rank']}, batch {a['batch']} at {a['size']} px; {env['machine']}, "
        f"{env['cpu_count']} CPUs, torch {env['torch']}, {env['threads']} thread(s), load average "
        f"{_load(load['start'])} at the start and {_load(load['end'])} at the end; "
        f"{a['rounds']} interleaved rounds): scoring one batch, as a multiple of one forward and "
        f"backward pass of the adapted model ({fb['median_ms']:.1f} ms median, "
        f"{fb['min_ms']:.1f}-{fb['max_ms']:.1f}). Ratio of the medians, the spread of the "
        "per-round ratios (min-max), the ratio of the fastest rounds, and the first batch with "
        "its one-off set-up (LRP's plain copy of the model); l1, l2 and random read weights "
        "only (one `importance()` call)."
    )
    table = [
        "| criterion | median ms (min-max) | x forward+backward | per round | fastest rounds "
        "| first batch ms | target |",
        "|---|---|---|---|---|---|---|",
    ] + [_row(n, figs[n]) for n in names]
    return f"{START}\n{head}\n\n" + "\n".join(table) + f"\n{END}\n"


def main(argv: list[str] | None = None) -> None:
    description = __doc__.splitlines()[0]
    write_block(argv, description, DEFAULT, section, START, END, "criterion-cost figures")


if __name__ == "__main__":
    main()
