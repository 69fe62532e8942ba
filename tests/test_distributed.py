"""Data-parallel runs: two gloo processes on the CPU take the same pruning decisions as each
other and as one process given the same data order.

Why they must agree with one process: rank ``r`` takes the ``r``-th half of every global batch
and its loss is the mean over that half; DDP averages the two gradients, which is the gradient
of the mean over the whole batch. Scoring deals whole batches to the ranks and sums the
criterion's totals over them. The model has no BatchNorm: in training, BatchNorm normalises by
each rank's own batch statistics, so a two-process run would differ from one process by more
than float rounding (use ``sync_batchnorm`` on CUDA for that).
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparta.train import RESULT, TASK, run
from test_train import masks, one_thread, small_config, tiny_cnn, tiny_data  # noqa: F401

WORLD = 2


def _config(out, **changes):
    return small_config(out, batch_size=16, scoring_batches=3, **changes)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: (name, config changes, model has BatchNorm): the comparison with one process uses "splora";
#: "fine-pruning" (every weight trained under DDP, BatchNorm buffers) checks rank agreement.
JOBS = [("splora", {}, False), ("fine-pruning", {"method": "fine-pruning"}, True)]


def _worker(rank: int, ports: list[int], out: str, dump: str) -> None:
    torch.set_num_threads(1)
    for (name, changes, batchnorm), port in zip(JOBS, ports):
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(WORLD),
        )
        config = _config(f"{out}/{name}", **changes)
        r = run(config, tiny_cnn(batchnorm=batchnorm), tiny_data(), progress=False)
        assert not dist.is_initialized()  # the run made the process group and took it down
        state = {k: v.clone() for k, v in r.model.state_dict().items()}
        torch.save({"state": state, "steps": r.steps}, f"{dump}/{name}-rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """``{job name: (output folder, [what rank 0 holds, what rank 1 holds])}``."""
    out, dump = tmp_path_factory.mktemp("ddp"), tmp_path_factory.mktemp("dump")
    ports = [_free_port() for _ in JOBS]
    mp.spawn(_worker, args=(ports, str(out), str(dump)), nprocs=WORLD, join=True)
    return {
        name: (
            out / name,
            [torch.load(dump / f"{name}-rank{r}.pt", weights_only=True) for r in range(WORLD)],
        )
        for name, _, _ in JOBS
    }


@pytest.mark.parametrize("job", [name for name, _, _ in JOBS])
def test_ranks_hold_identical_models(ranks, job):
    _, (zero, one) = ranks[job]
    assert zero["state"].keys() == one["state"].keys()
    assert any("mask" in k for k in zero["state"])
    for k, v in zero["state"].items():
        assert torch.equal(v, one["state"][k]), k  # masks, weights, BatchNorm statistics
    assert zero["steps"] == one["steps"]  # metrics all-reduced: the same on both ranks
    assert [s["density"] for s in zero["steps"]] == pytest.approx([1.0, 0.75, 0.5])


def test_only_rank_zero_writes_and_the_result_says_two_processes(ranks):
    out, _ = ranks["splora"]
    result = json.loads((out / RESULT).read_text())
    assert result["world_size"] == WORLD and (out / TASK).exists()
    assert sorted(p.name for p in out.iterdir()) == sorted([RESULT, TASK, "run.log"])


def test_two_processes_prune_like_one(ranks, tmp_path):
    _, (zero, _) = ranks["splora"]
    single = run(_config(tmp_path), tiny_cnn(batchnorm=False), tiny_data(), progress=False)
    for k, v in masks(single.model).items():
        assert torch.equal(v, zero["state"][k]), k
    for k, v in single.model.state_dict().items():
        assert torch.allclose(v, zero["state"][k], atol=1e-5), k  # up to float rounding
    assert [s["density"] for s in single.steps] == [s["density"] for s in zero["steps"]]
    assert [s["accuracy"] for s in single.steps] == [s["accuracy"] for s in zero["steps"]]
    for a, b in zip(single.steps, zero["steps"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
