"""The training-path kernel: a frozen Linear/ConvNd plus a learned centre-tap delta.

``DeltaLayerFn`` computes ``layer(x; W + centre(delta), b)`` with a single call of the layer,
so the forward costs what the plain layer costs. Its backward never forms a gradient for the
frozen weight ``W`` (unless the caller unfroze it), and obtains the delta's gradient cheaply:

* low-rank ``delta = L @ R`` (SPLoRA, groups=1): four thin products over the centre-tap
  input, ``r * 2 * (in + out)`` multiply-adds per output position (LoRA's gradient, Hu et al.);
* any other delta: the weight gradient of a strided 1x1 layer over the centre-tap input,
  ``out * in / groups`` per position, i.e. 1/k^d of a full weight gradient.

Doing the adapter branch as separate modules instead (PEFT, the original SPA code) pays
for a second forward, activation-sized additions and a second input gradient, which made a
training step slower than full fine-tuning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Geometry:
    """How a layer reads its input; ``spatial_dims == 0`` means ``nn.Linear``.

    ``padding`` is numeric and zero-valued: other padding modes are applied to the input
    before the kernel, as ``nn.ConvNd`` itself does.
    """

    spatial_dims: int = 0
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    kernel_size: tuple[int, ...] = ()
    groups: int = 1

    @property
    def centre(self) -> tuple:
        return (slice(None), slice(None), *(k // 2 for k in self.kernel_size))

    def with_delta(self, weight: Tensor, delta: Tensor) -> Tensor:
        if self.spatial_dims == 0:
            return weight + delta
        out = weight.clone()
        out[self.centre] += delta
        return out

    def layer(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.spatial_dims == 0:
            return F.linear(x, weight, bias)
        zeros = [0] * self.spatial_dims
        return torch.convolution(
            x, weight, bias, self.stride, self.padding, self.dilation, False, zeros, self.groups
        )

    def input_grad(self, grad: Tensor, x: Tensor, weight: Tensor, mask) -> tuple:
        """``(grad_input, grad_weight)`` of the layer, each computed only if asked for."""
        if self.spatial_dims == 0:
            gx = grad @ weight if mask[0] else None
            gw = _flat(grad).t() @ _flat(x) if mask[1] else None
            return gx, gw
        zeros = [0] * self.spatial_dims
        gx, gw, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, self.stride, self.padding, self.dilation,
            False, zeros, self.groups, [mask[0], mask[1], False],
        )  # fmt: skip
        return gx, gw

    def centre_taps(self, x: Tensor, like: Tensor) -> Tensor:
        """``(N, C, P)`` view of what the kernel's centre tap reads for each output position."""
        if self.spatial_dims == 0:
            return _flat(x).t().unsqueeze(0)
        offsets = [
            d * (k - 1) // 2 - p for d, k, p in zip(self.dilation, self.kernel_size, self.padding)
        ]
        if any(o < 0 for o in offsets):  # the tap reads zero padding: add just that much
            x = F.pad(x, [v for o in reversed(offsets) for v in (max(-o, 0),) * 2])
            offsets = [max(o, 0) for o in offsets]
        index = [slice(None), slice(None)]
        index += [
            slice(o, o + s * (n - 1) + 1, s)
            for o, s, n in zip(offsets, self.stride, like.shape[2:])
        ]
        taps = x[tuple(index)]
        return taps.reshape(taps.shape[0], taps.shape[1], -1)


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _channels(grad: Tensor, geom: Geometry) -> Tensor:
    """Output gradient as ``(N, out, P)``."""
    if geom.spatial_dims == 0:
        return _flat(grad).t().unsqueeze(0)
    return grad.reshape(grad.shape[0], grad.shape[1], -1)


class DeltaLayerFn(torch.autograd.Function):
    """``y = layer(x; W + centre(left @ right), bias)``; ``right is None`` means delta = left."""

    @staticmethod
    def forward(ctx, x, weight, bias, left, right, geom: Geometry):
        delta = left if right is None else left @ right
        ctx.save_for_backward(x, weight, left, right)
        ctx.geom = geom
        return geom.layer(x, geom.with_delta(weight, delta), bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, left, right = ctx.saved_tensors
        geom: Geometry = ctx.geom
        need_x, need_w, need_b, need_l, need_r, _ = ctx.needs_input_grad
        gx = gw = gb = gl = gr = None
        if need_x or need_w:
            w_eff = geom.with_delta(weight, left if right is None else left @ right)
            gx, gw = geom.input_grad(grad, x, w_eff, (need_x, need_w))
            if gw is not None and geom.spatial_dims == 0:
                gw = gw.reshape(weight.shape)
        if need_b:
            gb = _channels(grad, geom).sum(dim=(0, 2))
        if need_l or need_r:
            taps = geom.centre_taps(x, grad)  # (N, in, P)
            g = _channels(grad, geom)  # (N, out, P)
            if right is None:
                gl = _centre_weight_grad(g, taps, geom.groups)
            else:
                # delta = L R with L (out x r), R (r x in):  dL = G (R X)^T,  dR = (L^T G) X^T
                if need_l:
                    gl = (g @ (right @ taps).transpose(1, 2)).sum(0)
                if need_r:
                    gr = ((left.t() @ g) @ taps.transpose(1, 2)).sum(0)
        return gx, gw, gb, gl, gr, None


def _centre_weight_grad(g: Tensor, taps: Tensor, groups: int) -> Tensor:
    """Gradient of a pointwise weight (out, in/groups): sum over positions of g x^T, per group."""
    n, out, p = g.shape
    cin = taps.shape[1]
    g = g.reshape(n, groups, out // groups, p)
    taps = taps.reshape(n, groups, cin // groups, p)
    return (g @ taps.transpose(2, 3)).sum(0).reshape(out, cin // groups)
