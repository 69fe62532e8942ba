"""Validation of config values, in the library's error style (design.md, rule 6): an unknown
key names the key and the closest known one; an out-of-range value says what was received and
what range is accepted. Every error is a :class:`~sparta.errors.ConfigError` (a ``ValueError``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import field
from typing import Any

from ..errors import ConfigError

_RULE_KEYS = ("kind", "low", "high", "open_low", "open_high", "none")


def rule(
    default, kind, *, low=None, high=None, open_low=False, open_high=False, none=False, help=None
):
    """A dataclass field with its validation rule and its one-line ``help`` (what ``sparta run
    --help`` and the README's option list show) in ``metadata``."""
    meta = dict(kind=kind, low=low, high=high, open_low=open_low, open_high=open_high, none=none)
    return field(default=default, metadata={**meta, "help": help})


def check_keys(data, known: list[str], what: str) -> None:
    """Refuse a ``data`` that is not a mapping or has a key outside ``known``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a mapping of keys, got {type(data).__name__}")
    for key in data:
        if key not in known:
            hint = difflib.get_close_matches(str(key), known, n=1)
            raise ConfigError(
                f"unknown {what} key {key!r}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; known keys: {', '.join(sorted(known))}"
            )


def check_fields(config) -> None:
    """Check every field of ``config`` made by :func:`rule` (numbers normalised in place)."""
    for f in dataclasses.fields(config):
        if not f.metadata:
            continue
        value = getattr(config, f.name)
        rule_ = {k: f.metadata[k] for k in _RULE_KEYS}
        setattr(config, f.name, check_value(f.name, value, **rule_))


def check_value(name, value, kind, low, high, open_low, open_high, none) -> Any:
    """``value`` of the field ``name`` checked against its rule (an int given for a float
    field comes back as a float)."""
    if value is None:
        if none:
            return None
        raise ConfigError(f"{name} must be set, got None")
    kinds, given = (kind if isinstance(kind, tuple) else (kind,)), value
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = any(
        isinstance(value, k) and not (k is not bool and isinstance(value, bool)) for k in kinds
    )
    if not ok:
        expected = " or ".join({str: "text", int: "an integer", float: "a number",
                                bool: "true/false"}[k] for k in kinds)  # fmt: skip
        raise ConfigError(f"{name} must be {expected}, got {given!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {given!r}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        below = low is not None and (value <= low if open_low else value < low)
        above = high is not None and (value >= high if open_high else value > high)
        if below or above:
            bounds = _range(low, high, open_low, open_high)
            raise ConfigError(f"{name} must be {bounds}, got {given!r}")
    return value


def _range(low, high, open_low, open_high) -> str:
    if high is None:
        return f"{'>' if open_low else '>='} {low}"
    return f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"


def check_device(device: str) -> None:
    """Refuse a device name other than auto, cpu, cuda, cuda:INDEX or mps."""
    head, _, index = device.partition(":")
    if head not in ("auto", "cpu", "cuda", "mps") or (index and not index.isdigit()):
        raise ConfigError(
            f"device must be 'auto', 'cpu', 'cuda', 'cuda:<index>' or 'mps', got {device!r}"
        )
    if index and head != "cuda":
        raise ConfigError(f"only cuda devices take an index, got {device!r}")
