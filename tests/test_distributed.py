"""imret.distributed: the environment read into a DistInfo, and the collectives on a real 2-rank gloo group."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from imret import distributed
from imret.distributed import DistInfo
from tests.helpers import run_ranks

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "node-7", "MASTER_PORT": "31234"}


@pytest.fixture
def clean_env(monkeypatch):
    """No distributed variable from the shell running the tests."""
    for name in (*TORCHRUN, "IMRET_DIST_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_torchrun_variables_become_the_dist_info(clean_env):
    for name, value in TORCHRUN.items():
        clean_env.setenv(name, value)
    clean_env.setenv("IMRET_DIST_BACKEND", "gloo")
    info = distributed.from_env()
    assert info == DistInfo(rank=3, world_size=8, local_rank=1, local_world_size=2, master_addr="node-7",
                            master_port=31234, backend="gloo")
    assert not info.is_main and info.distributed


def test_a_mapping_can_stand_for_the_environment(clean_env):
    info = distributed.from_env({"WORLD_SIZE": "4", "RANK": "0"})
    assert (info.rank, info.world_size, info.local_rank) == (0, 4, 0)
    assert info.local_world_size == 4  # one node holding every rank, unless told otherwise
    assert (info.master_addr, info.master_port) == ("127.0.0.1", 29500)
    assert info.is_main and info.distributed


def test_without_world_size_the_run_is_one_process(clean_env):
    clean_env.setenv("RANK", "5")  # a stray rank alone does not make a job
    info = distributed.from_env()
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)


def test_slurm_variables_alone_are_not_read(clean_env):
    slurm = {"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "2"}
    for name, value in slurm.items():
        clean_env.setenv(name, value)
    info = distributed.from_env()
    assert (info.rank, info.world_size) == (0, 1)  # slurm/ exports the standard variables; imret reads those only


def test_the_backend_can_be_forced(clean_env):
    clean_env.setenv("IMRET_DIST_BACKEND", "mpi")
    assert distributed.default_backend() == "mpi"
    assert distributed.from_env({"WORLD_SIZE": "2"}).backend == "mpi"
    clean_env.delenv("IMRET_DIST_BACKEND")
    assert distributed.default_backend() == ("nccl" if torch.cuda.is_available() else "gloo")


def test_a_gloo_rank_works_on_the_cpu():
    assert DistInfo(backend="gloo").device == torch.device("cpu")


def test_one_process_needs_no_group():
    info = DistInfo()
    assert distributed.init(info) is info
    assert not dist.is_initialized()
    x = torch.arange(3.0, requires_grad=True)
    assert distributed.gather_with_grad(x, info) is x
    assert torch.equal(distributed.all_reduce_sum(torch.tensor([2.0]), info), torch.tensor([2.0]))
    assert distributed.broadcast_object({"a": 1}, info) == {"a": 1}
    distributed.barrier(info)  # returns at once
    distributed.shutdown()  # nothing to leave; no error


def collectives(info: DistInfo) -> dict:
    """Every helper of imret.distributed, on one rank of a real group (one spawn for all: spawning is slow)."""
    group = (dist.get_rank(), dist.get_world_size(), dist.get_backend())
    again = distributed.init(info)  # joining twice is a no-op, not an error
    x = torch.full((2, 3), float(info.rank + 1), requires_grad=True)
    gathered = distributed.gather_with_grad(x, info)
    weights = torch.arange(gathered.numel(), dtype=torch.float32).reshape(gathered.shape)
    (gathered * weights).sum().backward()
    total = distributed.all_reduce_sum(torch.tensor([float(info.rank + 1)]), info)
    chosen = distributed.broadcast_object({"rank": info.rank, "words": ["a", "b"]}, info)
    distributed.barrier(info)
    distributed.shutdown()
    return {"group": group, "again": again == info, "gathered": gathered.detach(), "grad": x.grad,
            "weights": weights, "total": total, "chosen": chosen, "left": not dist.is_initialized()}


def test_the_collectives_on_two_real_gloo_ranks():
    results = run_ranks(collectives, 2)
    for rank, out in enumerate(results):
        assert out["group"] == (rank, 2, "gloo")
        assert out["again"]
        # rank order: rank 0's rows (ones), then rank 1's (twos)
        assert torch.equal(out["gathered"], torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)]))
        # the gradient reaches this rank's own slice only
        assert torch.equal(out["grad"], out["weights"][2 * rank:2 * rank + 2])
        assert torch.equal(out["total"], torch.tensor([3.0]))
        assert out["chosen"] == {"rank": 0, "words": ["a", "b"]}
        assert out["left"]  # shutdown leaves the group

