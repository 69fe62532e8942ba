"""Write README.md's deployment figures from the JSON ``benchmarks/deploy.py`` wrote.

Run: ``.venv/bin/python benchmarks/readme_deploy.py [benchmarks/results/deploy.json]
[--readme README.md]``. The block sits between ``<!-- deploy:start -->`` and
``<!-- deploy:end -->``. Nothing is measured here: every figure comes from the benchmark's JSON.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from anywhere
from readme_block import write_block  # noqa: E402

START, END = "<!-- deploy:start -->", "<!-- deploy:end -->"
DEFAULT = Path(__file__).resolve().parent / "results" / "deploy.json"


def _ms(s: dict) -> str:
    return f"{s['median_ms']:.1f} ms ({s['min_ms']:.1f}-{s['max_ms']:.1f})"


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def section(d: dict) -> str:
    env = d["env"]
    load = ", ".join(f"{x:.1f}" for x in env["load_start"][:1] + env["load_end"][:1])
    lines = [
        START,
        f"`deploy.py` ({'`--quick`, ' if env.get('quick') else ''}"
        f"{env['machine'] + ', ' if env.get('machine') else ''}torch {env['torch']}, "
        f"{env['threads']} threads, load average {load} at start and end; medians with the "
        f"spread min-max): ResNet-50 with a SPLoRA r=8 task pruned to "
        f"{d['mac_ratio']:.2f}x fewer MACs (224 px).",
        "",
        "| task switch (load + build) | median (min-max) | switches | file bytes | torch ops "
        "of one build | target <= 10 ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in d["switch"].items():
        ops = f"{s['ops']:,}" if s.get("ops") is not None else ""
        lines.append(
            f"| {name} | {_ms(s)} | {s['n']} | {s['file_bytes']:,} | {ops} | {_met(s['met'])} |"
        )
    lines += ["", "| batch | runtime | base | compact | speed-up |", "|---|---|---|---|---|"]
    for batch, b in d["latency"].items():
        for runtime, r in b["runtimes"].items():
            lines.append(
                f"| {batch} | {runtime} | {_ms(r['base'])} | {_ms(r['compact'])} | "
                f"{r['speedup']:.2f}x |"
            )
        best = b["best"]
        lines.append(
            f"| {batch} | best of each side ({best['base']} vs {best['compact']}) | | | "
            f"**{best['speedup']:.2f}x** = {b['fraction_of_mac_ratio']:.2f} of the MAC ratio "
            f"(target {b['target_fraction']:.1f}: {_met(b['met'])}) |"
        )
        if "best_round_to8" in b:  # the same target pruned with round_to=8 (deploy.py)
            r8 = b["best_round_to8"]
            lines.append(
                f"| {batch} | best of each side, compact pruned with round_to=8 "
                f"({r8['base']} vs {r8['compact']}) | | | {r8['speedup']:.2f}x = "
                f"{b['fraction_of_mac_ratio_round_to8']:.2f} of its MAC ratio |"
            )
    lines += _profile(d.get("profile"))
    by = d["bytes"]
    learned = by["learned"]
    lines += [
        "",
        f"Task file vs a fine-pruned checkpoint of the same masks at {by['filter_density']:.0%} "
        f"filter density ({by['weight_density']:.1%} of the weights): {by['task_bytes']:,} vs "
        f"{by['finepruned_bytes']:,} bytes, **{by['bytes_ratio']:.1f}x** smaller (target 17x: "
        f"{_met(by['met'])}); learned parameters {learned['stored']['task']:,} vs "
        f"{learned['stored']['finepruned']:,} as stored ({learned['ratio_stored']:.1f}x), "
        f"{learned['paper']['task']:,} vs {learned['paper']['finepruned']:,} as the paper "
        f"counts them ({learned['ratio_paper']:.1f}x).",
        END,
    ]
    return "\n".join(lines) + "\n"


def _profile(profile: dict | None) -> list[str]:
    """deploy.py's section 2b: ONNX Runtime's per-operator profile at batch 1."""
    if not profile:
        return []
    lines = ["", "Where the time goes (ONNX Runtime profile, batch 1, medians):", ""]
    for name, p in profile.items():
        one, two = p["1"], p["2"]
        lines.append(
            f"- {name}: {two['nodes']} operators, {p['macs'] / 1e9:.3f} GMAC "
            f"(+{p['padding']:.0%} padded to channel blocks); 1 thread {one['run_median_ms']:.2f} "
            f"ms ({one['gmacs_per_s']:.0f} GMAC/s), 2 threads {two['run_median_ms']:.2f} ms; "
            f"executor {two['executor_us']:.1f} us per operator, a second thread "
            f"{p['sync_us']:.1f} us per convolution"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    description = __doc__.splitlines()[0]
    write_block(argv, description, DEFAULT, section, START, END, "deployment figures")


if __name__ == "__main__":
    main()
