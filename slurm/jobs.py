"""Job callables: what a SLURM (or local) task runs.

A ``StageJob`` is a small picklable object: the path of the run's resolved
config.yaml and a stage name. ``__call__`` imports the library late (the submitting
process stays light), exports torch.distributed's variables from submitit's job
environment, and runs the stage on this rank.

Preemption and time-outs: submitit sends USR2 and, on rank 0, calls ``checkpoint``
and requeues the job. A signal can land in the middle of a training step, where
saving would store a half-updated model, so while a stage can stop cooperatively
(training) the signal only records a stop request (``imret.stopping``). The trainer
finishes its step, the ranks agree, rank 0 saves, and only then is submitit's own
handler run: ``checkpoint`` returns this job as a ``DelayedSubmission``, submitit
requeues it, and the requeued job resumes from the checkpoint just written. Stages
that cannot stop cooperatively get submitit's handler at once (their finished parts
are kept on disk and skipped when the job runs again).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from types import FrameType
from typing import Any

import submitit


class StageJob:
    def __init__(self, config_path: str, stage: str, one_gpu_per_rank: bool = True) -> None:
        self.config_path = config_path
        self.stage = stage
        self.one_gpu_per_rank = one_gpu_per_rank

    def __call__(self) -> dict[str, Any]:
        _log_allocation()
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=self.one_gpu_per_rank)
        from imret import stopping
        from imret.config import load_yaml
        from imret.pipeline import run_stage

        submitit_handler = _defer_preemption_signal()
        cfg = load_yaml(self.config_path)
        try:
            return run_stage(cfg, self.stage)
        except stopping.StopRequested:
            _requeue(submitit_handler)
            raise AssertionError("unreachable: the job exits for its requeue")

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # By the time submitit calls this, the trainer has saved its state at a safe point (see
        # the module docstring); the requeued job resumes from the newest checkpoint.
        return submitit.helpers.DelayedSubmission(StageJob(self.config_path, self.stage, self.one_gpu_per_rank))

    def __repr__(self) -> str:
        return f"StageJob({self.stage}, {self.config_path})"


class ArrayTaskJob:
    """One task of an array sub-stage (``imret.pipeline.ArrayStep``), e.g. a database shard's search."""

    def __init__(self, config_path: str, step: str, task_index: int, num_tasks: int) -> None:
        self.config_path, self.step, self.task_index, self.num_tasks = config_path, step, task_index, num_tasks

    def __call__(self) -> str:
        _log_allocation()
        from imret.config import load_yaml
        from imret.pipeline import array_step, run_array_task

        cfg = load_yaml(self.config_path)
        out = run_array_task(cfg, array_step(self.step), self.task_index, self.num_tasks)
        print(f"{self.step}: task {self.task_index + 1}/{self.num_tasks} -> {out}", flush=True)
        return str(out)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(ArrayTaskJob(self.config_path, self.step, self.task_index,
                                                               self.num_tasks))


def _log_allocation() -> None:
    """One line per task saying what the scheduler gave it (read before the rank's GPU is picked)."""
    env = submitit.JobEnvironment()
    gpus = os.environ.get("SLURM_GPUS_ON_NODE", "0")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    print(f"imret: job {env.job_id} rank {env.global_rank}/{env.num_tasks} on node {env.node}/{env.num_nodes} "
          f"({env.hostname}); gpus on node: {gpus}; CUDA_VISIBLE_DEVICES={visible or '(unset)'}", flush=True)


def _defer_preemption_signal() -> Any:
    """Route the preemption signal to a stop request while a stage cooperates; return submitit's handler."""
    from imret import stopping

    signum = submitit.JobEnvironment._usr_sig()
    submitit_handler = signal.getsignal(signum)

    def on_signal(sig: int, frame: FrameType | None) -> None:
        if stopping.is_cooperating():
            print(f"imret: received {signal.Signals(sig).name}; stopping at the next safe point", flush=True)
            stopping.request()
        elif callable(submitit_handler):
            submitit_handler(sig, frame)

    signal.signal(signum, on_signal)
    return submitit_handler


def _requeue(submitit_handler: Any) -> None:
    """After a cooperative stop: rank 0 lets submitit checkpoint and requeue; the others wait for it.

    The other ranks must not exit first: with ``srun --kill-on-bad-exit`` their exit
    could end rank 0 before it has requeued the job. So they block in a collective
    that rank 0 never joins; it fails as soon as rank 0 exits after requeuing (or the
    scheduler ends them with the job), and only then do they leave.
    """
    import torch.distributed as dist

    rank = submitit.JobEnvironment().global_rank
    if rank == 0 and callable(submitit_handler):
        submitit_handler(submitit.JobEnvironment._usr_sig(), None)  # calls checkpoint(), requeues, exits
    if dist.is_initialized():
        try:
            dist.barrier()
        except Exception:  # rank 0 is gone: the requeue is under way
            pass
    time.sleep(0.5)
    sys.exit(-1)
