"""A stage that produced nothing fails and leaves no ``.done`` marker, so a corrected rerun is not skipped."""

from __future__ import annotations

import pytest

from imret.distributed import DistInfo
from imret.pipeline import run_stage
from imret.rundir import RunDir
from tests.helpers import tiny_images, write_tiny_split
from tests.test_train import tiny_config as train_config


def tiny_config(data, runs, name, stages, **overrides):
    cfg = train_config(data, runs, name, **overrides)
    cfg.stages = stages
    return cfg


def test_an_empty_query_split_fails_extract_without_a_marker(tiny_data, tmp_path):
    write_tiny_split(tiny_data, "empty", [], 8)  # a split with a manifest and no samples
    cfg = tiny_config(tiny_data, tmp_path / "runs", "empty-query", ["extract", "evaluate"],
                      extract__checkpoint="init", evaluate__query="empty")
    run = RunDir(cfg.run_dir)
    with pytest.raises(ValueError, match="split 'empty' of .* holds no samples.*shards.write"):
        run_stage(cfg, "extract", DistInfo())
    assert not run.marker("extract").exists()
    assert not (run.features("empty") / "manifest.json").exists()  # no complete-looking empty features either
    # the corrected rerun (a query split with samples, same run directory) is not blocked by a stale marker
    write_tiny_split(tiny_data, "filled", tiny_images(5, 3, seed=4), 8)
    fixed = tiny_config(tiny_data, tmp_path / "runs", "empty-query", ["extract", "evaluate"],
                        extract__checkpoint="init", evaluate__query="filled")
    assert run_stage(fixed, "extract", DistInfo())["samples"]["filled"] == 15
    assert run.marker("extract").exists()


def test_zero_training_steps_fail_without_a_marker(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "runs", "no-steps", ["train"], train__epochs=1)
    cfg.train.max_steps = -5  # past the load-time check, as a config edited by hand in the job would be
    run = RunDir(cfg.run_dir)
    with pytest.raises(ValueError, match="no training step was run"):
        run_stage(cfg, "train", DistInfo())
    assert not run.marker("train").exists() and not run.ckpt.exists()
    cfg.train.max_steps = 0
    assert run_stage(cfg, "train", DistInfo())["global_step"] > 0  # the rerun trains: nothing sticky was left
    assert run.marker("train").exists()


def test_negative_max_steps_is_refused_at_load(tiny_data, tmp_path):
    from imret.config import ConfigError

    with pytest.raises(ConfigError, match="train.max_steps: must be >= 0, got -5"):
        train_config(tiny_data, tmp_path, "x", train__max_steps=-5)
