"""sparta: Structured Pruning Adapters for PyTorch.

A frozen, shared base network; per task a tiny set of learned tensors (masks, adapters, biases,
norms, head); per task a physically pruned, fused model. See the README for a quick start.
"""

from .adapters import (
    AdaptedLayer,
    Adapter,
    SPLoRA,
    SPPaRA,
    get_adapter,
    list_adapters,
    register_adapter,
)
from .errors import (
    ConfigError,
    NonFiniteError,
    NotAdaptableError,
    SkippedLayerWarning,
    SpartaError,
    UnknownNameError,
)
from .measure import MacCounter, learned_parameters
from .pruning import BlockPruner, Pruner, StepRecord, Target, list_criteria, make_pruner
from .runtime import Deployed, deploy
from .tasks import ArtifactError, Task, TaskBank, build, export, report
from .wrapping import SkippedLayer, WrapReport, fuse, wrap

__version__ = "0.1.0"

__all__ = [
    "AdaptedLayer",
    "Adapter",
    "ArtifactError",
    "BlockPruner",
    "ConfigError",
    "Deployed",
    "MacCounter",
    "NonFiniteError",
    "NotAdaptableError",
    "Pruner",
    "SPLoRA",
    "SPPaRA",
    "SkippedLayer",
    "SkippedLayerWarning",
    "SpartaError",
    "StepRecord",
    "Target",
    "Task",
    "TaskBank",
    "UnknownNameError",
    "WrapReport",
    "__version__",
    "build",
    "deploy",
    "export",
    "fuse",
    "get_adapter",
    "learned_parameters",
    "list_adapters",
    "list_criteria",
    "make_pruner",
    "register_adapter",
    "report",
    "wrap",
]
