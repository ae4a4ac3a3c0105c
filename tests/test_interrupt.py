"""Stopping a local submission: Ctrl-C, a time-out past max_requeues, and --cluster debug without --pdb.

Each test runs ``launch/submit.py`` as a real process, with real ranks under submitit's local executor.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch.nn as nn

from imret import checkpoint
from imret.rundir import RunDir
from launch.submit import main as submit
from tests.fault_helpers import (ROOT, alive, child_env, children, kill_session, start_submit, submissions, text,
                                 tiny_experiments)
from tests.helpers import wait_until


class Boom(nn.Module):
    """A loss that always fails."""

    def forward(self, embeddings, labels):
        raise ValueError("the loss fails on purpose")


@pytest.mark.parametrize("target", ["process group", "submit alone"])
def test_ctrl_c_stops_the_ranks_at_a_safe_point_and_a_resubmission_resumes(target, tiny_data, tmp_path, capsys):
    # Epochs of 40 quarter-second steps: the stop lands well inside the first one, whatever the latency.
    experiments = tiny_experiments(tmp_path, tiny_data, train={"epochs": 2}, data={"steps_per_epoch": 40})
    run = tmp_path / "runs" / "tiny"
    proc = start_submit(experiments, "--exp", "tiny", "--cluster", "local", log_dir=tmp_path / "submit")
    out, err = tmp_path / "submit" / "out", tmp_path / "submit" / "err"
    try:
        assert wait_until(lambda: "epoch 1/2 step 2/40" in text(out), 240), text(err)
        controller = int(submissions(run)[0]["job_id"])
        ranks = children(controller)
        assert len(ranks) == 2
        if target == "process group":  # what the terminal does on Ctrl-C
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 130
        assert "Traceback" not in text(err) and "KeyboardInterrupt" not in text(err), text(err)
        assert not alive(controller) and not any(alive(r) for r in ranks)  # no orphans
        saved = checkpoint.Checkpointer(RunDir(run).ckpt).latest()
        assert saved is not None
        step = checkpoint.load_state(saved)["position"]["global_step"]
        assert 2 <= step < 40  # saved mid-epoch, at the stop (no epoch end has been reached)
        said = text(err) + text(out)
        assert f"saved at global step {step}" in said and "python launch/submit.py" in said and "--exp tiny" in said
    finally:
        kill_session(proc)

    if target == "submit alone":
        return  # this stop saved the same checkpoint as the other case; resuming is checked once, in that case
    # The resubmission resumes from that checkpoint and finishes the training.
    code = submit(["--experiments", str(experiments), "--exp", "tiny", "--cluster", "local"])
    assert code == 0, capsys.readouterr().err
    assert f"train: resumed from {saved}" in capsys.readouterr().out


def test_running_out_of_requeues_reads_as_a_message(tiny_data, tmp_path):
    # A 1-minute limit: submitit's local executor sends the time-out signal 30 s before it, and
    # max_requeues=0 allows no requeue.
    experiments = tiny_experiments(tmp_path, tiny_data, train={"epochs": 200},
                                   resources={"time_min": 1, "max_requeues": 0})
    proc = start_submit(experiments, "--exp", "tiny", "--cluster", "local", log_dir=tmp_path / "submit")
    try:
        assert proc.wait(timeout=240) == 1
        err = text(tmp_path / "submit" / "err")
        assert "Traceback" not in err and "UncompletedJobError" not in err, err
        assert "resources.max_requeues" in err and "timed out" in err, err
    finally:
        kill_session(proc)


def test_debug_mode_reports_a_failure_without_a_debugger_unless_asked(tiny_data, tmp_path):
    experiments = tiny_experiments(tmp_path, tiny_data, loss={"terms": [{"name": "tests.test_interrupt:Boom"}]})
    cmd = [sys.executable, str(ROOT / "launch" / "submit.py"), "--experiments", str(experiments), "--exp", "tiny",
           "--cluster", "debug"]
    done = subprocess.run(cmd, cwd=ROOT, input="c\n" * 5, capture_output=True, text=True, timeout=300,
                          env=child_env())
    assert "(Pdb)" not in done.stdout and "Traceback" not in done.stderr, done.stdout + done.stderr
    assert done.returncode == 1 and "the loss fails on purpose" in done.stderr and "--pdb" in done.stderr
    asked = subprocess.run(cmd + ["--pdb"], cwd=ROOT, input="q\n", capture_output=True, text=True, timeout=300,
                           env=child_env())
    assert "(Pdb)" in asked.stdout
