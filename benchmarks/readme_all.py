"""Regenerate every generated block of README.md from the results files committed with it.

Run: ``.venv/bin/python benchmarks/readme_all.py`` (== ``make readme``); ``--check`` changes
nothing and exits 1, printing the difference, when README.md is not what the results files
give (``tests/test_readme_blocks.py`` runs it, so a figure cannot go stale). Each block has its
own writer, which also takes a fresh benchmark output:

| block | writer | results file |
|---|---|---|
| ``demo`` (The demo) | ``readme_demo.py`` | ``benchmarks/results/demo.json`` (``sparta demo``'s ``results.json``) |
| ``zoo`` (Supported models) | ``readme_zoo.py`` | ``benchmarks/results/zoo.json`` (``benchmarks/zoo.py``) |
| ``deploy`` (deployment figures) | ``readme_deploy.py`` | ``benchmarks/results/deploy.json`` (``benchmarks/deploy.py``) |
| ``paper`` (the paper's Table 1) | ``readme_paper.py`` | ``benchmarks/results/paper_table.json`` (``benchmarks/paper_table.py``) |
| ``bert`` (block-pruned BERT) | ``readme_bench.py`` | ``benchmarks/results/bert_blocks.json`` (``benchmarks/bert_blocks.py --json``) |
| ``text`` (MiniLM on BBC News) | ``readme_text.py`` | ``benchmarks/results/text_bbc.json`` (``benchmarks/text_bbc.py``) |
| ``train`` (training-step cost) | ``readme_train.py`` | ``benchmarks/results/train_step.json`` (``benchmarks/train_step.py --json``) |
| ``criteria`` (scoring cost per criterion) | ``readme_criteria.py`` | ``benchmarks/results/criteria_cost.json`` (``benchmarks/criteria_cost.py --json``) |

A block whose results file is not there yet is left as it is and listed as pending.

Nothing is measured or typed by hand here.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import readme_bench  # noqa: E402
import readme_criteria  # noqa: E402
import readme_demo  # noqa: E402
import readme_deploy  # noqa: E402
import readme_paper  # noqa: E402
import readme_text  # noqa: E402
import readme_train  # noqa: E402
import readme_zoo  # noqa: E402
from readme_block import README, replace_block  # noqa: E402

RESULTS = HERE / "results"


def _section_block(writer):
    """README text -> README text with ``writer``'s block (START..END) made from its results."""
    return lambda text, d: replace_block(text, writer.section(d), writer.START, writer.END)


#: ``(marker name, results file, README text -> README text with that block regenerated)``.
BLOCKS = (
    ("demo", "demo.json", lambda text, d: readme_demo.rewrite(text, readme_demo.section(d))),
    ("zoo", "zoo.json", lambda text, d: readme_zoo.update(text, d)),
    ("deploy", "deploy.json", _section_block(readme_deploy)),
    (
        "paper",
        "paper_table.json",
        lambda text, d: readme_paper.update(text, readme_paper.section(d)),
    ),
    ("bert", "bert_blocks.json", _section_block(readme_bench)),
    ("text", "text_bbc.json", lambda text, d: readme_text.update(text, d)),
    ("train", "train_step.json", _section_block(readme_train)),
    ("criteria", "criteria_cost.json", _section_block(readme_criteria)),
)


def render(readme: str, results: Path = RESULTS) -> str:
    """``readme`` with every block regenerated from the files in ``results`` (a block whose
    file is missing is left as it is: see :func:`pending`)."""
    for _, name, write in BLOCKS:
        if (results / name).is_file():
            readme = write(readme, json.loads((results / name).read_text(encoding="utf-8")))
    return readme


def pending(results: Path = RESULTS) -> list[str]:
    """The blocks whose results file is not in ``results`` yet."""
    return [block for block, name, _ in BLOCKS if not (results / name).is_file()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if stale")
    args = parser.parse_args(argv)
    old = args.readme.read_text(encoding="utf-8")
    new = render(old, args.results)
    if args.check:
        if new != old:
            diff = difflib.unified_diff(
                old.splitlines(), new.splitlines(), "README.md", "generated", lineterm=""
            )
            print("\n".join(list(diff)[:80]))
            print("README.md is stale: run `make readme`")
            return 1
        waiting = pending(args.results)
        done = len(BLOCKS) - len(waiting)
        print(f"README.md: all {done} generated blocks with a results file match it")
        if waiting:
            print(f"pending (no results file yet): {', '.join(waiting)}")
        return 0
    args.readme.write_text(new, encoding="utf-8")
    print(f"{args.readme}: {len(BLOCKS)} blocks written ({', '.join(b[0] for b in BLOCKS)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
