"""``sparta demo``: the paper's comparison on a real network (:mod:`sparta.app.demo`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..app.demo import DEMO_WORKERS
from .console import app, stdout, user_errors

#: Default output folders: the toy has its own, or its runs (same method folders) and its
#: results.json would be mixed with the real demo's.
DEMO_OUT, TOY_OUT = "sparta-demo", "sparta-demo-toy"


# -- sparta demo ---------------------------------------------------------------------------------
@app.command("demo")
def demo_command(
    out: Annotated[
        Path | None,
        typer.Option(
            help="Folder for results.json, plots and the run folders [default: sparta-demo; "
            "with --toy: sparta-demo-toy, so that neither demo reads back the other's runs]."
        ),
    ] = None,
    toy: Annotated[
        bool, typer.Option("--toy", help="The small digits demo instead (no assets needed).")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed for the subsets, init and data order.")] = 0,
    epochs: Annotated[
        int | None, typer.Option(help="Initial training epochs (default: the demo's own).")
    ] = None,
    workers: Annotated[int, typer.Option(help="Processes running the methods side by side.")] = (
        DEMO_WORKERS
    ),
) -> None:
    """The paper's comparison on a real network, offline (2 CPU cores, about 4 minutes).

    ImageNet MobileNetV2 learns real Fashion-MNIST images by fine-pruning and by SPLoRA r8 with
    the paper's recipe, pruned to 30% and 10% FILTER density; prints accuracy, learned
    parameters in both accountings (stored / as the paper counts) and MFLOPs in Table 1's
    layout, whether the paper's claims hold here (with the structural ceiling of the parameter
    ratio), and each SPLoRA task's compact model, MACs and latency. Needs `make assets`. With
    --toy: the small digits demo (digits_cnn, 4 methods, 50/30/10% filter density).
    Writes OUT/results.json, plots and one run folder per method (OUT: sparta-demo, or
    sparta-demo-toy with --toy); a rerun reads finished runs back and resumes interrupted ones.

    Example: `sparta demo --out sparta-demo`, `sparta demo --toy`
    """
    from ..app.demo import run_demo

    if out is None:
        out = Path(TOY_OUT if toy else DEMO_OUT)
    with user_errors():
        run_demo(out_dir=out, seed=seed, epochs=epochs, toy=toy, workers=workers, console=stdout)
