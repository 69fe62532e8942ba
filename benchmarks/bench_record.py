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


def write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print(f"figures written to {path}")
