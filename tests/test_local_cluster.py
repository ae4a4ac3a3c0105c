"""slurm/local_cluster.sh `up` repairs a damaged cluster of the same shape and keeps its queue."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import wait_until

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "slurm" / "local_cluster.sh"
CLUSTER_DIR = Path("/tmp/imret-slurm")  # the script's default --dir, where the slurm_cluster fixture starts it
ENV = {**os.environ, "SLURM_CONF": str(CLUSTER_DIR / "slurm.conf")}
OPTIONS = {"nodes": "--nodes", "gpus": "--gpus-per-node", "cpus": "--cpus-per-node", "mem_mb": "--mem-mb",
           "port": "--port"}


def slurm(*argv: str) -> str:
    return subprocess.run(list(argv), env=ENV, capture_output=True, text=True, check=True, timeout=60).stdout


def shape_options() -> list[str]:
    """The `up` options that name the running cluster's shape, so that `up` repairs rather than restarts it."""
    state = (CLUSTER_DIR / "cluster.state").read_text().splitlines()
    shape = next(line.removeprefix("SHAPE=") for line in state if line.startswith("SHAPE="))
    pairs = dict(item.split("=") for item in shape.split())
    return [arg for key, flag in OPTIONS.items() for arg in (flag, pairs[key])]


def up(options: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), "up", *options], capture_output=True, text=True, timeout=300)


def daemon_pid(name: str) -> int:
    return int((CLUSTER_DIR / "run" / f"{name}.pid").read_text().strip())


def alive(pid: int) -> bool:
    """Running and not a zombie (a killed daemon stays a zombie until init reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False


def kill9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not alive(pid), 10), f"pid {pid} survived kill -9"



def queue() -> dict[str, tuple[str, str]]:
    """job id -> (state, reason or node list) of every job squeue shows."""
    rows = [line.split(maxsplit=2) for line in slurm("squeue", "-h", "-o", "%i %T %R").splitlines()]
    return {job: (state, where) for job, state, where in rows}


def saved_since(jobs: float, nodes: float) -> bool:
    """Whether slurmctld has written its job state file since `jobs`, and its node state file since `nodes`."""
    times = {"job_state": jobs, "node_state": nodes}
    files = {CLUSTER_DIR / "state" / name: when for name, when in times.items()}
    return all(f.is_file() and f.stat().st_mtime > when for f, when in files.items())


def node_state(node: str) -> str:
    return slurm("sinfo", "-h", "-n", node, "-o", "%t").strip()


def job_state(job: str) -> str:
    out = slurm("scontrol", "show", "job", job, "-o")
    return next(f.removeprefix("JobState=") for f in out.split() if f.startswith("JobState="))


@pytest.fixture
def local_cluster(slurm_cluster: str, tmp_path: Path) -> Iterator[tuple[list[str], Callable[..., str]]]:
    """The local cluster's shape options, and an sbatch that remembers its jobs.

    Whatever happens in the test, its jobs are cancelled and a daemon it killed is restarted, so
    that the other SLURM tests find a healthy cluster.
    """
    if not (CLUSTER_DIR / "cluster.state").is_file():
        pytest.skip(f"the answering SLURM controller was not started by slurm/local_cluster.sh in {CLUSTER_DIR}; "
                    "this test kills daemons, so it runs only against that cluster")
    options = shape_options()
    if int(options[options.index("--nodes") + 1]) < 2:
        pytest.skip("the local cluster has one node; this test needs two")
    jobs: list[str] = []

    def sbatch(*argv: str) -> str:
        job = slurm("sbatch", "--parsable", "--chdir", str(tmp_path), "-o", str(tmp_path / "%j.out"), *argv)
        jobs.append(job.strip().split(";")[0])
        return jobs[-1]

    try:
        yield options, sbatch
    finally:
        if jobs:
            subprocess.run(["scancel", *jobs], env=ENV, capture_output=True, timeout=60)
        status = subprocess.run([str(SCRIPT), "status"], capture_output=True, text=True, timeout=60)
        if status.returncode != 0:
            up(options)


def submit_queue(sbatch: Callable[..., str]) -> dict[str, str]:
    """A job running on n2, one held (for n2), and one waiting on the running one."""
    jobs = {"running": sbatch("-w", "n2", "--wrap", "sleep 600")}
    jobs["held"] = sbatch("-w", "n2", "--hold", "--wrap", "true")
    jobs["dependent"] = sbatch("--dependency", f"afterok:{jobs['running']}", "--wrap", "true")
    assert wait_until(lambda: queue().get(jobs["running"], ("",))[0] == "RUNNING", 60), queue()
    return jobs


def assert_queue_kept(jobs: dict[str, str]) -> None:
    now = queue()
    assert set(jobs.values()) <= set(now), f"jobs lost: {jobs} vs {now}"
    assert now[jobs["running"]] == ("RUNNING", "n2")
    assert now[jobs["held"]] == ("PENDING", "(JobHeldUser)")
    assert now[jobs["dependent"]] == ("PENDING", "(Dependency)")


def assert_healthy_and_working(jobs: dict[str, str]) -> None:
    """`status` says UP, n2 is usable again, and a job released onto n2 runs there to completion."""
    status = subprocess.run([str(SCRIPT), "status"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    assert node_state("n2") in ("idle", "alloc", "mix")
    slurm("scontrol", "release", jobs["held"])
    assert wait_until(lambda: job_state(jobs["held"]) == "COMPLETED", 60), job_state(jobs["held"])


def test_up_restarts_a_killed_slurmd_and_keeps_the_queue(local_cluster):
    options, sbatch = local_cluster
    jobs = submit_queue(sbatch)
    ctld, n1, n2 = daemon_pid("slurmctld"), daemon_pid("slurmd-n1"), daemon_pid("slurmd-n2")
    kill9(n2)

    repair = up(options)

    assert repair.returncode == 0, repair.stdout + repair.stderr
    assert_queue_kept(jobs)
    # only the killed daemon was started again
    assert daemon_pid("slurmctld") == ctld and daemon_pid("slurmd-n1") == n1 and alive(ctld) and alive(n1)
    assert daemon_pid("slurmd-n2") != n2 and alive(daemon_pid("slurmd-n2"))
    assert "not running: n2" in repair.stdout and "starting slurmd n2" in repair.stdout
    assert "cancelling" not in repair.stdout and "from scratch" not in repair.stdout
    assert_healthy_and_working(jobs)


def test_up_restarts_a_killed_controller_and_node_down_and_keeps_the_queue(local_cluster):
    options, sbatch = local_cluster
    jobs = submit_queue(sbatch)
    n1 = daemon_pid("slurmd-n1")
    kill9(daemon_pid("slurmd-n2"))
    # What slurmctld does by itself once the slurmd has been silent for SlurmdTimeout: the
    # node goes DOWN and its running job is requeued (same id, pending again).
    down = time.time()
    slurm("scontrol", "update", "nodename=n2", "state=down", "reason=imret test: slurmd killed")
    assert wait_until(lambda: queue()[jobs["running"]][0] == "PENDING", 30), queue()
    # slurmctld writes its state files up to 5 s after a change, so a kill -9 right after the
    # requeue loses it, and the jobs submitted just before it (CI saw the held job vanish):
    # SLURM's own limit, which no restart can undo. So the controller dies once the requeue and
    # the DOWN node are on disk: a job update after the requeue was seen asks for one more save
    # (the save for the requeue may have been written before that, and then none follows).
    requeued = time.time()
    slurm("scontrol", "update", f"jobid={jobs['held']}", "comment=imret test: saved state")
    assert wait_until(lambda: saved_since(jobs=requeued, nodes=down), 30), "slurmctld saved no state within 30 s"
    kill9(daemon_pid("slurmctld"))

    repair = up(options)

    assert repair.returncode == 0, repair.stdout + repair.stderr
    # the requeued job runs again under its own id, on n2, which is usable again
    assert wait_until(lambda: queue().get(jobs["running"]) == ("RUNNING", "n2"), 60), queue()
    assert_queue_kept(jobs)
    assert daemon_pid("slurmd-n1") == n1 and alive(n1)
    assert "not running: slurmctld n2" in repair.stdout and "starting slurmctld" in repair.stdout
    assert "cancelling" not in repair.stdout and "starting slurmd n1" not in repair.stdout
    assert_healthy_and_working(jobs)


def test_up_reset_cancels_the_queue_on_request(local_cluster):
    options, sbatch = local_cluster
    held = sbatch("--hold", "--wrap", "true")

    reset = up([*options, "--reset"])

    assert reset.returncode == 0, reset.stdout + reset.stderr
    assert "from scratch" in reset.stdout and "--reset" in reset.stdout and held in reset.stdout
    assert held not in queue()
    status = subprocess.run([str(SCRIPT), "status"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stdout
