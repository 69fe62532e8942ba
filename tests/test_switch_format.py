"""Task file format 4 and the lean build (issue #13, the switch budget and the task bytes).

Format 4 stores the manifest deflated (its schema is unchanged); older readers find a stub
that says "version 4" and refuse the file asking for an upgrade, and files with a plain
manifest (formats 1-3) still load. A compressed manifest is checked as a plain one is (its
checksum), and one that is not a complete zlib stream, inflates past the manifest limit or
sits beside a second plain manifest is refused. The build's one-pass BatchNorm fill gives
the same tensors, bit for bit, as the general path it stands in for.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import zlib

import pytest
import torch
from safetensors.torch import load as st_load

from sparta.tasks import ArtifactError, Builder, Task, export
from sparta.tasks.manifest import (
    CHECKSUM_KEY,
    MANIFEST_KEY,
    STUB,
    ZCHECKSUM_KEY,
    ZMANIFEST_KEY,
    check_manifest,
)
from sparta.tasks.taskfile import (
    MAX_HEADER_BYTES,
    blob_name,
    manifest_text,
    pack_masks,
    serialize,
    stored_tensors,
)
from test_build import make_task
from test_train import one_thread  # noqa: F401  (autouse: one thread, restored after)

plan_job = importlib.import_module("sparta.tasks.plan_job")


@pytest.fixture(scope="module")
def made():
    base, model, _ = make_task("resnet18", target="density=0.5")
    return base, export(model)


def _meta(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n])["__metadata__"]


def _with_meta(task: Task, meta: dict) -> bytes:
    return serialize(pack_masks(task.tensors, task.manifest), meta)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_the_manifest_is_stored_deflated_and_reads_back_the_same(made):
    _, task = made
    data = task.to_bytes()
    meta = _meta(data)
    assert meta[MANIFEST_KEY] == STUB and meta[CHECKSUM_KEY] == _sha(STUB)
    text = zlib.decompress(base64.b64decode(meta[ZMANIFEST_KEY])).decode()
    assert json.loads(text) == task.manifest and meta[ZCHECKSUM_KEY] == _sha(text)
    plain = json.dumps(task.manifest, sort_keys=True)
    assert len(meta[ZMANIFEST_KEY]) * 3 < len(plain)  # names and checksums deflate well
    loaded = Task.from_bytes(data)
    assert loaded.manifest == task.manifest and loaded.manifest["version"] == 3
    assert all(torch.equal(loaded.tensors[k], t) for k, t in task.tensors.items())
    assert Task.from_bytes(loaded.to_bytes()).to_bytes() == data  # deterministic


def test_the_file_holds_one_safetensors_tensor_per_dtype(made):
    _, task = made
    data = task.to_bytes()
    blobs = st_load(data)  # still a safetensors file any reader opens
    stored = stored_tensors(data)
    assert set(blobs) == {blob_name(c) for c in ("F32", "I64", "U8")}
    for code, dtype in (("F32", torch.float32), ("I64", torch.int64), ("U8", torch.uint8)):
        parts = sorted((k, t) for k, t in stored.items() if t.dtype == dtype)
        assert parts and blobs[blob_name(code)].numel() == sum(t.numel() for _, t in parts)
        flat = torch.cat([t.reshape(-1) for _, t in parts])  # by name: one dtype, one size
        assert torch.equal(blobs[blob_name(code)], flat)
    packed = pack_masks(task.tensors, task.manifest)
    assert set(stored) == set(packed)
    assert all(torch.equal(stored[k], t) for k, t in packed.items())
    n = int.from_bytes(data[:8], "little")
    assert n < len(json.dumps(task.manifest)) // 3  # header: 3 entries and the deflated text


def test_a_plain_manifest_file_still_loads_and_builds_the_same(made):
    base, task = made
    text = json.dumps(task.manifest, sort_keys=True)
    old = Task.from_bytes(_with_meta(task, {MANIFEST_KEY: text, CHECKSUM_KEY: _sha(text)}))
    new = Task.from_bytes(task.to_bytes())
    assert old.manifest == new.manifest
    a, _ = Builder(base).build(old, verify=True)
    b, _ = Builder(base).build(new, verify=True)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_an_older_reader_sees_a_version_4_stub_and_asks_for_an_upgrade():
    with pytest.raises(ArtifactError, match=r"format version 4, but this sparta reads version 3"):
        check_manifest(json.loads(STUB), "t.safetensors")


def _packed(text: bytes) -> str:
    return base64.b64encode(zlib.compress(text)).decode()


@pytest.mark.parametrize(
    "case, expected",
    [
        ("plain beside compressed", r"holds a compressed manifest and a plain one"),
        ("checksum", r"manifest checksum differs"),
        ("stub checksum", r"holds a compressed manifest and a plain one"),
        ("not base64", r"not base64 of a complete zlib stream"),
        ("truncated stream", r"not base64 of a complete zlib stream"),
        ("trailing bytes", r"not base64 of a complete zlib stream"),
        ("not utf-8", r"not base64 of a complete zlib stream"),
        ("not a string", r"not base64 of a complete zlib stream"),
        ("checksum only", r"not base64 of a complete zlib stream"),
        ("bomb", rf"inflates to more than {MAX_HEADER_BYTES:,} bytes"),
    ],
)
def test_a_crafted_compressed_manifest_is_refused(made, case, expected):
    _, task = made
    meta = _meta(task.to_bytes())
    text = manifest_text(meta)
    raw = zlib.compress(text.encode())
    if case == "plain beside compressed":
        meta[MANIFEST_KEY], meta[CHECKSUM_KEY] = text, _sha(text)
    elif case == "checksum":
        meta[ZCHECKSUM_KEY] = _sha(text + " ")
    elif case == "stub checksum":  # older readers would call the file corrupted: so do we
        meta[CHECKSUM_KEY] = _sha(STUB + " ")
    elif case == "not base64":
        meta[ZMANIFEST_KEY] = "*" + meta[ZMANIFEST_KEY][1:]
    elif case == "truncated stream":
        meta[ZMANIFEST_KEY] = base64.b64encode(raw[: len(raw) // 2]).decode()
    elif case == "trailing bytes":
        meta[ZMANIFEST_KEY] = base64.b64encode(raw + b"\0").decode()
    elif case == "not utf-8":
        meta[ZMANIFEST_KEY] = _packed(b"\xff\xfe" + text.encode())
    elif case == "not a string":
        meta[ZMANIFEST_KEY] = 7
    elif case == "checksum only":
        del meta[ZMANIFEST_KEY]
    else:  # 16 MiB + 1 of spaces deflate to ~16 KB: never inflated past the limit
        meta[ZMANIFEST_KEY] = _packed(b" " * (MAX_HEADER_BYTES + 1))
    with pytest.raises(ArtifactError, match=expected):
        Task.from_bytes(_with_meta(task, meta))


def test_the_one_pass_batchnorm_fill_equals_the_general_path(made, monkeypatch):
    base, task = made
    taken = []
    fill_norm = plan_job._Job._fill_norm

    def counting(self, *args):
        done = fill_norm(self, *args)
        taken.append(done)
        return done

    monkeypatch.setattr(plan_job._Job, "_fill_norm", counting)
    fast, _ = Builder(base).build(Task.from_bytes(task.to_bytes()), verify=True)
    assert taken and all(taken)  # every BatchNorm of this task takes it
    monkeypatch.setattr(plan_job._Job, "_fill_norm", lambda self, *args: False)
    general, _ = Builder(base).build(Task.from_bytes(task.to_bytes()), verify=True)
    a, b = fast.state_dict(), general.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    flags = {n: p.requires_grad for n, p in general.named_parameters()}
    assert {n: p.requires_grad for n, p in fast.named_parameters()} == flags
    ptrs = {t.untyped_storage().data_ptr() for t in a.values() if t.numel()}
    assert not ptrs & {t.untyped_storage().data_ptr() for t in base.state_dict().values()}
    assert not ptrs & {t.untyped_storage().data_ptr() for t in task.tensors.values()}


_ODD_CUTS = [None, True, False, 0, 1, -1, 2, 3, 1.0, "0", [], [0], [None], [0, 0, 0], [True, 0],
             [0, False], [None, None], [0, None], [None, 1], [2, 0], [0, -1], [1.0, 0], {}, (0, 1)]  # fmt: skip


def test_the_bulk_cuts_check_is_never_more_lenient_than_the_loop():
    plan_module = importlib.import_module("sparta.tasks.plan")

    def loop_ok(cuts: list, n: int) -> bool:  # the per-cut rule plan_problem names cuts by
        return all(
            isinstance(c, list)
            and len(c) == 2
            and c != [None, None]
            and all(i is None or plan_module._index(i, n) for i in c)
            for c in cuts
        )

    for odd in _ODD_CUTS:
        for cuts in ([odd], [[0, 1], odd], [odd, [1, None]]):
            for n in (0, 2):
                if plan_module._cuts_ok(cuts, n):
                    assert loop_ok(cuts, n), (cuts, n)
    assert plan_module._cuts_ok([[0, 1], [None, 1], [1, None]], 2)  # and it accepts good ones
    assert not plan_module._cuts_ok([[0, 2]], 2) and not plan_module._cuts_ok([[None, None]], 2)


@pytest.mark.parametrize(
    "edit",
    ["dtype", "shape", "offsets", "extra", "missing", "named tensor", "short body", "long body"],
)
def test_a_format_4_header_off_its_manifest_is_refused(made, edit):
    _, task = made
    data = task.to_bytes()
    n = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8 : 8 + n]), data[8 + n :]
    f32 = header[blob_name("F32")]
    if edit == "dtype":
        f32["dtype"] = "F16"
    elif edit == "shape":
        f32["shape"] = [f32["shape"][0] - 1]
    elif edit == "offsets":
        f32["data_offsets"][1] -= 4
    elif edit == "extra":
        header[blob_name("F64")] = {"dtype": "F64", "shape": [0], "data_offsets": [0, 0]}
    elif edit == "missing":
        del header[blob_name("I64")]
    elif edit == "named tensor":  # a tensor listed by name beside the per-dtype ones
        key = sorted(task.tensors)[0]
        header[key] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    elif edit == "short body":
        body = body[:-1]
    else:
        body = body + b"\0" * 8
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with pytest.raises(ArtifactError, match=r"header does not match its manifest|truncated"):
        Task.from_bytes(len(text).to_bytes(8, "little") + text + body)
