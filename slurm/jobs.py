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
are kept on disk and skipped when the job runs again). SIGTERM and SIGINT stop the
same way but end the job instead of requeuing it (``slurm.signals``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import submitit

from slurm import exiting, signals

if TYPE_CHECKING:  # the library is imported late, in the job (the submitting process stays light)
    from imret.config import ExperimentConfig


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

        cfg = load_yaml(self.config_path)
        explain = _requeue_refused(cfg, self.stage)
        submitit_handler = signals.route(explain)
        try:
            summary = run_stage(cfg, self.stage)
        except stopping.StopRequested:
            signals.stopped()
            if stopping.purpose() == stopping.END:
                signals.await_requeue_request()
            if stopping.purpose() == stopping.REQUEUE:
                signals.requeue(submitit_handler, explain)
            signals.end(self.stage)
            raise AssertionError("unreachable: the rank exits for its requeue or its end")
        exiting.leave_without_teardown()
        return summary

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
        signals.route(_requeue_refused(cfg, self.step.split("-")[0]))
        out = run_array_task(cfg, array_step(self.step), self.task_index, self.num_tasks)
        print(f"{self.step}: task {self.task_index + 1}/{self.num_tasks} -> {out}", flush=True)
        exiting.leave_without_teardown()
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


def _requeue_refused(cfg: ExperimentConfig, stage: str) -> Callable[[str], str]:
    """The message for a job that submitit will not requeue again (one paragraph, no traceback)."""
    from slurm.executors import stage_resources

    limit = stage_resources(cfg, stage).max_requeues
    kept = (f"training is saved in {cfg.run_dir}/train/ckpt" if stage == "train"
            else "the parts it finished are kept")

    def explain(reason: str) -> str:
        job = submitit.JobEnvironment().job_id
        if "timed-out too many times" in reason:
            return (f"job {job} ({cfg.name}:{stage}) timed out and was not requeued: it has used the "
                    f"{limit} requeue(s) after time-outs that resources.max_requeues allows. Nothing is lost: {kept}. "
                    f"Submit the experiment again to continue from there, and raise resources.time_min (or "
                    f"resources.max_requeues) so that it fits.")
        return f"job {job} ({cfg.name}:{stage}) was not requeued ({reason}); {kept}. Submit the experiment again."

    return explain
