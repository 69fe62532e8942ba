"""Data-parallel runs: process group set-up, DDP, and agreeing on pruning decisions.

Launched by ``torchrun`` (``WORLD_SIZE > 1`` in the environment), a run joins the process
group (NCCL on CUDA, gloo on CPU) unless the caller already did. Each rank trains on its slice
of every global batch (see :mod:`sparta.train.loop`); DDP averages the gradients of the
trainable parameters only. A wrapped model's frozen base has ``requires_grad=False``, so DDP
neither registers nor waits for it, and every trainable tensor (adapters, biases, norms, head,
and for fine-pruning every weight) takes part in every forward, pruned channels included (a
mask multiplies them by zero, which still is a use): ``find_unused_parameters`` stays off.

Pruning decisions must be identical on every rank. Data-driven criteria add up one term per
scored batch, so the scoring batches are dealt round-robin (whole global batches, not slices:
an absolute value is taken per batch) and the per-rank sums are all-reduced before the pruner
ranks them (:func:`reduce_scores`): the result is the single-process score over the same
batches, up to the order of the float additions. Buffers (BatchNorm statistics) are made equal
after every epoch by a broadcast from rank 0 (:func:`sync_buffers`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import ConfigError


@dataclass
class DistState:
    """Where this process stands: ``rank`` of ``world_size``, its device, and whether this
    module created the process group (and so destroys it at the end)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owned: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: this rank's CUDA device if there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for, but CUDA is not available")
    return device


def setup(device: str = "auto") -> DistState:
    """Join the process group if launched with ``WORLD_SIZE > 1`` (or use the caller's)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        rank, world, owned = dist.get_rank(), dist.get_world_size(), False
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank, owned = int(os.environ.get("RANK", "0")), False
        if world > 1:
            if not dist.is_available():
                raise ConfigError("WORLD_SIZE > 1 but torch.distributed is not available")
            dev = resolve_device(device, local_rank)
            backend = "nccl" if dev.type == "cuda" else "gloo"
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group(backend=backend)
            rank, world, owned = dist.get_rank(), dist.get_world_size(), True
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return DistState(rank=rank, world_size=world, local_rank=local_rank, device=dev, owned=owned)


def teardown(state: DistState) -> None:
    if state.owned and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device(state: DistState) -> torch.device:
    """NCCL reduces CUDA tensors only; gloo reduces CPU ones."""
    return state.device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensor: Tensor, state: DistState) -> Tensor:
    """The sum of ``tensor`` over ranks (a new tensor on ``tensor``'s device)."""
    if not state.enabled:
        return tensor
    t = tensor.detach().to(_comm_device(state)).clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.to(tensor.device)


def barrier(state: DistState) -> None:
    if state.enabled:
        dist.barrier()


def broadcast_object(obj, state: DistState):
    """Rank 0's ``obj`` on every rank."""
    if not state.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sync_buffers(model: nn.Module, state: DistState) -> None:
    """Every buffer (BatchNorm statistics, masks) as on rank 0."""
    if not state.enabled:
        return
    comm = _comm_device(state)
    with torch.no_grad():
        for buf in model.buffers():
            t = buf.to(comm)
            dist.broadcast(t, src=0)
            if t is not buf:
                buf.copy_(t)


def wrap_ddp(model: nn.Module, state: DistState, find_unused_parameters: bool = False):
    """``model`` in ``DistributedDataParallel`` (or itself in a single process)."""
    if not state.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [state.device.index] if state.device.type == "cuda" else None
    return DistributedDataParallel(
        model,
        device_ids=ids,
        output_device=ids[0] if ids else None,
        find_unused_parameters=find_unused_parameters,
    )


def scoring_share(batches: int, state: DistState) -> list[int]:
    """Which of ``batches`` scoring batches this rank scores (round-robin)."""
    return list(range(state.rank, batches, state.world_size))


def reduce_scores(pruner, state: DistState) -> dict[str, torch.Tensor] | None:
    """A data-driven criterion's scores summed over ranks (``None`` when not distributed or
    the criterion reads weights only, identical on every rank): pass them to
    ``pruner.step(scores)`` so that every rank takes the same decision. A rank that scored no
    batch contributes zeros."""
    criterion = pruner.criterion
    if not state.enabled or not getattr(criterion, "data_driven", False):
        return None
    sizes = {g.name: g.size for g in pruner.groups}
    if criterion.batches:
        local = pruner.importance()
    else:
        local = {k: torch.zeros(n, dtype=torch.float64) for k, n in sizes.items()}
    names = list(sizes)
    flat = torch.cat([local[k].reshape(-1) for k in names] + [torch.tensor([criterion.batches])])
    total = all_reduce_sum(flat.double(), state)
    if int(total[-1]) == 0:
        raise ConfigError("no rank scored any batch; scoring_batches must be >= 1")
    return dict(zip(names, total[:-1].split([sizes[k] for k in names])))
