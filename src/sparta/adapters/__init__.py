"""Adapter families, registered by name. Importing this package registers the built-in ones."""

from . import splopa, splora, sppara  # noqa: F401  (registration side effect)
from .attention import AdaptedWeight, MaskedBias
from .base import Adapter, get_adapter, list_adapters, register_adapter
from .layer import AdaptedLayer
from .splopa import SPLoPA
from .splora import SPLoRA
from .sppara import SPPaRA

__all__ = [
    "Adapter",
    "AdaptedLayer",
    "AdaptedWeight",
    "MaskedBias",
    "SPLoPA",
    "SPLoRA",
    "SPPaRA",
    "get_adapter",
    "list_adapters",
    "register_adapter",
]
