"""SPPaRA: structured pruning parallel residual adapter (Rebuffi et al. 2018, paper Sec. 3).

A full pointwise matrix P (out x in/groups) in parallel with a frozen convolution, i.e. added at
the kernel's centre tap, masked on both sides: W_task = (W + P) * (mask_out mask_in^T).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Adapter, check_init_scale, register_adapter


@register_adapter("sppara")
class SPPaRA(Adapter):
    """Full pointwise delta ``P`` for convolutions, initialised uniform(+-init_scale)."""

    kinds = ("conv",)

    def __init__(
        self, out_features: int, in_features: int, groups: int = 1, init_scale: float = 1e-4
    ):
        super().__init__(out_features, in_features, groups)
        self.check_options({"init_scale": init_scale})
        self.init_scale = init_scale
        self.P = nn.Parameter(torch.empty(out_features, in_features // groups))
        self.reset_parameters()

    @classmethod
    def check_options(cls, options: dict) -> None:
        super().check_options(options)
        check_init_scale(options.get("init_scale", 1e-4))

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.P, -self.init_scale, self.init_scale)

    def delta(self) -> Tensor:
        return self.P

    def num_learned(self) -> int:
        # Paper count: kept in x kept out (per group for grouped convolutions).
        return self.kept_entries()
