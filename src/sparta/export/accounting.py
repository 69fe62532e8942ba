"""``sparta.report``: what each task costs to store and to run, next to fine-pruning.

For every task: the parameters it learned (the paper's accounting), its artifact's bytes, and
the parameters and MACs of its compact model; then the same for the *fine-pruned* model of the
same masks, the paper's baseline, which learns every kept weight, so that its learned
parameters are all the compact model's parameters and its checkpoint is that model's state
dict (safetensors, without the structure needed to rebuild it: a lower bound).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors.torch import save as st_save
from torch import nn

from ..errors import ConfigError
from ..measure import MacCounter
from .artifact import Task
from .build import Builder
from .compact import CompactReport


@dataclass
class TaskAccount:
    """One task's row of a :class:`Report` (MACs for one example batch)."""

    name: str
    adapter: str
    learned_parameters: int
    task_bytes: int
    density: float  # kept fraction of the prunable channels / heads / neurons
    params: int  # the compact model's parameters
    macs: int  # the compact model's MACs
    base_params: int
    base_macs: int
    finepruned_learned: int
    finepruned_bytes: int

    @property
    def learned_ratio(self) -> float:
        """How many times fewer parameters the task learns than fine-pruning."""
        return self.finepruned_learned / max(self.learned_parameters, 1)

    @property
    def bytes_ratio(self) -> float:
        """How many times smaller the task file is than a fine-pruned checkpoint."""
        return self.finepruned_bytes / max(self.task_bytes, 1)

    @property
    def mac_ratio(self) -> float:
        """How many times fewer MACs the compact model needs than the base."""
        return self.base_macs / max(self.macs, 1)


@dataclass
class Report:
    rows: list[TaskAccount]

    def to_dict(self) -> list[dict]:
        return [
            asdict(r)
            | {
                "learned_ratio": r.learned_ratio,
                "bytes_ratio": r.bytes_ratio,
                "mac_ratio": r.mac_ratio,
            }
            for r in self.rows
        ]

    def to_markdown(self) -> str:
        head = (
            "| task | adapter | density | learned | task bytes | params | MACs (M) "
            "| fine-pruned learned | fine-pruned bytes | learned x | bytes x | MACs x |"
        )
        lines = [head, "|" + "---|" * 12]
        for r in self.rows:
            lines.append(
                f"| {r.name} | {r.adapter} | {r.density:.3f} | {r.learned_parameters:,} "
                f"| {r.task_bytes:,} | {r.params:,} | {r.macs / 1e6:,.1f} "
                f"| {r.finepruned_learned:,} | {r.finepruned_bytes:,} | {r.learned_ratio:.1f} "
                f"| {r.bytes_ratio:.1f} | {r.mac_ratio:.1f} |"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def account(
    name: str, task: Task, compact: nn.Module, report: CompactReport, base: nn.Module, inputs
) -> TaskAccount:
    """The :class:`TaskAccount` of ``task`` given its built ``compact`` model."""
    base_macs = MacCounter(base, inputs).count(base)
    macs = MacCounter(compact, inputs).count(compact)
    state = {k: v.detach().cpu().contiguous() for k, v in compact.state_dict().items()}
    return TaskAccount(
        name=name,
        adapter=task.adapter,
        learned_parameters=int(task.manifest["counts"]["learned_parameters"]),
        task_bytes=task_bytes(task),
        density=density(report),
        params=sum(p.numel() for p in compact.parameters()),
        macs=macs,
        base_params=sum(p.numel() for p in base.parameters()),
        base_macs=base_macs,
        finepruned_learned=sum(p.numel() for p in compact.parameters()),
        finepruned_bytes=len(st_save(state)),
    )


def task_bytes(task: Task) -> int:
    """Size of ``task`` as :meth:`Task.save` writes it."""
    return len(task.to_bytes())


def density(report: CompactReport) -> float:
    """Kept fraction of all prunable units (channels, heads, neurons) of the model."""
    units = sum(g.units for g in report.groups)
    return sum(g.alive for g in report.groups) / units if units else 1.0


def report(base: nn.Module, tasks, example_inputs=None) -> Report:
    """Account for one task or several (``{name: Task or path}``, or a list of them).

    ``example_inputs`` sets the batch MACs are counted for (default: the shapes each task
    recorded). Builds each compact model once, verified against the masked task model.
    """
    if isinstance(tasks, Task | str | Path):
        tasks = [tasks]
    if not isinstance(tasks, Mapping | list | tuple):
        raise ConfigError(
            f"report expects a Task, a task file, or a list or dict of them, got "
            f"{type(tasks).__name__}"
        )
    if not isinstance(tasks, Mapping):
        tasks = {_default_name(t, i): t for i, t in enumerate(tasks)}
    builder = Builder(base, example_inputs)
    rows = []
    for name, task in tasks.items():
        task = task if isinstance(task, Task) else Task.load(task)
        compact, creport = builder.build(task, verify=True)
        rows.append(account(name, task, compact, creport, base, builder.inputs(task)))
    return Report(rows)


def _default_name(task, index: int) -> str:
    return Path(task).stem if isinstance(task, str | Path) else f"task{index}"
