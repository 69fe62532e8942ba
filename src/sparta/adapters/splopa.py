"""SPLoPA: structured pruning low-rank PHM adapter, the paper's block-SPA (Sec. 3.3).

The weight matrix (out x in) is tiled by p x q blocks. R low-rank prototypes
``P_i = u_i v_i^T`` (p x q, rank 1 or 2) are mixed in every block by per-layer position weights
``B_i`` (out/p x in/q):

    delta  = sum_i B_i kron P_i
    W_task = (W + delta) * (M_block kron 1_{p x q}) * (mask_out mask_in^T)

``mask_block`` (out/p x in/q, 1 = kept) prunes whole blocks, the channel masks ``mask_out`` and
``mask_in`` prune rows and columns exactly as for the other adapters; :meth:`mask_matrix`
returns the product of both, which is what every path (fused, training, attention, ``fuse``)
multiplies the weight by.

Prototypes may be shared (``shared=True``) between the adapters of one wrapped model that have
the same block shape. They are then owned by those adapters (the same ``nn.Parameter`` objects
registered in each), handed out by a :class:`PrototypeBank` that the caller creates for one
model (``SPLoPA.new_context()``) and passes to every adapter as ``context=``; nothing is kept at
module level, so two models never share prototypes.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .base import Adapter, check_init_scale, grouped_mask, register_adapter

_DEFAULTS = {"block": 32, "prototypes": 64, "prototype_rank": 1, "shared": False}


def _block_shape(block: object) -> tuple[int, int]:
    """``(p, q)`` from an int or a pair of ints (a list after a JSON round trip)."""
    if isinstance(block, int) and not isinstance(block, bool):
        pair = (block, block)
    elif isinstance(block, tuple | list) and len(block) == 2:
        pair = tuple(block)
    else:
        pair = None
    if pair is None or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in pair):
        raise ConfigError(
            f"block must be a positive integer or a pair (p, q) of positive integers, got {block!r}"
        )
    return pair


class PrototypeBank:
    """The prototypes shared by the adapters of one model, by ``(p, q, prototypes, rank)``.

    Create one per model (``SPLoPA.new_context()``) and pass it to each adapter as ``context``;
    the first adapter of a shape creates the prototypes, later ones reuse the same Parameters.
    The bank only hands them out: the adapters hold them, so dropping the bank after building
    the model changes nothing.
    """

    def __init__(self) -> None:
        self._prototypes: dict[tuple[int, ...], tuple[nn.Parameter, nn.Parameter]] = {}

    def get(self, key: tuple[int, ...], make) -> tuple[nn.Parameter, nn.Parameter, bool]:
        """``(U, V, created)``: the prototypes for ``key``, made by ``make()`` the first time."""
        created = key not in self._prototypes
        if created:
            self._prototypes[key] = make()
        return (*self._prototypes[key], created)

    def __len__(self) -> int:
        return len(self._prototypes)


@register_adapter("splopa")
class SPLoPA(Adapter):
    """Block delta ``sum_i B_i kron (u_i v_i^T)`` with block and channel masks.

    Options: ``block`` (int or ``(p, q)``, default 32), ``prototypes`` R (default 64; a layer uses
    at most ``p * q``, since more p x q prototypes are linearly dependent), ``prototype_rank``
    (1 or 2), ``shared`` (share prototypes between the layers of one model with the same block
    shape; needs ``context``), ``init_scale`` (position weights start uniform(+-init_scale), so
    the wrapped model starts next to the base).
    """

    kinds = ("linear", "attention")
    #: Every mask buffer; the weight is kept where all of them keep it (see :meth:`mask_matrix`).
    mask_names: ClassVar[tuple[str, ...]] = ("mask_out", "mask_in", "mask_block")
    #: Set by block pruning while it trains scores or gates (see :meth:`factors`).
    factors_hook: ClassVar[object] = None

    def __init__(
        self,
        out_features: int,
        in_features: int,
        groups: int = 1,
        block: int | tuple[int, int] = 32,
        prototypes: int = 64,
        prototype_rank: int = 1,
        shared: bool = False,
        init_scale: float = 1e-4,
        *,
        context: PrototypeBank | None = None,
    ):
        super().__init__(out_features, in_features, groups)
        options = {
            "block": block,
            "prototypes": prototypes,
            "prototype_rank": prototype_rank,
            "shared": shared,
            "init_scale": init_scale,
        }
        self.check_options(options)
        reason = self.unsupported_reason(out_features, in_features, groups, options)
        if reason:
            raise ConfigError(reason)
        if context is not None and not isinstance(context, PrototypeBank):
            raise TypeError(f"context must be a PrototypeBank, got {type(context).__name__}")
        if shared and context is None:
            raise ConfigError(
                "shared=True needs the model's PrototypeBank: pass context=SPLoPA.new_context() "
                "(one per model) to each adapter"
            )
        p, q = self.block = _block_shape(block)
        self.prototypes = min(prototypes, p * q)
        self.prototype_rank, self.shared, self.init_scale = prototype_rank, shared, init_scale
        rows, cols = out_features // p, in_features // q
        self.pos = nn.Parameter(torch.empty(self.prototypes, rows, cols))
        if shared:
            key = (p, q, self.prototypes, prototype_rank)
            U, V, self.owns_prototypes = context.get(key, self._new_prototypes)
        else:
            (U, V), self.owns_prototypes = self._new_prototypes(), True
        self.U, self.V = U, V
        self.register_buffer("mask_block", torch.ones(rows, cols))
        nn.init.uniform_(self.pos, -init_scale, init_scale)

    def _new_prototypes(self) -> tuple[nn.Parameter, nn.Parameter]:
        """U (R x p x rank), V (R x q x rank), uniform(+-1/sqrt(p)) and uniform(+-1/sqrt(q))."""
        (p, q), r, k = self.block, self.prototypes, self.prototype_rank
        U = nn.Parameter(torch.empty(r, p, k).uniform_(-(p**-0.5), p**-0.5))
        V = nn.Parameter(torch.empty(r, q, k).uniform_(-(q**-0.5), q**-0.5))
        return U, V

    @classmethod
    def view_options(cls, options: dict) -> dict:
        p, q = _block_shape(options["block"])
        return {**options, "block": (p, q), "prototypes": min(options["prototypes"], p * q)}

    @classmethod
    def new_context(cls) -> PrototypeBank:
        """A fresh bank for one model's adapters (what ``context=`` takes)."""
        return PrototypeBank()

    # -- options -------------------------------------------------------------------------------
    @classmethod
    def option_names(cls) -> list[str]:
        return [n for n in super().option_names() if n != "context"]

    @classmethod
    def check_options(cls, options: dict) -> None:
        super().check_options(options)
        _block_shape(options.get("block", _DEFAULTS["block"]))
        count = options.get("prototypes", _DEFAULTS["prototypes"])
        if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
            raise ConfigError(f"prototypes must be a positive integer, got {count!r}")
        rank = options.get("prototype_rank", _DEFAULTS["prototype_rank"])
        if isinstance(rank, bool) or rank not in (1, 2):
            raise ConfigError(f"prototype_rank must be 1 or 2, got {rank!r}")
        if not isinstance(options.get("shared", False), bool):
            raise ConfigError(f"shared must be True or False, got {options['shared']!r}")
        check_init_scale(options.get("init_scale", 1e-4))

    @classmethod
    def unsupported_reason(cls, out_features, in_features, groups, options):
        p, q = _block_shape(options.get("block", _DEFAULTS["block"]))
        if groups != 1:
            return f"grouped weights (groups={groups}) have no block layout"
        if out_features % p or in_features % q:
            return (
                f"{p} x {q} blocks do not tile the {out_features} x {in_features} weight "
                f"(out must be divisible by {p} and in by {q}); choose another block"
            )
        return None

    # -- maths ---------------------------------------------------------------------------------
    def prototype_matrices(self) -> Tensor:
        """The R prototypes ``u_i v_i^T``, shape ``(R, p, q)``."""
        return self.U @ self.V.transpose(1, 2)

    def delta(self) -> Tensor:
        (p, q), r = self.block, self.prototypes
        rows, cols = self.mask_block.shape
        # blocks[(a, b), (i, j)] = sum_r B_r[a, b] P_r[i, j]: one (blocks x R) @ (R x pq) product
        blocks = self.pos.reshape(r, rows * cols).t() @ self.prototype_matrices().reshape(r, -1)
        return blocks.view(rows, cols, p, q).transpose(1, 2).reshape(self.out_features, -1)

    def factors(self) -> tuple[Tensor, None]:
        """The masked delta, as the gradient path of ``AdaptedLayer`` reads it. Block pruning
        (``sparta.pruning.BlockPruner``) may set ``factors_hook(adapter, masked) -> tensor`` to
        read the weight's gradient or gate blocks during training; it is state of the pruner,
        never saved."""
        masked = self.masked_delta()
        hook = self.factors_hook
        return (masked if hook is None else hook(self, masked)), None

    def block_mask_matrix(self) -> Tensor:
        """``mask_block kron 1_{p x q}``, shaped like the weight."""
        (p, q), (rows, cols) = self.block, self.mask_block.shape
        expanded = self.mask_block[:, None, :, None].expand(rows, p, cols, q)
        return expanded.reshape(self.out_features, self.in_features)

    def mask_matrix(self) -> Tensor:
        return grouped_mask(self.mask_out, self.mask_in) * self.block_mask_matrix()

    def mask_at(self, rows: Tensor, cols: Tensor | None) -> Tensor:
        """``mask_matrix()[rows][:, cols]`` without building the whole matrix."""
        p, q = self.block
        cols = torch.arange(self.in_features, device=rows.device) if cols is None else cols
        block = self.mask_block[rows.div(p, rounding_mode="floor")][
            :, cols.div(q, rounding_mode="floor")
        ]
        return block * self.mask_out[rows, None] * self.mask_in[None, cols]

    def _live_blocks(self) -> Tensor:
        """Bool (out/p x in/q): blocks kept by the block mask with a kept row and column."""
        (p, q), (rows, cols) = self.block, self.mask_block.shape
        live_rows = self.mask_out.view(rows, p).bool().any(1)
        live_cols = self.mask_in.view(cols, q).bool().any(1)
        return self.mask_block.bool() & live_rows[:, None] & live_cols[None, :]

    def kept_entries(self) -> int:
        (p, q), (rows, cols) = self.block, self.mask_block.shape
        # Counted in float64: masks follow the model's dtype, and bf16 sums are inexact above 256.
        kept_rows = self.mask_out.view(rows, p).count_nonzero(1).double()
        kept_cols = self.mask_in.view(cols, q).count_nonzero(1).double()
        return int(kept_rows @ self.mask_block.bool().double() @ kept_cols)

    def num_learned(self) -> int:
        # Position weights of the blocks that reach the output, plus the prototypes: counted by
        # the adapter that created them (once per model when shared), and not at all by an
        # unshared adapter with nothing left to adapt.
        live = int(self._live_blocks().sum())
        (p, q), r = self.block, self.prototypes
        counted = self.owns_prototypes and (self.shared or live > 0)
        return r * live + (r * (p + q) * self.prototype_rank if counted else 0)

    def extra_repr(self) -> str:
        (p, q), rows, cols = self.block, *self.mask_block.shape
        kept = int(self.mask_block.count_nonzero())
        text = f"block={p}x{q}, prototypes={self.prototypes}, rank={self.prototype_rank}"
        text += ", shared" if self.shared else ""
        return f"{text}, blocks={kept}/{rows * cols}, " + super().extra_repr()
