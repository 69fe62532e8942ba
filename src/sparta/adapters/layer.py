"""``AdaptedLayer``: a frozen ``nn.Linear`` or ``nn.ConvNd`` plus an adapter, one code path.

Both paths run the base layer once with ``(W + delta) * M`` and ``b * mask_out``
(tested to agree within 1e-5 relative, fp32):

* gradient path (whenever autograd must reach the adapter or bias): through ``DeltaLayerFn``,
  whose backward forms no gradient for the frozen weight and only thin ones for the adapter,
  so a training step costs less than full fine-tuning;
* fused path (otherwise, e.g. under ``torch.no_grad()``): the fused weight is cached until a
  weight, adapter or mask changes, so inference runs at plain-layer speed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from ..errors import ConfigError, NotAdaptableError
from .base import Adapter, get_adapter
from .delta_fn import DeltaLayerFn, Geometry


class TensorMemo:
    """Holds a value computed from some tensors until one of them is replaced or edited.

    Edits are seen through each tensor's version counter, which every in-place operation
    (an optimiser step, ``mask[i] = 0``, ``load_state_dict``) increments; replaced tensors
    (``.to()``, a new ``nn.Parameter``) are seen by identity.
    """

    def __init__(self) -> None:
        self._key: list[tuple[Tensor, int]] = []
        self._value = None

    def get(self, tensors: Sequence[Tensor], compute: Callable[[], object]):
        key = [(t, t._version) for t in tensors]
        same = len(key) == len(self._key) and all(
            a is b and va == vb for (a, va), (b, vb) in zip(key, self._key)
        )
        if not same:
            # Built outside inference mode and without a graph, so the value can be reused in
            # any later call, including ones that take gradients w.r.t. the input.
            with torch.inference_mode(False), torch.no_grad():
                self._value = compute()
            self._key = key
        return self._value

    def clear(self) -> None:
        self._key, self._value = [], None

    def __deepcopy__(self, memo):  # caches are not state: a copy starts empty
        return TensorMemo()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


def layer_geometry(layer: nn.Module) -> tuple[str, int, int, int]:
    """``(kind, out_features, in_features, groups)`` of a Linear or (non-transposed) ConvNd."""
    if isinstance(layer, nn.Linear):
        return "linear", layer.out_features, layer.in_features, 1
    if isinstance(layer, _ConvNd) and not layer.transposed:
        return "conv", layer.out_channels, layer.in_channels, layer.groups
    raise NotAdaptableError(f"expected nn.Linear or nn.Conv1d/2d/3d, got {type(layer).__name__}")


def centre_reason(layer: nn.Module) -> str | None:
    """Why a conv has no centre tap for a pointwise delta (even kernel size), else ``None``."""
    if isinstance(layer, _ConvNd):
        even = [k for k in layer.kernel_size if k % 2 == 0]
        if even:
            size = "x".join(map(str, layer.kernel_size))
            return f"kernel {size} has an even size, so there is no centre tap for the delta"
    return None


class AdaptedLayer(nn.Module):
    """A frozen Linear/ConvNd (``self.base``) with a task adapter (``self.adapter``).

    ``base.weight`` is frozen and never modified; ``base.bias`` is the task's bias (trainable
    unless frozen by the caller). Masks live on the adapter: ``mask_out`` zeroes output
    channels in weight, delta and bias; ``mask_in`` zeroes input channels.
    """

    def __init__(
        self, base: nn.Module, adapter: str | Adapter = "splora", name: str = "", **options
    ):
        super().__init__()
        if not isinstance(base, nn.Module):
            raise TypeError(f"expected an nn.Module to adapt, got {type(base).__name__}")
        label = f"layer {name!r}" if name else f"this {type(base).__name__}"
        kind, out_f, in_f, groups = layer_geometry(base)
        reason = centre_reason(base)
        if reason:
            raise NotAdaptableError(f"cannot adapt {label}: {reason}")
        if isinstance(adapter, str):
            cls = get_adapter(adapter)
            if kind not in cls.kinds:
                raise NotAdaptableError(
                    f"cannot adapt {label}: adapter {cls.name!r} supports {', '.join(cls.kinds)}"
                    f" layers, not {kind}"
                )
            options = cls.resolve_options(options)
            why = cls.unsupported_reason(out_f, in_f, groups, options)
            if why:
                raise NotAdaptableError(f"cannot adapt {label}: {why}")
            adapter = cls(out_f, in_f, groups, **options)
        elif options:
            raise ConfigError("options are only accepted together with an adapter name")
        if (adapter.out_features, adapter.in_features, adapter.groups) != (out_f, in_f, groups):
            raise ConfigError(
                f"adapter shape (out={adapter.out_features}, in={adapter.in_features}, "
                f"groups={adapter.groups}) does not match {label} "
                f"(out={out_f}, in={in_f}, groups={groups})"
            )
        self.base = base
        self.adapter = adapter.to(device=base.weight.device, dtype=base.weight.dtype)
        base.weight.requires_grad_(False)
        self.geometry = _geometry(base)
        self._masked_weight = TensorMemo()
        self._fused = TensorMemo()

    @property
    def mask_out(self) -> Tensor:
        return self.adapter.mask_out

    @property
    def mask_in(self) -> Tensor:
        return self.adapter.mask_in

    def _weight_mask(self) -> Tensor:
        matrix = self.adapter.mask_matrix()
        return matrix.reshape(*matrix.shape, *([1] * self.geometry.spatial_dims))

    def fused_weight(self) -> tuple[Tensor, Tensor | None]:
        """``((W + delta) * M, b * mask_out)``; differentiable when called with grad enabled."""
        weight = (
            self.geometry.with_delta(self.base.weight, self.adapter.delta()) * self._weight_mask()
        )
        bias = self.base.bias
        return weight, (None if bias is None else bias * self.mask_out)

    def _needs_grad(self) -> bool:
        if not torch.is_grad_enabled():
            return False
        bias = self.base.bias
        return (bias is not None and bias.requires_grad) or any(
            p.requires_grad for p in self.adapter.parameters()
        )

    def _pad(self, x: Tensor) -> Tensor:
        """Apply a non-zero padding mode up front, as ``nn.ConvNd`` does."""
        mode = getattr(self.base, "padding_mode", "zeros")
        if mode == "zeros":
            return x
        return F.pad(x, self.base._reversed_padding_repeated_twice, mode=mode)

    def forward(self, x: Tensor) -> Tensor:
        x = self._pad(x)
        if not self._needs_grad():
            keys = [self.base.weight, *self.adapter.parameters(), *self.adapter.buffers()]
            keys += [] if self.base.bias is None else [self.base.bias]
            weight, bias = self._fused.get(keys, self.fused_weight)
            return self.geometry.layer(x, weight, bias)
        weight = self._masked_weight.get(
            [self.base.weight, *self.adapter.masks()], self._masked_base_weight
        )
        bias = None if self.base.bias is None else self.base.bias * self.mask_out
        left, right = self.adapter.factors()
        return DeltaLayerFn.apply(x, weight, bias, left, right, self.geometry)

    def _masked_base_weight(self) -> Tensor:
        if all(bool(m.all()) for m in self.adapter.masks()):
            return self.base.weight  # nothing pruned: no copy
        return self.base.weight * self._weight_mask()

    def extra_repr(self) -> str:
        return f"adapter={self.adapter.name!r}"


def _geometry(layer: nn.Module) -> Geometry:
    if isinstance(layer, nn.Linear):
        return Geometry()
    d = len(layer.kernel_size)
    if layer.padding_mode != "zeros" or layer.padding == "valid":
        padding = (0,) * d  # non-zero modes pad the input before the kernel (see _pad)
    elif layer.padding == "same":  # odd kernels only (even ones are refused): symmetric
        padding = tuple(dl * (k - 1) // 2 for dl, k in zip(layer.dilation, layer.kernel_size))
    else:
        padding = tuple(layer.padding)
    return Geometry(
        d,
        tuple(layer.stride),
        padding,
        tuple(layer.dilation),
        tuple(layer.kernel_size),
        layer.groups,
    )
