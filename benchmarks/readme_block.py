"""Replace one generated block of README.md, between its start and end markers.

Shared by the ``readme_*.py`` scripts: each writes its subsection from a benchmark's JSON, so the
README's figures are never copied by hand.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def replace_block(readme: str, block: str, start: str, end: str, after: str = "## Benchmarks"):
    """``readme`` with the text from ``start`` to ``end`` replaced by ``block`` (which holds
    both markers); without the markers the block is added at the end of section ``after``
    (or of the file)."""
    if start in readme and end in readme:
        head, rest = readme.split(start, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        return head + block + ("\n" + tail if tail else "")
    marker = "\n" + after
    if marker not in readme:
        return readme.rstrip("\n") + "\n\n" + block
    at = readme.index(marker) + len(marker)
    nxt = readme.find("\n## ", at)
    nxt = len(readme) if nxt < 0 else nxt + 1
    return readme[:nxt].rstrip("\n") + "\n\n" + block + "\n" + readme[nxt:]


def write_block(
    argv: list[str] | None,
    description: str,
    default: Path,
    section: Callable[[dict], str],
    start: str,
    end: str,
    what: str,
) -> None:
    """The command line of a writer: ``[results.json] [--readme README.md]`` (the JSON defaults
    to ``default``); the README's block from ``start`` to ``end`` becomes ``section(results)``,
    and the writer says ``<readme>: <what> written from <results.json>``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("json", nargs="?", type=Path, default=default)
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    data = json.loads(args.json.read_text(encoding="utf-8"))
    text = replace_block(args.readme.read_text(encoding="utf-8"), section(data), start, end)
    args.readme.write_text(text, encoding="utf-8")
    print(f"{args.readme}: {what} written from {args.json}")
