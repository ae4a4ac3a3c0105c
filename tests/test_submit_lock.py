"""One live submission per run directory (local runs), and config backups that never overwrite each other."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import yaml

from imret import checkpoint
from imret.rundir import RunDir
from launch.submit import main as submit
from tests.fault_helpers import alive, children, kill_session, start_submit, submissions, text, tiny_experiments
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parents[1]


def test_a_run_directory_has_one_live_local_submission(tiny_data, tmp_path, capsys):
    experiments = tiny_experiments(tmp_path, tiny_data, train={"epochs": 40})
    run = tmp_path / "runs" / "tiny"
    first = start_submit(experiments, "--exp", "tiny", "--cluster", "local", log_dir=tmp_path / "first")
    try:
        assert wait_until(lambda: "step 2/5" in text(tmp_path / "first" / "out"), 180), text(tmp_path / "first" / "err")
        # A second submission while the first one runs is refused, naming the owner.
        code = submit(["--experiments", str(experiments), "--exp", "tiny", "--cluster", "local"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("submit: error:") and f"pid {first.pid}" in err, err
        assert "Traceback" not in err and len(submissions(run)) == 1

        # A crashed submit: its ranks train on, so the run directory is still taken, by them.
        controller = int(submissions(run)[0]["job_id"])
        ranks = children(controller)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        assert alive(controller) and all(alive(r) for r in ranks) and len(ranks) == 2
        code = submit(["--experiments", str(experiments), "--exp", "tiny", "--cluster", "local"])
        err = capsys.readouterr().err
        assert code == 2 and f"kill -TERM {controller}" in err and "Traceback" not in err, err
        assert len(submissions(run)) == 1

        # What the message says to do stops the ranks at a safe point, with a checkpoint.
        os.kill(controller, signal.SIGTERM)
        assert wait_until(lambda: not alive(controller) and not any(alive(r) for r in ranks), 120)
        log = text(Path(submissions(run)[0]["stdout"]))
        assert "stop requested; saved at global step" in log, log
        assert checkpoint.Checkpointer(RunDir(run).ckpt).latest() is not None
    finally:
        kill_session(first)


def test_forced_config_backups_never_overwrite_each_other(tmp_path):
    from imret.config import Experiments
    from launch.submit import _write_config

    exps = Experiments.load(ROOT / "experiments.yaml")
    configs = [exps.resolve("digits_demo", [f"run.root={tmp_path}", f"optim.lr={lr}"]) for lr in (0.1, 0.2, 0.3, 0.4)]
    for cfg in configs:  # well within one second
        _write_config(cfg, force=True)
    run = tmp_path / "digits_demo"
    kept = sorted(yaml.safe_load(p.read_text())["optim"]["lr"] for p in run.glob("config.*.yaml"))
    assert kept == [0.1, 0.2, 0.3]  # every replaced config is kept, under its own name
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 0.4
