"""Stages and their graph: train -> extract -> evaluate (-> cluster): the one list of them.

A stage is a function ``fn(cfg, run_dir, dist_info) -> summary`` in its own module,
imported only when it runs; a stage may have array sub-stages (``ArrayStep``) that run
as independent tasks before it, such as the database shards of a sharded evaluation.

``run_stage`` is what every launcher ends in, on every rank: it joins the process
group, skips the stage if its ``.done`` marker exists, runs it, and has rank 0 write
the marker with the summary; ``run_array_task`` runs one task of a sub-stage.
``slurm/`` decides where and how many processes run them; nothing here knows about
SLURM.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imret import distributed
from imret.config import STAGE_ORDER, ExperimentConfig
from imret.rundir import RunDir


@dataclass(frozen=True)
class ArrayStep:
    """An array sub-stage: ``tasks(cfg)`` independent tasks that run before the stage's own job.

    ``target`` is called as ``fn(cfg, run, task_index, num_tasks)`` in each task; the
    stage itself (its merge) runs once all of them are done. ``needed(cfg)`` says whether
    this experiment runs the sub-stage at all.
    """

    name: str
    target: str  # "module:function"
    tasks: Callable[[ExperimentConfig], int]
    needed: Callable[[ExperimentConfig], bool]


@dataclass(frozen=True)
class Stage:
    name: str
    target: str  # "module:function", called as fn(cfg, run, dist_info) on every rank of the job
    all_ranks: bool  # True: runs on every rank of the job shape; False: one process
    needs: tuple[str, ...]  # stages of the same run that must be done first
    arrays: tuple[ArrayStep, ...] = ()  # array sub-stages submitted before the stage's own job

    def array_steps(self, cfg: ExperimentConfig) -> list[ArrayStep]:
        """The sub-stages this experiment runs before this stage's job (in order)."""
        return [step for step in self.arrays if step.needed(cfg)]


def _sharded(cfg: ExperimentConfig) -> bool:
    return cfg.evaluate.db_shards > 1


def _db_shards(cfg: ExperimentConfig) -> int:
    return cfg.evaluate.db_shards


STAGES: dict[str, Stage] = {
    "train": Stage("train", "imret.train:train_stage", True, ()),
    "extract": Stage("extract", "imret.extract:extract_stage", True, ("train",)),
    "evaluate": Stage("evaluate", "imret.evaluate.stage:evaluate_stage", False, ("extract",), arrays=(
        # pass 1: every query against one database shard; pass 2 (full-ranking map only):
        # each shard's negatives above every positive. The evaluate job then merges.
        ArrayStep("evaluate-search", "imret.evaluate.sharded:search_task", _db_shards, _sharded),
        ArrayStep("evaluate-count", "imret.evaluate.sharded:count_task", _db_shards,
                  lambda cfg: _sharded(cfg) and "map" in cfg.evaluate.metrics),
    )),
    "cluster": Stage("cluster", "imret.cluster.stage:cluster_stage", False, ("extract",)),
}
assert tuple(STAGES) == STAGE_ORDER, "imret.pipeline.STAGES must list the stages of imret.config.STAGE_ORDER"


def load_target(target: str) -> Callable[..., Any]:
    """The function a ``module:function`` target names (imported now, not before)."""
    module, _, fn = target.partition(":")
    return getattr(importlib.import_module(module), fn)


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
    started = time.time()
    if info.is_main:
        print(f"{stage}: starting on {info.world_size} rank(s), backend {info.backend}", flush=True)
    summary = load_target(STAGES[stage].target)(cfg, run, info)
    distributed.barrier(info)
    if info.is_main:
        run.mark_done(stage, {"seconds": round(time.time() - started, 1), "world_size": info.world_size,
                              "config_digest": cfg.digest(), "summary": summary})
        print(f"{stage}: done in {time.time() - started:.1f} s", flush=True)
    # Leave the process group together, so no rank is still in a collective when a peer exits.
    # Once DDP has used the group, torch keeps its threads alive even after this; a job process
    # therefore ends without C++ teardown (slurm/exiting.py), which could otherwise abort it.
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


def run_array_task(cfg: ExperimentConfig, step: ArrayStep, task_index: int, num_tasks: int) -> Any:
    """One task of an array sub-stage, in this process."""
    return load_target(step.target)(cfg, RunDir(cfg.run_dir), task_index, num_tasks)


def array_step(name: str) -> ArrayStep:
    """The array sub-stage called ``name`` (e.g. ``evaluate-search``)."""
    for stage in STAGES.values():
        for step in stage.arrays:
            if step.name == name:
                return step
    raise KeyError(f"no array sub-stage named {name!r}")
