"""What a run shows and leaves behind: progress bars, the per-run log file, ``result.json``."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..io import atomic_write

LOGGER = logging.getLogger("sparta.train")


class Bars:
    """Rich progress bars with ETA: the whole run (in stages), the current epoch (in batches)
    and scoring (in batches). ``enabled=False`` turns every call into nothing."""

    def __init__(self, enabled: bool = True, console: Console | None = None):
        self.progress = Progress(
            TextColumn("{task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
        )
        self.run: TaskID | None = None
        self.inner: TaskID | None = None

    def __enter__(self) -> Bars:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def start_run(self, total: int, done: int) -> None:
        self.run = self.progress.add_task("run", total=total, completed=done, info="")

    def stage_done(self, info: str = "") -> None:
        if self.run is not None:
            self.progress.update(self.run, advance=1, info=info)

    def start(self, description: str, total: int) -> None:
        """A fresh inner bar (an epoch or scoring), replacing the previous one."""
        if self.inner is not None:
            self.progress.remove_task(self.inner)
        self.inner = self.progress.add_task(description, total=total, info="")

    def advance(self, info: str = "") -> None:
        if self.inner is not None:
            self.progress.update(self.inner, advance=1, info=info)


@contextmanager
def log_file(path: Path | None) -> Iterator[logging.Logger]:
    """Send ``sparta.train`` INFO records to ``path`` (appended: a resumed run continues its
    log) for the duration; ``None`` (ranks other than 0) writes nothing."""
    if path is None:
        yield LOGGER
        return
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    level = LOGGER.level
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    try:
        yield LOGGER
    finally:
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(level)
        handler.close()


def write_json(data: dict, path: Path) -> Path:
    """Write ``data`` as JSON atomically (temporary file, fsync, rename)."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    return path
