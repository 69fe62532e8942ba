"""Export: per-task artifacts, compact (physically pruned, fused) models, task banks and
accounting."""

from .accounting import Report, TaskAccount, report
from .artifact import ArtifactError, Task, apply_task, export, fingerprint
from .bank import TaskBank, TaskInfo
from .build import Builder, build
from .compact import CompactReport, build_compact

__all__ = [
    "ArtifactError",
    "Builder",
    "CompactReport",
    "Report",
    "Task",
    "TaskAccount",
    "TaskBank",
    "TaskInfo",
    "apply_task",
    "build",
    "build_compact",
    "export",
    "fingerprint",
    "report",
]
