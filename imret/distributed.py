"""The one place where an environment becomes a process group.

Every launcher ends in the same standard variables (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``): torchrun sets
them itself, and ``slurm/`` exports them from submitit's job environment (which covers
SLURM and submitit's local executor alike) before calling into the library. Without
them the run is a single process. imret itself never reads ``SLURM_*``.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    backend: str = "gloo"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def default_backend() -> str:
    """NCCL when this process can see a GPU, gloo otherwise (CPU jobs, laptops, tests)."""
    forced = os.environ.get("IMRET_DIST_BACKEND")
    if forced:
        return forced
    return "nccl" if torch.cuda.is_available() else "gloo"


def from_env(env: Mapping[str, str] | None = None) -> DistInfo:
    """Read the standard torch.distributed variables; absent ones mean a single process."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return DistInfo(backend=default_backend())
    world = int(env["WORLD_SIZE"])
    return DistInfo(
        rank=int(env.get("RANK", 0)),
        world_size=world,
        local_rank=int(env.get("LOCAL_RANK", 0)),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(env.get("MASTER_PORT", 29500)),
        backend=default_backend(),
    )


def init(info: DistInfo, timeout_s: float = 300) -> DistInfo:
    """Join the process group described by ``info`` (no-op for a single process).

    ``timeout_s`` bounds every collective, so a rank that died makes the others fail
    with an error instead of waiting forever.
    """
    if info.backend == "nccl":
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    if not info.distributed or dist.is_initialized():
        return info
    dist.init_process_group(
        backend=info.backend,
        init_method=f"tcp://{info.master_addr}:{info.master_port}",
        rank=info.rank,
        world_size=info.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return info


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def gather_with_grad(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate every rank's ``x`` (same shape on all ranks) in rank order.

    The local slice is the autograd-connected input itself; the other slices are
    constants. A loss over the result therefore back-propagates into this rank's part
    only, which is what DDP needs: each rank contributes the gradient of its own
    samples, and the sum over ranks is the single-process gradient (see
    ``imret.train`` for the matching scale).
    """
    if not info.distributed:
        return x
    parts = [torch.empty_like(x) for _ in range(info.world_size)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[info.rank] = x
    return torch.cat(parts)


def all_reduce_sum(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def broadcast_object(obj: object, info: DistInfo) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
