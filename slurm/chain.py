"""Submitting an experiment's missing stages as a chain of jobs.

On SLURM every missing stage is submitted at once, each depending on the one before
(``afterok``), and the submitting command returns. Locally (submitit's local
executor) the stages run one after another while this process waits, showing the
rank-0 log as it grows. Every submission is recorded in ``jobs/submissions.json``
for ``launch/status.py``.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import submitit

from imret.config import ExperimentConfig
from imret.pipeline import Stage, pending
from imret.rundir import RunDir, atomic_write_json
from slurm.executors import make_executor
from slurm.jobs import ArrayTaskJob, StageJob
from slurm.waiting import Interrupted, StageFailed, StoppedWaiting, local_start, wait_for

__all__ = ["Interrupted", "StageFailed", "Submitted", "submit_chain", "submit_stage", "submit_sweep"]


@dataclass
class Submitted:
    stage: str
    job_id: str
    mode: str
    ranks: int
    stdout: str
    stderr: str
    submitted: str
    host: str = ""  # where it was submitted from: a local job's processes run there


def record(run: RunDir, entry: Submitted) -> None:
    path = run.jobs / "submissions.json"
    entries = json.loads(path.read_text()) if path.exists() else []
    entries.append(asdict(entry))
    atomic_write_json(path, entries)


def new_entry(stage: str, job: submitit.Job[Any], mode: str, ranks: int) -> Submitted:
    return Submitted(stage, str(job.job_id), mode, ranks, str(job.paths.stdout), str(job.paths.stderr),
                     time.strftime("%Y-%m-%d %H:%M:%S"), socket.gethostname())


def submit_stage(cfg: ExperimentConfig, stage: Stage, mode: str, config_path: Path,
                 dependency: str | None = None) -> tuple[submitit.Job[Any], Submitted]:
    run = RunDir(cfg.run_dir)
    executor, shape = make_executor(cfg, stage.name, mode, run.jobs / "%j", dependency)
    with local_start(mode == "local"):
        job = executor.submit(StageJob(str(config_path.resolve()), stage.name, one_gpu_per_rank=stage.all_ranks))
    entry = new_entry(stage.name, job, mode, shape.ranks)
    record(run, entry)
    return job, entry


def submit_chain(cfg: ExperimentConfig, mode: str, config_path: Path, wait: bool = False,
                 after: str | None = None, pdb: bool = False) -> list[Submitted]:
    """Submit every stage that is not done yet.

    On SLURM all of them go in at once, each after the previous (``afterok``; the first
    after job ``after`` when given: the last job of an upstream experiment); with
    ``wait`` this then follows them in order. Locally each stage runs and is waited
    for before the next is submitted (``pdb``: a ``debug`` stage's failure opens the debugger).
    """
    done, todo = pending(cfg)
    for stage in done:
        print(f"{cfg.name}: {stage.name}: already done ({RunDir(cfg.run_dir).marker(stage.name)}), skipped")
    submitted: list[tuple[submitit.Job[Any], Submitted]] = []
    previous = after
    for stage in todo:
        if mode == "slurm" and stage.array_steps(cfg):
            previous = submit_array_steps(cfg, stage, config_path, previous)
        dependency = f"afterok:{previous}" if (mode == "slurm" and previous) else None
        job, entry = submit_stage(cfg, stage, mode, config_path, dependency)
        submitted.append((job, entry))
        print(f"{cfg.name}: {stage.name}: submitted job {entry.job_id} ({mode}, {entry.ranks} rank(s))"
              + (f", after {previous}" if dependency else ""), flush=True)
        if mode != "slurm":
            wait_for(job, entry, pdb=pdb)
        previous = str(job.job_id)
    if mode == "slurm" and wait:
        try:
            for job, entry in submitted:
                wait_for(job, entry)
        except StoppedWaiting:
            ids = " ".join(entry.job_id for _, entry in submitted)
            raise StoppedWaiting(f"stopped waiting; jobs {ids} stay queued on SLURM (cancel them with "
                              f"`scancel {ids}`)") from None
    return [entry for _, entry in submitted]


def submit_array_steps(cfg: ExperimentConfig, stage: Stage, config_path: Path, after: str | None) -> str:
    """A stage's array sub-stages on SLURM, each an array after the one before (``afterok``).

    For a sharded evaluation these are ``evaluate-search`` (task i searches every query
    against database shard i) and, for the full-ranking ``map``, ``evaluate-count``;
    the stage's own job, submitted next, merges their files. Returns the last array's id.
    """
    run = RunDir(cfg.run_dir)
    previous = after
    for step in stage.array_steps(cfg):
        n = step.tasks(cfg)
        dependency = f"afterok:{previous}" if previous else None
        executor, shape = make_executor(cfg, stage.name, "slurm", run.jobs / "%j", dependency)
        executor.update_parameters(name=f"{cfg.name}:{step.name}", slurm_array_parallelism=n)
        with executor.batch():
            jobs = [executor.submit(ArrayTaskJob(str(config_path.resolve()), step.name, i, n)) for i in range(n)]
        for job in jobs:
            record(run, new_entry(step.name, job, "slurm", shape.ranks))
        previous = str(jobs[0].job_id).split("_")[0]
        print(f"{cfg.name}: {step.name}: submitted array {previous} of {n} task(s)"
              + (f", after {dependency.split(':', 1)[1]}" if dependency else ""), flush=True)
    assert previous is not None
    return previous


def submit_sweep(configs: list[tuple[ExperimentConfig, Path]], mode: str, log_dir: Path,
                 parallelism: int) -> list[Submitted]:
    """A sweep on SLURM: per stage, one array over the points that still need it.

    Task i of a stage's array depends on task i of the previous stage's array only
    (``aftercorr``), so one point's failure cancels that point's later stages, not
    the other points'. Points are grouped by the stages they still need, so a partly
    finished sweep resumes where each point stands.
    """
    groups: dict[tuple[str, ...], list[tuple[ExperimentConfig, Path]]] = {}
    for cfg, path in configs:
        _, todo = pending(cfg)
        if todo:
            groups.setdefault(tuple(s.name for s in todo), []).append((cfg, path))
        else:
            print(f"{cfg.run_dir}: every stage done, skipped")
    submitted: list[Submitted] = []
    for stages, members in groups.items():
        previous: str | None = None
        for stage_name in stages:
            previous, entries = _submit_array(members, stage_name, mode, log_dir, parallelism, previous)
            submitted.extend(entries)
    return submitted


def _submit_array(members: list[tuple[ExperimentConfig, Path]], stage_name: str, mode: str, log_dir: Path,
                  parallelism: int, previous_array: str | None) -> tuple[str, list[Submitted]]:
    from imret.pipeline import STAGES

    stage = STAGES[stage_name]
    dependency = f"aftercorr:{previous_array}" if previous_array else None
    executor, shape = make_executor(members[0][0], stage_name, mode, log_dir / "%j", dependency)
    executor.update_parameters(slurm_array_parallelism=parallelism)
    with executor.batch():
        jobs = [executor.submit(StageJob(str(path.resolve()), stage_name, stage.all_ranks)) for _, path in members]
    entries = []
    for (cfg, _), job in zip(members, jobs):
        entry = new_entry(stage_name, job, mode, shape.ranks)
        record(RunDir(cfg.run_dir), entry)
        entries.append(entry)
    array_id = str(jobs[0].job_id).split("_")[0]
    print(f"{stage_name}: submitted array {array_id} of {len(jobs)} task(s)"
          + (f", each after its task of {previous_array}" if previous_array else ""), flush=True)
    return array_id, entries
