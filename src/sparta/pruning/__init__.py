"""Structured pruning on a frozen base: coupled groups, masks, importance, schedules."""
