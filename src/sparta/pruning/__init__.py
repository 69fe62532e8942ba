"""Structured pruning on a frozen base: coupled groups, masks, importance, schedules."""

from .pruner import Pruner, StepRecord, Target

__all__ = ["Pruner", "StepRecord", "Target"]
