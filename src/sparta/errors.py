"""Exception types raised by sparta.

Every error derives from :class:`SpartaError` and from the built-in type a caller would
naturally catch (``ValueError`` for bad values, ``TypeError`` for wrong types, ``KeyError``-like
lookups are reported as ``ValueError`` with the known names listed).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SpartaError(Exception):
    """Base class of every error raised on purpose by sparta."""


class ConfigError(SpartaError, ValueError):
    """A value given by the user is out of range or inconsistent."""


def _plural(kind: str) -> str:
    """``kind`` in the plural ("criterion" -> "criteria", "model" -> "models")."""
    if kind.endswith("criterion"):
        return kind[: -len("criterion")] + "criteria"
    return kind + "s"


class UnknownNameError(ConfigError):
    """A registered name (adapter, criterion, model, ...) does not exist."""

    #: Above this many known names, the message shows the closest few, not all of them.
    LISTED = 24

    def __init__(self, kind: str, name: object, known: Iterable[str], examples: Iterable[str] = ()):
        known = sorted(known)
        kinds = _plural(kind)
        hint = difflib.get_close_matches(str(name), known, n=1)
        if len(known) > self.LISTED:  # e.g. 80 models: the closest names, not a wall of text
            close = difflib.get_close_matches(str(name).lower(), known, n=5, cutoff=0.5)
            some = list(examples) or known[:5]  # typical names when none is close
            shown = f"close names: {', '.join(close)}" if close else f"e.g. {', '.join(some)}"
            guess = f" (did you mean {hint[0]!r}?)" if hint else ""
            msg = f"unknown {kind} {name!r}{guess}; {shown} ({len(known)} known {kinds})"
        else:
            msg = f"unknown {kind} {name!r}; known {kinds}: {', '.join(known) or '(none)'}"
            if hint:
                msg += f" (did you mean {hint[0]!r}?)"
        super().__init__(msg)
        self.kind, self.name, self.known = kind, name, known


class FileError(SpartaError, OSError):
    """A file or folder cannot be written or read; the message names the path the user gave
    (never a temporary file) and says why. ``errno`` is the operating system's error code."""


class NotAdaptableError(ConfigError):
    """A layer cannot carry the requested adapter (the message says why)."""


class NonFiniteError(SpartaError, ValueError):
    """A loss, score or weight is NaN or infinite: the pruning step is refused before any mask
    changes (the message names the criterion, the layers and the count of bad values)."""


class SkippedLayerWarning(UserWarning):
    """``sparta.wrap`` left some layers unadapted (the report lists each with its reason)."""
