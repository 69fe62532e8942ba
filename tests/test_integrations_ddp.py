"""The callbacks' pruning under data parallelism, as ``sparta run`` does it: two gloo
processes take the same decision, and it is the decision one process takes on all the data.
Scoring batches are dealt round-robin (rank r scores batches r, r + 2, ...) and the scores
summed over ranks; block criteria learn from each rank's own training batch (accumulated scores
summed, learned gates' gradients averaged)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sparta
from sparta.integrations.core import PruningDriver, default_loss
from test_train import one_thread  # noqa: F401  (autouse: tiny matrices run faster on 1 thread)
from tiny_models import MLP

WORLD = 2
#: (adapter options, pruner options): a data-driven channel criterion, an accumulated block
#: criterion and a learned-gate block criterion
JOBS = {
    "taylor": ({"adapter": "splora", "rank": 2}, {"criterion": "taylor", "target": 0.5}),
    "movement": ({"adapter": "splopa", "block": 4, "prototypes": 2}, {"criterion": "movement"}),
    "soft-movement": (
        {"adapter": "splopa", "block": 4, "prototypes": 2},
        {"criterion": "soft-movement", "lr": 0.5},
    ),
}


def _data(rank: int):
    gen = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
    return torch.randn(6, 12, generator=gen), torch.randint(0, 4, (6,), generator=gen)


def _model(adapter: dict):
    torch.manual_seed(0)
    options = dict(adapter)
    return sparta.wrap(MLP(), options.pop("adapter"), **options)


def _masks(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if "mask" in k}


def _run(name: str, batches: list, train: list) -> dict:
    """One pruning step: channel criteria score ``batches`` (this rank's share of them in a
    process group), block criteria learn from the training passes on ``train``."""
    adapter, options = JOBS[name]
    model = _model(adapter)
    blocks = adapter["adapter"] == "splopa"
    driver = PruningDriver(
        pruner_options={**options, "target": 0.5, **({"total_steps": 1} if blocks else {})},
        unit="steps",
        scoring_batches=len(batches),
    )
    driver.begin(model, batches, total_steps=1, epochs=1)
    if blocks:  # the training pass feeds the block criteria (scores or gate gradients)
        for x, y in train:
            (default_loss(model(x), y) / len(train)).backward()
    assert driver.after_optimizer_step(lambda: batches)
    return _masks(model)


def _worker(rank: int, port: int, dump: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        every = [_data(r) for r in range(WORLD)]
        out = {name: _run(name, every, [_data(rank)]) for name in JOBS}
    finally:
        dist.destroy_process_group()
    torch.save(out, f"{dump}/rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    dump = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(dump)), nprocs=WORLD, join=True)
    return [torch.load(dump / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", sorted(JOBS))
def test_ranks_decide_alike_and_as_one_process(ranks, name):
    first, second = (r[name] for r in ranks)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    pruned = sum(int((m == 0).sum()) for m in first.values())
    assert pruned > 0
    # one process on all the data (the mean loss over both batches, as DDP averages)
    every = [_data(r) for r in range(WORLD)]
    alone = _run(name, every, every)
    for key in first:
        assert torch.equal(first[key], alone[key]), key
    # without the sum, a rank alone would have decided differently
    own = [_run(name, [_data(r)], [_data(r)]) for r in range(WORLD)]
    assert any(not torch.equal(own[0][k], own[1][k]) for k in first)
