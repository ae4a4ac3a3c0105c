"""launch/status.py and the hints submit prints: the root cause of a failure, and commands that find the run."""

from __future__ import annotations

import shlex

from launch.status import main as status
from launch.submit import build_parser, status_command
from launch.submit import main as submit
from tests.fault_helpers import tiny_experiments


def test_a_failed_local_job_shows_the_rank_that_failed_first(tiny_data, tmp_path, capsys):
    # Rank 1 raises; rank 0 then fails too, in a collective, with a long gloo traceback of its own.
    experiments = tiny_experiments(tmp_path, tiny_data, loss={"terms": [{"name": "tests.test_slurm:RaiseOnRank1"}]},
                                   resources={"dist_timeout_s": 30})
    argv = ["--experiments", str(experiments), "--exp", "tiny"]
    assert submit([*argv, "--cluster", "local"]) == 1
    said = capsys.readouterr().err
    assert "task 1: ValueError: rank 1 fails on purpose" in said, said

    assert status(argv) == 1
    shown = capsys.readouterr().out
    assert "FAILED" in shown and "task 1: ValueError: rank 1 fails on purpose" in shown, shown


def test_the_status_hint_keeps_the_overrides_that_place_the_run(tmp_path, capsys):
    args = build_parser().parse_args(["--exp", "digits_demo", "--set", "run.name=mine", "--set",
                                      f"run.root={tmp_path}/my runs", "--set", "optim.lr=0.5"])
    hint = status_command(args)
    argv = shlex.split(hint)
    assert argv[:2] == ["python", "launch/status.py"]
    assert "run.name=mine" in argv and f"run.root={tmp_path}/my runs" in argv
    status(argv[2:])  # the hint finds that run directory
    assert f"{tmp_path}/my runs/mine" in capsys.readouterr().out
