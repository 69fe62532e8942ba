"""``sparta run`` as a separate process, as a user meets it (issue 15): a run killed with
SIGKILL resumes from ``--output-dir`` alone to the same result as an uninterrupted run; Ctrl-C
(SIGINT) exits 130 printing the exact command that resumes, which then finishes the run.
The rest of the CLI's newcomer checks run in-process: tests/test_cli_newcomer.py.

Each run is tiny (built-in digits, digits_cnn, small batches, a few seconds); every process
gets one thread so that the runs compared compute the same floats.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

RUN = [
    "--model", "digits_cnn", "--dataset", "digits", "--epochs", "3", "--recovery-epochs", "1",
    "--steps", "2", "--target", "0.5", "--batch-size", "32", "--scoring-batches", "2",
    "--device", "cpu",
]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
ENV.pop("COLUMNS", None)  # as a pipe: no width given
ENV.pop("RANK", None)


def _sparta(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sparta", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


def _terminal_signals() -> None:
    """SIGINT at its default, as under a terminal: a test run started in the background (``cmd
    &`` in a script, nohup) inherits SIGINT ignored, and Python then installs no Ctrl-C handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sparta", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        preexec_fn=_terminal_signals,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until ``path`` exists (the run's first checkpoint), polling every 5 ms."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.005)


def _outcome(folder: Path) -> dict:
    """What a run ends with, without its timings."""
    result = json.loads((folder / "result.json").read_text())
    return {"final": result["final"], "steps": result["steps"], "pruning": result["pruning"]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same run, uninterrupted."""
    out = tmp_path_factory.mktemp("reference") / "run"
    done = _sparta("run", *RUN, "--output-dir", str(out), "--no-progress")
    assert done.returncode == 0, done.stderr
    return out


def test_sigkill_then_resume_with_the_output_dir_only(reference, tmp_path):
    out = tmp_path / "killed"
    proc = _start("run", *RUN, "--output-dir", str(out), "--no-progress")
    _wait_for(out / "checkpoint.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "result.json").exists()  # killed mid-run
    assert json.loads((out / "config.json").read_text())["epochs"] == 3  # what --resume reads

    resumed = _sparta("run", "--output-dir", str(out), "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming run splora-taylor-d0.5-s0" in resumed.stderr
    assert _outcome(out) == _outcome(reference)
    task = (out / "task.safetensors").read_bytes()
    assert task == (reference / "task.safetensors").read_bytes()


def test_ctrl_c_exits_130_with_the_resume_command(reference, tmp_path):
    out = tmp_path / "with space"
    proc = _start("run", *RUN, "--output-dir", str(out), "--no-progress")
    _wait_for(out / "checkpoint.pt", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    (hint,) = [line for line in err.splitlines() if "resume with:" in line]
    command = hint.split("resume with: ", 1)[1]
    assert command == f"sparta run --output-dir {shlex.quote(str(out))} --resume"
    resumed = _sparta(*shlex.split(command)[1:], "--no-progress")  # the hint, as printed
    assert resumed.returncode == 0, resumed.stderr
    assert _outcome(out) == _outcome(reference)
