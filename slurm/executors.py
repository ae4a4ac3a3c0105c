"""Turning a stage's resources into a submitit executor: SLURM, local processes, or in-process."""

from __future__ import annotations

import copy
import dataclasses
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from imret.config import ExperimentConfig, ResourcesConfig
from imret.pipeline import STAGES

MODES = ("auto", "slurm", "local", "debug")

# The batch shell runs srun in the foreground, and bash acts on a trapped signal only once
# its foreground command ends; an untrapped USR2 kills it (the job FAILED with signal 12, no
# checkpoint). `scancel --signal=USR2 --batch` and sites that use `--signal=B:USR2@...` send
# USR2 to the batch shell only. So the script's `srun` becomes this function: it runs the
# step in the background and waits for it, passing USR2 on to the step (srun forwards it to
# every task), and outlives SIGTERM, which SLURM sends to the ranks themselves as well: they
# save before KillWait runs out, and the job ends when they have.
BATCH_SHELL_SIGNALS = [
    "# imret: pass USR2 sent to this batch shell on to the ranks; wait for them through SIGTERM",
    "srun() {",
    "    command srun \"$@\" &",
    "    local step=$! status",
    "    trap 'imret_signalled=1; kill -USR2 '\"$step\"' 2>/dev/null' USR2",
    "    trap 'imret_signalled=1' TERM",
    "    while :; do",
    "        imret_signalled=0",
    "        wait \"$step\"; status=$?",
    "        ((imret_signalled)) || return \"$status\"",
    "    done",
    "}",
]


def slurm_available() -> bool:
    """SLURM is usable when sbatch is on PATH and the controller answers."""
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return False
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return ping.returncode == 0 and "UP" in ping.stdout


def resolve_mode(mode: str) -> str:
    if mode == "auto":
        return "slurm" if slurm_available() else "local"
    if mode == "slurm" and not slurm_available():
        raise ValueError("--cluster slurm: no SLURM controller answers (`scontrol ping` failed or sbatch is not on "
                         "PATH). Start one with `slurm/local_cluster.sh up`, or use --cluster local.")
    return mode


def stage_resources(cfg: ExperimentConfig, stage: str) -> ResourcesConfig:
    """The resources of one stage: the experiment's, with that stage's overrides applied."""
    res = copy.deepcopy(cfg.resources)
    override = res.stages.get(stage)
    if override:
        for f in dataclasses.fields(override):
            value = getattr(override, f.name)
            if value is not None:
                setattr(res, f.name, value)
    res.stages = {}
    return res


def tasks_per_node(res: ResourcesConfig) -> int:
    """Ranks per node: one per GPU, else the configured number (1 by default)."""
    return res.gpus_per_node or res.tasks_per_node or 1


@dataclass
class Shape:
    """How many processes a stage runs as, and where."""

    nodes: int
    tasks_per_node: int
    gpus_per_node: int

    @property
    def ranks(self) -> int:
        return self.nodes * self.tasks_per_node


def stage_shape(cfg: ExperimentConfig, stage: str, mode: str) -> Shape:
    res = stage_resources(cfg, stage)
    explicit = cfg.resources.stages.get(stage)
    if not STAGES[stage].all_ranks and not (explicit and (explicit.nodes or explicit.tasks_per_node)):
        return Shape(1, 1, res.gpus_per_node)  # one process that sees all GPUs of its node
    if mode in ("local", "debug"):
        ranks = 1 if mode == "debug" else res.local_ranks
        return Shape(1, ranks, 0)
    return Shape(res.nodes, tasks_per_node(res), res.gpus_per_node)


def slurm_parameters(res: ResourcesConfig, shape: Shape, name: str) -> dict[str, Any]:
    """The AutoExecutor parameters of a SLURM job of this shape."""
    params: dict[str, Any] = {
        "name": name, "nodes": shape.nodes, "tasks_per_node": shape.tasks_per_node,
        "cpus_per_task": res.cpus_per_task, "timeout_min": res.time_min,
        "slurm_signal_delay_s": res.signal_delay_s,
        # a rank that fails ends the whole job step, so a hung peer cannot keep the allocation
        "slurm_srun_args": ["--kill-on-bad-exit=1"],
        # a job whose dependency failed is cancelled rather than left pending for ever
        "slurm_additional_parameters": {"kill-on-invalid-dep": "yes"},
        "slurm_setup": list(BATCH_SHELL_SIGNALS),
    }
    if shape.gpus_per_node:
        params["gpus_per_node"] = shape.gpus_per_node
    if res.mem_gb:
        params["mem_gb"] = res.mem_gb
    for key in ("partition", "account", "qos", "constraint", "exclude"):
        if getattr(res, key):
            params[f"slurm_{key}"] = getattr(res, key)
    return params


def make_executor(cfg: ExperimentConfig, stage: str, mode: str, folder: Path,
                  dependency: str | None = None) -> tuple[submitit.AutoExecutor, Shape]:
    shape = stage_shape(cfg, stage, mode)
    res = stage_resources(cfg, stage)
    requeues = {f"{mode}_max_num_timeout": res.max_requeues} if mode in ("slurm", "local") else {}
    executor = submitit.AutoExecutor(folder=folder, cluster=mode, **requeues)
    name = f"{cfg.name}:{stage}"
    if mode == "slurm":
        params = slurm_parameters(res, shape, name)
        if dependency:
            params["slurm_dependency"] = dependency
        executor.update_parameters(**params)
    elif mode == "local":
        executor.update_parameters(name=name, tasks_per_node=shape.tasks_per_node, nodes=1,
                                   timeout_min=res.time_min, gpus_per_node=0)
    return executor, shape


def sbatch_options(params: dict[str, Any]) -> dict[str, Any]:
    """AutoExecutor parameters as the keyword arguments of submitit's sbatch writer.

    This is the translation submitit's AutoExecutor makes for SLURM: generic names are renamed by the
    SlurmExecutor's own table, the generic memory is formatted as sbatch wants it, and `slurm_` options
    lose their prefix. Only class-level helpers are used, because constructing a SlurmExecutor fails
    where srun is not installed, and a dry run must work on a laptop.
    """
    from submitit.slurm.slurm import SlurmExecutor, _convert_mem

    renames = SlurmExecutor._equivalence_dict()
    options: dict[str, Any] = {}
    for key, value in params.items():
        if key.startswith("slurm_"):
            options[key.removeprefix("slurm_")] = value
        elif key == "mem_gb":
            options[renames[key]] = _convert_mem(value)
        else:
            options[renames[key]] = value
    unknown = set(options) - SlurmExecutor._valid_parameters()
    assert not unknown, f"not sbatch options of submitit: {sorted(unknown)}"
    return options


def sbatch_preview(cfg: ExperimentConfig, stage: str, folder: Path, dependency: str | None = None) -> str:
    """The sbatch script submitit would write for this stage (without submitting anything, and without srun)."""
    from submitit.slurm.slurm import _make_sbatch_string

    shape = stage_shape(cfg, stage, "slurm")
    params = slurm_parameters(stage_resources(cfg, stage), shape, f"{cfg.name}:{stage}")
    if dependency:
        params["slurm_dependency"] = dependency
    return _make_sbatch_string(command="<python -u -m submitit.core._submit ...>", folder=folder,
                               **sbatch_options(params))
