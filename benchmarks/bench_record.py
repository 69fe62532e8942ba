"""What a benchmark's ``--json`` file records besides its figures: the machine, the versions,
the threads and the load average, so that a README figure states where and how it was measured.

Used by ``criteria_cost.py`` and ``train_step.py`` (run as scripts from ``benchmarks/``).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the system has none)."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def environment() -> dict:
    """Machine, CPU count, platform, python, torch and torch's intra-op threads."""
    return {
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def add_json_option(parser, name: str) -> None:
    """``--json [PATH]``: write every figure to PATH (no path: ``results/<name>.json``; without
    the flag nothing is written, so a casual run leaves the committed results alone)."""
    default = RESULTS / f"{name}.json"
    parser.add_argument(
        "--json",
        type=Path,
        nargs="?",
        const=default,
        default=None,
        help=f"write every figure here (no path: benchmarks/results/{default.name})",
    )


def write(path: Path, data: dict) -> None:
    """``data`` as JSON at ``path``, written atomically (a killed run leaves the old file)."""
    from sparta.io import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(data, indent=1) + "\n")
    print(f"figures written to {path}")
