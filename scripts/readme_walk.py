"""Walk README.md as a newcomer would: run every ```bash and ```python block verbatim, in order.

    .venv/bin/python scripts/readme_walk.py --clone /tmp/walk2 --json /tmp/walk2.json
    make readme-walk                       # the same on this clone (README_WALK_ARGS=... adds)

The clone (a fresh ``git clone`` after ``make demo``, which creates its ``.venv``) is the working
folder of every command, with its ``.venv/bin`` first on ``PATH`` (and ``VIRTUAL_ENV`` set), as
after ``source .venv/bin/activate``. The rest of the environment is passed on as it is.

How blocks run:

- ``python`` blocks: each block is its own ``.venv/bin/python -c CODE`` process. A block right
  after the line ``<!-- walk:continues -->`` goes on from the python block before it (it uses
  the names that block made): the two run in one process, the earlier block's code first
  (chains of such blocks are followed back to their first block), and the record is the later
  block's.
- ``bash`` blocks: line by line. A command is one line plus the lines its trailing ``\\``
  continues; comment lines and blank lines are not commands. Each command runs as
  ``bash -e -c COMMAND`` (its trailing ``# ...`` comment included, as bash ignores it), one
  after another in the same folder, so a command sees what the ones before it wrote. Each
  command is one record, with the README line it starts on.

What a command's trailing comment says, the walker checks:

- ``# refused...`` : the command documents a refusal, so it passes when it exits 2 (the CLI's
  exit code for bad input) and fails on any other code, 0 included.
- ``# Ctrl-C...`` : the walker sends SIGINT to the command's process group after
  ``--interrupt-after`` seconds; it passes on exit 130 (interrupted, as documented) or 0 (it
  ended before the signal; the record's note says so).
  Every command starts with SIGINT and SIGQUIT at their defaults, as from a terminal, even when
  the walker itself runs in the background (where they are inherited ignored).

Commands that serve until stopped (``SERVERS``: ``tensorboard``) run for ``--serve-timeout``
seconds; one passes when it is still running then and has printed a URL with a port (such as
``http://localhost:6006/``; a link to a web page in a warning is not one), and is then stopped (SIGTERM, then SIGKILL to its process group). Every other command or block passes
on exit 0 within ``--timeout`` seconds (past it, its process group is killed and it fails).

Lines: ``--only`` and ``--skip`` take README line numbers, comma-separated: the line a command
starts on, or the opening fence of a block (which selects every command of a bash block).
Skipped items are recorded as skipped, with the reason ``--skip``.

Output: a JSON file (``--json``; rewritten atomically after every item, so a walk stopped
half-way keeps what it did) with one record per item: README line, kind, the command or the
block's first line, exit code, expected codes, passed, wall seconds, a note, the clone's commit
when it ran, and the last ``--tail`` lines of stdout and stderr together (progress bars'
carriage returns read as line ends). With ``--update`` the records already in the file are
kept, except those of the lines run again, so a walk can be done in parts, or one block
re-walked after a fix; a kept record moves to the line its command (or its block's first line)
starts on now, and is dropped when that is no longer in the README.
A short table is printed at the end. The exit status is 0 when every item run passed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

CONTINUES = "<!-- walk:continues -->"
SERVERS = ("tensorboard",)
REFUSED_EXIT = 2  # the CLI's exit code for bad input (unknown names, values, refused flags)
INTERRUPTED_EXIT = 130
_FENCE = re.compile(r"^```(bash|python)\s*$")
_SERVED = re.compile(r"https?://[\w.\-]+:\d+/?\S*")  # a URL with a port: where it serves
_COMMENT = re.compile(r"(?:^|\s)#\s*(.*)$")


@dataclass
class Item:
    """One thing to run: a python block, or one command of a bash block."""

    line: int  # README line of the command, or of the block's opening fence
    block: int  # README line of the block's opening fence
    kind: str  # "bash" or "python"
    code: str
    prelude: str = ""  # python: the code of the blocks it continues, run first
    continues: list[int] = field(default_factory=list)  # their fence lines
    comment: str = ""  # bash: the command's trailing comment

    @property
    def what(self) -> str:
        first = self.code.strip().splitlines()[0] if self.code.strip() else ""
        return first if self.kind == "bash" else f"python block: {first}"


def parse(text: str) -> list[Item]:
    """The README's bash commands and python blocks, in order (see the module's docstring)."""
    lines = text.splitlines()
    items: list[Item] = []
    last_python: Item | None = None
    i = 0
    while i < len(lines):
        found = _FENCE.match(lines[i])
        if not found:
            i += 1
            continue
        kind, start = found.group(1), i + 1  # 1-based line of the opening fence
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        body = lines[i + 1 : end]
        previous = next((ln.strip() for ln in reversed(lines[:i]) if ln.strip()), "")
        if kind == "python":
            item = Item(start, start, "python", "\n".join(body) + "\n")
            if previous == CONTINUES:
                if last_python is None:
                    raise ValueError(
                        f"README line {start}: {CONTINUES} but no python block before it; "
                        "expected the marker only before a block that goes on from another"
                    )
                item.prelude = last_python.prelude + last_python.code
                item.continues = [*last_python.continues, last_python.block]
            items.append(item)
            last_python = item
        else:
            items.extend(_commands(body, start))
        i = end + 1
    return items


def _commands(body: list[str], fence: int) -> list[Item]:
    commands: list[Item] = []
    j = 0
    while j < len(body):
        stripped = body[j].strip()
        if not stripped or stripped.startswith("#"):
            j += 1
            continue
        first, parts = j, [body[j]]
        while parts[-1].rstrip().endswith("\\") and j + 1 < len(body):
            j += 1
            parts.append(body[j])
        comment = _COMMENT.search(parts[-1])
        commands.append(
            Item(
                fence + 1 + first,
                fence,
                "bash",
                "\n".join(parts),
                comment=comment.group(1).strip() if comment else "",
            )
        )
        j += 1
    return commands


def expectation(item: Item) -> tuple[list[int], str]:
    """The exit codes that pass and the way the command is run: normal, interrupt or serve."""
    if item.kind == "bash":
        comment = item.comment.lower()
        if comment.startswith("refused"):
            return [REFUSED_EXIT], "normal"
        if comment.startswith("ctrl-c"):
            return [INTERRUPTED_EXIT, 0], "interrupt"
        words = item.code.split()
        if words and Path(words[0]).name in SERVERS:
            return [], "serve"
    return [0], "normal"


@dataclass
class Record:
    line: int
    block: int
    kind: str
    what: str
    status: str  # passed, failed, skipped
    exit_code: int | None = None
    expected: list[int] = field(default_factory=list)
    wall_s: float = 0.0
    note: str = ""
    commit: str = ""  # the clone's commit when it ran (a walk in parts may span several)
    output_tail: list[str] = field(default_factory=list)


def environment(clone: Path) -> dict[str, str]:
    env = dict(os.environ)
    venv = clone / ".venv"
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env.pop("PYTHONHOME", None)
    return env


def _terminal_signals() -> None:
    """In the child: SIGINT and SIGQUIT as a terminal's command gets them. A walker started in
    the background (``cmd &`` in a script) inherits them ignored, and so would every command,
    with Python then installing no KeyboardInterrupt handler: Ctrl-C would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def _stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_item(item: Item, clone: Path, env: dict[str, str], options) -> Record:
    expected, mode = expectation(item)
    record = Record(item.line, item.block, item.kind, item.what, "failed", expected=expected)
    record.commit = _commit(clone)
    if item.kind == "python":
        argv = [str(clone / ".venv" / "bin" / "python"), "-c", item.prelude + item.code]
        if item.continues:
            record.note = f"runs after the block(s) at line(s) {item.continues} in one process"
    else:
        argv = ["bash", "-e", "-c", item.code]
    limit = options.serve_timeout if mode == "serve" else options.timeout
    with tempfile.TemporaryFile() as out:
        start = time.perf_counter()
        proc = subprocess.Popen(
            argv, cwd=clone, env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_terminal_signals,
        )  # fmt: skip
        interrupted = still_running = False
        try:
            if mode == "interrupt":
                try:
                    proc.wait(options.interrupt_after)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGINT)
                    interrupted = True
            proc.wait(max(limit - (time.perf_counter() - start), 0.1))
        except subprocess.TimeoutExpired:
            still_running = True
            _stop(proc)
        record.wall_s = round(time.perf_counter() - start, 2)
        out.seek(0)
        text = out.read().decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")
    lines = [ln.rstrip() for ln in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    record.output_tail = lines[-options.tail :]
    # a process ended by signal N reads as a shell reports it: 128 + N (SIGINT: 130)
    code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
    if mode == "serve":
        record.exit_code = None if still_running else code
        url = _SERVED.search(text)
        if still_running and url:
            record.status = "passed"
            record.note = f"still serving after {limit:g} s at {url.group(0)}; stopped"
        else:
            record.note = f"expected it to serve past {limit:g} s and print a URL; " + (
                "it printed none" if still_running else "it exited"
            )
        return record
    record.exit_code = None if still_running else code
    if still_running:
        record.note = f"timed out after {limit:g} s (--timeout); stopped"
        return record
    if code in expected:
        record.status = "passed"
    if mode == "interrupt":
        record.note = (
            f"SIGINT sent after {options.interrupt_after:g} s"
            if interrupted
            else f"ended within {options.interrupt_after:g} s, before the SIGINT"
        )
    elif expected == [REFUSED_EXIT]:
        record.note = "documented as refused: expected exit 2"
    return record


def _lines(value: str) -> set[int]:
    try:
        return {int(part) for part in value.split(",") if part.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected README line numbers separated by commas, got {value!r}"
        ) from None


def select(items: list[Item], only: set[int], skip: set[int]) -> list[tuple[Item, bool]]:
    """Each item with whether it runs (``only`` and ``skip`` match its line or its block's)."""
    chosen = []
    for item in items:
        keys = {item.line, item.block}
        runs = (not only or bool(keys & only)) and not keys & skip
        chosen.append((item, runs))
    return chosen


def rekey(kept: list[Record], items: list[Item]) -> list[Record]:
    """Records of an earlier walk, at the lines their command or block now starts on (README
    edits above them move them); a record whose command or block's first line is no longer in
    the README is dropped (it needs walking again). Equal commands: the nearest line."""
    out = []
    for record in kept:
        same = [i for i in items if i.kind == record.kind and i.what == record.what]
        if not same:
            continue
        item = min(same, key=lambda i: abs(i.line - record.line))
        record.line, record.block = item.line, item.block
        out.append(record)
    return out


def merge(kept: list[Record], new: list[Record]) -> list[Record]:
    """``kept`` with the records of ``new`` in place of those of the same line, by line."""
    lines = {r.line for r in new}
    return sorted([r for r in kept if r.line not in lines] + new, key=lambda r: r.line)


def table(records: list[Record]) -> str:
    rows = ["| line | kind | what | exit | s | result |", "|---|---|---|---|---|---|"]
    for r in records:
        what = r.what if len(r.what) <= 70 else r.what[:67] + "..."
        code = "" if r.exit_code is None else str(r.exit_code)
        result = r.status + (f" ({r.note})" if r.note and r.status != "passed" else "")
        rows.append(f"| {r.line} | {r.kind} | `{what}` | {code} | {r.wall_s:.1f} | {result} |")
    return "\n".join(rows)


def write_json(path: Path, readme: Path, clone: Path, records: list[Record]) -> None:
    data = {
        "readme": str(readme),
        "clone": str(clone),
        "commit": _commit(clone),
        "records": [asdict(r) for r in records],
    }
    try:
        from sparta.io import atomic_write
    except ImportError:  # a walker run outside the package's environment
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
        os.replace(tmp, path)
        return
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)


def _commit(clone: Path) -> str:
    done = subprocess.run(
        ["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    return done.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clone", type=Path, default=Path.cwd(), help="the working folder")
    parser.add_argument("--readme", type=Path, help="default: CLONE/README.md")
    parser.add_argument("--json", type=Path, default=Path("readme_walk.json"))
    parser.add_argument("--only", type=_lines, default=set(), help="README lines to run")
    parser.add_argument("--skip", type=_lines, default=set(), help="README lines not to run")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per item")
    parser.add_argument("--serve-timeout", type=float, default=20.0)
    parser.add_argument("--interrupt-after", type=float, default=15.0)
    parser.add_argument(
        "--update", action="store_true", help="keep the records of --json for lines not run"
    )
    parser.add_argument("--tail", type=int, default=40, help="output lines kept per item")
    options = parser.parse_args(argv)
    clone = options.clone.resolve()
    readme = (options.readme or clone / "README.md").resolve()
    if not (clone / ".venv" / "bin" / "python").exists():
        parser.error(
            f"{clone} has no .venv/bin/python; run `make demo` (or `make test`) there first"
        )
    items = parse(readme.read_text(encoding="utf-8"))
    env = environment(clone)
    kept: list[Record] = []
    if options.update and options.json.exists():
        old = json.loads(options.json.read_text(encoding="utf-8"))["records"]
        kept = rekey([Record(**r) for r in old], items)
    records: list[Record] = []
    for item, runs in select(items, options.only, options.skip):
        if not runs:
            # an item --only did not select is simply not part of this walk; one --skip took
            # out of it is recorded as skipped
            if not options.only or {item.line, item.block} & options.only:
                records.append(
                    Record(item.line, item.block, item.kind, item.what, "skipped", note="--skip")
                )
            continue
        print(f"[line {item.line}] {item.kind}: {item.what}", file=sys.stderr, flush=True)
        record = run_item(item, clone, env, options)
        print(
            f"    -> {record.status}, exit {record.exit_code}, {record.wall_s:.1f} s"
            + (f" ({record.note})" if record.note else ""),
            file=sys.stderr,
            flush=True,
        )
        if record.status == "failed":
            print("    " + "\n    ".join(record.output_tail[-8:]), file=sys.stderr, flush=True)
        records.append(record)
        write_json(options.json, readme, clone, merge(kept, records))
    write_json(options.json, readme, clone, merge(kept, records))
    print(table(records))
    return 0 if all(r.status != "failed" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
