"""What ``sparta demo`` prints and leaves behind: the Table-1-shaped table, the settings, the
paper's claims checked on the demo's own numbers (both accountings, with the structural
ceiling of the parameter ratio), the deployment, ``results.json`` and the plots. See
:mod:`sparta.app.demo`."""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console

from .paper_claims import claim_lines
from .paper_report import rich_long_table, write_plots


def settings_lines(results: dict) -> list[str]:
    p, data = results["profile"], results["data"]
    g = results["grid"]
    size = f"{p['image_size']} px, " if p.get("image_size") else ""
    budget = f"{p['epochs']} epoch(s), then {g['steps']} pruning steps of "
    return [
        f"{results['title']}: {data['train']:,} training images ({p['val_fraction']:.0%} of them "
        f"held out for validation), {data['test']:,} test images, {size}seed {results['seed']}",
        budget + f"{g['step_fraction']:.0%} of the original filters ({p['criterion']} importance, "
        f"global ranking), each followed by {p['recovery_epochs']} recovery epoch(s); paper "
        f"recipe: SGD momentum 0.9, weight decay 5e-4, step lr schedule, lr {p['lr']:g} "
        f"(adapters x{_scale(results)}), batch {p['batch_size']}",
        "density = fraction of FILTERS kept (the paper's Table 1); 100% = each trajectory "
        "before its first pruning step (fine-pruning's is full fine-tuning). Learned params: "
        "'paper' counts every norm's affine parameters and the whole head (Table 1); 'stored' "
        "counts what the task file keeps (kept channels only). MFLOPs = 2 x MACs per image. "
        "acc = test accuracy; one seed, so differences of a few points are within noise.",
    ]


def _scale(results: dict) -> str:
    scales = {c.get("adapter_lr_scale") for c in results["configs"].values()}
    return "/".join(f"{s:g}" for s in sorted(s for s in scales if s is not None))


def deployment_lines(results: dict) -> list[str]:
    d = results["deployment"]
    lines = []
    for t in d["tasks"].values():
        speed = t["base_latency_ms"] / t["latency_ms"]
        lines.append(
            f"{t['label']} deployed at the lowest density: task file {t['task_bytes']:,} bytes; compact "
            f"model {t['compact_parameters']:,} parameters (base {d['base_parameters']:,}), "
            f"{t['macs'] / 1e6:.2f} M MACs per image (base {d['base_macs'] / 1e6:.2f} M), "
            f"{t['latency_ms']:.2f} ms vs {t['base_latency_ms']:.2f} ms per batch of "
            f"{d['latency_batch']} ({speed:.2f}x faster; median of {d['latency_repeats']})"
        )
    bank = d.get("bank")
    if bank:
        first = ", ".join(f"{n} {v:.1f} ms" for n, v in bank["first_switch_ms"].items())
        cached = ", ".join(f"{n} {v:.3f} ms" for n, v in bank["cached_switch_ms"].items())
        same = "yes" if bank["outputs_equal"] else "NO"
        lines.append(
            f"TaskBank on one base: first switch (build) {first}; cached switch {cached}; "
            f"served outputs equal a separately built model: {same}"
        )
    lines.append(
        f"base bit-identical after every run: {'yes' if d['base_bit_identical'] else 'NO'}"
    )
    return lines


def print_report(results: dict, console: Console) -> None:
    console.print(rich_long_table(results["aggregated"], title=results["title"]))
    lines = [*settings_lines(results), "", *claim_lines(results["claims"]), ""]
    lines += deployment_lines(results)
    for line in lines:
        console.print(line, markup=False, highlight=False)
    for failure in results["failed"]:
        console.print(f"FAILED {failure}", style="bold red", markup=False, highlight=False)
    load = ", ".join(f"{x:g}" for x in results["load_average"])
    console.print(
        f"wall time {results['wall_time_s']:.1f} s on {results['cpu_count']} CPU core(s), "
        f"{results['workers']} worker process(es) x {results['threads_per_worker']} thread; "
        f"load average {load}",
        highlight=False,
    )


def write_outputs(results: dict, out: Path) -> dict:
    """Write the plots and ``results.json`` into ``out``; returns the files written (relative),
    also recorded in ``results["files"]``."""
    from ..train.report import write_json

    plots = write_plots(results["aggregated"], out, title=results["title"])
    files = {
        "results": "results.json",
        "plots": [p.name for p in plots],
        "runs": "runs",
        "task_files": [
            os.path.relpath(t["task_file"], out) for t in results["deployment"]["tasks"].values()
        ],
    }
    results["files"] = files
    write_json(results, out / "results.json")
    return files
