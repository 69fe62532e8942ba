"""The paper's comparison shown: a table in Table 1's layout (rich and markdown) and Fig.-6-like
plots (accuracy vs learned parameters, accuracy vs MFLOPs), from
:func:`sparta.app.paper.aggregate`'s rows. Densities are filter densities throughout."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich import box
from rich.table import Table

from ..io import atomic_write

PLOTS = ("accuracy_vs_learned.png", "accuracy_vs_mflops.png")
BLOCK = ("acc %", "learned\n(paper)", "learned\n(stored)", "MFLOPs")


def _blocks(agg: Sequence[dict]) -> list[float]:
    return sorted({a["target_density"] for a in agg if a["criterion"] is not None}, reverse=True)


def _lines(agg: Sequence[dict]) -> list[tuple[str, str | None]]:
    return list(dict.fromkeys((a["method"], a["criterion"]) for a in agg))


def _cells(a: dict | None) -> list[str]:
    if a is None:
        return ["-"] * len(BLOCK)
    std = f" +- {100 * a['accuracy_std']:.1f}" if a["n"] > 1 else ""
    return [
        f"{100 * a['accuracy']:.1f}{std}",
        compact(a.get("learned_parameters_paper")),
        compact(a["learned_parameters"]),
        f"{a['mflops']:.1f}",
    ]


def table_rows(agg: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and cells: one line per (method, criterion); per filter density the accuracy
    (mean +- std over seeds), learned parameters in both accountings and MFLOPs. Full
    fine-tuning (dense) fills every density block with its one result, marked "(dense)"."""
    blocks = _blocks(agg)
    header = ["method", "criterion"]
    for d in blocks:
        header += [f"{d:.0%} filters: {b}" for b in BLOCK]
    body = []
    for method, criterion in _lines(agg):
        found = [a for a in agg if a["method"] == method and a["criterion"] == criterion]
        label = found[0]["label"] + (" (dense)" if criterion is None else "")
        cells = [label, criterion or "-"]
        for d in blocks:
            if criterion is None:
                cells += _cells(found[0])
            else:
                cells += _cells(next((a for a in found if a["target_density"] == d), None))
        body.append(cells)
    return header, body


def rich_table(agg: Sequence[dict], title: str = "") -> Table:
    header, body = table_rows(agg)
    table = Table(title=title or None, box=box.SIMPLE_HEAD, pad_edge=False)
    for i, name in enumerate(header):
        table.add_column(name.replace(" filters: ", "\n"), justify="left" if i < 2 else "right")
    for cells in body:
        table.add_row(*cells)
    return table


def long_rows(agg: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and cells, one line per (method, criterion, filter density): narrower than
    Table 1's layout (fits a terminal), the same numbers plus val accuracy and weights kept."""
    header = ["method", "criterion", "filters\nkept", "weights\nkept", "test acc %",
              "val\nacc %", "learned\n(paper)", "learned\n(stored)", "MFLOPs"]  # fmt: skip
    body = []
    for a in sorted(agg, key=lambda a: (_lines(agg).index((a["method"], a["criterion"])),
                                        -a["target_density"])):  # fmt: skip
        acc, paper, stored, mflops = _cells(a)
        val = "-" if a.get("val_accuracy") is None else f"{100 * a['val_accuracy']:.1f}"
        body.append([a["label"], a["criterion"] or "-", f"{a['target_density']:.0%}",
                     f"{100 * a['weight_density']:.1f}%", acc, val, paper, stored, mflops])  # fmt: skip
    return header, body


def rich_long_table(agg: Sequence[dict], title: str = "") -> Table:
    header, body = long_rows(agg)
    table = Table(title=title or None, box=box.SIMPLE_HEAD, pad_edge=False)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i < 2 else "right")
    for cells in body:
        table.add_row(*cells)
    return table


def markdown_table(agg: Sequence[dict], long: bool = False) -> str:
    """Table 1's layout (``long``: one line per filter density) as a markdown table."""
    header, body = long_rows(agg) if long else table_rows(agg)
    header = [h.replace("\n", " ") for h in header]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("\n", " ") for c in cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def compact(n) -> str:
    """``1234567`` -> ``1.23M``, ``45678`` -> ``45.7K``; ``None`` -> ``n/a``."""
    if n is None:
        return "n/a"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return f"{round(n)}"


def write_plots(agg: Sequence[dict], out: str | Path, title: str = "") -> list[Path]:
    """Accuracy (mean, +- std bars) vs learned parameters (paper count where known, else
    stored; log x) and vs MFLOPs, one line per (method, criterion) through its filter
    densities, full fine-tuning as a star; PNGs written atomically (Agg, no pyplot state)."""
    from matplotlib.figure import Figure

    out = Path(out)
    paper = all(a.get("learned_parameters_paper") is not None for a in agg)
    learned = "learned_parameters_paper" if paper else "learned_parameters"
    paths = []
    for name, x_key, x_label, log in (
        (PLOTS[0], learned, f"learned parameters ({'paper' if paper else 'stored'} count)", True),
        (PLOTS[1], "mflops", "MFLOPs per example (2 x MACs)", False),
    ):
        fig = Figure(figsize=(6.6, 4.4), layout="constrained")
        ax = fig.add_subplot()
        for method, criterion in _lines(agg):
            pts = sorted(
                (a for a in agg if a["method"] == method and a["criterion"] == criterion),
                key=lambda a: a[x_key] or 0,
            )
            xs, ys = [a[x_key] for a in pts], [100 * a["accuracy"] for a in pts]
            err = [100 * (a["accuracy_std"] or 0) for a in pts]
            if criterion is None:
                ax.errorbar(xs, ys, yerr=err, fmt="k*", ms=11, label=pts[0]["label"])
                continue
            ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3,
                        label=f"{pts[0]['label']} ({criterion})")  # fmt: skip
            for a, x, y in zip(pts, xs, ys, strict=True):
                ax.annotate(f"{a['target_density']:.0%}", (x, y), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")  # fmt: skip
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title or "accuracy at each filter density (labels: filters kept)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        path = out / name
        with atomic_write(path) as f:
            fig.savefig(f, dpi=110, format="png")
        paths.append(path)
    return paths
