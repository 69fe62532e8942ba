"""The adapter protocol and its registry.

An adapter is the task-specific part of one frozen weight. Whatever the layer (``Linear``,
``ConvNd`` or a projection inside ``MultiheadAttention``), the adapter sees the weight as a matrix
of shape ``(out, in // groups)``: for a k x k convolution the delta lives at the kernel's centre
tap, so it is a pointwise branch in parallel with the frozen layer (paper, Sec. 3; design.md).

Every adapter also owns the layer's channel masks ``mask_out`` (out) and ``mask_in`` (in), so one
module holds all the per-layer task state. The effective weight is

    W_task = (W + delta) * (mask_out mask_in^T)

where, for grouped layers, ``mask_in`` is read per group of output rows.
"""

from __future__ import annotations

import functools
import inspect
from abc import ABCMeta, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import Registry

_ADAPTERS: Registry[Adapter] = Registry("adapter")

#: The kinds of layer an adapter may declare support for.
LAYER_KINDS = ("linear", "conv", "attention")


def register_adapter(name: str) -> Callable[[type[Adapter]], type[Adapter]]:
    """Class decorator that makes an :class:`Adapter` available to :func:`sparta.wrap` by name."""
    return _ADAPTERS.register(name)


def get_adapter(name: str) -> type[Adapter]:
    """The adapter class registered under ``name``; unknown names list the known ones."""
    return _ADAPTERS.get(name)


def list_adapters() -> list[str]:
    """Names of every registered adapter, sorted."""
    return _ADAPTERS.names()


def grouped_mask(mask_out: Tensor, mask_in: Tensor, groups: int = 1) -> Tensor:
    """``mask_out mask_in^T`` shaped like a (out, in // groups) weight: output row ``o`` of
    group ``j`` reads input channels ``j * in/groups ... (j + 1) * in/groups - 1``."""
    out, in_g = mask_out.shape[0], mask_in.shape[0] // groups
    grouped_in = mask_in.view(groups, 1, in_g).expand(groups, out // groups, in_g)
    return mask_out[:, None] * grouped_in.reshape(out, in_g)


def kept_entries(mask_out: Tensor, mask_in: Tensor, groups: int = 1) -> int:
    """``grouped_mask(...).sum()`` without building the matrix (a VGG classifier's is 100M)."""
    # count_nonzero: exact whatever the masks' dtype (a bf16 sum is not, above 256)
    kept_in = mask_in.view(groups, -1).count_nonzero(1)
    per_group = mask_out.view(groups, -1).count_nonzero(1) * kept_in
    return int(per_group.sum())


#: ``init_scale`` bounds: the adapter starts as ``uniform(-init_scale, init_scale)`` next to
#: the frozen weight, meant to be a tiny perturbation (1e-4 by default). Above 1 it is no longer
#: one (1e30 already turns a ResNet's outputs into NaN), so it is refused, from ``wrap`` and
#: from a task file alike.
MAX_INIT_SCALE = 1.0


def check_init_scale(value: object) -> None:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not (number and 0 <= value <= MAX_INIT_SCALE):
        raise ConfigError(
            f"init_scale must be a number in [0, {MAX_INIT_SCALE:g}] (the adapter's initial "
            f"values are uniform(-init_scale, init_scale); default 1e-4), got {value!r}"
        )


class Adapter(nn.Module, metaclass=ABCMeta):
    """Base class: a learned delta of shape ``(out_features, in_features // groups)`` plus masks.

    Subclasses define :meth:`delta` and :meth:`num_learned`, and may override :meth:`factors`
    when the delta is a product of thin matrices (SPLoRA).
    Options accepted by ``__init__`` after ``groups`` are the adapter's user-facing options.
    """

    name: ClassVar[str] = ""
    #: Layer kinds this adapter can adapt (a subset of :data:`LAYER_KINDS`).
    kinds: ClassVar[tuple[str, ...]] = LAYER_KINDS
    #: The adapter's mask buffers: the weight is kept where all of them keep it
    #: (:meth:`mask_matrix`); adapters with more masks than the channel ones extend it.
    mask_names: ClassVar[tuple[str, ...]] = ("mask_out", "mask_in")

    def __init__(self, out_features: int, in_features: int, groups: int = 1):
        super().__init__()
        if in_features % groups or out_features % groups:
            raise ConfigError(
                f"in_features={in_features} and out_features={out_features} must both be "
                f"divisible by groups={groups}"
            )
        self.out_features, self.in_features, self.groups = out_features, in_features, groups
        self.register_buffer("mask_out", torch.ones(out_features))
        self.register_buffer("mask_in", torch.ones(in_features))

    # -- options -------------------------------------------------------------------------------
    @classmethod
    def option_names(cls) -> list[str]:
        return list(_option_names(cls))

    @classmethod
    def check_options(cls, options: dict) -> None:
        """Refuse unknown options, naming the accepted ones; subclasses add range checks."""
        unknown = set(options) - set(cls.option_names())
        if unknown:
            accepted = ", ".join(cls.option_names()) or "none"
            raise ConfigError(
                f"adapter {cls.name!r} takes no option {sorted(unknown)[0]!r}; "
                f"its options are: {accepted}"
            )

    @classmethod
    def resolve_options(cls, options: dict) -> dict:
        """Checked options with every default filled in."""
        cls.check_options(options)
        params = inspect.signature(cls.__init__).parameters
        return {n: options.get(n, params[n].default) for n in cls.option_names()}

    @classmethod
    def unsupported_reason(
        cls, out_features: int, in_features: int, groups: int, options: dict
    ) -> str | None:
        """Why this adapter cannot adapt a weight of this shape, or ``None`` if it can."""
        return None

    # -- maths ---------------------------------------------------------------------------------
    @property
    def in_per_group(self) -> int:
        return self.in_features // self.groups

    @abstractmethod
    def delta(self) -> Tensor:
        """The unmasked delta, shape ``(out_features, in_features // groups)``."""

    def masks(self) -> list[Tensor]:
        return [getattr(self, n) for n in self.mask_names]

    def mask_at(self, rows: Tensor, cols: Tensor) -> Tensor:
        """``mask_matrix()[rows][:, cols]`` (groups 1) without building the whole matrix."""
        return self.mask_out[rows].view(-1, 1) * self.mask_in[cols].view(1, -1)

    @classmethod
    def view(cls, out_features: int, in_features: int, groups: int, options: dict, tensors: dict):
        """An adapter reading ``tensors`` (its parameters and masks by name; options resolved
        by :meth:`resolve_options`) for its maths only (``delta_at``, ``mask_at``,
        ``mask_matrix``): no module set-up, no initialisation, nothing registered. Used to fuse
        a task's stored tensors into a compact model without building the task model; never
        call, train or save it. Families whose attributes differ from their options override
        :meth:`view_options`."""
        adapter = object.__new__(cls)
        attrs = {"out_features": out_features, "in_features": in_features, "groups": groups}
        adapter.__dict__.update(attrs, **cls.view_options(options), **tensors)
        return adapter

    @classmethod
    def view_options(cls, options: dict) -> dict:
        """The attributes :meth:`view` sets from resolved ``options`` (by default the same)."""
        return dict(options)

    @classmethod
    def new_context(cls):
        """State shared by the adapters of one wrapped model (passed to each constructor as
        ``context=``), or ``None``: adapters that share nothing need none."""
        return None

    def mask_matrix(self) -> Tensor:
        """``mask_out mask_in^T`` laid out like the weight matrix, ``mask_in`` read per group."""
        return grouped_mask(self.mask_out, self.mask_in, self.groups)

    def kept_entries(self) -> int:
        """Entries of the weight matrix kept by the masks."""
        return kept_entries(self.mask_out, self.mask_in, self.groups)

    def delta_at(self, rows: Tensor, cols: Tensor | None) -> Tensor:
        """``delta()[rows][:, cols]`` (all columns when ``cols`` is None); adapters with
        factors override it to compute only those entries (used when building a compact
        model, which keeps a few rows and columns of large layers)."""
        delta = self.delta().index_select(0, rows)
        return delta if cols is None else delta.index_select(1, cols)

    def masked_delta(self) -> Tensor:
        return self.delta() * self.mask_matrix()

    def factors(self) -> tuple[Tensor, Tensor | None]:
        """The masked delta as ``(left, right)`` with delta = left @ right, or ``(delta, None)``.

        The training kernel differentiates a factored delta with thin products (see
        ``delta_fn``); adapters without a cheap factorisation keep the default.
        """
        return self.masked_delta(), None

    @abstractmethod
    def num_learned(self) -> int:
        """Learned parameters that still reach the output under the current masks."""

    # -- helpers for subclasses ----------------------------------------------------------------
    def kept_in_columns(self) -> Tensor:
        """Bool (in // groups): columns of the delta kept by the input mask in any group."""
        return self.mask_in.view(self.groups, self.in_per_group).bool().any(0)

    def kept_out_rows(self) -> Tensor:
        return self.mask_out.bool()

    def extra_repr(self) -> str:
        kept_out = int(self.mask_out.count_nonzero())
        kept_in = int(self.mask_in.count_nonzero())
        text = f"out={kept_out}/{self.out_features}, in={kept_in}/{self.in_features}"
        return text + (f", groups={self.groups}" if self.groups > 1 else "")


@functools.cache
def _option_names(cls: type) -> tuple[str, ...]:
    """The keyword options of an adapter class: its ``__init__`` parameters after ``groups``
    (cached: building a task constructs one adapter per layer)."""
    params = list(inspect.signature(cls.__init__).parameters)
    return tuple(params[params.index("groups") + 1 :])
