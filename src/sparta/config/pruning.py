"""Checks of a run's adapter options and pruner choice (channels or blocks).

An adapter option given explicitly (``block``, ``prototypes``, ``prototype_rank``, ``shared``;
``None`` means "not given") must be one the run's adapter takes; the block pruning options must
fit the blocks pruner. ``rank`` (a default of its own) and ``init_scale`` (which a recipe sets
for every method) go only to adapters that take them, as before.
"""

from __future__ import annotations

from ..errors import ConfigError, UnknownNameError

#: Adapter options of :class:`~sparta.config.RunConfig` whose ``None`` means "not given".
ADAPTER_OPTIONS = ("block", "prototypes", "prototype_rank", "shared")
PRUNERS = ("channels", "blocks")
GRANULARITIES = ("blocks", "heads", "neurons", "heads,neurons")


def adapter_class(method: str):
    """The adapter class of ``method``, or ``None`` for the baselines (not adapters)."""
    from ..adapters import get_adapter, list_adapters

    return get_adapter(method) if method in list_adapters() else None


def pruner_granularity(config) -> str:
    """``config.pruner``, or inferred: ``"blocks"`` for an adapter with masks beyond the
    channel ones (SPLoPA's block mask), ``"channels"`` otherwise."""
    if config.pruner is not None:
        return config.pruner
    cls = adapter_class(config.method)
    return "blocks" if cls is not None and "mask_block" in cls.mask_names else "channels"


def check_method_options(config) -> None:
    """Refuse adapter options the run's method does not take, and pruner settings that do not
    fit the pruner (see the module docstring)."""
    cls = adapter_class(config.method)
    accepted = set(cls.option_names()) if cls is not None else set()
    for name in ADAPTER_OPTIONS:
        if getattr(config, name) is not None and name not in accepted:
            takes = ", ".join(sorted(accepted)) or "none (it trains the model's own weights)"
            raise ConfigError(
                f"method {config.method!r} takes no option {name!r} (given {getattr(config, name)!r})"
                f"; its options are: {takes}. Drop --{name.replace('_', '-')} or choose a "
                "method that takes it (`sparta adapters` lists them)"
            )
    if config.pruner is not None and config.pruner not in PRUNERS:
        raise UnknownNameError("pruner", config.pruner, PRUNERS)
    if pruner_granularity(config) == "blocks":
        _check_blocks(config, cls)


def _check_blocks(config, cls) -> None:
    from ..pruning.block_criteria import get_block_criterion, list_block_criteria

    if cls is None or "mask_block" not in cls.mask_names:
        raise ConfigError(
            f"pruner 'blocks' prunes the blocks of an adapter with block masks (splopa); "
            f"method {config.method!r} has none: use --method splopa or --pruner channels"
        )
    criterion = get_block_criterion(config.block_criterion)
    if config.granularity not in GRANULARITIES:
        raise UnknownNameError("granularity", config.granularity, GRANULARITIES)
    if not isinstance(config.target, float) or not 0 < config.target <= 1:
        raise ConfigError(
            f"the blocks pruner's target is the fraction of blocks kept, a number in (0, 1]; "
            f"got {config.target!r}"
        )
    if config.warmup + config.cooldown >= 1:
        raise ConfigError(
            f"warmup ({config.warmup:g}) + cooldown ({config.cooldown:g}) must leave training "
            "steps to prune in (their sum below 1)"
        )
    if config.penalty is not None and not has_penalty(criterion):
        with_one = [n for n in list_block_criteria() if has_penalty(get_block_criterion(n))]
        raise ConfigError(
            f"block criterion {config.block_criterion!r} has no penalty, got penalty="
            f"{config.penalty!r}; criteria with one: {', '.join(with_one)} (or drop --penalty)"
        )


def has_penalty(criterion_cls) -> bool:
    """Whether a block criterion adds a loss term (it overrides ``penalty``)."""
    from ..pruning.block_criteria import BlockCriterion

    return criterion_cls.penalty is not BlockCriterion.penalty
