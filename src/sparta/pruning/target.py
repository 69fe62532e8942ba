"""What a :class:`~sparta.pruning.Pruner` is asked to reach: a kind and a kept level."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from ..errors import ConfigError

TARGET_KINDS = ("density", "sparsity", "macs")


@dataclass(frozen=True)
class Target:
    """What to reach: ``density`` (filter density: the fraction of filters, i.e. output
    channels, attention heads and FFN neurons, kept), ``sparsity`` (the fraction of prunable
    *weights* removed; ``1 - sparsity`` is the weight density) or ``macs`` (fraction of MACs
    kept).

    The paper's "density" (its Table 1: 30%, 10%) is the filter density, ``Target("density",
    0.3)``. Removing filters removes both the rows of a layer and the matching columns of the
    next, so the kept weight fraction is far lower, about ``density ** 2`` on chained
    convolutions (ResNet-50 at filter density 0.3 keeps about 8% of its prunable weights).
    """

    kind: str
    value: float

    def __post_init__(self):
        if self.kind not in TARGET_KINDS:
            raise ConfigError(
                f"target kind must be one of {', '.join(TARGET_KINDS)}, got {self.kind!r}"
            )
        v = self.value
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ConfigError(f"{self.kind} target must be a number, got {v!r}")
        object.__setattr__(self, "value", v := float(v))  # numpy and torch scalars too
        low_ok = v >= 0 if self.kind == "sparsity" else v > 0
        high_ok = v < 1 if self.kind == "sparsity" else v <= 1
        if not (low_ok and high_ok):
            bounds = "[0, 1)" if self.kind == "sparsity" else "(0, 1]"
            raise ConfigError(f"{self.kind} target must be in {bounds}, got {v!r}")

    @property
    def level(self) -> float:
        """The kept fraction of the measured quantity."""
        return 1.0 - self.value if self.kind == "sparsity" else float(self.value)

    @classmethod
    def parse(cls, target) -> Target:
        if isinstance(target, Target):
            return target
        if isinstance(target, str) and "=" in target:
            kind, _, value = target.partition("=")
            try:
                return cls(kind.strip(), float(value))
            except ValueError as exc:
                raise ConfigError(f"cannot read target {target!r}: {exc}") from None
        return cls("density", target)
