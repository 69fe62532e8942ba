"""Input specs: the shapes and dtypes of an example batch, as JSON data.

A task records the spec of the batch it was pruned with, so that building its compact model
(which traces the base once to find coupled channels) needs no example from the caller.
A spec is ``{"tensor": {"shape": [...], "dtype": "float32"}}``, ``{"tuple": [spec, ...]}`` or
``{"dict": {name: spec}}``.

Also here, for every layer that takes an example batch (measuring, pruning, building): walking
its tensors, describing it in a message, refusing an empty one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from .errors import ConfigError

MAX_DEPTH = 8
MAX_RANK = 8
MAX_LEAVES = 64
MAX_ELEMENTS = 2**24  # 64 MB of float32: ample for an example batch, harmless to allocate
#: Input dtypes a spec may name: floats, and integers / bools (token ids, masks, segment ids).
DTYPES = (
    "float32", "float16", "bfloat16", "float64",
    "int64", "int32", "int16", "int8", "uint8", "bool",
)  # fmt: skip


def tensors(inputs) -> Iterator[Tensor]:
    """Every tensor of ``inputs`` (a tensor, or tuples/lists/dicts of them, nested)."""
    if isinstance(inputs, Tensor):
        yield inputs
    elif isinstance(inputs, dict):
        for v in inputs.values():
            yield from tensors(v)
    elif isinstance(inputs, tuple | list):
        for v in inputs:
            yield from tensors(v)


def describe(inputs) -> str:
    """``of shape (2, 3, 8, 8)``, or the structure of a tuple/dict of tensors."""
    if isinstance(inputs, Tensor):
        return f"of shape {tuple(inputs.shape)}"
    if isinstance(inputs, dict):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in inputs.items()) + "}"
    if isinstance(inputs, tuple | list):
        return "(" + ", ".join(describe(v) for v in inputs) + ")"
    return f"of type {type(inputs).__name__}"


def check_nonempty(inputs, what: str) -> None:
    """Refuse a batch holding a tensor with a zero-sized dimension (e.g. a batch of 0): shapes,
    MACs per sample, scores and outputs cannot be measured on no data."""
    if any(0 in t.shape for t in tensors(inputs)):
        raise ConfigError(
            f"{what} {describe(inputs)} hold a tensor with a zero-sized dimension (a batch of "
            "0?); give a batch of at least one sample, every dimension at least 1"
        )


def input_spec(inputs) -> dict:
    """The spec of ``inputs`` (a tensor, or a tuple/list/dict of them)."""
    if isinstance(inputs, Tensor):
        return {"tensor": {"shape": list(inputs.shape), "dtype": _dtype_name(inputs.dtype)}}
    if isinstance(inputs, tuple | list):
        return {"tuple": [input_spec(x) for x in inputs]}
    if isinstance(inputs, dict):
        return {"dict": {str(k): input_spec(v) for k, v in inputs.items()}}
    raise ConfigError(
        f"example inputs must be a tensor or a tuple/list/dict of tensors, got "
        f"{type(inputs).__name__}"
    )


def make_inputs(spec: dict, seed: int = 0, device: torch.device | str | None = None):
    """A batch following ``spec``: floats from a seeded normal, integers and bools as ones
    (valid token ids, attention masks and segment ids for BERT-like models), on ``device``
    (the model's, see ``sparta.devices.module_device``; the same values on any device)."""
    gen = torch.Generator().manual_seed(seed)

    def build(s):
        if "tensor" in s:
            shape, dtype = s["tensor"]["shape"], getattr(torch, s["tensor"]["dtype"])
            if dtype.is_floating_point:
                return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
            return torch.ones(shape, dtype=dtype, device=device)
        if "tuple" in s:
            return tuple(build(x) for x in s["tuple"])
        return {k: build(v) for k, v in s["dict"].items()}

    problem = spec_problem(spec)
    if problem is not None:
        raise ConfigError(f"not a usable input spec ({problem}): {_short(spec)}")
    return build(spec)


def check_spec(spec) -> bool:
    """Whether ``spec`` is a well-formed, sane input spec (it may come from an untrusted file)."""
    return spec_problem(spec) is None


def spec_problem(spec) -> str | None:
    """Why ``spec`` is not a sane input spec, or ``None``: tensors of the dtypes in
    :data:`DTYPES`, ranks up to :data:`MAX_RANK`, sizes >= 1, nested at most
    :data:`MAX_DEPTH` deep, at most :data:`MAX_LEAVES` tensors and :data:`MAX_ELEMENTS`
    elements in all (so that building a batch from a file cannot exhaust memory)."""
    leaves: list[list[int]] = []
    problem = _walk(spec, 0, leaves)
    if problem is None and len(leaves) > MAX_LEAVES:
        problem = f"{len(leaves)} tensors (at most {MAX_LEAVES})"
    if problem is None:
        total = sum(math.prod(s) for s in leaves)
        if total > MAX_ELEMENTS:
            problem = f"{total:,} elements in all (at most {MAX_ELEMENTS:,} = 2**24)"
    return problem


def _walk(spec, depth: int, leaves: list) -> str | None:
    if depth > MAX_DEPTH:
        return f"nested deeper than {MAX_DEPTH}"
    if not isinstance(spec, dict) or len(spec) != 1:
        return (
            f"{_short(spec)} is not one of {{'tensor': ...}}, {{'tuple': [...]}}, {{'dict': ...}}"
        )
    ((kind, value),) = spec.items()
    if kind == "tensor":
        return _tensor_problem(value, leaves)
    if kind == "tuple" and isinstance(value, list):
        items = value
    elif kind == "dict" and isinstance(value, dict):
        items = list(value.values())
    else:
        return f"{_short(spec)} is not a tensor, a tuple (list) or a dict spec"
    for item in items:
        if len(leaves) > MAX_LEAVES:
            break
        if (problem := _walk(item, depth + 1, leaves)) is not None:
            return problem
    return None


def _tensor_problem(value, leaves: list) -> str | None:
    if not isinstance(value, dict) or set(value) != {"shape", "dtype"}:
        return f"tensor spec {_short(value)} needs exactly 'shape' and 'dtype'"
    shape, dtype = value["shape"], value["dtype"]
    if dtype not in DTYPES:
        return f"dtype {_short(dtype)} is not one of {', '.join(DTYPES)}"
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_RANK
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape)
    ):
        return f"shape {_short(shape)} is not a list of at most {MAX_RANK} sizes >= 1"
    if math.prod(shape) > MAX_ELEMENTS:
        return f"shape {shape} has {math.prod(shape):,} elements (at most {MAX_ELEMENTS:,})"
    leaves.append(shape)
    return None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
