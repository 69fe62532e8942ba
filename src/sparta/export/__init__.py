"""Export: compact (physically pruned, fused) models."""

from .compact import CompactReport, build_compact

__all__ = ["CompactReport", "build_compact"]
