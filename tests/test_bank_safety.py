"""Banks that survive bad files, and one clear sparta error for every bad input (issue #11).

A task is verified once, when it is added, and a failing task is never registered (no file is
left); a bad file in a bank's folder does not stop the bank from opening; reading refuses
what is not a regular task file before reading it; writes name the path the user gave and
leave no temporary file behind, even after a SIGKILL.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import sparta
from sparta.errors import FileError, SpartaError
from sparta.io import TEMP_SUFFIX, atomic_write
from sparta.tasks import ArtifactError, Builder, Task, TaskBank, apply_task, build, export
from sparta.tasks.taskfile import digest
from test_artifact import _write_raw
from test_build import make_task, rel_diff, run

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def residual():
    """``(base, {name: task}, x)``: two tasks (SPLoRA, SPPaRA) on one small residual CNN."""
    base, m1, x = make_task("residual")
    _, m2, _ = make_task("residual", adapter="sppara")
    return base, {"a": export(m1), "b": export(m2)}, x


def _edited(task: Task, path: Path, edit) -> Path:
    """``task`` written to ``path`` with its manifest changed by ``edit`` (checksum redone)."""
    manifest = json.loads(json.dumps(task.manifest))
    edit(manifest)
    _write_raw(path, task.tensors, manifest)
    return path


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model, before) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# -- verification once, at add -----------------------------------------------------------------
def test_a_failing_task_is_never_registered_and_leaves_no_file(residual, tmp_path, monkeypatch):
    base, tasks, x = residual
    folder = tmp_path / "bank"
    bank = TaskBank(base, folder)
    # 1. The recorded inputs are not a batch the base takes (edited, checksum redone).
    bad = _edited(tasks["a"], tmp_path / "bad.safetensors", lambda m: _set_image(m, 9))
    with pytest.raises(SpartaError, match=r"cannot run on .*\[2, 3, 9, 9\]"):
        bank.add("bad", bad)
    # 2. The compact model does not reproduce the masked one (a build bug, simulated).
    # The task carries a plan (format 3): the build slices the base, then checks its output
    # against the one recorded at export.
    assert tasks["a"].plan is not None
    planner = importlib.import_module("sparta.tasks.from_plan").PlanBuilder
    real_build = planner.build

    def broken_build(self, task, path="<task>"):
        model, report = real_build(self, task, path)
        with torch.no_grad():
            model.fc.weight.mul_(1.5)
        return model, report

    monkeypatch.setattr(planner, "build", broken_build)
    with pytest.raises(ArtifactError, match=r"'wrong' failed verification.*differs"):
        bank.add("wrong", tasks["a"])
    monkeypatch.undo()
    # 3. A manifest without counts.learned_parameters: refused when read (was a KeyError).
    no_count = _edited(
        tasks["a"],
        tmp_path / "nocount.safetensors",
        lambda m: m["counts"].pop("learned_parameters"),
    )
    with pytest.raises(ArtifactError, match="counts.learned_parameters"):
        bank.add("nocount", no_count)
    # 4. A Task object (not a file) with a NaN, its checksum redone: refused all the same.
    key = "fc.parametrizations.weight.original"
    manifest = json.loads(json.dumps(tasks["a"].manifest))
    tensors = dict(tasks["a"].tensors, **{key: tasks["a"].tensors[key].clone()})
    tensors[key].view(-1)[0] = float("nan")
    manifest["tensors"][key]["sha256"] = digest(tensors[key])
    with pytest.raises(ArtifactError, match=r"'fc.parametrizations.weight.original' holds NaN"):
        bank.add("nan", Task(tensors, manifest))
    assert bank.names == [] and bank.errors == {}
    assert sorted(p.name for p in folder.iterdir()) == [], "a refused task left a file"
    bank.add("a", tasks["a"])  # a good task still goes in, and the bank reopens
    assert TaskBank(base, folder).names == ["a"]


def _set_image(manifest: dict, size: int) -> None:
    manifest["inputs"]["tensor"]["shape"][2:] = [size, size]


def test_verify_happens_once_at_add(residual, tmp_path, monkeypatch):
    base, tasks, x = residual
    calls = []
    real = Builder.build

    def counting(self, task, verify=True):
        calls.append(verify)
        return real(self, task, verify=verify)

    monkeypatch.setattr(Builder, "build", counting)
    bank = TaskBank(base, tmp_path / "bank", cache_size=1)
    bank.add("a", tasks["a"])
    bank.add("b", tasks["b"])
    assert calls == [True, True]  # one verified build per task, at add
    with torch.no_grad():
        out_a = bank.model("a")(x)  # evicted by b: rebuilt, not re-verified
        bank.model("b")
    assert calls == [True, True, False, False]
    bank.model("b")  # cached: no build
    assert len(calls) == 4
    # A bank opened on the folder verifies each task once, on its first use.
    again = TaskBank(base, tmp_path / "bank", cache_size=1)
    assert len(calls) == 4  # opening builds nothing
    with torch.no_grad():
        assert torch.equal(again.model("a")(x), out_a)
    again.model("b")
    again.model("a")
    assert calls[4:] == [True, True, False]
    # verify=True: every build is verified.
    every = TaskBank(base, cache_size=1, verify=True)
    every.add("a", tasks["a"])
    every.add("b", tasks["b"])
    every.model("a")
    assert calls[7:] == [True, True, True]


def test_a_task_storing_fewer_tensors_never_sees_another_tasks_values(residual):
    """A Builder reuses one masked model per task layout: a task that does not store a
    trainable tensor (e.g. trained without norms) must find the base's value, not the
    previous task's."""
    base, tasks, x = residual
    planned = tasks["a"]
    full = planned.without_plan()  # the graph path, with its reused masked models
    key = "bn.parametrizations.bias.original"
    manifest = json.loads(json.dumps(full.manifest))
    del manifest["tensors"][key]
    fewer = Task({k: v for k, v in full.tensors.items() if k != key}, manifest)
    builder = Builder(base)
    with torch.no_grad():
        for task in (full, fewer, full, fewer):
            got = run(builder.build(task)[0], x)
            assert rel_diff(got, run(apply_task(base, task).eval(), x)) < 1e-5
        assert rel_diff(run(builder.build(fewer)[0], x), run(builder.build(full)[0], x)) > 1e-4
        # The plan path reads the base's value too; its recorded output is the full task's.
        manifest = json.loads(json.dumps(planned.manifest))
        del manifest["tensors"][key]
        fewer_planned = Task(dict(fewer.tensors), manifest)
        got = run(builder.build(fewer_planned, verify=False)[0], x)
        assert rel_diff(got, run(apply_task(base, fewer).eval(), x)) < 1e-5
        with pytest.raises(SpartaError, match="differs from the one recorded at export"):
            builder.build(fewer_planned, verify=True)
    # An adapter tensor cannot be absent: it would keep a random initial value.
    key = "branch.adapter.B"
    manifest = json.loads(json.dumps(full.manifest))
    del manifest["tensors"][key]
    no_adapter = Task({k: v for k, v in full.tensors.items() if k != key}, manifest)
    for make in (lambda: builder.build(no_adapter), lambda: apply_task(base, no_adapter)):
        with pytest.raises(ArtifactError, match=r"missing .*adapter tensors \['branch.adapter.B'"):
            make()
    manifest = json.loads(json.dumps(planned.manifest))
    del manifest["tensors"][key]
    no_adapter = Task({k: v for k, v in planned.tensors.items() if k != key}, manifest)
    with pytest.raises(ArtifactError, match=r"adapter tensors \['A'.*holds \['A', 'B'"):
        builder.build(no_adapter, verify=False)


# -- a bank with bad files ---------------------------------------------------------------------
def test_a_bank_with_bad_files_opens_lists_them_and_serves_the_others(residual, tmp_path):
    base, tasks, x = residual
    folder = tmp_path / "bank"
    good = TaskBank(base, folder)
    good.add("a", tasks["a"])
    (folder / "garbage.safetensors").write_bytes(b"\x00" * 100)
    (folder / "dir.safetensors").mkdir()
    _edited(tasks["b"], folder / "nocount.safetensors", lambda m: m.pop("counts"))
    _edited(tasks["b"], folder / "head.safetensors", lambda m: m["adapted"].append("fc"))
    _edited(tasks["b"], folder / "norm.safetensors", lambda m: m["adapted"].append("bn"))
    other_base, other, _ = make_task("residual", seed=1)
    export(other).save(folder / "other.safetensors")
    (folder / "bad name.safetensors").write_bytes(tasks["b"].to_bytes())
    before = _snapshot(base)

    bank = TaskBank(base, folder)
    assert bank.names == ["a", "norm"]  # 'norm' reads fine: it fails when first built
    assert set(bank.errors) == {
        "head.safetensors",
        "garbage.safetensors",
        "dir.safetensors",
        "nocount.safetensors",
        "other.safetensors",
        "bad name.safetensors",
    }
    assert "header length 0" in bank.errors["garbage.safetensors"]
    assert "a directory" in bank.errors["dir.safetensors"]
    assert "'counts'" in bank.errors["nocount.safetensors"]
    assert "another base" in bank.errors["other.safetensors"]
    assert "task name" in bank.errors["bad name.safetensors"]
    assert "listed twice in adapted/head" in bank.errors["head.safetensors"]
    with torch.no_grad():
        assert rel_diff(bank.model("a")(x), good.model("a")(x)) < 1e-6
    # The edited file lists a norm as adapted: refused on first use, then listed as bad.
    with pytest.raises(ArtifactError, match=r"lists bn \(BatchNorm2d\) as adapted"):
        bank.model("norm")
    assert bank.names == ["a"] and "norm.safetensors" in bank.errors
    with pytest.raises(ArtifactError, match="unusable"):
        bank.model("garbage")
    assert _unchanged(base, before)
    # A bad file's name is taken until it is replaced (overwrite) or removed.
    with pytest.raises(sparta.ConfigError, match="already in the bank"):
        bank.add("garbage", tasks["b"])
    bank.add("garbage", tasks["b"], overwrite=True)
    bank.remove("nocount")
    assert not (folder / "nocount.safetensors").exists()
    assert TaskBank(base, folder).names == ["a", "garbage", "norm"]


def test_tasks_list_shows_an_unusable_file(tmp_path):
    from sparta.cli import app
    from sparta.train.rebuild import BaseSpec

    base = BaseSpec(model="digits_cnn", num_classes=10).create()
    x = torch.randn(2, 1, 8, 8)
    model = sparta.wrap(base, "splora", rank=2)
    sparta.Pruner(model, x, criterion="l1", target=0.5).step()
    folder = tmp_path / "bank"
    runner = CliRunner()
    task = tmp_path / "t.safetensors"
    export(model.eval()).save(task)
    added = runner.invoke(
        app, ["tasks", "add", str(folder), "good", str(task), "--model", "digits_cnn"]
    )
    assert added.exit_code == 0, added.output
    (folder / "broken.safetensors").write_bytes(b"not a task")
    listed = runner.invoke(app, ["tasks", "list", str(folder), "--json"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    assert [r["name"] for r in rows] == ["good", "broken.safetensors"]
    assert "truncated" in rows[1]["error"] or "not a sparta task" in rows[1]["error"]
    table = runner.invoke(app, ["tasks", "list", str(folder)])
    assert table.exit_code == 0 and "good" in table.stdout
    assert "unusable task file broken.safetensors" in " ".join(table.stderr.split())


# -- every raw error of the issue is one clear sparta error naming the input ----------------------
@pytest.mark.parametrize("bad", [None, 3, b"bytes"])
def test_load_of_something_that_is_not_a_path(bad):
    with pytest.raises(ArtifactError, match="expected the path of a task file"):
        Task.load(bad)
    with pytest.raises(ArtifactError, match="expected the bytes of a task file"):
        Task.from_bytes(None)
    with pytest.raises(sparta.ConfigError, match="report expects a Task.*got int"):
        sparta.report(torch.nn.Linear(2, 2), 3)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are a POSIX thing")
def test_load_refuses_directories_pipes_and_huge_files_before_reading(tmp_path):
    with pytest.raises(ArtifactError, match=r"'.*folder' is a directory"):
        Task.load(_mkdir(tmp_path / "folder"))
    with pytest.raises(ArtifactError, match="cannot open task file '.*missing"):
        Task.load(tmp_path / "missing.safetensors")
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(_error_of(Task.load, fifo)))
    thread.daemon = True
    thread.start()
    thread.join(10)
    assert outcome and "not a regular file" in outcome[0], "reading a named pipe hung"
    huge = tmp_path / "huge.safetensors"
    with open(huge, "wb") as f:
        f.truncate(5 * 2**30)  # sparse: no disk used
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ArtifactError, match=r"huge.safetensors' is 5,368,709,120 bytes, over"):
        Task.load(huge)
    # A header claiming more than the file holds, or than any manifest needs.
    for claim in (2**40, 2**30):
        with open(huge, "r+b") as f:
            f.write(claim.to_bytes(8, "little"))
        with pytest.raises(ArtifactError, match="header"):
            Task.load(huge, max_bytes=2**40)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 200_000  # KiB


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _error_of(fn, *args) -> str:
    try:
        fn(*args)
    except SpartaError as exc:
        return str(exc)
    return "no error"


def test_save_to_a_directory_a_long_name_or_a_read_only_folder(residual, tmp_path, monkeypatch):
    task = residual[1]["a"]
    with pytest.raises(FileError, match=r"cannot write '.*target': it is a directory"):
        task.save(_mkdir(tmp_path / "target"))
    long = tmp_path / ("x" * 300 + ".safetensors")
    with pytest.raises(FileError, match=r"cannot write '.*xxx\.safetensors': the file name is too"):
        task.save(long)
    (tmp_path / "plain").write_text("x")
    with pytest.raises(FileError, match=r"cannot write '.*plain/t.safetensors': a part of"):
        task.save(tmp_path / "plain" / "t.safetensors")
    locked = _mkdir(tmp_path / "locked")
    if os.geteuid() == 0:  # root writes anywhere: simulate the refusal the OS would give
        monkeypatch.setattr(
            "tempfile.mkstemp", lambda **kw: _raise(PermissionError(13, "Permission denied"))
        )
    else:
        locked.chmod(0o555)
    with pytest.raises(FileError, match=r"cannot write '.*locked/t.safetensors': the folder"):
        task.save(locked / "t.safetensors")
    monkeypatch.undo()
    locked.chmod(0o755)
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith((TEMP_SUFFIX, ".tmp"))]
    assert leftovers == []
    # A bank on a read-only folder refuses the add with the same error and registers nothing.
    bank = TaskBank(residual[0], locked)
    monkeypatch.setattr(
        "tempfile.mkstemp", lambda **kw: _raise(PermissionError(13, "Permission denied"))
    )
    with pytest.raises(FileError, match=r"'.*locked/a.safetensors': the folder .* not writable"):
        bank.add("a", task)
    assert bank.names == []


def _raise(exc):
    raise exc


def test_bank_on_a_file_and_bank_names_too_long(residual, tmp_path):
    base, tasks, _ = residual
    file = tmp_path / "afile"
    file.write_text("x")
    with pytest.raises(FileError, match=r"bank directory '.*afile' is a file, not a folder"):
        TaskBank(base, file)
    bank = TaskBank(base, tmp_path / "bank")
    with pytest.raises(sparta.ConfigError, match=r"1 to 200 letters.*\(300 characters\)"):
        bank.add("n" * 300, tasks["a"])
    assert list((tmp_path / "bank").iterdir()) == []


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"tensor": {"shape": [2, 3, 16, 16], "dtype": "qint8"}}, "dtype 'qint8'"),
        ({"tensor": {"shape": [2, 3, 16, 16], "dtype": "complex64"}}, "dtype 'complex64'"),
        ({"tensor": {"shape": [2] * 9, "dtype": "float32"}}, "at most 8 sizes"),
        ({"tensor": {"shape": [2, 3, 0, 16], "dtype": "float32"}}, "sizes >= 1"),
        ({"tensor": {"shape": [2, 3, 30000, 30000], "dtype": "float32"}}, "5,400,000,000"),
        ({"tensor": {"shape": "2x3", "dtype": "float32"}}, "not a list"),
        ({"tuple": [{"tensor": {"shape": [1], "dtype": "float32"}}] * 65}, "65 tensors"),
        ({"array": []}, "not a tensor, a tuple"),
    ],
)
def test_absurd_recorded_inputs_are_refused_when_read(residual, tmp_path, inputs, message):
    path = _edited(residual[1]["a"], tmp_path / "t.safetensors", lambda m: m.update(inputs=inputs))
    with pytest.raises(ArtifactError, match=rf"t.safetensors'.*'inputs'.*{message}"):
        Task.load(path)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"rank": 4, "init_scale": 1e300}, "init_scale"),
        ({"rank": -1}, "rank"),
        ({"rank": "4"}, "rank"),
        ({"rank": 4, "alpha": 2}, "no option 'alpha'"),
    ],
)
def test_adapter_options_are_checked_by_the_adapter(residual, tmp_path, options, message):
    path = _edited(
        residual[1]["a"], tmp_path / "t.safetensors", lambda m: m["adapter"].update(options=options)
    )
    with pytest.raises(ArtifactError, match=rf"t.safetensors'.*adapter does not load.*{message}"):
        Task.load(path)


def test_build_with_wrongly_shaped_example_inputs(residual):
    base, tasks, _ = residual
    for bad in (torch.randn(2, 5, 16, 16), torch.randn(2, 3, 9, 9)):
        with pytest.raises(sparta.ConfigError, match=r"cannot run on example_inputs \(float32 \["):
            build(base, tasks["a"], example_inputs=bad)


# -- atomic writes ---------------------------------------------------------------------------------
def test_a_sigkilled_write_leaves_no_temporary_behind(tmp_path):
    target = tmp_path / "ckpt.bin"
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(target)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    try:
        assert child.stdout.readline().strip() == b"writing"
        temporaries = [p for p in tmp_path.iterdir() if p.name.endswith(TEMP_SUFFIX)]
        assert len(temporaries) == 1 and temporaries[0].stat().st_size == 1 << 20
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    assert temporaries[0].exists() and not target.exists()  # what SIGKILL leaves
    with atomic_write(target) as f:  # the next write into the folder cleans it
        f.write(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.bin"]
    assert target.read_bytes() == b"new"


_KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from sparta.io import atomic_write
    with atomic_write(sys.argv[1]) as f:
        f.write(b"x" * (1 << 20))
        f.flush()
        print("writing", flush=True)
        time.sleep(120)
    """
)


def test_live_writers_temporaries_are_kept(tmp_path):
    """Only the temporaries of dead processes go: a concurrent write in progress stays."""
    live = tmp_path / f".x.{_host()}-{os.getppid()}-abc{TEMP_SUFFIX}"
    live.write_bytes(b"in progress")
    with atomic_write(tmp_path / "y") as f:
        f.write(b"y")
    assert live.exists()


def _host() -> str:
    from sparta.io import _HOST

    return _HOST


def test_same_task_gives_the_same_bytes_in_two_processes(tmp_path):
    """safetensors writes its metadata in hash-map order, which varies between processes;
    task files must not (sorted JSON keys, a deterministic layout)."""
    runs = []
    for seed in ("1", "2"):  # concurrently: each process spends most of its time importing
        out = tmp_path / f"task{seed}.safetensors"
        env = {**os.environ, "PYTHONPATH": SRC, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
        runs.append((out, subprocess.Popen([sys.executable, "-c", _EXPORTER, str(out)], env=env)))
    for _, process in runs:
        assert process.wait(120) == 0
    first, second = (out.read_bytes() for out, _ in runs)
    assert first == second
    assert Task.from_bytes(first).manifest["adapter"]["name"] == "splora"


_EXPORTER = textwrap.dedent(
    """
    import sys, torch, warnings, sparta
    from torch import nn
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    x = torch.randn(2, 3, 12, 12)
    model = sparta.wrap(base, "splora", rank=2, head="6")
    sparta.Pruner(model, x, criterion="l1", target=0.5).step()
    sparta.export(model.eval()).save(sys.argv[1])
    """
)
