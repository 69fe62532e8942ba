"""Choosing a pruner: ``make_pruner`` (channels or blocks, inferred from the adapter) and the
criteria registries by granularity (``list_criteria("channels" | "blocks")``)."""

from __future__ import annotations

import inspect

from torch import nn

from ..adapters.layer import AdaptedLayer
from ..adapters.splopa import SPLoPA
from ..errors import ConfigError
from ..registry import Registry
from .block_criteria import _BLOCK_CRITERIA
from .blocks import BlockPruner
from .importance import _CRITERIA
from .protocol import GRANULARITIES, PrunerBase
from .pruner import Pruner


# -- criteria by granularity --------------------------------------------------------------------
def _registry(granularity: str) -> Registry:
    if granularity not in GRANULARITIES:
        raise ConfigError(
            f"granularity must be 'channels' or 'blocks', got {granularity!r}: channel "
            "criteria rank filters, heads and neurons; block criteria rank SPLoPA blocks"
        )
    return _CRITERIA if granularity == "channels" else _BLOCK_CRITERIA


def list_criteria(granularity: str = "channels") -> list[str]:
    """Names of the registered criteria of ``granularity`` (``"channels"`` or ``"blocks"``)."""
    return _registry(granularity).names()


def get_criterion(name: str, granularity: str = "channels") -> type:
    """The criterion class registered under ``name`` for ``granularity``."""
    return _registry(granularity).get(name)


# -- the factory --------------------------------------------------------------------------------
def infer_granularity(model: nn.Module) -> str:
    """``"blocks"`` for a model whose Linear layers carry SPLoPA adapters, else ``"channels"``."""
    for m in model.modules():
        if isinstance(m, AdaptedLayer) and isinstance(m.adapter, SPLoPA):
            if isinstance(m.base, nn.Linear):
                return "blocks"
    return "channels"


def pruner_class(granularity: str) -> type[PrunerBase]:
    _registry(granularity)  # refuses an unknown granularity
    return Pruner if granularity == "channels" else BlockPruner


def pruner_options(granularity: str, criterion: str | None = None) -> list[str]:
    """The options ``make_pruner`` accepts for ``granularity`` (and ``criterion``)."""
    cls = pruner_class(granularity)
    params = inspect.signature(cls.__init__).parameters.values()
    names = [
        p.name
        for p in params
        if p.name not in ("self", "model") and p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    if criterion is not None:
        names += list(_criterion_options(get_criterion(criterion, granularity)))
    return names


def _criterion_options(cls) -> tuple[str, ...]:
    options = getattr(cls, "option_names", None)  # channel criteria
    return tuple(options if options is not None else getattr(cls, "options", {}))


def make_pruner(model: nn.Module, pruner: str | None = None, **options) -> PrunerBase:
    """The pruner for ``model``: ``pruner="channels"`` (:class:`~sparta.pruning.Pruner`),
    ``"blocks"`` (:class:`~sparta.pruning.BlockPruner`), or ``None``: blocks for a model
    wrapped with ``"splopa"``, channels otherwise. ``options`` go to the chosen class
    (``example_inputs`` is required for channels); an option it does not take is refused.

    Example::

        pruner = sparta.make_pruner(model, example_inputs=x, criterion="taylor", target=0.3,
                                    steps=3)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"make_pruner expects a torch.nn.Module, got {type(model).__name__}")
    if pruner is not None and pruner not in GRANULARITIES:
        raise ConfigError(
            f"pruner must be 'channels', 'blocks' or None (inferred from the adapter), got "
            f"{pruner!r}"
        )
    granularity = pruner or infer_granularity(model)
    cls = pruner_class(granularity)
    default = inspect.signature(cls.__init__).parameters["criterion"].default
    criterion = options.get("criterion", default)
    if isinstance(criterion, str):
        get_criterion(criterion, granularity)  # unknown names list the known ones
    accepted = pruner_options(granularity, criterion if isinstance(criterion, str) else None)
    for key in options:
        if key not in accepted:
            other = next(g for g in GRANULARITIES if g != granularity)
            elsewhere = key in pruner_options(other)
            raise ConfigError(
                f"pruner={granularity!r} takes no option {key!r}"
                + (f" (an option of pruner={other!r})" if elsewhere else "")
                + f"; its options are: {', '.join(accepted)}"
                + ("" if pruner else f" (inferred from the model: {_why(granularity)})")
            )
    if granularity == "channels" and "example_inputs" not in options:
        raise ConfigError(
            "pruner='channels' needs example_inputs=<a batch the model accepts> (a tensor, or "
            "a tuple or dict of tensors): it traces the model to find coupled channels"
        )
    return cls(model, **options)


def _why(granularity: str) -> str:
    if granularity == "blocks":
        return "its Linear layers carry SPLoPA adapters"
    return "no Linear layer carries a SPLoPA adapter; pass pruner='blocks' to prune blocks"
