"""Write README.md's "Supported models" section from the JSON ``benchmarks/zoo.py`` wrote.

Run: ``.venv/bin/python benchmarks/readme_zoo.py zoo.json [large.json ...]`` (or
``benchmarks/zoo.py --readme zoo.json``). The section sits between ``<!-- zoo:start -->`` and ``<!-- zoo:end -->``; without
the markers it is added before "## Benchmarks". Nothing is measured here: the table is the
sweep's own output (a summary line, then one row per model).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

START, END = "<!-- zoo:start -->", "<!-- zoo:end -->"
README = Path(__file__).resolve().parents[1] / "README.md"


def section(data: dict) -> str:
    rows = data["rows"]
    lines = [
        START,
        "## Supported models",
        "",
        "The full loop (`wrap` SPLoRA r=4 -> `Pruner` half the filters in 2 steps, every "
        'group to the same fraction (`ranking="local"`) -> `export` -> `save` -> '
        "`Task.load` -> `build`) on every model below: random weights, batch 2, each model in "
        "its own process under a time and memory limit, measured by `benchmarks/zoo.py` "
        f"({data['machine']}). *pass*: the compact model equals the masked one within 1e-4 "
        "relative (worst criterion shown), the masked outputs are alive, the wrapped model "
        "equals the base at init within 1e-2, the base is bit-identical afterwards; params and "
        "MACs are compact / base (the larger over the criteria); *not smaller*: exact, but "
        "every channel is coupled through something sparta keeps whole. Criteria: "
        + _criteria(rows)
        + ".",
        "",
        "How models are handled: grouped convolutions (ResNeXt, RegNet) lose whole groups; "
        "fused q/k/v attention (timm `Attention` and alike) loses whole heads once a numeric "
        "check on a copy proves that removing a head equals zeroing it; a coupling the "
        "dependency graph cannot prove exact (a reshape that splits or shuffles channels, an "
        "unbind, a matmul between activations) leaves those layers unpruned. Each such layer "
        "is listed with its reason in `pruner.notes` and `compact.sparta_compact.notes` "
        "(*n notes* below). Grouping is bounded in time (120 s) and memory (index lists "
        "capped by the widest layer): a model beyond that is refused, never left hanging.",
        "",
        "Reproduce: `.venv/bin/python benchmarks/zoo.py --jobs 2 --large 150 --large-memory 14 "
        "--json zoo.json` (each model under 7 GB resident memory, those over 150 M parameters "
        "alone under 14 GB; `--criteria l1` halves the time), then "
        "`.venv/bin/python benchmarks/readme_zoo.py zoo.json`. The table below is generated "
        "from `benchmarks/results/zoo.json`, the merged rows of the sweeps behind it (a model "
        "rerun after a fix replaces its earlier row).",
        "",
        "**" + _summary(rows) + "**",
        "",
        "| model | source | input | result | max rel diff | params | MACs | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] == "pass":
            cells = [
                "pass" + _remarks(r),
                f"{r['max_rel_diff']:.1e}",
                f"{r['params_ratio']:.2f}",
                f"{r['macs_ratio']:.2f}",
            ]
        else:
            why = (r.get("error") or "").replace("|", "/").replace("\n", " ")
            cells = [f"{r['status']}: {why[:140]}", "", "", ""]
        lines.append(
            f"| {r['model']} | {r['source']} | {r['size']} px | "
            + " | ".join(cells)
            + f" | {r['seconds']:.0f} |"
        )
    lines += ["", END]
    return "\n".join(lines)


def _remarks(row: dict) -> str:
    """`` (12 notes)``; `` (..., not smaller)`` where exact but nothing was removed (every
    channel coupled through something sparta keeps whole, e.g. GroupNorm everywhere)."""
    parts = [f"{len(row['notes'])} notes"] if row["notes"] else []
    if row["params_ratio"] >= 0.999:
        parts.append("not smaller")
    return f" ({'; '.join(parts)})" if parts else ""


def _criteria(rows: list[dict]) -> str:
    kinds = {}
    for r in rows:
        kinds.setdefault(", ".join(r.get("criteria") or ["l1", "taylor"]), []).append(r)
    if len(kinds) == 1:
        return next(iter(kinds))
    return "; ".join(f"{k} ({len(v)} models)" for k, v in kinds.items())


def _summary(rows: list[dict]) -> str:
    parts = []
    for source in dict.fromkeys(r["source"] for r in rows):
        mine = [r for r in rows if r["source"] == source]
        passed = sum(r["status"] == "pass" for r in mine)
        skipped = sum(r["status"] == "skipped" for r in mine)
        text = f"{source}: {passed} of {len(mine)} pass exactly"
        parts.append(text + (f" ({skipped} skipped as large)" if skipped else ""))
    return "; ".join(parts)


def merge(paths: list[str]) -> dict:
    """The rows of several sweeps (e.g. the large models rerun alone with more memory): a
    later file's row replaces an earlier one of the same model. ``PATH@l1`` says that sweep
    ran with ``--criteria l1`` (rows say nothing: both criteria)."""
    rows: dict[tuple[str, str], dict] = {}
    machines = []
    for spec in paths:
        path, _, criteria = spec.partition("@")  # "timm.json@l1": a sweep run with --criteria l1
        data = json.loads(Path(path).read_text())
        machines.append(data["machine"])
        for r in data["rows"]:
            if criteria and not r.get("criteria"):
                r["criteria"] = criteria.split(",")
            rows[(r["source"], r["model"])] = r
    return {"machine": "; ".join(dict.fromkeys(machines)), "rows": list(rows.values())}


def write_readme(json_paths: str | list[str], readme: Path = README) -> None:
    paths = [json_paths] if isinstance(json_paths, str) else list(json_paths)
    readme.write_text(update(readme.read_text(), merge(paths)))


def update(text: str, data: dict) -> str:
    """README text ``text`` with the section of ``data`` (merged sweeps) in its place."""
    new = section(data)
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + new + rest.split(END, 1)[1]
    else:
        marker = "## Benchmarks"
        head, sep, tail = text.partition(marker)
        text = head + new + "\n\n" + sep + tail if sep else text.rstrip() + "\n\n" + new + "\n"
    return text


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: readme_zoo.py ZOO.json [MORE.json ...]  (later rows replace earlier)")
    write_readme(sys.argv[1:])
