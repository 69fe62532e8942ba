"""A tiny name -> class registry, shared by adapters and importance criteria."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from .errors import ConfigError, UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Classes registered by name; each gets its name as ``cls.name``."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def decorate(cls: type[T]) -> type[T]:
            if name in self._items and self._items[name] is not cls:
                raise ConfigError(f"a {self.kind} named {name!r} is already registered")
            cls.name = name
            self._items[name] = cls
            return cls

        return decorate

    def get(self, name: str) -> type[T]:
        """The class registered under ``name``; unknown names list the known ones."""
        if not isinstance(name, str) or name not in self._items:
            raise UnknownNameError(self.kind, name, self._items)
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)


def require_modules(names: Iterable[str], known: list[str], what: str) -> None:
    """Refuse any of ``names`` that is not among the model's module names ``known``."""
    for name in names:
        if name not in known:
            hint = difflib.get_close_matches(name, known, n=3)
            raise ConfigError(
                f"{what} {name!r} is not a module of the model"
                + (f"; close names: {', '.join(hint)}" if hint else "")
            )
