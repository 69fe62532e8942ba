"""Resumable runs: a run stopped after any checkpoint and resumed ends exactly as one that was
never stopped (same masks, weights, metrics, pruning decisions and task file bytes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sparta.errors import ConfigError
from sparta.train import CHECKPOINT, RESULT, TASK, load_checkpoint, run
from test_train import masks, one_thread, small_config, tiny_cnn, tiny_data  # noqa: F401

TESTS = Path(__file__).resolve().parent


class Stop(Exception):
    pass


def _config(out, **changes):
    # recovery_epochs=2: a checkpoint falls inside a recovery phase (optimiser state resumed)
    return small_config(out, recovery_epochs=2, **changes)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        r = run(_config(out), tiny_cnn(), tiny_data(), progress=False)
    return r, json.loads((out / RESULT).read_text())


def _assert_same_run(resumed, out: Path, reference) -> None:
    ref, ref_json = reference
    got = json.loads((out / RESULT).read_text())
    for key in ("steps", "pruning", "final"):
        assert got[key] == ref_json[key], key
    ref_state, state = ref.model.state_dict(), resumed.model.state_dict()
    assert masks(resumed.model).keys() == masks(ref.model).keys()
    assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)  # masks and weights
    assert _task_content(out / TASK) == _task_content(ref.output_dir / TASK)
    assert not (out / CHECKPOINT).exists()


def _task_content(path: Path):
    """Manifest and tensors of a task file (the header's key order may vary by process)."""
    with safe_open(path, "pt") as f:
        meta = {k: json.loads(v) if k.endswith("manifest") else v for k, v in f.metadata().items()}
        return meta, {k: f.get_tensor(k).tolist() for k in sorted(f.keys())}


# stages: train, train, eval, prune 1, train, train, eval, prune 2, train, train, eval;
# checkpoints after every train and prune stage: 8 in all
@pytest.mark.parametrize("stop_after", [1, 3, 4, 7])
def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path, reference, stop_after):
    def crash(n, path):
        if n == stop_after:
            raise Stop

    with pytest.raises(Stop):
        run(_config(tmp_path), tiny_cnn(), tiny_data(), progress=False, on_checkpoint=crash)
    assert load_checkpoint(tmp_path / CHECKPOINT)["cursor"] > 0
    assert not (tmp_path / RESULT).exists()
    resumed = run(_config(tmp_path), tiny_cnn(), tiny_data(), progress=False, resume=True)
    assert resumed.resumed and not resumed.skipped
    _assert_same_run(resumed, tmp_path, reference)
    log = (tmp_path / "run.log").read_text()
    assert "starting run" in log and "resuming run" in log


CHILD = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from test_resume import _config
from test_train import tiny_cnn, tiny_data
from sparta.train import run

def kill(n, path):
    if n == {stop_after}:
        os.kill(os.getpid(), signal.SIGKILL)

run(_config({out!r}), tiny_cnn(), tiny_data(), progress=False, on_checkpoint=kill)
"""


def test_resume_after_sigkill_in_a_subprocess(tmp_path, reference):
    """The process dies by SIGKILL right after its 4th checkpoint (inside the first recovery
    phase); a new process resumes from the file on disk."""
    script = CHILD.format(tests=str(TESTS), stop_after=4, out=str(tmp_path))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    state = load_checkpoint(tmp_path / CHECKPOINT)
    assert state["cursor"] == 5 and len(state["pruner"]["history"]) == 1
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind
    resumed = run(_config(tmp_path), tiny_cnn(), tiny_data(), progress=False, resume=True)
    _assert_same_run(resumed, tmp_path, reference)


def test_resume_refuses_a_different_config(tmp_path):
    def crash(n, path):
        raise Stop

    with pytest.raises(Stop):
        run(_config(tmp_path), tiny_cnn(), tiny_data(), progress=False, on_checkpoint=crash)
    with pytest.raises(ConfigError, match="lr: 0.05 -> 0.1"):
        run(_config(tmp_path, lr=0.1), tiny_cnn(), tiny_data(), progress=False, resume=True)
    # without resume, the run starts afresh (the old checkpoint is dropped)
    fresh = run(_config(tmp_path, steps=1, lr=0.1), tiny_cnn(), tiny_data(), progress=False)
    assert not fresh.resumed and len(fresh.steps) == 2


def test_a_finished_run_is_read_back_only_for_its_own_config(tmp_path, reference):
    # `sparta demo --toy` once read the real demo's finished runs back as its own (same
    # folders): a finished run of another config is refused, never returned as this one's
    ref, ref_json = reference
    out = Path(ref_json["config"]["output_dir"])
    again = run(_config(out), tiny_cnn(), tiny_data(), progress=False, resume=True)
    assert again.skipped and again.final == ref.final
    moved = run(_config(out, device="auto"), tiny_cnn(), tiny_data(), progress=False, resume=True)
    assert moved.skipped  # a setting that changes no result (device, workers) may differ
    with pytest.raises(ConfigError, match=r"the finished run in .*lr: 0\.05 -> 0\.1"):
        run(_config(out, lr=0.1), tiny_cnn(), tiny_data(), progress=False, resume=True)
    assert json.loads((out / RESULT).read_text()) == ref_json  # untouched
