"""The compact plan a task carries (format version 3): what its compact model is, as data.

Recorded at export, where the masked model and its groups exist (:mod:`.make_plan`), read by
:func:`sparta.build` (:mod:`.from_plan`), which then needs no wrap, no graph and no trace::

    "plan": {
      "sets":  [[width, "<base64 bits>"], ...],       # kept index sets, one bit per index
      "cuts":  {"layer": [out set | null, in set | null], ...},   # in base coordinates
      "attrs": {"module": {"num_heads": 6, "pruned_heads": [0, 3]}, ...},
      "report": {"params_before": n, "params_after": n, "groups": [[...], ...], "notes": [...]},
      "check": {"shape": [...], "dtype": "float32", "scale": s, "values" | "proj": [...]}
    }

``cuts`` keep, per cut layer, the output indices (dim 0 of every per-channel tensor: weight,
bias, norm parameters and statistics) and the input indices (dim 1 of the weight). A set of
bits is sorted and unique by construction. ``attrs`` are the attributes other than widths that
cutting changes (head counts and sizes); widths (``out_channels``, ``groups``, ...) follow from
the kept counts. ``check`` is the compact model's output on the recorded probe inputs
(``make_inputs(manifest["inputs"], seed=0)``): the values themselves when small, else their
maximum and a seeded projection, so ``build(verify=True)`` re-checks with one forward.

Everything here comes from a file: :func:`check_plan` checks the schema and bounds when the
manifest is read; what needs the base (module names and types, widths) is checked at build.
"""

from __future__ import annotations

import base64
import math
from itertools import chain

import numpy as np
import torch
from torch import Tensor

from ..errors import SpartaError

#: Attributes a plan may change, besides the widths the build derives from the kept counts:
#: Hugging Face self-attention (``num_attention_heads``, ``all_head_size``, the parent's
#: ``pruned_heads``) and fused q/k/v attention (``num_heads``, ``attn_dim``; ``fused_heads``).
PLAN_ATTRS = frozenset(
    {"num_attention_heads", "all_head_size", "attention_head_size", "pruned_heads", "num_heads",
     "attn_dim", "head_dim"}
)  # fmt: skip
#: Width attributes of the layers a plan cuts: set by the build, never read from a file.
WIDTH_ATTRS = frozenset(
    {"out_channels", "in_channels", "groups", "num_features", "in_features", "out_features"}
)
MAX_WIDTH = 2**24
MAX_SETS = 2**16
MAX_CHECK_VALUES = 4096  # outputs up to this size are stored whole, larger ones projected
PROJECTIONS = 32
_KEYS = {"sets": list, "cuts": dict, "attrs": dict, "report": dict, "check": dict}
_FLOATS = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
           "bfloat16": torch.bfloat16}  # fmt: skip


def plan_problem(manifest: dict, version: int) -> str | None:
    """What is wrong with the plan of ``manifest`` (format ``version``), or ``None``: version
    3 tasks carry one, older ones none; its schema and bounds (the manifest check raises
    :class:`ArtifactError` with it)."""
    if version < 3:
        return f"a format version {version} task carries no plan (plans are version 3)"
    if "plan" not in manifest:
        return "a format version 3 task carries one (tasks without are written as version 2)"
    plan = manifest["plan"]
    if not isinstance(plan, dict) or set(plan) != set(_KEYS):
        return f"expected a dict with keys {sorted(_KEYS)}"
    bad = next((k for k, typ in _KEYS.items() if not isinstance(plan[k], typ)), None)
    if bad:
        return f"{bad} is not a {_KEYS[bad].__name__}"
    sets = plan["sets"]
    if len(sets) > MAX_SETS or not all(_set_ok(s) for s in sets):
        return f"sets must be at most {MAX_SETS} [width, base64 bits] pairs"
    if not _cuts_ok(list(plan["cuts"].values()), len(sets)):  # in bulk; then which one
        for name, cut in plan["cuts"].items():
            ok = isinstance(cut, list) and len(cut) == 2 and cut != [None, None]
            if not ok or not all(i is None or _index(i, len(sets)) for i in cut):
                return f"cuts[{_short(name)}] is not [set index | null, set index | null]"
    for name, attrs in plan["attrs"].items():
        if not isinstance(attrs, dict) or not attrs:
            return f"attrs[{_short(name)}] is not a non-empty dict"
        for attr, value in attrs.items():
            if attr not in PLAN_ATTRS:
                return f"attribute {_short(attr)} is not one a plan may set ({sorted(PLAN_ATTRS)})"
            if not (_index(value, MAX_WIDTH) or _int_list(value)):
                return f"attrs[{_short(name)}][{attr!r}] is not an integer or a list of them"
    return _report_problem(plan["report"]) or _check_problem(plan["check"])


def _cuts_ok(cuts: list, n_sets: int) -> bool:
    """Every cut is ``[set index | null, set index | null]``, not both null: the loop's checks
    in C-level passes (a ResNet-50 plan cuts ~100 layers; the manifest is checked per build).
    ``False`` when any might fail (the loop then names it); never more lenient than it."""
    if not (set(map(type, cuts)) <= {list} and set(map(len, cuts)) <= {2}):
        return False
    flat = list(chain.from_iterable(cuts))
    ints = [i for i in flat if i is not None]
    return (
        set(map(type, flat)) <= {int, type(None)}  # (bool is not int here: type, not isinstance)
        and [None, None] not in cuts
        and min(ints, default=0) >= 0
        and max(ints, default=-1) < n_sets
    )


def _set_ok(entry) -> bool:
    return (
        isinstance(entry, list)
        and len(entry) == 2
        and _index(entry[0], MAX_WIDTH + 1)
        and entry[0] > 0
        and isinstance(entry[1], str)
        and len(entry[1]) == 4 * math.ceil(math.ceil(entry[0] / 8) / 3)
    )


def _report_problem(report: dict) -> str | None:
    ints = all(_index(report.get(k), 2**62) for k in ("params_before", "params_after"))
    groups = report.get("groups")
    rows_ok = isinstance(groups, list) and all(
        isinstance(g, list)
        and len(g) == 6
        and all(isinstance(s, str) for s in g[:2])
        and all(_index(n, MAX_WIDTH + 1) for n in g[2:5])
        and (g[5] is None or isinstance(g[5], str))
        for g in groups
    )
    notes = report.get("notes")
    notes_ok = isinstance(notes, list) and all(isinstance(n, str) for n in notes)
    if set(report) != {"params_before", "params_after", "groups", "notes"}:
        return "report keys are not params_before, params_after, groups, notes"
    return None if ints and rows_ok and notes_ok else "report fields are malformed"


def _check_problem(check: dict) -> str | None:
    shape, dtype, scale = check.get("shape"), check.get("dtype"), check.get("scale")
    values = check.get("values", check.get("proj"))
    ok = (
        set(check) in ({"shape", "dtype", "scale", "values"}, {"shape", "dtype", "scale", "proj"})
        and _int_list(shape)
        and len(shape) <= 8
        and dtype in _FLOATS
        and _finite(scale)
        and isinstance(values, list)
        and all(_finite(v) for v in values)
    )
    if not ok:
        return "check must hold shape, dtype, scale and values or proj (finite numbers)"
    n = math.prod(shape)
    expected = n if "values" in check else PROJECTIONS
    if len(values) != expected or ("values" in check and n > MAX_CHECK_VALUES):
        return f"check holds {len(values)} numbers for an output of shape {shape}"
    return None


def _index(value, bound: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < bound


def _int_list(value) -> bool:
    return isinstance(value, list) and all(_index(v, MAX_WIDTH) for v in value)


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- index sets ------------------------------------------------------------------------------------
def encode_set(kept: Tensor, width: int) -> list:
    """``[width, base64 bits]`` of the sorted kept indices ``kept`` of ``range(width)``."""
    bits = np.zeros(width, dtype=bool)
    bits[kept.cpu().numpy()] = True
    return [width, base64.b64encode(np.packbits(bits).tobytes()).decode("ascii")]


# -- the output check ------------------------------------------------------------------------------
def output_check(out: Tensor) -> dict:
    """The ``check`` record of output ``out``: its values when small, else a projection."""
    if str(out.dtype).removeprefix("torch.") not in _FLOATS:
        raise ValueError(f"the model's output is {out.dtype}, not floating point")
    flat = out.detach().double().flatten().cpu()
    record = {
        "shape": list(out.shape),
        "dtype": str(out.dtype).removeprefix("torch."),
        "scale": float(flat.abs().max()) if flat.numel() else 0.0,
    }
    if flat.numel() <= MAX_CHECK_VALUES:
        record["values"] = flat.tolist()
    else:
        record["proj"] = _project(flat).tolist()
    return record


def compare_check(check: dict, out: Tensor) -> None:
    """Raise :class:`SpartaError` unless output ``out`` matches ``check`` within 1e-4 relative
    (of the largest magnitude; 4 eps for half-precision outputs, as the build's own check)."""
    allowed = max(1e-4, 4 * torch.finfo(_FLOATS[check["dtype"]]).eps)
    scale = check["scale"] + 1e-12
    if list(out.shape) != check["shape"]:
        err = float("inf")
    else:
        flat = out.detach().double().flatten().cpu()
        if "values" in check:
            want = torch.tensor(check["values"], dtype=torch.float64)
        else:  # each projection averages the differences: compared at the same tolerance
            flat, want = _project(flat), torch.tensor(check["proj"], dtype=torch.float64)
            flat = torch.cat([flat, out.detach().double().abs().max().reshape(1).cpu()])
            want = torch.cat([want, torch.tensor([check["scale"]], dtype=torch.float64)])
        err = float((flat - want).abs().max()) / scale if flat.numel() else 0.0
    if not err <= allowed:
        raise SpartaError(
            f"the compact model's output on the task's probe inputs differs from the one "
            f"recorded at export: shape {list(out.shape)} vs {check['shape']}, max relative "
            f"difference {err:.3g} (allowed {allowed:.3g}); the base or the task file was "
            "changed since export"
        )


def _project(flat: Tensor) -> Tensor:
    """``PROJECTIONS`` seeded random-sign sums of ``flat``, each divided by sqrt(numel)."""
    gen = torch.Generator().manual_seed(0)
    out = torch.zeros(PROJECTIONS, dtype=torch.float64)
    for start in range(0, flat.numel(), 1 << 16):
        chunk = flat[start : start + (1 << 16)]
        signs = torch.randint(0, 2, (PROJECTIONS, chunk.numel()), generator=gen) * 2 - 1
        out += signs.double() @ chunk
    return out / math.sqrt(max(flat.numel(), 1))
