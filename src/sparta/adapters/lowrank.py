"""Products of a low-rank delta ``L R`` (L: out x r, R: r x in) with activations, in the memory
layout the activations already have, for the training kernel (``delta_fn``).

An activation ``(N, C, *S)`` is read as a matrix of channels without copying where its layout
allows: ``"rows"``, an ``(N * prod(S), C)`` matrix, when it is channels-last (and for Linear
inputs, which are ``(M, C)`` already); ``"batch"``, ``N`` matrices ``(C, prod(S))``, when it is
contiguous (NCHW). Rows make every product one large matrix product; a batch needs ``bmm`` and
a sum over the batch. Anything else is copied into the layout of the tensor it meets.
"""

from __future__ import annotations

import torch
from torch import Tensor

ROWS, BATCH = "rows", "batch"


def layout_of(t: Tensor) -> str:
    """``"rows"`` for a 2-d or channels-last tensor, else ``"batch"``."""
    if t.dim() == 2 or t.movedim(1, -1).is_contiguous():
        return ROWS
    return BATCH


def matrix(t: Tensor, layout: str) -> Tensor:
    """``t`` as the matrix (``rows``) or matrices (``batch``) of its channels; a view when
    ``t``'s layout is ``layout``, else a copy."""
    if t.dim() == 2:
        return t
    if layout == ROWS:
        return t.movedim(1, -1).reshape(-1, t.shape[1])
    return t.reshape(t.shape[0], t.shape[1], -1)


def unmatrix(m: Tensor, like: Tensor, layout: str) -> Tensor:
    """The inverse of :func:`matrix`: ``m`` with the shape of ``like`` (channels: ``m``'s)."""
    if like.dim() == 2:
        return m
    if layout == ROWS:
        return m.view(like.shape[0], *like.shape[2:], m.shape[-1]).movedim(-1, 1)
    return m.view(like.shape[0], m.shape[1], *like.shape[2:])


def project(x: Tensor, right: Tensor, layout: str) -> Tensor:
    """``right`` (k x C) applied to every position of ``x``: rows ``(M, k)``, batch ``(N, k, P)``."""
    if layout == ROWS:
        return x @ right.t()
    return torch.bmm(right.expand(x.shape[0], -1, -1), x)


def outer(g: Tensor, h: Tensor, layout: str) -> Tensor:
    """``sum over positions of g h^T``: ``(C_g, C_h)``."""
    if layout == ROWS:
        # (h^T g)^T rather than g^T h: the thin factor on the left is the faster product for
        # MKL on CPU (about 1.5x on ResNet-50's channels-last shapes, r=16).
        return (h.t() @ g).t().contiguous()
    return torch.bmm(g, h.transpose(1, 2)).sum(0)


def add_projected(y: Tensor, h: Tensor, left: Tensor, layout: str) -> None:
    """``y += left h`` at every position, in place (``y`` a matrix view of the output)."""
    if layout == ROWS:
        y.addmm_(h, left.t())
    else:
        y.baddbmm_(left.expand(h.shape[0], -1, -1), h)


def low_rank_grads(g, x, h, left, right, layout, need_l, need_r, need_k=False) -> tuple:
    """For delta = L R over inputs ``x`` and output gradient ``g`` (both matrices in ``layout``):
    ``dL = sum g (R x)^T`` and ``dR = sum (L^T g) x^T`` (LoRA's gradient, Hu et al.), and
    ``K = L^T g`` (the branch form's input gradient needs it). ``h``: ``R x`` if known."""
    gl = gr = k = None
    if need_l:
        gl = outer(g, project(x, right, layout) if h is None else h, layout)
    if need_r or need_k:
        k = project(g, left.t(), layout)
    if need_r:
        gr = outer(k, x, layout)
    return gl, gr, k
