"""Write README.md's training-step figures from the JSON ``benchmarks/train_step.py`` wrote.

Run: ``.venv/bin/python benchmarks/train_step.py --threads 2 --json``, then
``.venv/bin/python benchmarks/readme_train.py [benchmarks/results/train_step.json]``. The block
sits between ``<!-- train:start -->`` and ``<!-- train:end -->``. Nothing is measured here: every
figure, the machine, the threads, the load and the spread over rounds come from the JSON.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from readme_block import write_block  # noqa: E402

START, END = "<!-- train:start -->", "<!-- train:end -->"
DEFAULT = Path(__file__).resolve().parent / "results" / "train_step.json"
TRAIN_TARGET, EVAL_TARGET = 0.70, 1.05  # issue #14 (train_step.py's docstring)
OPTIMIZERS = {"sgd": "SGD (momentum 0.9)", "adamw": "AdamW"}


def _met(value: float, target: float, rounds: list[float] | None = None) -> str:
    verdict = "met" if value <= target else "**not met**"
    if rounds and min(rounds) <= target <= max(rounds):
        verdict += ", the rounds span it"
    return verdict


def _ratio(r: dict) -> str:
    rounds = r["ratio_per_round"]
    return (
        f"{r['ratio']:.2f}x ({min(rounds):.2f}-{max(rounds):.2f}; CPU time {r['cpu_ratio']:.2f}x)"
    )


def _load(values: list[float] | None) -> str:
    return "n/a" if not values else f"{values[0]:g}"


def section(d: dict) -> str:
    a, env, load, rows = d["args"], d["env"], d["load_average"], d["train_step"]
    floor = any("floor" in r for r in rows.values())
    head = (
        f"`train_step.py` ({a['model']}, batch {a['batch']} at {a['size']} px, SPLoRA "
        f"r={a['rank']} vs full fine-tuning, optimisers over the trainable parameters only, "
        f"`foreach`; {env['machine']}, {env['cpu_count']} CPUs, torch {env['torch']}, "
        f"{env['threads']} thread(s), load average {_load(load['start'])} at the start, "
        f"{_load(load['after_timing'])} after the timing and {_load(load['end'])} at the end; "
        f"medians of {a['rounds']} rounds side by side, with the spread of the per-round ratios "
        "(min-max) and the ratio of process CPU time)"
        + (
            "; the floor is the same wrapped model with its adapters frozen (no adapter "
            "gradient at all), timed alongside:"
            if floor
            else ":"
        )
    )
    cols = "| optimiser | layout | full ms | SPLoRA ms | SPLoRA / full | target <= 0.70x |"
    sep = "|---|---|---|---|---|---|"
    if floor:
        cols += " floor / full |"
        sep += "---|"
    table = [cols, sep]
    for r in rows.values():
        opt = OPTIMIZERS.get(r["optimizer"], r["optimizer"])
        if r["layout"] == "best":
            line = (
                f"| {opt} | best vs best | | | **{r['ratio']:.2f}x** "
                f"| {_met(r['ratio'], TRAIN_TARGET)} |"
            )
            table.append(line + (" |" if floor else ""))
            continue
        ms = r["median_ms"]
        line = (
            f"| {opt} | {r['layout'].replace('_', '-')} | {ms['full']:.0f} | {ms['splora']:.0f} "
            f"| {_ratio(r['splora'])} "
            f"| {_met(r['splora']['ratio'], TRAIN_TARGET, r['splora']['ratio_per_round'])} |"
        )
        if floor:
            line += f" {_ratio(r['floor'])} |" if "floor" in r else " |"
        table.append(line)
    ev = d["eval_forward"]
    rounds = ev["ratio_per_round"]
    tail = (
        f"Eval-mode forward under `no_grad`, wrapped / plain model: **{ev['ratio']:.2f}x** "
        f"({min(rounds):.2f}-{max(rounds):.2f} over {len(rounds)} rounds; target <= "
        f"{EVAL_TARGET:g}x: {_met(ev['ratio'], EVAL_TARGET, rounds).replace('**', '')})."
    )
    mem = d.get("memory")
    if mem:
        peak = mem["peak_mib"]
        tail += (
            f" Peak training memory (each model in a fresh process), SPLoRA / full fine-tuning: "
            f"{peak['splora']:.0f} vs {peak['full']:.0f} MiB, **{mem['ratio']:.2f}x**."
        )
    return f"{START}\n{head}\n\n" + "\n".join(table) + f"\n\n{tail}\n{END}\n"


def main(argv: list[str] | None = None) -> None:
    description = __doc__.splitlines()[0]
    write_block(argv, description, DEFAULT, section, START, END, "training-step figures")


if __name__ == "__main__":
    main()
