"""The ``sparta`` command line: thin commands over the public API and the applications.

    sparta adapters                        registered adapters, their layer kinds and options
    sparta inspect resnet50 --rank 8       what wrapping a torchvision model adapts and learns
    sparta demo [--toy]                    the paper's comparison on MobileNetV2 / Fashion-MNIST
    sparta run [CONFIG] [--field value]    train, prune and export one run or a grid (runs.py)
    sparta report RUNS... --out DIR        Table-1-style summary of runs, with plots (runs.py)
    sparta eval TASK / sparta bench TASK   a task's compact model: test accuracy / speed (deploy.py)
    sparta tasks list|add|remove|build     a task bank on one shared base (tasks.py)

``adapters`` and ``inspect`` live in adapters.py, ``demo`` in demo.py; console.py holds the app
they register on (one-line errors and warnings, tables that do not wrap when piped); options.py
the options several commands share (base model, ``--format``); fields.py generates ``sparta
run``'s options from the config's fields; run_folder.py checks and records a run's folder. Bad
input (unknown names, out-of-range values) ends with exit code 2 and one red line on stderr;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

# Each command module registers its commands on ``app`` when imported, in this order (the order
# of ``sparta --help``).
from . import adapters, demo, deploy, runs, tasks  # noqa: F401
from .console import app, stderr, stdout, user_errors

__all__ = ["app", "main", "stderr", "stdout", "user_errors"]


def main() -> None:
    """Entry point of the ``sparta`` script and of ``python -m sparta``."""
    app(prog_name="sparta")
