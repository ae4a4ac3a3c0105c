"""Checkpoint selection: validation during training keeps the best checkpoint and stops early, on 2 gloo
ranks, and a run interrupted in the middle ends with the same choice as one that was not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from imret import checkpoint
from imret.config import ConfigError, ExperimentConfig
from imret.distributed import DistInfo
from imret.rundir import RunDir
from tests.helpers import run_ranks
from tests.test_train import tiny_config

PATIENCE = 2
METRIC = "recall@1"


@pytest.fixture
def noisy_data(tmp_path: Path) -> Path:
    """tiny_data's layout with a faint class band in strong noise, so that Recall@1 has room to change."""
    from tests.helpers import write_tiny_split

    def images(num_classes: int, per_class: int, seed: int, prefix: str) -> list[tuple]:
        rng = np.random.default_rng(seed)
        items = []
        for c in range(num_classes):
            for i in range(per_class):
                img = rng.integers(0, 220, size=(16, 16, 3), dtype=np.uint8)
                row = c * 16 // num_classes
                img[row:row + 2] = np.clip(img[row:row + 2].astype(int) + 40, 0, 255).astype(np.uint8)
                items.append((f"{prefix}{c:03d}_{i:04d}", c, img))
        return items

    root = tmp_path / "noisy"
    write_tiny_split(root, "train", images(4, 10, 1, "t"), 8)
    test = [it for it in images(8, 9, 2, "e") if it[1] >= 4]
    write_tiny_split(root, "query", [it for it in test if int(it[0][-4:]) % 3 == 0], 8)
    write_tiny_split(root, "database", [it for it in test if int(it[0][-4:]) % 3 != 0], 8)
    return root


def selecting_config(data_root: Path, runs: Path, name: str, **overrides: Any) -> ExperimentConfig:
    """Validation after every epoch on query vs database; the lr drops to 0 after epoch 4, so from then on
    no validation can improve (test_vit has no BatchNorm statistics to drift) and patience must run out."""
    settings = dict(
        optim__name="sgd", optim__lr=0.1, schedule__name="multistep", schedule__milestones=[4], schedule__gamma=0.0,
        train__epochs=12, train__checkpoint_every=2, train__keep_checkpoints=1,
        train__validation={"every": 1, "query": "query", "database": "database", "metric": METRIC,
                           "patience": PATIENCE},
        extract__batch_size=8, extract__num_workers=0, extract__checkpoint="best",
    )
    settings.update(overrides)
    return tiny_config(data_root, runs, name, **settings)


def train_rank(info: DistInfo, cfg: ExperimentConfig) -> dict[str, Any]:
    from imret import train

    return train.train_stage(cfg, RunDir(cfg.run_dir), info)


def newest_meta(cfg: ExperimentConfig) -> dict[str, Any]:
    return checkpoint.read_meta(checkpoint.Checkpointer(RunDir(cfg.run_dir).ckpt).latest())


def score(cfg: ExperimentConfig, path: Path) -> float:
    """The validation metric of a checkpoint's weights, embedded here in one process: independent of the trainer."""
    from imret.data.shards import ShardSplit
    from imret.evaluate.core import evaluate
    from imret.extract import _embed
    from imret.data.loader import extraction_loader
    from imret.models import build_model

    model = build_model(cfg.model)
    model.load_state_dict(checkpoint.load_state(path)["model"])
    model.eval()
    embedded = {}
    with torch.no_grad():
        for split in ("query", "database"):
            loader = extraction_loader(cfg, ShardSplit(cfg.data.root, split), 0, 1)
            parts = [(_embed(model, images).numpy(), labels.numpy()) for images, labels, _ in loader]
            embedded[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    (q, ql), (d, dl) = embedded["query"], embedded["database"]
    return evaluate(q, ql, d, dl, [METRIC], neighbours=0).metrics[METRIC]


def test_best_checkpoint_and_early_stopping_on_two_ranks_with_a_resume(noisy_data, tmp_path):
    whole = selecting_config(noisy_data, tmp_path, "whole")
    summary = run_ranks(train_rank, 2, whole)[0]
    # the same run, stopped in the middle of epoch 5 (as a preemption would; 5 steps an epoch), after the
    # best and one validation without improvement, and resumed by a second job
    parts = selecting_config(noisy_data, tmp_path, "parts", train__max_steps=22)
    run_ranks(train_rank, 2, parts)
    interrupted = newest_meta(parts)
    assert interrupted["global_step"] == 22 and len(interrupted["selection"]["history"]) == 4
    assert interrupted["selection"]["bad"] == 1 and not interrupted["selection"]["stopped"]
    resumed = selecting_config(noisy_data, tmp_path, "parts")
    run_ranks(train_rank, 2, resumed)

    sel = newest_meta(whole)["selection"]
    assert newest_meta(resumed)["selection"] == sel  # the same values, the same choice, the same stop
    values = [v for _, v in sel["history"]]
    epochs = [int(e) for e, _ in sel["history"]]
    print(f"validation {METRIC} by epoch:", dict(zip(epochs, values)))
    best_index = values.index(max(values))  # the first of the best: only a strict improvement counts
    assert sel["best"] == max(values) and sel["best_epoch"] == epochs[best_index]
    assert 0 < best_index and len(set(values)) > 1  # the data leaves something to choose
    assert sel["stopped"] and len(values) == best_index + 1 + PATIENCE  # stopped after `patience` without gain
    assert epochs == list(range(1, len(values) + 1)) and len(values) < whole.train.epochs
    assert summary["stopped_early"] and summary["best_epoch"] == sel["best_epoch"]
    assert newest_meta(whole)["epoch"] == epochs[-1]  # no epoch trained after the stop

    for cfg in (whole, resumed):
        best = checkpoint.find(RunDir(cfg.run_dir), "best")
        meta = checkpoint.read_meta(best)
        assert meta["step"] == sel["best_step"] and meta["epoch_end"] and meta["epoch"] == sel["best_epoch"]
        assert best != checkpoint.Checkpointer(RunDir(cfg.run_dir).ckpt).latest()  # kept though keep_checkpoints=1
        assert score(cfg, best) == pytest.approx(sel["best"], abs=1e-9)
    a = checkpoint.load_state(checkpoint.find(RunDir(whole.run_dir), "best"))["model"]
    b = checkpoint.load_state(checkpoint.find(RunDir(resumed.run_dir), "best"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert_tensorboard_has_validation(whole, values)
    # a requeue after the early stop (before the stage was marked done) trains nothing more
    from imret import train

    again = train.train_stage(whole, RunDir(whole.run_dir), DistInfo())
    assert again["global_step"] == newest_meta(whole)["global_step"] and again["stopped_early"]


def assert_tensorboard_has_validation(cfg: ExperimentConfig, values: list[float]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(RunDir(cfg.run_dir).tb))
    acc.Reload()
    logged = [e.value for e in acc.Scalars(f"validation/{METRIC}")]
    assert logged == pytest.approx(values, abs=1e-6)


def test_validation_leaves_training_unchanged(tiny_data, tmp_path):
    from imret import train

    plain = tiny_config(tiny_data, tmp_path, "plain")
    train.train_stage(plain, RunDir(plain.run_dir), DistInfo())
    validated = tiny_config(tiny_data, tmp_path, "validated", extract__batch_size=8, extract__num_workers=0,
                            train__validation={"every": 1, "query": "query", "database": ""})
    train.train_stage(validated, RunDir(validated.run_dir), DistInfo())
    a = checkpoint.load_state(checkpoint.Checkpointer(RunDir(plain.run_dir).ckpt).latest())
    b = checkpoint.load_state(checkpoint.Checkpointer(RunDir(validated.run_dir).ckpt).latest())
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert len(newest_meta(validated)["selection"]["history"]) == 2


@pytest.mark.parametrize("every, first, expected", [
    (5, 1, [1, 6, 11, 16]), (10, 1, [1, 11]), (5, 0, [5, 10, 15, 20]), (0, 0, []), (3, 4, [4, 7, 10, 13, 16, 19]),
])
def test_validation_epochs(every, first, expected):
    from imret.config.schema import ValidationConfig
    from imret.selection import due

    val = ValidationConfig(every=every, first=first, query="test")
    assert [e for e in range(1, 21) if due(val, e)] == expected


def test_selection_rules():
    from imret.config.schema import ValidationConfig
    from imret.selection import Selection

    val = ValidationConfig(every=1, query="q", mode="min", patience=2)
    sel = Selection()
    assert sel.record(val, 1, 10, 0.5) and not sel.record(val, 2, 20, 0.5)  # equal is no improvement
    assert sel.record(val, 3, 30, 0.4) and (sel.best_step, sel.bad) == (30, 0)
    assert not sel.record(val, 4, 40, float("nan")) and not sel.stopped
    assert not sel.record(val, 5, 50, 0.6) and sel.stopped and sel.best == 0.4


@pytest.mark.parametrize("overrides, message", [
    ({"extract__checkpoint": "best"}, "extract.checkpoint=best needs a validation"),
    ({"train__validation": {"every": 2}}, "train.validation.query: name the split"),
    ({"train__validation": {"patience": 3}}, "patience needs train.validation.every"),
])
def test_selection_config_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, tmp_path, "bad", **overrides)


def test_an_unknown_validation_metric_is_refused_at_submit(tmp_path):
    from imret import checks

    cfg = tiny_config(tmp_path, tmp_path, "x", train__validation={"every": 1, "query": "q", "metric": "recal@1"})
    with pytest.raises(ConfigError, match="train.validation.metric"):
        checks.check(cfg)


def test_best_without_a_validation_yet_names_the_problem(tiny_data, tmp_path):
    from imret import train

    cfg = tiny_config(tiny_data, tmp_path, "early", train__max_steps=2, train__checkpoint_every=1,
                      train__validation={"every": 1, "query": "query"})
    train.train_stage(cfg, RunDir(cfg.run_dir), DistInfo())
    with pytest.raises(ValueError, match="no validation .* has chosen a checkpoint yet"):
        checkpoint.find(RunDir(cfg.run_dir), "best")


def test_a_missing_validation_split_stops_the_submit(tiny_data, tmp_path, capsys):
    import yaml

    from launch.submit import main as submit

    entry = {"run": {"root": str(tmp_path / "runs")},
             "data": {"root": str(tiny_data), "image_size": 32, "batch_size": 8, "samples_per_class": 2,
                      "num_workers": 0},
             "model": {"backbone": "test_resnet", "embed_dim": 8},
             "train": {"validation": {"every": 1, "query": "valid"}},
             "resources": {"local_ranks": 1}}
    path = tmp_path / "experiments.yaml"
    path.write_text(yaml.safe_dump({"tiny": entry}))
    assert submit(["--experiments", str(path), "--exp", "tiny", "--cluster", "local"]) == 2
    assert "valid" in capsys.readouterr().err and not (tmp_path / "runs").exists()
