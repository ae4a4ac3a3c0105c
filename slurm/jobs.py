"""Job callables: what a SLURM (or local) task runs.

A ``StageJob`` is a small picklable object: the path of the run's resolved
config.yaml and a stage name. ``__call__`` imports the library late (the submitting
process stays light), exports torch.distributed's variables from submitit's job
environment, and runs the stage on this rank. ``checkpoint`` is submitit's
preemption / time-out hook: it returns the same job as a ``DelayedSubmission``, so
submitit requeues it and the stage resumes from its last checkpoint.
"""

from __future__ import annotations

from typing import Any

import submitit


class StageJob:
    def __init__(self, config_path: str, stage: str, one_gpu_per_rank: bool = True) -> None:
        self.config_path = config_path
        self.stage = stage
        self.one_gpu_per_rank = one_gpu_per_rank

    def __call__(self) -> dict[str, Any]:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=self.one_gpu_per_rank)
        from imret.config import load_yaml
        from imret.pipeline import run_stage

        cfg = load_yaml(self.config_path)
        return run_stage(cfg, self.stage)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # Nothing to save here: training checkpoints itself every train.checkpoint_every steps
        # and at every epoch end, and resumes from the newest one when the job restarts.
        return submitit.helpers.DelayedSubmission(StageJob(self.config_path, self.stage, self.one_gpu_per_rank))

    def __repr__(self) -> str:
        return f"StageJob({self.stage}, {self.config_path})"
