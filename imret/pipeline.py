"""Stages and their graph: train -> extract -> evaluate (-> cluster).

A stage is a function ``run(cfg, run_dir, dist_info) -> summary`` in its own module,
imported only when it runs. ``run_stage`` is what every launcher ends in, on every
rank: it joins the process group, skips the stage if its ``.done`` marker exists,
runs it, and has rank 0 write the marker with the summary. ``slurm/`` decides where
and how many processes run it; nothing here knows about SLURM.
"""

from __future__ import annotations

import importlib
import os
import time
from dataclasses import dataclass
from typing import Any

from imret import distributed
from imret.config import ExperimentConfig
from imret.rundir import RunDir


@dataclass(frozen=True)
class Stage:
    name: str
    target: str  # "module:function"
    all_ranks: bool  # True: runs on every rank of the job shape; False: one process
    needs: tuple[str, ...]  # stages of the same run that must be done first


STAGES: dict[str, Stage] = {
    "train": Stage("train", "imret.train:run", True, ()),
    "extract": Stage("extract", "imret.extract:run", True, ("train",)),
    "evaluate": Stage("evaluate", "imret.evaluate:run", False, ("extract",)),
    "cluster": Stage("cluster", "imret.cluster:run", False, ("extract",)),
}


def plan(cfg: ExperimentConfig) -> list[Stage]:
    """The experiment's stages in order."""
    return [STAGES[name] for name in cfg.stages]


def pending(cfg: ExperimentConfig) -> tuple[list[Stage], list[Stage]]:
    """(done, to run) among the experiment's stages."""
    run = RunDir(cfg.run_dir)
    stages = plan(cfg)
    return [s for s in stages if run.is_done(s.name)], [s for s in stages if not run.is_done(s.name)]


def run_stage(cfg: ExperimentConfig, stage: str, info: distributed.DistInfo | None = None) -> dict[str, Any]:
    """Run one stage in this process (one rank of the job). Returns the stage's summary."""
    run = RunDir(cfg.run_dir)
    info = distributed.init(info or distributed.from_env(), cfg.resources.dist_timeout_s)
    if info.backend == "gloo":
        _limit_cpu_threads(cfg.resources.cpus_per_task, info.local_world_size)
    if run.is_done(stage):
        if info.is_main:
            print(f"{stage}: already done ({run.marker(stage)}), skipped", flush=True)
        return run.done_info(stage)
    _check_needs(cfg, run, stage)
    module, _, fn = STAGES[stage].target.partition(":")
    started = time.time()
    if info.is_main:
        print(f"{stage}: starting on {info.world_size} rank(s), backend {info.backend}", flush=True)
    summary = getattr(importlib.import_module(module), fn)(cfg, run, info)
    distributed.barrier(info)
    if info.is_main:
        run.mark_done(stage, {"seconds": round(time.time() - started, 1), "world_size": info.world_size,
                              "config_digest": cfg.digest(), "summary": summary})
        print(f"{stage}: done in {time.time() - started:.1f} s", flush=True)
    # Leave the process group together. A group left to interpreter shutdown can abort a rank
    # ("terminate called without an active exception") when its peer has already gone, and
    # with srun --kill-on-bad-exit that fails a job whose work had finished.
    distributed.barrier(info)
    distributed.shutdown()
    return summary


def _limit_cpu_threads(cpus_per_task: int, local_ranks: int) -> None:
    """One intra-op thread pool per CPU rank, sized so the ranks of a node do not oversubscribe it.

    Under SLURM a task is usually bound to its own cpus_per_task CPUs; without binding
    (submitit's local executor, a laptop) every rank sees every CPU, so they are shared.
    """
    import torch

    visible = len(os.sched_getaffinity(0))
    share = visible if visible <= cpus_per_task else max(1, min(cpus_per_task, visible // max(local_ranks, 1)))
    torch.set_num_threads(share)


def _check_needs(cfg: ExperimentConfig, run: RunDir, stage: str) -> None:
    for need in STAGES[stage].needs:
        if need in cfg.stages and not run.is_done(need):
            raise RuntimeError(f"stage '{stage}' needs '{need}' of {run.root} to be done first ({run.marker(need)} is missing)")
