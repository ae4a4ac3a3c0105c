"""A finished rank leaves without C++ teardown, and keeps its exit status (slurm/exiting.py).

Each case runs submitit's real job entry point (``python -m submitit.core._submit``) in a
subprocess, with the environment submitit's local executor gives a task, on a pickled job
written here.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from submitit.core.utils import DelayedSubmission, JobPaths

from slurm import exiting

ROOT = Path(__file__).resolve().parents[1]


def ddp_then_leave() -> int:
    """A one-rank gloo group with a DDP wrapper, left as run_stage leaves it, then the guard.

    An exit handler registered before the guard marks whether the interpreter's own teardown
    ran after it: with the guard, it must not.
    """
    import atexit

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))
    dist.destroy_process_group()
    atexit.register(lambda: Path(os.environ["SUBMITIT_FOLDER"], "teardown-ran").touch())
    print("stage finished", end="")  # no newline, no flush: the guard must flush it
    exiting.leave_without_teardown()
    return 7


def unpicklable_after_leaving() -> threading.Lock:
    """The guard is set, then submitit fails to write the result (a lock does not pickle)."""
    exiting.leave_without_teardown()
    return threading.Lock()


def run_job(tmp_path: Path, function) -> tuple[int, JobPaths]:
    paths = JobPaths(tmp_path, job_id="1", task_id=0)
    DelayedSubmission(function).dump(paths.submitted_pickle)
    env = {**os.environ, "SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "1", "SUBMITIT_LOCAL_NTASKS": "1",
           "SUBMITIT_LOCAL_JOB_NUM_NODES": "1", "SUBMITIT_LOCAL_NODEID": "0", "SUBMITIT_LOCAL_GLOBALID": "0",
           "SUBMITIT_LOCAL_LOCALID": "0", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with open(paths.stdout, "w") as out, open(paths.stderr, "w") as err:
        code = subprocess.run([sys.executable, "-m", "submitit.core._submit", str(tmp_path)], check=False, env=env,
                              stdout=out, stderr=err, timeout=120).returncode
    return code, paths


def test_a_finished_job_exits_zero_with_its_result_and_output(tmp_path):
    code, paths = run_job(tmp_path, ddp_then_leave)
    assert code == 0, paths.stderr.read_text()
    assert pickle.loads(paths.result_pickle.read_bytes()) == ("success", 7)
    out = paths.stdout.read_text()  # block-buffered (no -u): what is there was flushed before os._exit
    assert "stage finished" in out and out.endswith("Exiting after successful completion\n")
    assert not (tmp_path / "teardown-ran").exists()


def test_a_failure_after_the_guard_still_exits_nonzero(tmp_path):
    code, paths = run_job(tmp_path, unpicklable_after_leaving)
    assert code == 1
    assert "Submitted job triggered an exception" in paths.stderr.read_text()


def test_outside_a_job_process_the_guard_does_nothing():
    hook = sys.excepthook
    exiting.leave_without_teardown()  # this is pytest's process: its exit must stay untouched
    assert sys.excepthook is hook


@pytest.mark.parametrize("failed, code", [(False, 0), (True, 1)])
def test_the_exit_status_follows_an_uncaught_exception(failed, code):
    ending = "raise RuntimeError('after the guard')" if failed else ""
    program = "\n".join([
        "import sys, types", "import slurm.exiting as guard",
        "guard.JOB_ENTRY = 'stand_in_entry'",  # this program stands in for submitit's entry module
        "sys.modules['__main__'].__spec__ = types.SimpleNamespace(name='stand_in_entry')",
        "guard.leave_without_teardown()", "print('done', end='')", ending])
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=ROOT, timeout=60,
                            check=False)
    assert result.returncode == code and result.stdout == "done"
    assert ("after the guard" in result.stderr) is failed
