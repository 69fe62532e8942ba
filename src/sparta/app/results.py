"""Experiment results: read the ``result.json`` of many runs, aggregate them over seeds into a
table like the paper's Table 1, and plot accuracy against learned parameters, density and MACs.

    runs = load_runs(["runs/"])          # every result.json below runs/
    rows = aggregate(runs)               # one row per group of runs differing only in the seed
    print(to_markdown(rows))             # the table, then notes (merged, dropped, compared)
    plot(rows, "report/")                # three PNG files

A *run* is a flat dict of one ``result.json`` (its config's shown keys, its result-changing
settings and its final evaluation); a *row* is a group of runs whose every result-changing
setting is equal and whose seeds differ (:mod:`.grouping`: a seed found twice counts once),
with the accuracy's mean and standard deviation (sample standard deviation; ``None`` for a
single seed) and the mean of every other number. Rows that share the shown keys but differ in
another setting (epochs, steps, lr, ...) say which in their ``settings`` text; ``run_settings``
holds all of the group's result-changing settings.

Every run's artifact is the file it saved: an adapter's task file, or a baseline's compact
model (``finetune``, ``fine-pruning``: :mod:`sparta.tasks.baseline`). Each adapter row is
compared with the baseline of the same settings (fine-pruning for a pruned row, fine-tuning
for an unpruned one): ``baseline_bytes`` is that baseline's compact file, ``bytes_ratio`` how
many times smaller the adapter's task file is.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Iterable
from pathlib import Path

from ..config import BASELINE_METHODS
from ..errors import ConfigError
from .grouping import group_runs, settings_of

RESULT_FILE = "result.json"
#: What identifies a row of the table: runs sharing these (and differing in seed) are averaged.
GROUP_KEYS = ("model", "dataset", "method", "criterion", "target")
#: Numbers averaged over the seeds of a row (accuracy also gets a standard deviation).
MEAN_KEYS = (
    "learned_parameters",
    "learned_parameters_paper",
    "density",
    "macs",
    "macs_fraction",
    "artifact_bytes",
    "loss",
)
#: Columns of :func:`to_csv`, in order.
ROW_COLUMNS = (
    *GROUP_KEYS,
    "settings",
    "seeds",
    "accuracy_mean",
    "accuracy_std",
    *MEAN_KEYS,
    "artifact",
    "artifact_file",
    "baseline_bytes",
    "bytes_ratio",
    "output_dirs",
)
#: Settings in which an adapter run and its baseline may differ and still be compared.
ADAPTER_SETTINGS = frozenset(
    {"method", "rank", "init_scale", "block", "prototypes", "prototype_rank", "shared",
     "adapter_lr_scale"}
)  # fmt: skip


# -- reading ---------------------------------------------------------------------------------------
def run_record(result: dict, output_dir: str | Path | None = None) -> dict:
    """The flat run dict of one parsed ``result.json`` (see the module docstring).

    ``artifact_bytes`` is the size of the file the run saved, ``artifact_file`` its name and
    ``artifact`` what it is: ``task`` (an adapter's task file) or ``compact model`` (a
    baseline's, see :mod:`sparta.tasks.baseline`); a result that saved no file (older
    baselines) has ``None`` for all three. ``criterion`` and ``target`` are ``None`` for runs
    that do not prune. ``settings`` are the result-changing settings (:mod:`.grouping`).
    """
    if not isinstance(result, dict) or result.get("format") != "sparta.result":
        raise ConfigError("not a sparta result (expected format 'sparta.result')")
    config, final = result.get("config", {}), result.get("final", {})
    prunes = bool(result.get("pruning")) or (
        config.get("method") != "finetune" and config.get("steps", 0) > 0
    )
    file = (result.get("files") or {}).get("task")
    size = final.get("task_bytes")
    if size is None:  # an older baseline: it kept no model file
        artifact = file = None
    else:
        artifact = "compact model" if config.get("method") in BASELINE_METHODS else "task"
    return {
        "name": result.get("name"),
        "model": config.get("model"),
        "dataset": config.get("dataset"),
        "method": config.get("method"),
        "criterion": pruning_criterion(config) if prunes else None,
        "target": config.get("target") if prunes else None,
        "seed": config.get("seed"),
        "accuracy": final.get("accuracy"),
        "loss": final.get("loss"),
        "learned_parameters": final.get("learned_parameters"),
        # Table 1's count (every norm and the whole head in full); None in older results
        "learned_parameters_paper": final.get("learned_parameters_paper"),
        "density": final.get("density"),  # fraction of filters kept
        "macs": final.get("macs"),
        "macs_fraction": final.get("macs_fraction"),
        "artifact": artifact,
        "artifact_file": file,
        "artifact_bytes": size,
        "output_dir": str(output_dir if output_dir is not None else config.get("output_dir")),
        "settings": settings_of(config, prunes),
    }


def pruning_criterion(config: dict) -> str | None:
    """The criterion that pruned a run (from its config): ``block_criterion`` where the blocks
    pruner did (``pruner``, or inferred from the adapter), else ``criterion``."""
    from types import SimpleNamespace

    from ..config.pruning import pruner_granularity

    run = SimpleNamespace(pruner=config.get("pruner"), method=config.get("method"))
    blocks = pruner_granularity(run) == "blocks"
    return config.get("block_criterion" if blocks else "criterion")


def find_results(paths: Iterable[str | Path]) -> list[Path]:
    """The ``result.json`` files of ``paths``: a file itself, a run folder's own file, or every
    one found below a folder (sorted), without duplicates."""
    found: dict[Path, None] = {}
    for path in paths:
        path = Path(path)
        if path.is_file():
            candidates = [path]
        elif (path / RESULT_FILE).is_file():
            candidates = [path / RESULT_FILE]
        elif path.is_dir():
            candidates = sorted(path.rglob(RESULT_FILE))
        else:
            raise ConfigError(f"no such file or folder: {str(path)!r}")
        if not candidates:
            raise ConfigError(f"no {RESULT_FILE} found in or below {str(path)!r}")
        for c in candidates:
            found.setdefault(c.resolve(), None)
    return list(found)


def load_runs(paths: Iterable[str | Path]) -> list[dict]:
    """One flat run dict (see :func:`run_record`) per ``result.json`` of ``paths`` (run folders,
    result files, or folders searched recursively). ``output_dir`` is the folder the file is in.
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    runs = []
    for file in find_results(paths):
        try:
            result = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {str(file)!r}: {exc}") from None
        try:
            runs.append(run_record(result, file.parent))
        except ConfigError as exc:
            raise ConfigError(f"{str(file)!r}: {exc}") from None
    return runs


# -- aggregating -----------------------------------------------------------------------------------
def _sort_key(row: dict) -> tuple:
    target = row["target"]
    numeric = isinstance(target, int | float) and not isinstance(target, bool)
    return (
        str(row["model"]),
        str(row["dataset"]),
        str(row["method"]),
        str(row["criterion"] or ""),
        # densest first; text targets ("macs=0.1") after the numbers
        (0, -target, "") if numeric else (1, 0.0, str(target or "")),
    )


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


class Rows(list):
    """The rows of :func:`aggregate`, with ``notes``: what was merged, dropped or compared."""

    notes: list[str]


def aggregate(runs: Iterable[dict]) -> Rows:
    """Rows of runs with equal result-changing settings (so seeds are averaged; see the module
    docstring), sorted by model, dataset, method, criterion and target (densest first), each
    adapter row compared with its baseline's compact file."""
    runs = [r if "settings" in r else {**r, "settings": {}} for r in runs]
    groups, notes = group_runs(runs, GROUP_KEYS)
    rows = Rows()
    for members in groups:
        first = members[0]
        accuracies = [m["accuracy"] for m in members if m.get("accuracy") is not None]
        row = {k: first.get(k) for k in GROUP_KEYS}
        row["settings"] = first.get("settings_text", "")
        row["run_settings"] = first["settings"]
        row["seeds"] = len(members)
        row["accuracy_mean"] = statistics.fmean(accuracies) if accuracies else None
        row["accuracy_std"] = statistics.stdev(accuracies) if len(accuracies) > 1 else None
        for k in MEAN_KEYS:
            row[k] = _mean([m.get(k) for m in members])
        row["artifact"] = first.get("artifact")
        row["artifact_file"] = first.get("artifact_file")
        row["output_dirs"] = [m.get("output_dir") for m in members]
        rows.append(row)
    notes += _compare_baselines(rows)
    rows.sort(key=_sort_key)
    rows.notes = notes
    return rows


def _compare_baselines(rows: list[dict]) -> list[str]:
    """Fill ``baseline_bytes`` and ``bytes_ratio`` of each adapter row from the baseline row of
    the same settings (but for :data:`ADAPTER_SETTINGS`); notes for adapter rows without one."""

    def key(row: dict, method: str) -> str:
        shared = {k: v for k, v in row["run_settings"].items() if k not in ADAPTER_SETTINGS}
        return json.dumps([row["model"], row["dataset"], method, shared], default=str)

    baselines = {key(r, r["method"]): r for r in rows if r["method"] in BASELINE_METHODS}
    missing = []
    for row in rows:
        row["baseline_bytes"] = row["bytes_ratio"] = None
        if row["method"] in BASELINE_METHODS:
            continue
        wanted = "fine-pruning" if row["criterion"] is not None else "finetune"
        base = baselines.get(key(row, wanted))
        if base is None or base["artifact_bytes"] is None:
            missing.append(f"{row['method']}/{row['criterion']}/{row['target']}")
            continue
        row["baseline_bytes"] = base["artifact_bytes"]
        if row["artifact_bytes"]:
            row["bytes_ratio"] = base["artifact_bytes"] / row["artifact_bytes"]
    if missing and any(r["method"] in BASELINE_METHODS for r in rows):
        return [
            "no baseline run with the same settings (and a saved compact model) to compare "
            f"with for: {', '.join(missing)}"
        ]
    return []


# -- writing ---------------------------------------------------------------------------------------
def _int(value) -> str:
    return "-" if value is None else f"{round(value):,}"


def _fixed(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _text(value) -> str:
    return "-" if value is None else str(value)


def _accuracy(row: dict) -> str:
    if row["accuracy_mean"] is None:
        return "-"
    if row["accuracy_std"] is None:  # one seed: no spread to show
        return f"{100 * row['accuracy_mean']:.2f}"
    return f"{100 * row['accuracy_mean']:.2f} ± {100 * row['accuracy_std']:.2f}"


MARKDOWN_COLUMNS = (
    ("model", lambda r: _text(r["model"])),
    ("dataset", lambda r: _text(r["dataset"])),
    ("method", lambda r: _text(r["method"])),
    ("criterion", lambda r: _text(r["criterion"])),
    ("target", lambda r: _text(r["target"])),
    ("accuracy (%)", _accuracy),
    ("learned (stored)", lambda r: _int(r["learned_parameters"])),
    ("learned (paper)", lambda r: _int(r.get("learned_parameters_paper"))),
    ("filter density", lambda r: _fixed(r["density"])),
    ("MACs", lambda r: _int(r["macs"])),
    ("artifact bytes", lambda r: _int(r["artifact_bytes"])),
    ("baseline bytes", lambda r: _int(r.get("baseline_bytes"))),
    ("x smaller", lambda r: "-" if r.get("bytes_ratio") is None else f"{r['bytes_ratio']:.1f}x"),
    ("seeds", lambda r: str(r["seeds"])),
)


def table_cells(rows: Iterable[dict]) -> tuple[list[str], list[list[str]]]:
    """``(header, cells)``: the rows formatted as text, as :func:`to_markdown` shows them (a
    ``settings`` column after the shown keys when some rows differ in another setting)."""
    rows = list(rows)
    columns = list(MARKDOWN_COLUMNS)
    if any(r.get("settings") for r in rows):
        columns.insert(len(GROUP_KEYS), ("settings", lambda r: r.get("settings") or "-"))
    header = [name for name, _ in columns]
    return header, [[cell(r) for _, cell in columns] for r in rows]


def to_markdown(rows: Iterable[dict]) -> str:
    """A Markdown table: accuracy in percent as mean ± std over seeds (the mean alone for one
    seed), means of the rest; then the notes of :func:`aggregate` (``Note: ...`` lines)."""
    header, cells = table_cells(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    notes = getattr(rows, "notes", None) or []
    lines += ([""] if notes else []) + [f"Note: {n}" for n in notes]
    return "\n".join(lines) + "\n"


def to_csv(rows: Iterable[dict]) -> str:
    """CSV text with the raw numbers (accuracy as a fraction), one line per row;
    ``output_dirs`` joined with ``;``."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=ROW_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        out = {k: row.get(k) for k in ROW_COLUMNS}
        out["output_dirs"] = ";".join(str(d) for d in row.get("output_dirs") or [])
        writer.writerow({k: "" if v is None else v for k, v in out.items()})
    return buffer.getvalue()


# -- plotting --------------------------------------------------------------------------------------
#: ``(file stem, x key, x label, log scale)`` of each plot.
PLOTS = (
    (
        "accuracy_vs_learned_parameters",
        "learned_parameters",
        "learned parameters per task (as stored)",
        True,
    ),
    ("accuracy_vs_density", "density", "filter density (kept fraction of filters)", False),
    ("accuracy_vs_macs", "macs", "MACs per example batch", False),
)


def plot(runs_or_rows: Iterable[dict], out_dir: str | Path) -> list[Path]:
    """Write accuracy against learned parameters (log x), density and MACs as PNG files into
    ``out_dir`` (created if missing); one line per (model, dataset, method, criterion), error
    bars for the standard deviation over seeds. Takes runs (aggregated first) or rows. Uses
    matplotlib's Agg canvas without pyplot, so no global backend is changed."""
    from matplotlib.figure import Figure

    items = list(runs_or_rows)
    rows = items if all("accuracy_mean" in r for r in items) else aggregate(items)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    series: dict[str, list[dict]] = {}
    several = {k: len({json.dumps(r[k]) for r in rows}) > 1 for k in ("model", "dataset")}
    for row in rows:
        if row["accuracy_mean"] is None:
            continue
        parts = [row[k] for k in ("model", "dataset") if several[k]]
        parts += [row["method"]] + ([row["criterion"]] if row["criterion"] else [])
        parts += [row["settings"]] if row.get("settings") else []
        series.setdefault(" / ".join(str(p) for p in parts), []).append(row)
    written = []
    for stem, key, label, log in PLOTS:
        fig = Figure(figsize=(6.4, 4.4), layout="constrained")
        ax = fig.add_subplot()
        for name, members in series.items():
            points = sorted(
                (r[key], 100 * r["accuracy_mean"], 100 * (r["accuracy_std"] or 0.0))
                for r in members
                if r[key] is not None and not (log and r[key] <= 0)
            )
            if not points:
                continue
            xs, ys, errs = zip(*points)
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=name)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"accuracy vs {label.split(' (')[0]}")
        ax.grid(True, alpha=0.3)
        if series:
            ax.legend(fontsize="small")
        path = out / f"{stem}.png"
        fig.savefig(path, dpi=120)
        written.append(path)
    return written


def write_report(rows: list[dict], out_dir: str | Path) -> list[Path]:
    """``report.md``, ``report.csv`` and the plots of ``rows`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, cs = out / "report.md", out / "report.csv"
    md.write_text(to_markdown(rows), encoding="utf-8")
    cs.write_text(to_csv(rows), encoding="utf-8")
    return [md, cs, *plot(rows, out)]
