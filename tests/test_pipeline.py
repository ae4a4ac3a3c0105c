"""imret.pipeline: the list of stages and array sub-stages, the plan of an experiment, and run_stage's markers.

The markers and skips are checked through run_stage itself, with the evaluate stage pointed (monkeypatch) at
a recording function of this module, so that no model has to train; the real stages run in test_train.py,
test_extract.py, test_hostile_stages.py and the demo.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from imret import pipeline
from imret.config import STAGE_ORDER, from_dict
from imret.distributed import DistInfo
from imret.rundir import RunDir

CALLS: list[tuple] = []


def config(tmp_path: Path, name: str = "p", **sections):
    return from_dict({"run": {"root": str(tmp_path / "runs")}, **sections}, name)


@pytest.fixture(autouse=True)
def keep_threads():
    """run_stage sizes torch's thread pool; give the test process its own back."""
    threads = torch.get_num_threads()
    CALLS.clear()
    yield
    torch.set_num_threads(threads)


def record_stage(cfg, run: RunDir, info: DistInfo) -> dict:
    CALLS.append((cfg.name, run.root, info.rank))
    return {"items": len(CALLS)}


def failing_stage(cfg, run: RunDir, info: DistInfo) -> dict:
    raise ValueError("nothing to evaluate")


def record_task(cfg, run: RunDir, task: int, tasks: int) -> tuple:
    CALLS.append((run.root, task, tasks))
    return task * 10 + tasks


def test_the_stages_are_the_configs_stage_order():
    assert tuple(pipeline.STAGES) == STAGE_ORDER
    assert all(stage.name == name for name, stage in pipeline.STAGES.items())


def test_a_stage_needs_only_stages_before_it():
    for i, name in enumerate(STAGE_ORDER):
        assert set(pipeline.STAGES[name].needs) <= set(STAGE_ORDER[:i]), name


def test_every_target_names_a_function():
    targets = [s.target for s in pipeline.STAGES.values()]
    targets += [a.target for s in pipeline.STAGES.values() for a in s.arrays]
    for target in targets:
        assert callable(pipeline.load_target(target)), target


def test_array_step_names_are_unique_and_found():
    steps = [a for s in pipeline.STAGES.values() for a in s.arrays]
    assert len({a.name for a in steps}) == len(steps)
    for step in steps:
        assert pipeline.array_step(step.name) is step
    with pytest.raises(KeyError, match="no array sub-stage named 'evaluate-nothing'"):
        pipeline.array_step("evaluate-nothing")


def test_an_unsharded_evaluation_has_no_array_sub_stages(tmp_path):
    assert pipeline.STAGES["evaluate"].array_steps(config(tmp_path)) == []


def test_a_sharded_evaluation_runs_one_task_per_database_shard(tmp_path):
    cfg = config(tmp_path, evaluate={"db_shards": 3})
    steps = pipeline.STAGES["evaluate"].array_steps(cfg)
    assert [s.name for s in steps] == ["evaluate-search", "evaluate-count"]  # the count pass is for map
    assert [s.tasks(cfg) for s in steps] == [3, 3]
    no_map = config(tmp_path, evaluate={"db_shards": 3, "metrics": ["recall@1"]})
    assert [s.name for s in pipeline.STAGES["evaluate"].array_steps(no_map)] == ["evaluate-search"]


def test_the_plan_follows_the_experiments_stages(tmp_path):
    assert [s.name for s in pipeline.plan(config(tmp_path))] == ["train", "extract", "evaluate"]
    with_cluster = config(tmp_path, stages=["train", "extract", "evaluate", "cluster"])
    assert [s.name for s in pipeline.plan(with_cluster)] == list(STAGE_ORDER)
    assert [s.name for s in pipeline.plan(config(tmp_path, stages=["extract", "cluster"]))] == ["extract", "cluster"]


def test_pending_splits_done_from_to_run_by_their_markers(tmp_path):
    cfg = config(tmp_path)
    run = RunDir(cfg.run_dir)
    run.mark_done("train", {})
    done, todo = pipeline.pending(cfg)
    assert [s.name for s in done] == ["train"] and [s.name for s in todo] == ["extract", "evaluate"]
    run.mark_done("cluster", {})  # a marker of a stage this experiment does not run changes nothing
    assert [s.name for s in pipeline.pending(cfg)[1]] == ["extract", "evaluate"]


@pytest.fixture
def recorded(monkeypatch):
    stage = dataclasses.replace(pipeline.STAGES["evaluate"], target=f"{__name__}:record_stage")
    monkeypatch.setitem(pipeline.STAGES, "evaluate", stage)


def test_run_stage_runs_the_stage_and_writes_its_marker(tmp_path, recorded, capsys):
    cfg = config(tmp_path, stages=["evaluate"])
    assert pipeline.run_stage(cfg, "evaluate", DistInfo()) == {"items": 1}
    assert CALLS == [("p", cfg.run_dir, 0)]
    marker = json.loads(RunDir(cfg.run_dir).marker("evaluate").read_text())
    assert marker["stage"] == "evaluate" and marker["summary"] == {"items": 1}
    assert marker["world_size"] == 1 and marker["config_digest"] == cfg.digest()
    assert "evaluate: starting on 1 rank(s), backend gloo" in capsys.readouterr().out


def test_a_done_stage_is_skipped(tmp_path, recorded, capsys):
    cfg = config(tmp_path, stages=["evaluate"])
    pipeline.run_stage(cfg, "evaluate", DistInfo())
    capsys.readouterr()
    again = pipeline.run_stage(cfg, "evaluate", DistInfo())
    assert len(CALLS) == 1  # not run a second time
    assert again["summary"] == {"items": 1}
    assert "evaluate: already done" in capsys.readouterr().out


def test_a_stage_whose_need_is_not_done_does_not_run(tmp_path, recorded):
    cfg = config(tmp_path)  # runs extract before evaluate
    with pytest.raises(RuntimeError, match=r"stage 'evaluate' needs 'extract' .*extract.done is missing"):
        pipeline.run_stage(cfg, "evaluate", DistInfo())
    assert CALLS == [] and not RunDir(cfg.run_dir).marker("evaluate").exists()
    RunDir(cfg.run_dir).mark_done("extract", {})
    pipeline.run_stage(cfg, "evaluate", DistInfo())
    assert len(CALLS) == 1


def test_a_failing_stage_leaves_no_marker(tmp_path, monkeypatch):
    stage = dataclasses.replace(pipeline.STAGES["evaluate"], target=f"{__name__}:failing_stage")
    monkeypatch.setitem(pipeline.STAGES, "evaluate", stage)
    cfg = config(tmp_path, stages=["evaluate"])
    with pytest.raises(ValueError, match="nothing to evaluate"):
        pipeline.run_stage(cfg, "evaluate", DistInfo())
    assert not RunDir(cfg.run_dir).is_done("evaluate")


def test_run_array_task_calls_the_target_with_its_task(tmp_path):
    cfg = config(tmp_path, evaluate={"db_shards": 4})
    step = pipeline.ArrayStep("evaluate-test", f"{__name__}:record_task", lambda c: 4, lambda c: True)
    assert [pipeline.run_array_task(cfg, step, i, 4) for i in range(4)] == [4, 14, 24, 34]
    assert CALLS == [(cfg.run_dir, i, 4) for i in range(4)]


def test_cpu_ranks_share_the_cpus_they_see():
    visible = len(os.sched_getaffinity(0))
    pipeline._limit_cpu_threads(cpus_per_task=1, local_ranks=1)
    assert torch.get_num_threads() == 1
    pipeline._limit_cpu_threads(cpus_per_task=visible + 8, local_ranks=4)  # bound to fewer CPUs than asked
    assert torch.get_num_threads() == visible


def test_the_real_array_tasks_feed_the_evaluate_stage(tmp_path):
    """evaluate-search and evaluate-count through run_array_task on tiny features, then the evaluate stage
    merges their files (without redoing them) into the results of an unsharded evaluation."""
    from imret.evaluate.stage import evaluate_stage
    from tests.test_search_shards import fake_run

    cfg, run = fake_run(tmp_path, "sharded", self_search=False, db_shards=3)
    steps = pipeline.STAGES["evaluate"].array_steps(cfg)
    written = [pipeline.run_array_task(cfg, step, i, step.tasks(cfg)) for step in steps for i in range(3)]
    assert [p.name for p in written] == [f"{kind}-{i:04d}-of-0003.npz" for kind in ("topk", "count") for i in range(3)]
    stamps = {p: p.stat().st_mtime_ns for p in written}
    run.mark_done("extract", {})
    pipeline.run_stage(cfg, "evaluate", DistInfo())
    assert {p: p.stat().st_mtime_ns for p in written} == stamps  # merged, not searched again
    ref_cfg, ref = fake_run(tmp_path, "whole", self_search=False)
    evaluate_stage(ref_cfg, ref, DistInfo())
    sharded, whole = json.loads(run.results.read_text()), json.loads(ref.results.read_text())
    for key in ("map", "recall@1", "precision@1", "r_precision"):
        assert sharded[key] == whole[key], key
