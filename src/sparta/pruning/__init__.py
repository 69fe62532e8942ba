"""Structured pruning on a frozen base: coupled groups, masks, importance, schedules."""

from .block_criteria import list_block_criteria, register_block_criterion
from .blocks import BlockPruner, BlockStep
from .factory import list_criteria, make_pruner
from .protocol import PrunerBase
from .pruner import Pruner, StepRecord, Target

__all__ = [
    "BlockPruner",
    "BlockStep",
    "Pruner",
    "PrunerBase",
    "StepRecord",
    "Target",
    "list_block_criteria",
    "list_criteria",
    "make_pruner",
    "register_block_criterion",
]
