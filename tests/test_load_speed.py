"""The fast task-file reader keeps every check (issue #13, the switch budget).

``Task.load`` reads a file once, parses its header and manifest once, and checks the tensors in
bulk passes (views of one buffer, whole-list comparisons, one NumPy pass per dtype). These
tests pin what the bulk passes must not lose: a file laid out any valid way (not only as
sparta writes it: other orders, misaligned tensors) loads to the same tensors; every malformed
entry, layout, value or checksum is refused naming the tensor at fault; the bulk manifest check
is never more lenient than the entry-by-entry one. Speed itself is measured in
``benchmarks/task_load.py``, never asserted.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import random

import numpy as np
import pytest
import torch

import sparta
from sparta.tasks import ArtifactError, Task, export
from sparta.tasks.artifact import CHECKSUM_KEY, MANIFEST_KEY
from test_build import make_task
from test_train import one_thread  # noqa: F401  (autouse: one thread, restored after)

taskfile = importlib.import_module("sparta.tasks.taskfile")
taskbody = importlib.import_module("sparta.tasks.taskbody")
manifest_module = importlib.import_module("sparta.tasks.manifest")

_CODES = {"float32": "F32", "float64": "F64", "int64": "I64", "uint8": "U8", "bool": "BOOL"}


@pytest.fixture(scope="module")
def residual():
    return make_task("residual")


@pytest.fixture(scope="module")
def saved(residual) -> tuple[Task, bytes]:
    task = export(residual[1])
    return task, task.to_bytes()


def _parts(data: bytes) -> tuple[dict, dict]:
    """``(stored tensors, manifest)`` of a task file's bytes (masks still packed)."""
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    return taskfile.stored_tensors(data), json.loads(taskfile.manifest_text(meta))  # format 4


def _write(stored: dict, manifest: dict, order=None) -> bytes:
    """A safetensors file of ``stored`` in ``order`` (default: by name), tensors back to back
    with no alignment padding, the manifest signed: valid, but not laid out as sparta writes."""
    text = json.dumps(manifest)
    header: dict = {
        "__metadata__": {
            MANIFEST_KEY: text,
            CHECKSUM_KEY: hashlib.sha256(text.encode()).hexdigest(),
        }
    }
    chunks, offset = [], 0
    for key in order or sorted(stored):
        t = stored[key].contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        code = _CODES[str(t.dtype).removeprefix("torch.")]
        header[key] = {"dtype": code, "shape": list(t.shape)}
        header[key]["data_offsets"] = [offset, offset + len(data)]
        chunks.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + b"".join(chunks)


def _resign(stored: dict, manifest: dict, key: str, t: torch.Tensor) -> None:
    """Replace ``stored[key]`` by ``t`` with its checksum recorded (a crafted, signed file)."""
    stored[key] = t
    manifest["tensors"][key]["sha256"] = hashlib.sha256(t.view(torch.uint8).numpy()).hexdigest()


def _same(a: Task, b: Task) -> None:
    assert a.manifest == b.manifest and list(a.tensors) == sorted(b.tensors)
    for key, t in b.tensors.items():
        got = a.tensors[key]
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), key


def test_a_file_is_read_and_parsed_once(saved, tmp_path, monkeypatch):
    task, data = saved
    path = tmp_path / "t.safetensors"
    path.write_bytes(data)
    calls = {"inspect": 0, "check_manifest": 0, "json": 0, "read": 0}

    def counting(name, fn):
        def wrapper(*args, **kw):
            calls[name] += 1
            return fn(*args, **kw)

        return wrapper

    monkeypatch.setattr(taskfile, "inspect", counting("inspect", taskfile.inspect))
    monkeypatch.setattr(
        taskfile, "check_manifest", counting("check_manifest", taskfile.check_manifest)
    )
    monkeypatch.setattr(taskfile.json, "loads", counting("json", json.loads))
    read_into = taskfile._read_into

    def counting_read(fd, buffer, name):
        calls["read"] += buffer.nbytes
        return read_into(fd, buffer, name)

    monkeypatch.setattr(taskfile, "_read_into", counting_read)
    loaded = Task.load(path)
    n = int.from_bytes(data[:8], "little")
    assert calls == {"inspect": 1, "check_manifest": 1, "json": 2, "read": len(data) - 8 - n}
    _same(loaded, task)


def test_tensors_are_exact_writable_and_independent(saved):
    task, data = saved
    loaded = Task.from_bytes(data)
    _same(loaded, task)
    before = {k: t.clone() for k, t in loaded.tensors.items()}
    first, *rest = [k for k, t in loaded.tensors.items() if t.is_floating_point()]
    loaded.tensors[first].add_(1.0)  # writable, and touching one tensor touches no other
    assert not torch.equal(loaded.tensors[first], before[first])
    assert all(torch.equal(loaded.tensors[k], before[k]) for k in loaded.tensors if k != first)
    assert all(t.is_contiguous() for t in loaded.tensors.values())
    masks = [k for k, e in task.manifest["tensors"].items() if e["kind"] == "mask"]
    assert masks and all(loaded.tensors[k].dtype == torch.bool for k in masks)


def test_a_compact_model_shares_no_storage_with_the_loaded_task(saved, residual):
    """The loaded tensors are views of one buffer: a model built from them must own its
    tensors (an edit of either would reach the other; safetensors refuses shared storage)."""
    base, _, x = residual
    loaded = Task.from_bytes(saved[1])
    body = {t.untyped_storage().data_ptr() for t in loaded.tensors.values()}
    for task in (loaded, loaded.without_plan()):
        compact = sparta.build(base, task)
        shared = [
            k for k, v in compact.state_dict().items() if v.untyped_storage().data_ptr() in body
        ]
        assert not shared, shared
        with torch.no_grad():
            assert torch.isfinite(compact(x)).all()


@pytest.mark.parametrize("order", ["reversed", "shuffled", "masks between floats"])
def test_any_valid_layout_loads_the_same_tensors(saved, order):
    task, data = saved
    stored, manifest = _parts(data)
    keys = sorted(stored)
    if order == "reversed":
        keys = keys[::-1]
    elif order == "shuffled":
        random.Random(0).shuffle(keys)
    else:  # packed masks (odd byte counts) interleaved: floats misaligned, masks far apart
        masks = [k for k in keys if manifest["tensors"][k].get("packed")]
        others = [k for k in keys if k not in masks]
        keys = [k for pair in zip(masks, others) for k in pair]
        keys += masks[len(others) :] + others[len(masks) :]
    crafted = _write(stored, manifest, keys)
    _same(Task.from_bytes(crafted), task)


def test_misaligned_tensors_are_copied_not_viewed(saved):
    task, data = saved
    stored, manifest = _parts(data)
    odd = next(k for k, t in stored.items() if t.dtype == torch.uint8 and t.numel() % 4)
    keys = [odd] + sorted(k for k in stored if k != odd)
    loaded = Task.from_bytes(_write(stored, manifest, keys))
    _same(loaded, task)
    floats = [t for t in loaded.tensors.values() if t.dtype == torch.float32 and t.numel()]
    assert all(t.data_ptr() % 4 == 0 for t in floats)


def _corrupt_value(data: bytes, value: float, dtype=torch.float32) -> tuple[bytes, str]:
    """A signed file whose middle float tensor holds ``value`` (checksum recorded)."""
    stored, manifest = _parts(data)
    floats = sorted(k for k, t in stored.items() if t.dtype == dtype and t.numel() > 1)
    key = floats[len(floats) // 2]
    t = stored[key].clone()
    t.view(-1)[t.numel() // 2] = value
    _resign(stored, manifest, key, t)
    return _write(stored, manifest), key


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_value_is_refused_naming_its_tensor(saved, value):
    crafted, key = _corrupt_value(saved[1], value)
    with pytest.raises(ArtifactError, match=rf"tensor '{key}' holds NaN or infinite values"):
        Task.from_bytes(crafted)


def test_a_flipped_byte_is_refused_naming_its_tensor(saved):
    task, data = saved
    stored, manifest = _parts(data)
    for kind in ("param", "mask"):
        keys = sorted(k for k, e in manifest["tensors"].items() if e["kind"] == kind)
        key = keys[len(keys) // 2]
        t = stored[key].clone()
        t.view(torch.uint8).view(-1)[0] ^= 0x80 if kind == "mask" else 1  # masks: first bit
        crafted = _write({**stored, key: t}, manifest)
        with pytest.raises(ArtifactError, match=rf"corrupted: tensor '{key}' checksum differs"):
            Task.from_bytes(crafted)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_every_float_dtype_has_its_finite_check(dtype):
    for values, bad in [([1.0, -2.5, 0.0], False), ([1.0, float("inf")], True)]:
        raw = torch.tensor(values, dtype=dtype).view(torch.uint8).numpy()
        assert taskbody._bad(raw, dtype) is bad
    raw = torch.tensor([0.5, float("nan"), 1.0], dtype=dtype).view(torch.uint8).numpy()
    assert taskbody._bad(raw, dtype)
    raw = torch.tensor([65504.0 if dtype == torch.float16 else 3e38], dtype=dtype)
    assert not taskbody._bad(raw.view(torch.uint8).numpy(), dtype)  # large but finite


def test_version_1_bool_masks_load_and_a_bool_byte_above_1_is_refused(saved):
    task, data = saved
    stored, manifest = _parts(data)
    manifest["version"] = 1
    manifest.pop("plan", None)  # plans are version 3
    for key, e in manifest["tensors"].items():
        if e.pop("packed", False):  # one byte per channel, as version 1 wrote masks
            stored[key] = task.tensors[key].clone()
    _same(Task.from_bytes(_write(stored, manifest)), Task(task.tensors, manifest))
    key = sorted(k for k, e in manifest["tensors"].items() if e["kind"] == "mask")[1]
    bad = stored[key].clone().view(torch.uint8)
    bad[0] = 2
    _resign(stored, manifest, key, bad.view(torch.bool))
    with pytest.raises(ArtifactError, match=rf"tensor '{key}' holds bool bytes other than 0"):
        Task.from_bytes(_write(stored, manifest))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("shape", None),
        ("shape", [True, 2]),
        ("shape", [-1]),
        ("shape", [2**20, 2**20, 2**20]),
        ("packed", 1),
        ("kind", ["mask"]),
        ("dtype", "complex64"),
        ("rows", 3),
        ("sha256", None),
        ("stored", [1, 2, 3, 4, 5]),
        ("as", {}),
    ],
)
def test_a_malformed_entry_is_refused_by_name(saved, field, value):
    _, data = saved
    stored, manifest = _parts(data)
    keys = sorted(manifest["tensors"])
    key = keys[len(keys) // 2]
    manifest["tensors"][key][field] = value
    with pytest.raises(ArtifactError, match=rf"tensor entry '{key}' is malformed"):
        Task.from_bytes(_write(stored, manifest))


@pytest.mark.parametrize(
    ("field", "value"),
    [("dtype", "F64"), ("shape", [3, 1]), ("data_offsets", [0.0, 4.0]), ("data_offsets", [0])],
)
def test_a_header_entry_off_the_manifest_is_refused_by_name(saved, field, value):
    _, data = saved
    stored, manifest = _parts(data)
    crafted = _write(stored, manifest)
    n = int.from_bytes(crafted[:8], "little")
    header = json.loads(crafted[8 : 8 + n])
    key = sorted(k for k in header if k != "__metadata__")[3]
    header[key][field] = value
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with pytest.raises(ArtifactError, match=rf"tensor '{key}' is stored as"):
        Task.from_bytes(len(head).to_bytes(8, "little") + head + crafted[8 + n :])


_ODD_VALUES = [None, True, False, 0, 1, -1, 1.5, "x", "bool", "mask", "param", "float32", [],
               [0], [True], [1.0], [-2], [2**33], [1] * 9, {}, {"a": 1}]  # fmt: skip


def test_the_bulk_entry_check_is_never_more_lenient(saved):
    """``_entries_ok`` (bulk) accepts exactly when ``_entry_ok`` accepts every entry."""
    _, data = saved
    _, manifest = _parts(data)
    rng = random.Random(5)
    fields = ["kind", "shape", "dtype", "as", "sha256", "stored", "packed", "rows", "cols", "x"]
    outcomes = set()
    for _ in range(400):
        entries = [dict(e) for e in manifest["tensors"].values()]
        for _ in range(rng.choice([1, 1, 2])):
            e = rng.choice(entries)
            if rng.random() < 0.15:
                e.pop(rng.choice(fields), None)
            else:
                e[rng.choice(fields)] = rng.choice(_ODD_VALUES)
        each = all(manifest_module._entry_ok(e) for e in entries)
        assert manifest_module._entries_ok(entries) == each, entries
        outcomes.add(each)
    assert outcomes == {True, False}  # both outcomes exercised


def test_kept_counts_and_strides_match_a_plain_computation():
    rng = np.random.default_rng(0)
    sizes = [0, 1, 7, 8, 9, 0, 64, 3, 0]
    starts, position = [], 0
    for n in sizes:
        starts.append(position)
        position += 8 * math.ceil(n / 8)  # each mask starts on a byte
    bits = rng.integers(0, 2, size=position, dtype=np.uint8)
    want = [int(bits[s : s + n].sum()) for s, n in zip(starts, sizes)]
    assert taskbody._counts(bits, starts, sizes) == want
    for shape in [(), (0,), (3,), (2, 0, 4), (5, 1, 3, 3), (1, 1)]:
        assert tuple(taskbody._contiguous_strides(shape)) == torch.empty(shape).stride()
