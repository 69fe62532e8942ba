"""Input specs: the shapes and dtypes of an example batch, as JSON data.

A task records the spec of the batch it was pruned with, so that building its compact model
(which traces the base once to find coupled channels) needs no example from the caller.
A spec is ``{"tensor": {"shape": [...], "dtype": "float32"}}``, ``{"tuple": [spec, ...]}`` or
``{"dict": {name: spec}}``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import ConfigError

_MAX_DEPTH = 8


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


def make_inputs(spec: dict, seed: int = 0):
    """A batch following ``spec``: floats from a seeded normal, integers and bools as ones
    (valid token ids, attention masks and segment ids for BERT-like models)."""
    gen = torch.Generator().manual_seed(seed)

    def build(s):
        if "tensor" in s:
            shape, dtype = s["tensor"]["shape"], getattr(torch, s["tensor"]["dtype"])
            if dtype.is_floating_point:
                return torch.randn(shape, generator=gen).to(dtype)
            return torch.ones(shape, dtype=dtype)
        if "tuple" in s:
            return tuple(build(x) for x in s["tuple"])
        return {k: build(v) for k, v in s["dict"].items()}

    if not check_spec(spec):
        raise ConfigError(f"not an input spec: {spec!r}")
    return build(spec)


def check_spec(spec, depth: int = 0) -> bool:
    """Whether ``spec`` is a well-formed input spec (it may come from an untrusted file)."""
    if depth > _MAX_DEPTH or not isinstance(spec, dict) or len(spec) != 1:
        return False
    ((kind, value),) = spec.items()
    if kind == "tensor":
        shape, dtype = (
            (value.get("shape"), value.get("dtype"))
            if isinstance(value, dict)
            else (
                None,
                None,
            )
        )
        return (
            isinstance(shape, list)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
            and isinstance(dtype, str)
            and isinstance(getattr(torch, dtype, None), torch.dtype)
        )
    if kind == "tuple":
        return isinstance(value, list) and all(check_spec(x, depth + 1) for x in value)
    if kind == "dict":
        return isinstance(value, dict) and all(check_spec(x, depth + 1) for x in value.values())
    return False


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
