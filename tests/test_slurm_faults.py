"""Faults on a real SLURM scheduler (the local cluster): a second submission, USR2 to the batch shell,
scancel of a training job, and a rank killed by the kernel."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from imret import checkpoint
from imret.config import save_yaml
from imret.pipeline import STAGES
from imret.rundir import RunDir
from launch.status import main as status
from slurm.chain import submit_stage
from slurm.state import slurm_state
from tests.fault_helpers import SLOW_LOSS, kill_session, start_submit, submissions, text, tiny_experiments
from tests.helpers import wait_until
from tests.test_train import tiny_config

pytestmark = pytest.mark.slurm
SLOW = dict(loss__terms=[{"name": SLOW_LOSS}], train__checkpoint_every=1000, resources__tasks_per_node=2)


def state_of(job_id: str) -> str:
    state = slurm_state(str(job_id))
    return state.state if state else "GONE"


def start(cfg):
    save_yaml(cfg, RunDir(cfg.run_dir).config)
    return submit_stage(cfg, STAGES["train"], "slurm", RunDir(cfg.run_dir).config)


def newest_state(cfg) -> dict:
    return checkpoint.load_state(checkpoint.Checkpointer(RunDir(cfg.run_dir).ckpt).latest())


def task_pid(job_id: str, rank: int) -> int | None:
    """The pid of one rank of a running job (the local cluster's nodes are this machine)."""
    for proc in Path("/proc").iterdir():
        try:
            env = dict(v.split("=", 1) for v in (proc / "environ").read_text().split("\0") if "=" in v)
            cmdline = (proc / "cmdline").read_text()
        except (OSError, ValueError):
            continue
        if (env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_PROCID") == str(rank)
                and "submitit.core._submit" in cmdline):
            return int(proc.name)
    return None


def test_a_second_submission_is_refused_while_the_first_ones_jobs_live(slurm_cluster, tiny_data, tmp_path):
    experiments = tiny_experiments(tmp_path, tiny_data, stages=["train", "extract"])
    argv = ("--exp", "tiny", "--cluster", "slurm", "--set", "run.name=twice")
    procs = [start_submit(experiments, *argv, log_dir=tmp_path / f"submit{i}") for i in range(2)]
    try:
        codes = sorted(p.wait(timeout=300) for p in procs)
        assert codes == [0, 2], [text(tmp_path / f"submit{i}" / "err") for i in range(2)]
        jobs = [e["job_id"] for e in submissions(tmp_path / "runs" / "twice")]
        assert len(jobs) == 2  # one chain: train, extract
        accepted, refused = (0, 1) if procs[0].returncode == 0 else (1, 0)
        assert "--set run.name=twice" in text(tmp_path / f"submit{accepted}" / "out")  # the status hint finds it
        err = text(tmp_path / f"submit{refused}" / "err")
        assert err.startswith("submit: error:") and "Traceback" not in err, err
        if "scancel" in err:  # refused after the first one's jobs were queued: they are named
            assert f"scancel {' '.join(jobs)}" in err
        else:  # refused while the first one was still submitting
            assert "another launch/submit.py" in err
        # And once the chain is queued, a resubmission is refused, naming its jobs.
        again = start_submit(experiments, *argv, log_dir=tmp_path / "again")
        assert again.wait(timeout=300) == 2
        assert f"scancel {' '.join(jobs)}" in text(tmp_path / "again" / "err")
    finally:
        for p in procs:
            kill_session(p)
        queued = [e["job_id"] for e in submissions(tmp_path / "runs" / "twice")]
        if queued:  # the chain is not needed past this point: leave the cluster to the tests after this one
            subprocess.run(["scancel", *queued], capture_output=True, timeout=60)
        subprocess.run(["scancel", *[e["job_id"] for e in submissions(tmp_path / "runs" / "twice")]])


def test_usr2_to_the_batch_shell_checkpoints_requeues_and_resumes_exactly(slurm_cluster, tiny_data, tmp_path,
                                                                          capsys):
    configs = {name: tiny_config(tiny_data, tmp_path, name, train__epochs=4, **SLOW) for name in ("whole", "signalled")}
    jobs = {name: start(cfg) for name, cfg in configs.items()}
    job, entry = jobs["signalled"]
    log = Path(entry.stdout)
    assert wait_until(lambda: "step 2/5" in text(log), 300, poll=0.2)
    # As `--signal=B:USR2@...` does at a time limit: the signal reaches the batch shell only.
    subprocess.run(["scancel", "--signal=USR2", "--batch", str(job.job_id)], check=True)
    for running, _ in jobs.values():
        assert wait_until(running.done, 600)
        running.results()
    said = text(log)
    assert "stop requested; saved at global step" in said and "train: resumed from" in said
    shown = subprocess.run(["scontrol", "show", "job", str(job.job_id)], capture_output=True, text=True).stdout
    assert "Restarts=1" in shown  # requeued under its own id
    ours, reference = newest_state(configs["signalled"]), newest_state(configs["whole"])
    assert ours["position"] == reference["position"] == {"epoch": 4, "step": 0, "global_step": 20}
    assert all(torch.equal(ours["model"][k], v) for k, v in reference["model"].items())
    capsys.readouterr()
    status_of(configs["signalled"], tmp_path)
    assert re.search(r"requeued 1 time", capsys.readouterr().out)


def status_of(cfg, tmp_path: Path) -> int:
    experiments = tiny_experiments(tmp_path / f"status-{cfg.name}", Path(cfg.data.root))
    return status(["--experiments", str(experiments), "--exp", "tiny", "--set", f"run.root={cfg.run.root}",
                   "--set", f"run.name={cfg.run.name}"])


def test_scancel_saves_a_checkpoint_within_the_grace_period(slurm_cluster, tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, "cancelled", train__epochs=40, **SLOW)
    job, entry = start(cfg)
    log = Path(entry.stdout)
    assert wait_until(lambda: "epoch 2/40 step 3/5" in text(log), 300, poll=0.1)
    subprocess.run(["scancel", str(job.job_id)], check=True)  # SIGTERM, then SIGKILL after KillWait
    assert wait_until(lambda: state_of(job.job_id) in ("CANCELLED", "GONE"), 120)
    said = text(log)
    assert "stop requested; saved at global step" in said, said + text(Path(entry.stderr))
    step = newest_state(cfg)["position"]["global_step"]
    assert step >= 8 and step % 5  # the steps after the epoch-end checkpoint (step 5) were kept


def test_a_rank_killed_by_the_kernel_shows_as_the_root_cause(slurm_cluster, tiny_data, tmp_path, capsys):
    cfg = tiny_config(tiny_data, tmp_path, "killed", train__epochs=40, resources__dist_timeout_s=30, **SLOW)
    job, entry = start(cfg)
    assert wait_until(lambda: "step 2/5" in text(Path(entry.stdout)), 300, poll=0.2)
    pid = task_pid(str(job.job_id), 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # what the OOM killer does
    assert wait_until(lambda: state_of(job.job_id) == "FAILED", 120)
    capsys.readouterr()
    assert status_of(cfg, tmp_path) == 1
    shown = capsys.readouterr().out
    assert re.search(r"cause: srun: error: n\d: task 1: Killed", shown), shown  # the root cause, named
    assert re.search(rf"job {job.job_id}: FAILED, (exit code \d+|signal \d+)", shown), shown
