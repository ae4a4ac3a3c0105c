"""The whole job lifecycle against a real SLURM scheduler (the local cluster: 2 nodes x 8 fake GPUs)."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

from imret import checkpoint
from imret.config import save_yaml
from imret.pipeline import STAGES
from imret.rundir import RunDir
from launch.submit import main as submit
from slurm.chain import submit_stage
from slurm.state import slurm_state
from tests.helpers import check_gathered, gather_table, wait_until
from tests.test_train import tiny_config

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).resolve().parents[1]



def state_of(job_id: str) -> str:
    state = slurm_state(str(job_id))
    return state.state if state else "GONE"


def task_placement(job_dir: Path) -> list[tuple[int, int]]:
    """(global rank, node index) of every task, from submitit's own start-up lines."""
    found = set()
    for log in job_dir.glob("*_log.out"):  # submitit logs its start-up line to stdout
        for m in re.finditer(r"node=(\d+)\(\d+\), global_rank=(\d+)\(\d+\)", log.read_text()):
            found.add((int(m.group(2)), int(m.group(1))))
    return sorted(found)


class RaiseOnRank1(nn.Module):
    """Rank 1 raises at its second step; rank 0 would wait in the next collective."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 2 and torch.distributed.get_rank() == 1:
            raise ValueError("rank 1 fails on purpose")
        return (embeddings @ embeddings.T).mean()


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    from shards.write import main as write_shards

    out = tmp_path_factory.mktemp("digits")
    assert write_shards(["digits", "--out", str(out), "--no-progress"]) == 0
    return out


def test_digits_demo_on_two_nodes_of_two_tasks(slurm_cluster, digits, tmp_path):
    code = submit(["--exp", "digits_demo", "--cluster", "slurm", "--wait", "--set", f"data.root={digits}",
                   "--set", f"run.root={tmp_path}", "--set", "resources.nodes=2",
                   "--set", "resources.tasks_per_node=2", "--set", "train.epochs=2"])
    assert code == 0
    run = RunDir(tmp_path / "digits_demo")
    assert run.done_info("train")["world_size"] == 4
    train_job = json.loads((run.jobs / "submissions.json").read_text())[0]["job_id"]
    placement = task_placement(run.jobs / train_job)
    assert placement == [(0, 0), (1, 0), (2, 1), (3, 1)]  # 4 gloo ranks over the two nodes
    results = json.loads(run.results.read_text())
    assert results["meta"]["num_queries"] == 181 and 0 < results["map"] < 1 and results["recall@1"] > 0.3


def sweep_experiments(tmp_path: Path, data: Path) -> Path:
    entries = {"tiny_sweep": {
        "description": "three learning rates",
        "data": {"root": str(data), "image_size": 32, "batch_size": 8, "samples_per_class": 2, "num_workers": 0},
        "model": {"backbone": "test_vit", "embed_dim": 16},
        "train": {"epochs": 1, "log_every": 1},
        "evaluate": {"query": "query", "database": "database", "metrics": ["map", "recall@1"]},
        "resources": {"tasks_per_node": 2, "time_min": 10},
        "sweep": {"points": [{"optim.lr": 0.01}, {"optim.lr": 0.001}, {"name": "slow", "optim.lr": 0.0001}],
                  "array_parallelism": 3},
    }}
    path = tmp_path / "experiments.yaml"
    path.write_text(yaml.safe_dump(entries))
    return path


def test_a_sweep_runs_as_one_array(slurm_cluster, tiny_data, tmp_path, capsys):
    experiments = sweep_experiments(tmp_path, tiny_data)
    assert submit(["--experiments", str(experiments), "--exp", "tiny_sweep", "--cluster", "slurm",
                   "--set", f"run.root={tmp_path}/runs"]) == 0
    points = [RunDir(tmp_path / "runs" / "tiny_sweep" / name) for name in ("lr-0.01", "lr-0.001", "slow")]
    assert wait_until(lambda: all(p.is_done("evaluate") for p in points), 600)
    for stage in ("train", "extract", "evaluate"):
        ids = [next(e["job_id"] for e in json.loads((p.jobs / "submissions.json").read_text()) if e["stage"] == stage)
               for p in points]
        array = {i.split("_")[0] for i in ids}
        assert len(array) == 1 and sorted(i.split("_")[1] for i in ids) == ["0", "1", "2"], ids
        shown = subprocess.run(["scontrol", "show", "job", ids[0]], capture_output=True, text=True).stdout
        assert f"ArrayJobId={array.pop()}" in shown and "ArrayTaskId=" in shown
    for point in points:
        assert set(json.loads(point.results.read_text())) >= {"map", "recall@1"}
    table = gather_table(tmp_path / "runs", "tiny_sweep/*", capsys)
    assert sorted(table) == ["tiny_sweep/lr-0.001", "tiny_sweep/lr-0.01", "tiny_sweep/slow"]
    check_gathered(tmp_path / "runs", table, ("map", "recall@1"))


def test_a_chain_is_submitted_at_once_skipped_when_done_and_stops_at_a_failure(slurm_cluster, tiny_data, tmp_path,
                                                                            capsys):
    experiments = sweep_experiments(tmp_path, tiny_data)
    entries = yaml.safe_load(experiments.read_text())
    entries["tiny_sweep"].pop("sweep")
    experiments.write_text(yaml.safe_dump(entries))
    common = ["--experiments", str(experiments), "--exp", "tiny_sweep", "--cluster", "slurm",
              "--set", "evaluate.db_shards=2", "--set", f"run.root={tmp_path}/runs"]
    assert submit(common) == 0
    out = capsys.readouterr().out
    train_id = re.search(r"train: submitted job (\d+)", out).group(1)
    extract_id = re.search(r"extract: submitted job (\d+)", out).group(1)
    assert f"after {train_id}" in out  # all stages queued at once
    # the database search as two arrays of two tasks (pass 1 search, pass 2 counts for map)
    search_id = re.search(rf"evaluate-search: submitted array (\d+) of 2 .*after {extract_id}", out).group(1)
    count_id = re.search(rf"evaluate-count: submitted array (\d+) of 2 .*after {search_id}", out).group(1)
    assert re.search(rf"evaluate: submitted job \d+ .*after {count_id}", out)
    run = RunDir(tmp_path / "runs" / "tiny_sweep")
    assert wait_until(lambda: run.is_done("evaluate"), 600)
    results = json.loads(run.results.read_text())
    assert results["meta"]["db_shards"] == 2 and "over 2 database shards" in results["meta"]["ranking"]
    assert sorted(p.name for p in (run.eval / "shards").iterdir()) == [
        "count-0000-of-0002.npz", "count-0001-of-0002.npz", "topk-0000-of-0002.npz", "topk-0001-of-0002.npz"]
    # the merged result is the unsharded one
    from imret.config import load_yaml
    from imret.evaluate import evaluate
    from imret.features import load_features

    cfg = load_yaml(run.config)
    q, db = load_features(run, cfg.evaluate.query), load_features(run, cfg.evaluate.database)
    whole = evaluate(q.embeddings, q.labels, db.embeddings, db.labels, ["map", "recall@1"]).results()
    assert results["map"] == pytest.approx(whole["map"], abs=1e-6)
    assert results["recall@1"] == whole["recall@1"]

    assert submit(common) == 0
    out = capsys.readouterr().out
    assert all(f"{stage}: already done" in out for stage in ("train", "extract", "evaluate"))
    assert len(json.loads((run.jobs / "submissions.json").read_text())) == 7  # nothing new was submitted

    broken = common[:-1] + [f"run.root={tmp_path}/broken", "--set", "extract.checkpoint=epoch-99"]
    assert submit(broken) == 0
    bad = RunDir(tmp_path / "broken" / "tiny_sweep")
    jobs = {e["stage"]: e["job_id"] for e in json.loads((bad.jobs / "submissions.json").read_text())}
    assert wait_until(lambda: state_of(jobs["evaluate"]) == "CANCELLED", 600)
    assert state_of(jobs["extract"]) == "FAILED" and bad.is_done("train") and not bad.is_done("extract")
    from launch.status import main as status

    capsys.readouterr()
    assert status(["--experiments", str(experiments), "--exp", "tiny_sweep", "--set",
                   f"run.root={tmp_path}/broken"]) == 1
    shown = capsys.readouterr().out
    assert re.search(r"extract\s+FAILED\s+job " + jobs["extract"], shown)
    assert f"log: {bad.jobs / jobs['extract']}" in shown and "no checkpoint 'epoch-99'" in shown
    assert re.search(r"evaluate\s+CANCELLED.*waits on the failed stage 'extract'", shown)


def test_preempted_training_is_requeued_under_its_id_and_resumes_exactly(slurm_cluster, tiny_data, tmp_path):
    shared = dict(loss__terms=[{"name": "tests.test_preemption:SlowContrastive"}], train__epochs=4,
                  train__checkpoint_every=1000, resources__tasks_per_node=2)
    results = {}
    for name in ("whole", "preempted"):
        cfg = tiny_config(tiny_data, tmp_path, name, **shared)
        save_yaml(cfg, RunDir(cfg.run_dir).config)
        job, entry = submit_stage(cfg, STAGES["train"], "slurm", RunDir(cfg.run_dir).config)
        if name == "preempted":
            log = Path(entry.stdout)
            assert wait_until(lambda: log.exists() and "step 2/5" in log.read_text(), 300, poll=0.2)
            job._interrupt()  # submitit's preemption signal (USR2 to every task)
        assert wait_until(job.done, 600)
        job.results()
        results[name] = (cfg, job)
    cfg, job = results["preempted"]
    text = Path(job.paths.stdout).read_text()
    assert "stop requested; saved at global step" in text and "train: resumed from" in text
    shown = subprocess.run(["scontrol", "show", "job", str(job.job_id)], capture_output=True, text=True).stdout
    assert "Restarts=1" in shown  # requeued under the same job id
    final = lambda c: checkpoint.load_state(checkpoint.Checkpointer(RunDir(c.run_dir).ckpt).latest())
    ours, reference = final(cfg), final(results["whole"][0])
    assert ours["position"] == reference["position"] == {"epoch": 4, "step": 0, "global_step": 20}
    assert all(torch.equal(ours["model"][k], v) for k, v in reference["model"].items())


def test_a_failing_rank_ends_the_job_within_the_timeout(slurm_cluster, tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, "raise", loss__terms=[{"name": "tests.test_slurm:RaiseOnRank1"}],
                      resources__tasks_per_node=2, resources__dist_timeout_s=30)
    save_yaml(cfg, RunDir(cfg.run_dir).config)
    job, entry = submit_stage(cfg, STAGES["train"], "slurm", RunDir(cfg.run_dir).config)
    started = time.monotonic()
    assert wait_until(lambda: state_of(job.job_id) == "FAILED", 30 + 120)  # the timeout plus start-up
    assert time.monotonic() - started < 30 + 120
    rank1 = Path(str(entry.stderr).replace("_0_log.err", "_1_log.err")).read_text()
    assert "rank 1 fails on purpose" in rank1 and not RunDir(cfg.run_dir).is_done("train")


def test_an_eight_gpu_node_runs_eight_gloo_ranks(slurm_cluster, tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, "eight", resources__gpus_per_node=8, resources__cpus_per_task=1,
                      train__max_steps=2)
    save_yaml(cfg, RunDir(cfg.run_dir).config)
    job, entry = submit_stage(cfg, STAGES["train"], "slurm", RunDir(cfg.run_dir).config)
    assert wait_until(job.done, 600)
    job.results()
    assert RunDir(cfg.run_dir).done_info("train")["world_size"] == 8
    shown = subprocess.run(["scontrol", "show", "job", str(job.job_id)], capture_output=True, text=True).stdout
    assert "TresPerNode=gres:gpu:8" in shown and "NumTasks=8" in shown
    rank0 = Path(job.paths.stdout).read_text()
    assert "rank 0/8 on node 0/1" in rank0 and "gpus on node: 8; CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7" in rank0
    assert task_placement(RunDir(cfg.run_dir).jobs / str(job.job_id)) == [(r, 0) for r in range(8)]


def test_the_digits_loop_runs_as_one_dependency_chain(slurm_cluster, tmp_path, capsys):
    from shards.write import main as write_shards

    assert write_shards(["digits", "--protocol", "loop", "--out", str(tmp_path / "digits_loop"), "--no-progress"]) == 0
    assert submit(["--exp", "digits_loop_iter2", "--cluster", "slurm", "--set", f"data.root={tmp_path}/digits_loop",
                   "--set", f"run.root={tmp_path}/runs", "--set", "resources.tasks_per_node=2"]) == 0
    out = capsys.readouterr().out
    submitted = re.findall(r"(digits_loop_iter\d): (\w+): submitted job (\d+).*?(?:, after (\d+))?$", out, re.M)
    assert len(submitted) == 12  # 3 iterations x train, extract, evaluate, cluster, all queued at once
    for previous, current in zip(submitted, submitted[1:]):
        assert current[3] == previous[2]  # each job waits on the one before, across iterations too
    last = RunDir(tmp_path / "runs" / "digits_loop_iter2")
    assert wait_until(lambda: last.is_done("cluster"), 1200, poll=2)
    for i in range(3):
        run = RunDir(tmp_path / "runs" / f"digits_loop_iter{i}")
        assert json.loads(run.results.read_text())["map"] > 0.3
        assert json.loads((run.cluster / "results.json").read_text())["selected"] > 0
    table = gather_table(tmp_path / "runs", "digits_loop_iter*", capsys)
    assert sorted(table) == [f"digits_loop_iter{i}" for i in range(3)]
    check_gathered(tmp_path / "runs", table, ("map", "recall@1"))
