"""README.md's figures cannot go stale: every generated block is what its writer makes of the
results file committed with it (``make readme`` == ``benchmarks/readme_all.py``), and the
blocks the writers own are all there, each once."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def _readme_all():
    spec = importlib.util.spec_from_file_location(
        "readme_all", REPO / "benchmarks" / "readme_all.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_generated_block_matches_its_results_file():
    text = README.read_text(encoding="utf-8")
    generated = _readme_all().render(text)
    if generated != text:
        import difflib

        diff = "\n".join(
            list(difflib.unified_diff(text.splitlines(), generated.splitlines(), lineterm=""))[:40]
        )
        pytest.fail(f"README.md differs from its results files (run `make readme`):\n{diff}")


def test_every_block_of_the_readme_has_a_writer_and_is_there_once():
    text = README.read_text(encoding="utf-8")
    module = _readme_all()
    names = [b[0] for b in module.BLOCKS]
    assert set(re.findall(r"<!-- ([a-z_-]+):start -->", text)) == set(names)
    for name in names:
        assert text.count(f"<!-- {name}:start -->") == text.count(f"<!-- {name}:end -->") == 1
    # every block but those whose benchmark has not been run yet is checked above
    assert set(module.pending()) <= {"text"}
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert "readme:" in makefile and "benchmarks/readme_all.py" in makefile


def test_a_changed_results_file_changes_the_readme_and_check_says_so(tmp_path, capsys):
    module = _readme_all()
    results = tmp_path / "results"
    shutil.copytree(REPO / "benchmarks" / "results", results)
    demo = json.loads((results / "demo.json").read_text(encoding="utf-8"))
    demo["wall_time_s"] = demo["wall_time_s"] + 1000  # a rerun that took longer
    (results / "demo.json").write_text(json.dumps(demo), encoding="utf-8")
    readme = tmp_path / "README.md"
    shutil.copy(README, readme)
    check = ["--readme", str(readme), "--results", str(results), "--check"]
    assert module.main(check) == 1 and "make readme" in capsys.readouterr().out
    assert module.main(["--readme", str(readme), "--results", str(results)]) == 0
    assert module.main(check) == 0
    assert readme.read_text(encoding="utf-8") != README.read_text(encoding="utf-8")
