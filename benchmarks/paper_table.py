"""The paper's Table 1 on a real pretrained network: ImageNet MobileNetV2 -> Fashion-MNIST.

Full fine-tuning, fine-pruning, SPLoRA r8 and r32 and SPPaRA, pruned iteratively (5% of the
original filters per step, global ranking, recovery training after every step) to 30% and 10%
**filter density** (fraction of filters kept), with the paper's recipe (``RunConfig.from_recipe(
"paper")``: SGD momentum 0.9, weight decay 5e-4, step lr, adapters at 10x the lr, 10% of the
training images held out for validation) and the same budget for every method. The grid is
planned, run and tabulated by :mod:`sparta.app.paper` (one run per trajectory: the 30% row and the
10% row of a method and seed come from the same run). Then the transformer row
(``benchmarks/paper_text.py``: all-MiniLM-L6-v2 on BBC News, SPLoRA vs fine-pruning of heads and
FFN neurons to 25% kept).

Printed: the table in Table 1's layout (accuracy mean +- std over seeds, learned parameters as
the paper counts them and as a task file stores them, MFLOPs), the paper's claims checked on it
(in both accountings) with the structural ceiling of the parameter ratio on MobileNetV2, the
median time of a Pruner step for fine-pruning and SPLoRA (from the runner's timings), threads,
load average and wall time. Written: ``<out>/paper_table.json`` (``paper_table_<budget>.json``
for ``--quick``/``--full``) and the two Fig.-6 plots ``<out>/paper_table_accuracy_vs_*.png``.

Budgets (2 CPU cores, 2 worker processes of 1 thread each):

- default (about 25 min on a quiet machine): 1,000 training images (900 train + 100 val) and
  1,000 test images at 64 px (class-balanced subsets, seed 0); 3 initial epochs, 1 recovery
  epoch per step (18 steps to 10%, 21 epochs in all; full fine-tuning gets 21 epochs too), batch
  32, lr 0.01 (adapters x10: the demo's settings, chosen on its validation split); criterion
  taylor; seeds 0 and 1 (10 runs); then the text row's default budget (4 runs, about 7 min).
  A first default at 32 px, batch 64 and lr 0.003 (1,350 training images) left the pruned
  models under-trained (fine-pruning l1 at 10% filters: 7.5% and 15.6%, SPLoRA taylor 35% and
  21%): at 32 px MobileNetV2's last stages see 1x1 maps, and 21 batches per recovery epoch
  were too few. A trajectory here costs about 200 CPU-s (an epoch of 900 images at 64 px, one
  thread, ~8 s; 19 evaluations of 1,000 images ~25 s);
- ``--quick`` (2-3 min): finetune, fine-pruning and SPLoRA r8, 512 + 256 images, steps of 30%,
  one seed, and the text row's quick budget: a smoke run, not a result;
- ``--full``: the paper's grid (criteria l1, gradient, taylor, lrp; 3 seeds), 6,000 + 2,000
  images at 64 px, 3 recovery epochs per step: hours on 2 cores.

Resumable: every run keeps a checkpoint under ``--runs``; rerunning after a kill continues the
unfinished runs and reads the finished ones back.

    .venv/bin/python benchmarks/paper_table.py [--quick | --full] [--out DIR] [--no-text]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from sparta.errors import SpartaError

sys.path.insert(0, str(Path(__file__).resolve().parent))
import paper_text  # noqa: E402  (the transformer row, a sibling script)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

BUDGETS = {
    "quick": dict(
        methods=("finetune", "fine-pruning", "splora-r8"), criteria=("taylor",), seeds=(0,),
        densities=(0.4, 0.1), step_fraction=0.3, train=512, test=256, image_size=32,
        runner=dict(epochs=2, recovery_epochs=1, batch_size=64, scoring_batches=1),
    ),
    "default": dict(
        methods=("finetune", "fine-pruning", "splora-r8", "splora-r32", "sppara"),
        criteria=("taylor",), seeds=(0, 1), densities=(0.3, 0.1), step_fraction=0.05,
        train=1000, test=1000, image_size=64,
        runner=dict(epochs=3, recovery_epochs=1, batch_size=32, scoring_batches=4, lr=0.01),
    ),
    "full": dict(
        methods=("finetune", "fine-pruning", "splora-r8", "splora-r32", "sppara"),
        criteria=("l1", "gradient", "taylor", "lrp"), seeds=(0, 1, 2), densities=(0.3, 0.1),
        step_fraction=0.05, train=6000, test=2000, image_size=64,
        runner=dict(epochs=5, recovery_epochs=3, batch_size=64, scoring_batches=8),
    ),
}  # fmt: skip
PLOT_PREFIX = "paper_table_"


def datasets(budget: dict, data_dir: Path):
    """Seeded class-balanced subsets of Fashion-MNIST's train and test splits."""
    import dataclasses

    from sparta.data import load_dataset, subset

    full = load_dataset(
        "fashion-mnist", data_dir=data_dir, image_size=budget["image_size"], download=False
    )
    return dataclasses.replace(
        full,
        train=subset(full.train, budget["train"], 0),
        test=subset(full.test, budget["test"], 0),
    )


def model():
    """torchvision's ImageNet MobileNetV2 (IMAGENET1K_V1) with a new 10-class head."""
    from sparta.models import create

    return create("mobilenet_v2", num_classes=10, weights="IMAGENET1K_V1")


def step_times(outcomes: list[dict]) -> dict:
    """Median seconds of one Pruner step (scoring excluded) per method, from the runner's
    timings: per run ``(prune_s - score_s) / steps``."""
    per: dict[str, list[float]] = {}
    for o in outcomes:
        result = o.get("result") or {}
        steps = len(result.get("pruning", []))
        timings = result.get("timings", {})
        if steps and "prune_s" in timings:
            seconds = (timings["prune_s"] - timings.get("score_s", 0.0)) / steps
            per.setdefault(o["key"].split("/")[0], []).append(seconds)
    return {k: {"median_s": statistics.median(v), "runs": len(v)} for k, v in per.items()}


def run_grid(budget_name: str, runs: Path, data_dir: Path, workers: int, log=print):
    """Plan, run (resumable) and tabulate the image grid with :func:`sparta.app.paper.compare`."""
    from sparta.app.paper import Grid, compare

    b = BUDGETS[budget_name]
    grid = Grid(
        methods=b["methods"], criteria=b["criteria"], densities=b["densities"],
        seeds=b["seeds"], step_fraction=b["step_fraction"],
    )  # fmt: skip
    data = datasets(b, data_dir)
    log(
        f"{len(grid.methods)} methods x {len(grid.criteria)} criteria x {len(grid.seeds)} seeds, "
        f"{grid.steps} pruning steps to {min(grid.densities):.0%} filter density; "
        f"{len(data.train)} training images ({len(data.test)} test) at {b['image_size']} px"
    )

    def done(outcome: dict) -> None:
        status = outcome["status"] + (" (resumed)" if outcome.get("resumed") else "")
        log(f"  {outcome['key']}: {status} in {outcome['wall_s']:.0f} s "
            + (outcome.get("error") or ""))  # fmt: skip

    folder = runs / paper_text.settings_folder(budget_name, b)
    return compare(
        grid, model(), data, folder, workers=workers, on_outcome=done, device="cpu", **b["runner"]
    )


def write_plots(agg, out: Path, prefix: str = PLOT_PREFIX) -> list[Path]:
    """The two Fig.-6 plots as ``<out>/<prefix><plot>.png``."""
    from sparta.app.paper_report import write_plots as plots

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        for path in plots(agg, tmp, "ImageNet MobileNetV2 -> Fashion-MNIST (filters kept)"):
            target = out / f"{prefix}{path.name}"
            os.replace(path, target)
            paths.append(target)
    return paths


def report(data: dict, log=print) -> None:
    """Everything the benchmark prints, from its JSON (so a rerun prints the same)."""
    from rich.console import Console

    from sparta.app.paper import claim_lines
    from sparta.app.paper_report import rich_table

    c = data["setup"]
    log(
        f"ImageNet MobileNetV2 -> Fashion-MNIST: {c['train']} training images (10% held out for "
        f"validation), {c['test']} test, {c['image_size']} px; {c['steps']} steps of "
        f"{c['step_fraction']:.0%} of the filters; density = fraction of filters kept"
    )
    Console(width=200).print(rich_table(data["aggregated"], "Table 1 layout"))
    for line in claim_lines(data["claims"]):
        log(line)
    for method, t in sorted(data["prune_step_s"].items()):
        log(f"Pruner step ({method}): median {t['median_s']:.2f} s over {t['runs']} run(s)")
    failed = [r for r in data["runs"] if r["status"] == "failed"]
    for r in failed:
        log(f"FAILED {r['key']}: {r['error']}")
    if data.get("text"):
        log("")
        paper_text.report(data["text"], log)
    elif data.get("text_skipped"):
        log(f"transformer row skipped: {data['text_skipped']}")
    m = data["machine"]
    reused = [r["key"] for r in data["runs"] if r["status"] == "skipped" or r.get("resumed")]
    if reused:
        log(
            f"note: {len(reused)} of {len(data['runs'])} image runs were finished or started "
            "by an earlier invocation (read back or resumed): the wall time below is this "
            "invocation's only"
        )
    log(
        f"threads: {m['workers']} worker process(es) x {m['threads']} torch thread(s) "
        f"({m['cpus']} CPUs); load average {m['load_average']}; wall time "
        f"{data['wall_s'] / 60:.1f} min (image grid {data['grid_wall_s'] / 60:.1f}, text row "
        f"{data.get('text_wall_s', 0) / 60:.1f})"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a 2-3 minute smoke run")
    mode.add_argument("--full", action="store_true", help="the paper's whole grid (hours)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON and plots folder")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "paper_table",
                        help="run folders (checkpoints; resumed from)")  # fmt: skip
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--workers", type=int, default=2, help="processes, 1 thread each")
    parser.add_argument("--no-text", action="store_true", help="skip the transformer row")
    args = parser.parse_args(argv)
    name = "quick" if args.quick else "full" if args.full else "default"
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        comparison = run_grid(name, args.runs, args.data_dir, args.workers)
    except SpartaError as exc:  # missing data or weights: say how to get them, no traceback
        print(f"paper_table: {exc}", file=sys.stderr)
        return 2
    grid_wall = time.perf_counter() - start
    b = BUDGETS[name]
    data = comparison.to_dict()
    data.update(
        budget=name,
        setup={k: b[k] for k in ("train", "test", "image_size", "step_fraction")}
        | {"steps": comparison.grid.steps, **b["runner"]},
        prune_step_s=step_times(comparison.outcomes),
        grid_wall_s=grid_wall,
    )
    if not args.no_text:
        t0 = time.perf_counter()
        try:
            text = paper_text.text_row(name, args.out, args.workers, args.runs)
            data["text"] = {k: v for k, v in text.items() if k != "rows"}
        except SpartaError as exc:  # the encoder or the corpus is not installed
            print(f"transformer row skipped: {exc}", file=sys.stderr)
            data["text_skipped"] = str(exc)
        data["text_wall_s"] = time.perf_counter() - t0
    data["wall_s"] = time.perf_counter() - start
    data["machine"] = {
        "workers": args.workers,
        "threads": 1,
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
    }
    suffix = "" if name == "default" else f"_{name}"
    paper_text._write_json(data, args.out / f"paper_table{suffix}.json")
    write_plots(comparison.aggregated, args.out, f"paper_table{suffix}_")
    report(data)
    return 1 if comparison.failed else 0


if __name__ == "__main__":
    sys.exit(main())
