"""Crafted task files: nothing a file says can touch the base, crash sparta, or be accepted
with outputs its task does not have (issue #11).

From three real small tasks (a residual CNN, a torchvision ViT, a tiny BERT) the test makes
task files whose manifests are edited with the checksum recomputed (names of layers that are
not adapted, the head or a norm listed as adapted, frozen base tensors smuggled in as task
tensors, wrong dtypes and shapes, missing or mistyped keys, absurd input specs and sizes,
adapter options out of range, ...) plus random byte corruptions, and feeds each one to
``Task.from_bytes`` and a shared ``Builder`` (the path a ``TaskBank`` takes, with its cached
task models whose frozen weights alias the base). Every attempt must end in a sparta error or
in a compact model with the task's outputs; after every attempt every tensor of the base is
compared bit by bit with a snapshot; peak memory growth is measured.
"""

from __future__ import annotations

import json
import random
import resource
import time
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from sparta.errors import SpartaError
from sparta.tasks import Builder, Task, TaskBank, apply_task, export
from sparta.tasks.artifact import CHECKSUM_KEY, MANIFEST_KEY, _pack_masks
from sparta.tasks.taskfile import _DTYPES, VERSION, digest, serialize
from test_artifact import build as artifact_task
from test_build import make_task, rel_diff, run
from test_train import one_thread  # noqa: F401  (autouse: one thread, restored after)

transformers = pytest.importorskip("transformers")


@dataclass
class Source:
    """One real task and what the checks need about it."""

    name: str
    base: nn.Module
    task: Task
    x: object
    raw: dict  # the tensors as stored in the file (masks packed)
    names: list  # module names of the base, plus a few that are not
    frozen: dict  # {wrapped state_dict key: tensor} of keys the task does not hold
    want: torch.Tensor  # the compact model's outputs on x
    builder: Builder
    snapshot: dict


def _source(name: str, base, model, x) -> Source:
    task = export(model)
    builder = Builder(base)
    with torch.no_grad():
        want = run(builder.build(task)[0], x)
    sd = model.state_dict()
    names = [n for n, _ in base.named_modules()] + ["nope", "*", "fc?", "[a]", "a..b"]
    return Source(
        name=name,
        base=base,
        task=task,
        x=x,
        raw=_pack_masks(task.tensors, task.manifest),
        names=names,
        frozen={k: v for k, v in sd.items() if k not in task.tensors},
        want=want,
        builder=builder,
        snapshot={k: _bits(v) for k, v in _all_tensors(base).items()},
    )


@pytest.fixture(scope="module")
def sources() -> list[Source]:
    return [
        _source("resnet", *make_task("residual")),
        _source("vit", *artifact_task("vit")),
        _source("bert", *make_task("bert")),
    ]


def _all_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {f"p:{k}": v for k, v in model.named_parameters(remove_duplicate=False)}
    out.update({f"b:{k}": v for k, v in model.named_buffers(remove_duplicate=False)})
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).clone()


def _base_intact(src: Source) -> bool:
    now = _all_tensors(src.base)
    return now.keys() == src.snapshot.keys() and all(
        torch.equal(_bits(t), src.snapshot[k]) for k, t in now.items()
    )


# -- mutations: each edits a copy of the manifest (and maybe the stored tensors) ------------------
# A mutation returns True when it changes the task's tensor values (a different, legitimate
# task: its outputs are then compared with its own masked model, not with the original's).
def _pick_entry(m, rng):
    table = m.get("tensors")
    if not isinstance(table, dict) or not table:
        return None, None
    key = rng.choice(sorted(table))
    return key, table[key]


def m_adapted(m, raw, src, rng):
    adapted = m["adapted"]
    how = rng.randrange(5)
    if how == 0 or not adapted:
        adapted.append(rng.choice(src.names))
    elif how == 1:
        adapted[rng.randrange(len(adapted))] = rng.choice(src.names)
    elif how == 2:
        del adapted[rng.randrange(len(adapted))]
    elif how == 3:  # the head (moved from "head", so that no name is listed twice)
        adapted.append(m["head"].pop()) if m["head"] else adapted.clear()
    else:
        adapted.append(rng.choice([n for n in src.names if "norm" in n or n.endswith(("bn", "ln"))]
                                  or src.names))  # fmt: skip


def m_head(m, raw, src, rng):
    m["head"] = rng.choice([[], [rng.choice(src.names)], m["adapted"][:1], ["*"], m["head"] * 2])
    if m["head"] and m["head"][0] in m["adapted"]:
        m["adapted"].remove(m["head"][0])


def m_masked(m, raw, src, rng):
    masked = m["masked"]
    how = rng.randrange(3)
    if how == 0 or not masked:
        masked.append(
            [rng.choice(src.names), rng.choice(["weight", "bias", "in_proj_weight", "x"])]
        )
    elif how == 1:
        del masked[rng.randrange(len(masked))]
    else:
        masked[rng.randrange(len(masked))][1] = rng.choice(["bias", "in_proj_weight", "w"])


def m_entry(m, raw, src, rng):
    key, e = _pick_entry(m, rng)
    if e is None:
        return
    field = rng.choice(["dtype", "as", "shape", "stored", "rows", "cols", "kind", "packed", "del"])
    if field in ("dtype", "as"):
        e[field] = rng.choice([*_DTYPES, "qint8", "float8_e4m3fn", 3, None])
    elif field in ("shape", "stored"):
        shape = list(e.get(field, e["shape"]))
        e[field] = rng.choice(
            [
                [],
                [10**12],
                [2**31, 2**31],
                shape + [1],
                shape[::-1],
                [s + 1 for s in shape],
                [max(s - 1, 0) for s in shape],
                [-1] + shape[1:],
                "3",
                [True],
                [1.5],
            ]
        )
    elif field in ("rows", "cols"):
        e[field] = rng.choice([None, "nope", rng.choice(sorted(m["tensors"])), 7])
    elif field == "kind":
        e["kind"] = rng.choice(["param", "mask", "stat", "frozen", None])
    elif field == "packed":
        e["packed"] = rng.choice([True, False, 1, "yes"])
    else:
        e.pop(rng.choice(sorted(e)))


def m_rename(m, raw, src, rng):
    """Rename a task tensor, in the manifest only or in the file too (maybe onto another)."""
    key, e = _pick_entry(m, rng)
    if e is None:
        return
    new = rng.choice([*sorted(src.frozen), *sorted(m["tensors"]), key + ".x", "fc.weight"])
    m["tensors"][new] = m["tensors"].pop(key)
    if rng.random() < 0.7 and key in raw:
        raw[new] = raw.pop(key)
    return True  # a tensor moved: if accepted, it is another task (compared with its own model)


def m_smuggle(m, raw, src, rng):
    """Add a frozen base tensor of the task model as a task tensor of the right shape and dtype:
    loading it would overwrite the base (or the weights its templates share with it)."""
    key = rng.choice(sorted(src.frozen))
    like = src.frozen[key]
    t = torch.full_like(like, 7.0) if like.is_floating_point() else torch.ones_like(like)
    kind = rng.choice(["param", "param", "stat", "mask"])
    if kind == "mask":
        t = torch.ones(like.shape, dtype=torch.bool)
    entry = {"kind": kind, "shape": list(t.shape), "dtype": str(t.dtype)[6:], "sha256": digest(t)}
    if kind == "mask":
        entry["as"] = str(like.dtype)[6:]
    m["tensors"][key] = entry
    raw[key] = t


def m_top(m, raw, src, rng):
    key = rng.choice(sorted(m))
    if rng.random() < 0.4:
        del m[key]
    else:  # a value of another type (or an empty one where that is not a valid one)
        value = rng.choice([None, 1, "x", [], {}, 1.5, True, [None]])
        same = json.dumps(value) == json.dumps(m[key]) or (key, value) == ("version", 1)
        m[key] = None if same else value


def m_counts(m, raw, src, rng):
    c = m["counts"]
    value = rng.choice([None, -1, "12", 1.5, True, 10**30, [], "del"])
    if value == "del":
        c.pop("learned_parameters", None)
    else:
        c[rng.choice(["learned_parameters", "tensor_bytes"])] = value


def m_inputs(m, raw, src, rng):
    spec = m.get("inputs")
    leaf = {"shape": [2, 3, 16, 16], "dtype": "float32"}
    m["inputs"] = rng.choice(
        [
            {"tensor": {**leaf, "shape": [2, 3, 30000, 30000]}},
            {"tensor": {**leaf, "dtype": "qint8"}},
            {"tensor": {**leaf, "dtype": "complex64"}},
            {"tensor": {**leaf, "shape": [2] * 12}},
            {"tensor": {**leaf, "shape": [2, 3, -4, 4]}},
            {"tensor": {**leaf, "shape": [0, 3, 16, 16]}},
            {"tensor": {**leaf, "shape": [2]}},
            {"tensor": {**leaf, "shape": [2, 3, 5, 5]}},
            {"tensor": {**leaf, "dtype": "int64"}},
            {"tensor": leaf, "tuple": []},
            {"tuple": [{"tensor": {**leaf, "shape": [1]}}] * 100},
            _nest({"tensor": leaf}, 20),
            {"dict": {"input_ids": {"tensor": {"shape": [2, 7], "dtype": "int64"}}}},
            {"dict": {"input_ids": {"tensor": {"shape": [2, 10**6], "dtype": "int64"}}}},
            [1, 2],
            _with_batch(spec, rng.choice([1, 3])),  # another batch size: a fine task
        ]
    )


def _nest(spec, depth):
    for _ in range(depth):
        spec = {"tuple": [spec]}
    return spec


def _with_batch(spec, batch):
    spec = json.loads(json.dumps(spec))
    leaves = [spec]
    while leaves:
        s = leaves.pop()
        if "tensor" in s:
            s["tensor"]["shape"][0] = batch
        else:
            leaves.extend(s.get("tuple", []) or list(s.get("dict", {}).values()))
    return spec


def m_options(m, raw, src, rng):
    opts = m["adapter"]["options"]
    how = rng.randrange(4)
    if how == 0:
        opts["init_scale"] = rng.choice([1e300, -1.0, float("nan"), float("inf"), "x", 2.0, 0.5])
    elif how == 1:
        opts[rng.choice(sorted(opts) or ["rank"])] = rng.choice([0, -1, 10**9, 1e30, "4", None])
    elif how == 2:
        opts[rng.choice(["alpha", "dropout", ""])] = 1
    else:
        m["adapter"]["name"] = rng.choice(["sppara", "splopa", "nope", 3, ""])


def m_base(m, raw, src, rng):
    base = m["base"]
    how = rng.randrange(3)
    if how == 0:
        base["sha256"] = "0" * 64
    elif how == 1 and base["tensors"]:
        base["tensors"].pop(rng.choice(sorted(base["tensors"])))
    else:
        key = rng.choice(sorted(base["tensors"]) or ["x"])
        base["tensors"][key] = rng.choice(["", 3, "[1]|float32|00"])


def m_version(m, raw, src, rng):
    if rng.random() < 0.5:
        # 2 or 1: a plan in an older format; VERSION + 1: a future one
        m["version"] = rng.choice([0, -1, 1, 2, VERSION + 1, "2", 2.0, None, True])
    else:
        m["format"] = rng.choice(["sparta.Task", "other", None, 3])


def m_values(m, raw, src, rng):
    """Scale a stored float tensor (checksum redone): a different but legitimate task."""
    floats = [k for k, t in raw.items() if t.is_floating_point() and t.numel()]
    key = rng.choice(floats)
    raw[key] = raw[key] * rng.uniform(-3, 3)
    m["tensors"][key]["sha256"] = digest(raw[key])
    return True


def m_nonfinite(m, raw, src, rng):
    floats = [k for k, t in raw.items() if t.is_floating_point() and t.numel()]
    key = rng.choice(floats)
    t = raw[key].clone()
    t.view(-1)[rng.randrange(t.numel())] = rng.choice([float("nan"), float("inf")])
    raw[key] = t
    m["tensors"][key]["sha256"] = digest(t)


def m_benign(m, raw, src, rng):
    """Edits that change nothing a model computes: must be accepted with the same outputs."""
    how = rng.randrange(3)
    if how == 0:
        m["counts"]["tensor_bytes"] = rng.randrange(10**6)
    elif how == 1:
        m["adapter"]["options"]["init_scale"] = rng.choice([0.0, 1e-3, 0.5, 1.0])
    else:
        m["masked"].reverse()
        m["adapted"].reverse()


MUTATIONS = [
    m_adapted, m_head, m_masked, m_entry, m_entry, m_rename, m_smuggle, m_smuggle, m_top,
    m_counts, m_inputs, m_options, m_base, m_version, m_values, m_nonfinite, m_benign,
]  # fmt: skip
ALWAYS_REFUSED = {"m_smuggle", "m_nonfinite", "m_version", "m_top", "m_base"}


def _crafted(src: Source, rng: random.Random) -> tuple[str, bytes, bool]:
    """``(what, file bytes, values changed)``: one mutation with the checksum redone, or (one
    in eight each) a random byte corruption of the original file, or an edited safetensors
    header (tensor dtypes, shapes, offsets) around an intact manifest."""
    data = src.task.to_bytes()
    draw = rng.random()
    if draw < 1 / 8:
        data = bytearray(data)
        header = 8 + int.from_bytes(data[:8], "little")
        for _ in range(rng.choice((1, 2, 8))):
            at = rng.randrange(header if rng.random() < 0.5 else len(data))
            data[at] ^= rng.randrange(1, 256)
        return "bytes", bytes(data), False
    if draw < 2 / 8:
        return "header", _edited_header(data, rng), False
    mutation = rng.choice(MUTATIONS)
    manifest, raw = json.loads(json.dumps(src.task.manifest)), dict(src.raw)
    changed = bool(mutation(manifest, raw, src, rng))
    text = json.dumps(manifest, sort_keys=True)
    meta = {MANIFEST_KEY: text, CHECKSUM_KEY: _sha(text)}
    return mutation.__name__, serialize(raw, meta), changed


def _edited_header(data: bytes, rng: random.Random) -> bytes:
    n = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8 : 8 + n]), data[8 + n :]
    key = rng.choice(sorted(k for k in header if k != "__metadata__"))
    entry = header[key]
    how = rng.randrange(5)
    start, stop = entry["data_offsets"]
    choices = {
        0: ("dtype", ["F32", "F16", "I64", "U8", "BOOL", "F8_E4M3", "X"]),
        1: ("shape", [[], [10**12], entry["shape"] + [1], [-1]]),
        2: ("data_offsets", [[0, stop + 1], [start, 2**62], [stop, start], [start]]),
    }
    if how in choices:  # always a real change
        field, values = choices[how]
        entry[field] = rng.choice([v for v in values if v != entry[field]])
    elif how == 3:
        header[key + ".extra"] = dict(entry)
    else:
        del header[key]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + body


def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def _attempt(src: Source, data: bytes, changed: bool, i: int) -> str:
    """``"refused"`` or ``"accepted"``; raises AssertionError on anything else."""
    try:
        task = Task.from_bytes(data, f"crafted-{i}")
        if i % 25 == 0:  # now and then the public paths: a bank (verified add), apply_task
            bank = TaskBank(src.base)
            bank.add("t", task)
            compact = bank.model("t")
        else:
            compact, _ = src.builder.build(task, verify=True)
        with torch.no_grad():
            got = run(compact, src.x)
            want = run(apply_task(src.base, task).eval(), src.x) if changed else src.want
    except SpartaError:
        return "refused"
    assert got.shape == want.shape and rel_diff(got, want) < 1e-4, (
        f"accepted with different outputs ({rel_diff(got, want):.3g})"
    )
    return "accepted"


def _sweep(sources: list[Source], count: int, seed: int) -> Counter:
    rng = random.Random(seed)
    outcomes, raw = Counter(), []
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i in range(count):
        src = sources[i % len(sources)]
        what, data, changed = _crafted(src, rng)
        try:
            outcome = _attempt(src, data, changed, i)
        except AssertionError as exc:
            raw.append(f"{src.name}/{what}: {exc}")
            outcome = "wrong"
        except Exception as exc:  # a raw error: the thing this test exists to catch
            raw.append(f"{src.name}/{what}: {type(exc).__name__}: {exc}")
            outcome = "raw"
        outcomes[outcome] += 1
        outcomes[f"{what}:{outcome}"] += 1
        assert _base_intact(src), f"attempt {i} ({src.name}/{what}) wrote into the base"
    growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
    print(f"{count} crafted files: peak RSS grew by {growth:.0f} MiB")
    assert not raw, f"{len(raw)} raw errors or wrong outputs, e.g. {raw[:5]}"
    assert growth < 400, f"peak memory grew by {growth:.0f} MiB"
    for name in ALWAYS_REFUSED:
        assert outcomes[f"{name}:accepted"] == 0, name
    return outcomes


def test_a_thousand_crafted_files(sources):
    start = time.monotonic()
    outcomes = _sweep(sources, 1000, seed=11)
    print(dict(sorted(outcomes.items())), f"{time.monotonic() - start:.1f} s")
    assert outcomes["refused"] + outcomes["accepted"] == 1000
    # Both outcomes really happen (the oracle is exercised), and benign edits pass.
    assert outcomes["refused"] > 600 and outcomes["accepted"] > 50
    assert outcomes["m_benign:refused"] == 0 and outcomes["m_values:accepted"] > 0
    assert outcomes["m_smuggle:refused"] > 0 and outcomes["bytes:refused"] > 0
    assert outcomes["header:accepted"] == 0 and outcomes["header:refused"] > 50


@pytest.mark.slow
def test_many_more_crafted_files(sources):
    outcomes = _sweep(sources, 10_000, seed=12)
    assert outcomes["refused"] + outcomes["accepted"] == 10_000
