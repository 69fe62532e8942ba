"""Reading a local state-dict file and loading it strictly, with readable errors."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import ConfigError

#: Keys under which training scripts commonly nest the state dict inside a checkpoint.
NESTED_KEYS = ("state_dict", "model")
#: How many offending keys an error message names.
SHOWN = 5


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors stored in ``path``: a ``.safetensors`` file, or anything else read with
    ``torch.load(weights_only=True)`` (``.pt``, ``.pth``, ...) onto the CPU.

    A checkpoint that is a dict holding the state dict under ``"state_dict"`` or ``"model"``
    is unwrapped; a ``module.`` prefix on every key (``DistributedDataParallel``) is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as error:
            raise ConfigError(
                f"cannot read safetensors checkpoint {str(path)!r}: {error}"
            ) from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
            first = (
                str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            )
            raise ConfigError(
                f"cannot read checkpoint {str(path)!r} with torch.load(weights_only=True) "
                f"(only tensors and plain containers are accepted): {first}"
            ) from None
    if isinstance(state, Mapping):
        for key in NESTED_KEYS:
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not state:
        raise ConfigError(f"checkpoint {str(path)!r} holds no state dict")
    not_tensors = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise ConfigError(
            f"checkpoint {str(path)!r} is not a state dict: non-tensor entries {_few(not_tensors)}"
        )
    state = {str(k): v for k, v in state.items()}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_strict(model: nn.Module, state: Mapping[str, Tensor], source: str, what: str) -> None:
    """``model.load_state_dict(state)`` after checking keys and shapes; a mismatch raises
    :class:`ConfigError` naming a few missing, unexpected and mis-shaped entries."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} (checkpoint {list(state[k].shape)}, model {list(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_few(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {_few(shapes)}")
    if problems:
        raise ConfigError(f"checkpoint {source!r} does not fit {what}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def _few(items: list[str]) -> str:
    shown = ", ".join(items[:SHOWN])
    return shown + (f" (and {len(items) - SHOWN} more)" if len(items) > SHOWN else "")
