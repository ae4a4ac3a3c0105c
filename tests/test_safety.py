"""A non-finite loss stops training cleanly; a dead rank takes the job down instead of hanging it."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from imret import checkpoint
from imret.distributed import DistInfo
from imret.rundir import RunDir
from imret.train import NonFiniteLoss
from tests.test_train import tiny_config


class NanOnThirdCall(nn.Module):
    """Contrastive-like loss that returns NaN the third time it is called."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = (embeddings @ embeddings.T).mean()
        return loss * float("nan") if self.calls == 3 else loss


class DieOnRank1(nn.Module):
    """Kills its own process on rank 1 at the third step (a node dying mid-training)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 3 and torch.distributed.is_initialized() and torch.distributed.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return (embeddings @ embeddings.T).mean()


def test_nan_loss_names_step_keys_and_the_intact_checkpoint(tiny_data, tmp_path):
    from imret import train

    cfg = tiny_config(tiny_data, tmp_path, "nan", train__checkpoint_every=1,
                      loss__terms=[{"name": "tests.test_safety:NanOnThirdCall"}])
    with pytest.raises(NonFiniteLoss) as err:
        train.train_stage(cfg, RunDir(cfg.run_dir), DistInfo())
    message = str(err.value)
    last = checkpoint.Checkpointer(RunDir(cfg.run_dir).ckpt).latest()
    assert "the loss is nan at epoch 1, step 2 (global step 2)" in message
    assert "batch keys: t0" in message and str(last) in message and last.name == "step-00000002"
    state = checkpoint.load_state(last)
    assert state["position"]["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_a_dead_rank_fails_the_job_within_the_timeout(tiny_data, tmp_path):
    from imret.config import save_yaml
    from slurm.executors import make_executor
    from slurm.jobs import StageJob

    cfg = tiny_config(tiny_data, tmp_path, "dead", loss__terms=[{"name": "tests.test_safety:DieOnRank1"}],
                      resources__dist_timeout_s=30, resources__local_ranks=2)
    save_yaml(cfg, RunDir(cfg.run_dir).config)
    executor, _ = make_executor(cfg, "train", "local", RunDir(cfg.run_dir).jobs / "%j")
    job = executor.submit(StageJob(str(RunDir(cfg.run_dir).config), "train"))
    started = time.monotonic()
    while not job.done() and time.monotonic() - started < 30 + 120:  # bound: the timeout plus start-up
        time.sleep(0.5)
    assert job.done(), "the surviving rank is still running after the process-group timeout"
    with pytest.raises(Exception):
        job.results()
    survivor = Path(job.paths.stderr).read_text()  # rank 0's log
    # gloo reports the peer's death at once (connection reset); a hung peer would hit the timeout
    assert any(sign in survivor for sign in ("Connection reset by peer", "Connection closed by peer", "Timed out"))
    assert not RunDir(cfg.run_dir).is_done("train")
