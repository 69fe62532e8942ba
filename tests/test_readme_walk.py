"""scripts/readme_walk.py: the README walker's parser and runner, on a made-up README whose
commands are tiny shell and python snippets (no sparta command runs)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _walker():
    spec = importlib.util.spec_from_file_location(
        "readme_walk", REPO / "scripts" / "readme_walk.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["readme_walk"] = module
    spec.loader.exec_module(module)
    return module


walk = _walker()

README = """\
# made up

```bash
echo one   # the first command
# a comment line, not a command

printf '%s\\n' two \\
    three
```

```python
x = 21
print("py", x)
```

<!-- walk:continues -->
```python
print("double", x * 2)
```

```text
not run
```

```bash
exit 2       # refused: the documented bad input
exit 0       # refused: but it is not
false
fakeserver --port 0
sleep 30     # Ctrl-C, or kill it
```
"""


def test_parse_finds_commands_blocks_lines_and_continuations():
    items = walk.parse(README)
    assert [(i.line, i.block, i.kind) for i in items] == [
        (4, 3, "bash"),
        (7, 3, "bash"),
        (11, 11, "python"),
        (17, 17, "python"),
        (26, 25, "bash"),
        (27, 25, "bash"),
        (28, 25, "bash"),
        (29, 25, "bash"),
        (30, 25, "bash"),
    ]
    assert items[1].code == "printf '%s\\n' two \\\n    three"
    assert items[0].comment == "the first command"
    assert items[2].prelude == "" and items[2].continues == []
    assert items[3].prelude == 'x = 21\nprint("py", x)\n' and items[3].continues == [11]
    assert [walk.expectation(i) for i in items[4:]] == [
        ([2], "normal"),
        ([2], "normal"),
        ([0], "normal"),
        ([0], "normal"),
        ([130, 0], "interrupt"),
    ]


def test_a_continuation_without_a_python_block_before_it_is_refused():
    with pytest.raises(ValueError, match="line 2"):
        walk.parse("<!-- walk:continues -->\n```python\nprint(1)\n```\n")


def test_only_and_skip_match_a_command_line_or_its_block():
    items = walk.parse(README)
    runs = [i.line for i, r in walk.select(items, {25, 4}, set()) if r]
    assert runs == [4, 26, 27, 28, 29, 30]
    runs = [i.line for i, r in walk.select(items, set(), {3, 17}) if r]
    assert runs == [11, 26, 27, 28, 29, 30]


def _clone(tmp_path: Path, readme: str) -> Path:
    clone = tmp_path / "clone"
    (clone / ".venv" / "bin").mkdir(parents=True)
    os.symlink(sys.executable, clone / ".venv" / "bin" / "python")
    server = clone / ".venv" / "bin" / "tensorboard"  # found first on PATH: the clone's venv
    server.write_text(
        "#!/bin/sh\necho see https://example.org/notes\necho serving at http://localhost:6006/\n"
        "exec sleep 60\n"
    )
    server.chmod(0o755)
    (clone / "README.md").write_text(readme, encoding="utf-8")
    return clone


def test_walk_runs_each_item_in_the_clone_and_records_it(tmp_path, monkeypatch):
    # as in a walker started in the background (`walk &`): SIGINT arrives ignored; the commands
    # must get it at its default, or the Ctrl-C command below would run on to its timeout
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    readme = README.replace("fakeserver --port 0", "tensorboard --logdir runs/x")
    clone = _clone(tmp_path, readme)
    out = tmp_path / "walk.json"
    monkeypatch.setattr(walk, "SERVERS", ("tensorboard",))
    try:
        code = walk.main(
            ["--clone", str(clone), "--json", str(out), "--skip", "4", "--serve-timeout", "3",
             "--interrupt-after", "1", "--timeout", "20"]
        )  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 1  # `exit 0 # refused` and `false` fail
    records = json.loads(out.read_text(encoding="utf-8"))["records"]
    by_line = {r["line"]: r for r in records}
    assert by_line[4]["status"] == "skipped" and by_line[4]["note"] == "--skip"
    assert by_line[7]["status"] == "passed" and by_line[7]["output_tail"] == ["two", "three"]
    assert by_line[11]["output_tail"] == ["py 21"]
    # the continuation ran in one process with the block before it
    assert by_line[17]["status"] == "passed"
    assert by_line[17]["output_tail"] == ["py 21", "double 42"]
    assert (by_line[26]["status"], by_line[26]["exit_code"]) == ("passed", 2)
    assert (by_line[27]["status"], by_line[27]["exit_code"]) == ("failed", 0)
    assert (by_line[28]["status"], by_line[28]["exit_code"]) == ("failed", 1)
    server = by_line[29]
    assert server["status"] == "passed" and server["exit_code"] is None
    assert "http://localhost:6006/" in server["note"] and 3 <= server["wall_s"] < 15
    interrupted = by_line[30]
    assert (interrupted["status"], interrupted["exit_code"]) == ("passed", 130)
    assert interrupted["wall_s"] < 15 and "SIGINT" in interrupted["note"]
    assert all(r["wall_s"] >= 0 for r in records)


def test_a_command_past_its_timeout_is_stopped_and_fails(tmp_path):
    clone = _clone(tmp_path, "```bash\nsleep 30\ntensorboard --quiet && exit 1\n```\n")
    (clone / ".venv" / "bin" / "tensorboard").write_text("#!/bin/sh\nexit 0\n")
    out = tmp_path / "walk.json"
    assert walk.main(["--clone", str(clone), "--json", str(out), "--timeout", "1",
                      "--serve-timeout", "2"]) == 1  # fmt: skip
    sleep, server = json.loads(out.read_text(encoding="utf-8"))["records"]
    assert sleep["status"] == "failed" and sleep["exit_code"] is None
    assert "timed out" in sleep["note"] and sleep["wall_s"] < 10
    assert server["status"] == "failed" and "it exited" in server["note"]


def test_the_real_readme_parses_and_its_continuations_follow_a_python_block():
    items = walk.parse((REPO / "README.md").read_text(encoding="utf-8"))
    assert sum(i.kind == "python" for i in items) >= 10
    assert any(i.kind == "bash" and i.code.startswith("sparta run") for i in items)
    for item in items:
        if item.continues:
            assert item.kind == "python" and item.prelude.strip()


def test_update_keeps_the_records_of_lines_not_run_again(tmp_path):
    clone = _clone(tmp_path, "```bash\necho first\nfalse\n```\n")
    out = tmp_path / "walk.json"
    assert walk.main(["--clone", str(clone), "--json", str(out)]) == 1
    (clone / "README.md").write_text("```bash\necho first\ntrue\n```\n", encoding="utf-8")
    assert walk.main(["--clone", str(clone), "--json", str(out), "--only", "3", "--update"]) == 0
    records = json.loads(out.read_text(encoding="utf-8"))["records"]
    assert [(r["line"], r["status"], r["output_tail"]) for r in records] == [
        (2, "passed", ["first"]),
        (3, "passed", []),
    ]
    # README edits above a kept record move it; a command no longer there drops its record
    (clone / "README.md").write_text("new\n\n```bash\necho first\necho new\n```\n", "utf-8")
    assert walk.main(["--clone", str(clone), "--json", str(out), "--only", "5", "--update"]) == 0
    records = json.loads(out.read_text(encoding="utf-8"))["records"]
    assert [(r["line"], r["block"], r["what"]) for r in records] == [
        (4, 3, "echo first"),
        (5, 3, "echo new"),
    ]
    # --skip inside what --only selects is recorded as skipped; what --only leaves out is not
    assert walk.main(["--clone", str(clone), "--json", str(out), "--only", "3", "--skip", "4"]) == 0
    records = json.loads(out.read_text(encoding="utf-8"))["records"]
    assert [(r["line"], r["status"]) for r in records] == [(4, "skipped"), (5, "passed")]
