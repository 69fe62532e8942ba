"""Write README.md's paper-table subsection from the JSON ``benchmarks/paper_table.py`` wrote.

Run: ``.venv/bin/python benchmarks/readme_paper.py [benchmarks/results/paper_table.json]
[--readme README.md]``. The
subsection sits between ``<!-- paper:start -->`` and ``<!-- paper:end -->``; without the
markers it is added at the end of the "## Benchmarks" section. Nothing is measured here: every
figure comes from the JSON (the benchmark's own output), so the README cannot go stale by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from anywhere
from readme_block import replace_block, write_block  # noqa: E402

START, END = "<!-- paper:start -->", "<!-- paper:end -->"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "benchmarks" / "results" / "paper_table.json"


def section(data: dict) -> str:
    from sparta.app.paper_claims import claim_lines
    from sparta.app.paper_report import markdown_table

    s, m = data["setup"], data["machine"]
    grid = data["grid"]
    lines = [
        START,
        "### The paper's Table 1 on a real network: ImageNet MobileNetV2 -> Fashion-MNIST",
        "",
        f"`benchmarks/paper_table.py` ({data['budget']} budget): torchvision's ImageNet "
        f"MobileNetV2 with a new 10-class head on {s['train']:,} Fashion-MNIST training images "
        f"(10% of them held out for validation) and {s['test']:,} test images at "
        f"{s['image_size']} px; the paper's recipe (SGD momentum 0.9, weight decay 5e-4, step "
        f"lr, adapters at 10x the lr), {s['epochs']} initial epochs, then {s['steps']} pruning "
        f"steps of {s['step_fraction']:.0%} of the filters ({', '.join(grid['criteria'])}, "
        f"global ranking), {s['recovery_epochs']} recovery epoch(s) after each; seeds "
        f"{', '.join(map(str, grid['seeds']))}. **Density is the fraction of filters kept**; "
        "the 30% and 10% columns of a method come from one pruning trajectory. Accuracy is "
        "test accuracy, mean +- std over seeds; learned parameters as the paper counts them "
        "(all norm affine parameters and the whole head) and as a task file stores them "
        "(kept channels only); MFLOPs = 2 x MACs per image.",
        "",
        markdown_table(data["aggregated"]).rstrip("\n"),
        "",
        "The paper's claims, checked on these numbers (and the structural ceiling of the "
        "parameter ratio on MobileNetV2: what SPLoRA still learns besides its adapters):",
        "",
    ]
    lines += [f"- {line}" for line in claim_lines(data["claims"])]
    steps = data.get("prune_step_s", {})
    if steps:
        lines += [
            "",
            "Pruner step time (median over runs, scoring excluded): "
            + "; ".join(f"{k} {v['median_s']:.2f} s" for k, v in sorted(steps.items()))
            + ".",
        ]
    if data.get("text"):
        lines += ["", *text_lines(data["text"])]
    elif data.get("text_skipped"):
        lines += ["", f"The transformer row was not run: {data['text_skipped']}"]
    reused = sum(r["status"] == "skipped" or bool(r.get("resumed")) for r in data["runs"])
    note = f", {reused} of {len(data['runs'])} runs reused from an earlier invocation" * bool(
        reused
    )
    lines += [
        "",
        f"Wall time {data['wall_s'] / 60:.1f} min{note} ({m['workers']} worker processes x "
        f"{m['threads']} torch thread, {m['cpus']} CPUs, load average at the end "
        f"{m['load_average'][0]}, sampled once: other jobs running beside the benchmark lengthen "
        f"the wall time, not the results; user CPU time is the steadier measure; torch "
        f"{m['torch']}). Reproduce: `.venv/bin/python "
        "benchmarks/paper_table.py` (resumable; `--quick` for a 2-3 minute smoke run, `--full` "
        "for the paper's whole grid), then `.venv/bin/python benchmarks/readme_paper.py`.",
        END,
    ]
    return "\n".join(lines) + "\n"


def text_lines(t: dict) -> list[str]:
    """The transformer row: one table line per method, then the comparison with the paper."""
    d = t["data"]
    first = next(iter(t["methods"].values()))["config"]
    lines = [
        "**Transformer row** (`benchmarks/paper_text.py`): all-MiniLM-L6-v2 with a new linear "
        f"head on mean-pooled token states, BBC News ({d['sizes'][0]} train / {d['sizes'][1]} "
        f"val / {d['sizes'][2]} test articles, {d['max_len']} tokens); SPLoRA r{first['rank']} "
        "on every Linear of the encoder vs fine-pruning, attention heads and FFN neurons "
        f"pruned ({first['criterion']}, {first['step_fraction']:.0%} of the units per step) to "
        f"{first['density']:.0%} kept, the same budget for both; seeds "
        f"{', '.join(map(str, next(iter(t['methods'].values()))['seeds']))}.",
        "",
        "| method | test accuracy % | learned (paper) | learned (stored) | units kept | "
        "weights pruned |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in t["methods"].items():
        acc = m["accuracy"]
        lines.append(
            f"| {name} | {100 * acc['mean']:.1f} +- {100 * acc['std']:.1f} | "
            f"{m['learned_parameters_paper']:,.0f} | {m['learned_parameters']:,.0f} | "
            f"{m['density']:.0%} | {m['sparsity']:.0%} |"
        )
    if "gap_points" in t:
        c = t["paper_claim"]
        lines += [
            "",
            f"SPLoRA minus fine-pruning: **{t['gap_points']:+.1f} points** with "
            f"**{t['params_ratio_paper']:.1f}x** fewer learned parameters (paper count; "
            f"{t['params_ratio']:.1f}x as stored; {t['params_ratio_without_embeddings']:.1f}x "
            "without the token embeddings, which only fine-pruning learns). The paper "
            f"({c['model']}, "
            f"{c['pruned_weights']:.0%} of weights pruned): {c['gap_points']:+.0f} points, "
            f"{c['params_ratio']}x fewer. {_verdict(t)}",
        ]
    return lines


def _verdict(t: dict) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from paper_text import verdict

    text = verdict(t).removeprefix("verdict: ")
    return text[0].upper() + text[1:] + "."


def update(readme: str, block: str) -> str:
    return replace_block(readme, block, START, END)


def main(argv: list[str] | None = None) -> None:
    description = __doc__.splitlines()[0]
    write_block(argv, description, DEFAULT, section, START, END, "paper table subsection")


if __name__ == "__main__":
    main()
