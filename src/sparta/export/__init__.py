"""Export: per-task artifacts and compact (physically pruned, fused) models."""

from .artifact import ArtifactError, Task, apply_task, export, fingerprint
from .compact import CompactReport, build_compact

__all__ = [
    "ArtifactError",
    "CompactReport",
    "Task",
    "apply_task",
    "build_compact",
    "export",
    "fingerprint",
]
