"""The names a text field of :class:`~sparta.config.RunConfig` accepts, read from the
registries where they live (adapters, criteria, schedules), so that ``sparta run --help``
lists what this installation offers, and a method or criterion registered later shows up with
no edit here."""

from __future__ import annotations

from collections.abc import Callable


def _methods() -> list[str]:
    from .run import methods

    return methods()


def _criteria() -> list[str]:
    from ..pruning.importance import list_criteria

    return list_criteria()


def _schedules() -> list[str]:
    from ..pruning.schedules import SCHEDULES

    return list(SCHEDULES)


def _fixed(name: str) -> Callable[[], list[str]]:
    def names() -> list[str]:
        from . import run

        return list(getattr(run, name))

    return names


def _recipes() -> list[str]:
    from .recipes import recipes

    return list(recipes())


#: Field -> the function listing the names it accepts.
CHOICES: dict[str, Callable[[], list[str]]] = {
    "recipe": _recipes,
    "method": _methods,
    "criterion": _criteria,
    "schedule": _schedules,
    "optimizer": _fixed("OPTIMIZERS"),
    "lr_schedule": _fixed("LR_SCHEDULES"),
    "ranking": _fixed("RANKINGS"),
}


def choices(field: str) -> list[str] | None:
    """The names field ``field`` accepts (``None``: any text of its kind)."""
    names = CHOICES.get(field)
    return None if names is None else list(names())
