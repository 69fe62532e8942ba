"""SPLoRA: structured pruning low-rank adapter (paper Eq. 4).

    W_task = (W + B A) * (mask_out mask_in^T),  B: (out x r),  A: (r x in/groups)

For a k x k convolution B A sits at the kernel's centre tap. In training the layer runs once
with the delta folded in, and the gradients of A and B come from thin products over the
centre-tap input (``delta_fn``), never from a weight gradient of the whole kernel.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .base import Adapter, check_init_scale, register_adapter


@register_adapter("splora")
class SPLoRA(Adapter):
    """Low-rank delta ``B @ A`` of rank ``rank``; A Kaiming-uniform, B uniform(+-init_scale)."""

    def __init__(
        self,
        out_features: int,
        in_features: int,
        groups: int = 1,
        rank: int = 8,
        init_scale: float = 1e-4,
    ):
        super().__init__(out_features, in_features, groups)
        self.check_options({"rank": rank, "init_scale": init_scale})
        reason = self.unsupported_reason(out_features, in_features, groups, {"rank": rank})
        if reason:
            raise ConfigError(reason)
        self.rank, self.init_scale = rank, init_scale
        self.A = nn.Parameter(torch.empty(rank, in_features // groups))
        self.B = nn.Parameter(torch.empty(out_features, rank))
        self.reset_parameters()

    @classmethod
    def check_options(cls, options: dict) -> None:
        super().check_options(options)
        rank = options.get("rank", 8)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ConfigError(f"rank must be a positive integer, got {rank!r}")
        check_init_scale(options.get("init_scale", 1e-4))

    @classmethod
    def unsupported_reason(cls, out_features, in_features, groups, options):
        # A rank above both sides of the matrix cannot add anything, even in principle; ranks
        # between min and max are allowed because the paper adapts e.g. ResNet's 3-channel stem
        # at the global rank (that is how its parameter counts come out).
        rank = options.get("rank", 8)
        limit = max(out_features, in_features // groups)
        if rank > limit:
            return (
                f"rank {rank} is larger than the layer allows: the delta is "
                f"{out_features} x {in_features // groups}, so rank must be <= {limit}"
            )
        return None

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.uniform_(self.B, -self.init_scale, self.init_scale)

    def delta(self) -> Tensor:
        return self.B @ self.A

    def delta_at(self, rows: Tensor, cols: Tensor | None) -> Tensor:
        right = self.A if cols is None else self.A.index_select(1, cols)
        return self.B.index_select(0, rows) @ right

    def factors(self) -> tuple[Tensor, Tensor | None]:
        if self.groups > 1:  # A is shared by the groups but masked per group: no thin form
            return super().factors()
        # Masking the factors is exact: diag(m_out) B A diag(m_in) = (B A) * (m_out m_in^T).
        return self.B * self.mask_out[:, None], self.A * self.mask_in[None, :]

    def num_learned(self) -> int:
        # Paper count: r * (kept in + kept out) for every adapted layer.
        kept_in = int(self.kept_in_columns().sum())
        kept_out = int(self.kept_out_rows().sum())
        return self.rank * (kept_in + kept_out)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, " + super().extra_repr()
