"""``sparta.report``: what each task costs to store and to run, next to fine-pruning.

For every task: the parameters it learned in both accountings of
:func:`sparta.learned_parameters` ("stored": what its file holds; "paper": Table 1's, with
every norm and the whole head in full), its artifact's bytes, its filter density (the kept
fraction of prunable channels, heads and neurons) and the parameters and MACs of its compact
model; then the same for the *fine-pruned* model of the same masks, the paper's baseline,
which learns every kept weight: stored, its learned parameters are all the compact model's
parameters; as the paper counts, also every pruned norm channel and head column. Its
checkpoint is the compact model's state dict (safetensors, without the structure needed to
rebuild it: a lower bound).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors.torch import save as st_save
from torch import nn

from ..errors import ConfigError
from ..measure import MacCounter, learned_parameters, whole_modules
from .artifact import Task
from .build import Builder
from .compact import CompactReport


@dataclass
class TaskAccount:
    """One task's row of a :class:`Report` (MACs for one example batch)."""

    name: str
    adapter: str
    learned_parameters: int  # stored accounting (what the task file holds)
    task_bytes: int
    density: float  # filter density: kept fraction of the prunable channels / heads / neurons
    params: int  # the compact model's parameters
    macs: int  # the compact model's MACs
    base_params: int
    base_macs: int
    finepruned_learned: int  # stored accounting
    finepruned_bytes: int
    learned_parameters_paper: int  # the paper's accounting (all norms, the whole head)
    finepruned_learned_paper: int

    @property
    def learned_ratio(self) -> float:
        """How many times fewer parameters the task learns than fine-pruning (stored)."""
        return self.finepruned_learned / max(self.learned_parameters, 1)

    @property
    def learned_ratio_paper(self) -> float:
        """:attr:`learned_ratio` as the paper counts (Table 1's ratio)."""
        return self.finepruned_learned_paper / max(self.learned_parameters_paper, 1)

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
                "learned_ratio_paper": r.learned_ratio_paper,
                "bytes_ratio": r.bytes_ratio,
                "mac_ratio": r.mac_ratio,
            }
            for r in self.rows
        ]

    def to_markdown(self) -> str:
        head = (
            "| task | adapter | filter density | learned (stored) | learned (paper) | task bytes "
            "| params | MACs (M) | fine-pruned learned (stored) | fine-pruned learned (paper) "
            "| fine-pruned bytes | learned x (stored) | learned x (paper) | bytes x | MACs x |"
        )
        lines = [head, "|" + "---|" * 15]
        for r in self.rows:
            lines.append(
                f"| {r.name} | {r.adapter} | {r.density:.3f} | {r.learned_parameters:,} "
                f"| {r.learned_parameters_paper:,} | {r.task_bytes:,} | {r.params:,} "
                f"| {r.macs / 1e6:,.1f} | {r.finepruned_learned:,} "
                f"| {r.finepruned_learned_paper:,} | {r.finepruned_bytes:,} "
                f"| {r.learned_ratio:.1f} | {r.learned_ratio_paper:.1f} "
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
    params = sum(p.numel() for p in compact.parameters())
    return TaskAccount(
        name=name,
        adapter=task.adapter,
        learned_parameters=int(task.manifest["counts"]["learned_parameters"]),
        task_bytes=task_bytes(task),
        density=density(report),
        params=params,
        macs=macs,
        base_params=sum(p.numel() for p in base.parameters()),
        base_macs=base_macs,
        finepruned_learned=params,
        finepruned_bytes=len(st_save(state)),
        learned_parameters_paper=paper_count(task, base),
        finepruned_learned_paper=params + _pruned_whole(base, compact, task.manifest["head"]),
    )


def paper_count(task: Task, base: nn.Module) -> int:
    """The task's learned parameters as the paper counts them: recorded in its manifest (files
    written by this version), else counted on the task model on ``base`` (older files)."""
    recorded = task.manifest["counts"].get("learned_parameters_paper")
    if recorded is not None:
        return int(recorded)
    from .apply import task_model

    return learned_parameters(task_model(base, task, share_frozen=True), accounting="paper")


def _pruned_whole(base: nn.Module, compact: nn.Module, head: list[str]) -> int:
    """Parameters of the norms and the head that the compact model lost to pruning (the paper
    counts them learned by fine-pruning, which trains every norm and the whole head)."""

    def whole(model: nn.Module) -> int:
        params = {id(p): p for m in whole_modules(model, head).values() for p in m.parameters()}
        return sum(p.numel() for p in params.values())

    return whole(base) - whole(compact)


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
