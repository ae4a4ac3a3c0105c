"""A training job preempted mid-run stops at a safe point, is requeued, resumes, and ends exactly as
an uninterrupted job. Runs the real job path: StageJob under submitit's local executor (2 ranks)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch
import torch.nn as nn

from imret import checkpoint
from imret.config import save_yaml
from imret.rundir import RunDir
from slurm.executors import make_executor
from slurm.jobs import StageJob
from tests.test_train import tiny_config


class SlowContrastive(nn.Module):
    """A contrastive loss that takes a quarter of a second, so the job is still running when signalled."""

    def __init__(self) -> None:
        super().__init__()
        from imret.losses.contrastive import ContrastiveLoss

        self.inner = ContrastiveLoss(neg_margin=0.8)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        time.sleep(0.25)
        return self.inner(embeddings, labels)


def submit(cfg):
    save_yaml(cfg, RunDir(cfg.run_dir).config)
    executor, _ = make_executor(cfg, "train", "local", RunDir(cfg.run_dir).jobs / "%j")
    return executor.submit(StageJob(str(RunDir(cfg.run_dir).config), "train"))


def rank_processes(job) -> list[int]:
    """The task processes that submitit's local controller started (its children)."""
    pid = job._process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children]


def wait(job, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not job.done() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job.done(), "job did not finish"


def test_preempted_job_resumes_to_the_weights_of_an_uninterrupted_one(tiny_data, tmp_path):
    shared = dict(loss__terms=[{"name": "tests.test_preemption:SlowContrastive"}], train__epochs=4,
                  train__checkpoint_every=1000, resources__local_ranks=2)
    whole = submit(tiny_config(tiny_data, tmp_path, "whole", **shared))
    wait(whole)
    whole.results()

    cfg = tiny_config(tiny_data, tmp_path, "preempted", **shared)
    job = submit(cfg)
    log = Path(job.paths.stdout)
    deadline = time.monotonic() + 120
    while not (log.exists() and "step 2/5" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in rank_processes(job):  # what SLURM does at a preemption: USR2 to every task
        os.kill(pid, signal.SIGUSR2)
    wait(job)
    job.results()  # the requeued job finished
    text = log.read_text()
    assert "stop requested; saved at global step" in text
    assert "train: resumed from" in text
    final = lambda c: checkpoint.load_state(checkpoint.Checkpointer(RunDir(c.run_dir).ckpt).latest())
    ours, reference = final(cfg), final(tiny_config(tiny_data, tmp_path, "whole", **shared))
    assert ours["position"] == reference["position"] == {"epoch": 4, "step": 0, "global_step": 20}
    for key, value in reference["model"].items():
        assert torch.equal(ours["model"][key], value), key
