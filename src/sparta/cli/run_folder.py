"""What ``sparta run`` does with its output folder before a run starts: the config of a run
resumed from its folder alone, the refusals that keep one run from replacing another, and the
``config.json`` recorded in every run (and grid) folder.

- ``--resume --output-dir DIR`` reads DIR's saved config (``config.json``, else the run's
  ``result.json`` or checkpoint); other flags given with it must agree with it (a flag that
  does not change results, such as ``--device``, may differ), else the differing keys are named.
- A folder that already holds a run is refused unless the command continues that same run
  (``--resume``, or a grid run again) or ``--overwrite`` replaces it.
- An ``--output-dir`` that is a file, or that cannot be created, is one clear error.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from ..config import GRID_KEYS, GridConfig, RunConfig, config_from_dict, resolve_config
from ..errors import ConfigError
from ..train.checkpoint import (
    RUN_CONFIG,
    SavedRun,
    config_changes,
    saved_run,
    write_run_config,
)
from .fields import flag

_STATES = {
    "finished": "finished",
    "interrupted": "interrupted: it has a checkpoint",
    "started": "started, no checkpoint yet",
    "grid": "a grid's folder",
}


def resolve(path, overrides: dict, grid: dict, resume: bool) -> RunConfig | GridConfig:
    """The config to run: the file and flags (:func:`sparta.config.resolve_config`), or, for
    ``--resume`` without a config file, the run saved in ``--output-dir`` with the flags
    checked against it."""
    if not resume or path is not None:
        return resolve_config(path, overrides, grid)
    out = overrides.get("output_dir")
    if out is None:
        raise ConfigError(
            "--resume needs --output-dir: the folder of the run to continue (its saved config "
            "gives every other setting)"
        )
    saved = _saved(out)
    if saved is None:
        raise ConfigError(
            f"nothing to resume in {out!r}: "
            + (
                "no such folder"
                if not Path(out).exists()
                else f"it holds no run (no {RUN_CONFIG}, checkpoint.pt or result.json)"
            )  # fmt: skip
            + "; start the run without --resume"
        )
    config = config_from_dict({**saved.config, "output_dir": str(out)})
    if isinstance(config, GridConfig):
        lists = {k: getattr(config, k) for k in GRID_KEYS} | grid
        config = GridConfig(base=config.base.replace(**overrides), **lists)
    else:
        config = config.replace(**overrides)
        if grid:
            raise ConfigError(
                f"--resume: {out!r} holds one run, not a grid; leave out "
                + ", ".join(flag(k) for k in grid)
            )
    _refuse_changes(saved, config, out, "--resume: the flags given differ from the run saved")
    return config


def prepare(config: RunConfig | GridConfig, resume: bool, overwrite: bool, main: bool) -> None:
    """Check every folder ``config`` will write into, create them and record their config.
    Only the ``main`` process (rank 0 under torchrun) does: another one would find the
    config.json rank 0 just wrote and take it for another run."""
    if not main:
        return
    runs = config.runs() if isinstance(config, GridConfig) else [config]
    folders = [Path(r.output_dir) for r in runs]
    if isinstance(config, GridConfig):
        parent = Path(config.base.output_dir)
        saved = _saved(parent)
        if saved is not None and saved.state != "grid" and not overwrite:
            raise ConfigError(_holds(parent, saved) + "; a grid needs a folder of its own")
        folders.insert(0, parent)
    for run in runs:  # a grid continues its runs; a single run needs --resume to
        _check_run_folder(run, resume or isinstance(config, GridConfig), overwrite)
    for folder in folders:
        _create(folder)
    if isinstance(config, GridConfig):
        write_run_config(folders[0], config.to_dict())
    for run in runs:
        write_run_config(run.output_dir, run.to_dict())


def resume_command(config: RunConfig | GridConfig) -> str:
    """The command that continues ``config``'s run (or grid) from its folder."""
    base = config.base if isinstance(config, GridConfig) else config
    return f"sparta run --output-dir {shlex.quote(str(base.output_dir))} --resume"


# -- checks ----------------------------------------------------------------------------------------
def _saved(folder) -> SavedRun | None:
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(
            f"--output-dir {str(folder)!r} is a file, not a folder; give a folder (it is "
            "created if missing)"
        )
    return saved_run(folder) if folder.is_dir() else None


def _holds(folder: Path, saved: SavedRun) -> str:
    return f"{str(folder)!r} already holds run {saved.name!r} ({_STATES[saved.state]})"


def _check_run_folder(run: RunConfig, continues: bool, overwrite: bool) -> None:
    folder = Path(run.output_dir)
    saved = _saved(folder)
    if saved is None or overwrite:
        return
    if saved.state == "grid":
        raise ConfigError(_holds(folder, saved) + "; give a folder of its own to a single run")
    if not continues:
        raise ConfigError(
            _holds(folder, saved) + "; pass --resume to continue it, --overwrite to replace "
            "it, or another --output-dir"
        )
    _refuse_changes(saved, run, folder, f"{str(folder)!r} holds a run with other settings")


def _refuse_changes(saved: SavedRun, config, folder, what: str) -> None:
    now = config.to_dict()
    if saved.state != "grid":
        now = {**now, "output_dir": str(folder)}
    changes = config_changes(saved.config, now)
    if changes:
        shown = ", ".join(
            f"{flag(k)} (saved {a!r}, now {b!r})" for k, (a, b) in list(changes.items())[:6]
        )
        raise ConfigError(
            f"{what} in {str(folder)!r}: {shown}; leave them out to continue it as saved, pass "
            "--overwrite to replace it, or use another --output-dir"
        )


def _create(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--output-dir {str(folder)!r} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create --output-dir {str(folder)!r}: {exc.strerror or exc}; give a folder "
            "that can be written"
        ) from None
