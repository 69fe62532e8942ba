"""The README's Trainer and Lightning quick starts run verbatim on CPU (issue #14, item 2):
each block after its ``<!-- quickstart:... -->`` marker runs in a fresh interpreter in an
empty folder and must end with its task file written and built."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = {"trainer": ("transformers", "bert.sparta"), "lightning": ("lightning", "cnn.sparta")}


def quickstart(name: str) -> str:
    text = README.read_text(encoding="utf-8")
    found = re.search(rf"<!-- quickstart:{name} -->\s*```python\n(.*?)```", text, re.S)
    assert found, f"README has no block after <!-- quickstart:{name} -->"
    return found.group(1)


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_readme_quickstart_runs_verbatim(tmp_path, name):
    package, task = BLOCKS[name]
    pytest.importorskip(package)
    code = quickstart(name)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / task).stat().st_size > 0
    assert "tensor([[" in done.stdout  # the compact model's outputs were printed
    assert "density" in done.stdout
