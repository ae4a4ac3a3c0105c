"""Training: N gloo ranks update exactly like one process; interrupted runs resume exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from imret import checkpoint
from imret.config import ExperimentConfig, from_dict
from imret.distributed import DistInfo
from imret.rundir import RunDir
from tests.helpers import run_ranks


def tiny_config(data_root: Path, runs: Path, name: str, **overrides: Any) -> ExperimentConfig:
    cfg = {
        "run": {"root": str(runs), "name": name},
        "data": {"root": str(data_root), "image_size": 32, "batch_size": 8, "samples_per_class": 2,
                 "num_workers": 0, "augment": "crop_flip"},
        "model": {"backbone": "test_vit", "embed_dim": 16, "pool": "gem"},
        "loss": {"terms": [{"name": "contrastive", "params": {"neg_margin": 0.8}},
                           {"name": "smooth_ap", "weight": 0.5, "params": {"temperature": 0.05}}]},
        "optim": {"name": "adamw", "lr": 0.01, "head_lr_mult": 2.0},
        "schedule": {"name": "cosine", "warmup_epochs": 0.5},
        "train": {"epochs": 2, "seed": 3, "log_every": 1},
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        cfg.setdefault(section, {})[field] = value
    return from_dict(cfg, name)


def train_rank(info: DistInfo, cfg: ExperimentConfig) -> dict[str, torch.Tensor] | None:
    from imret import train

    train.train_stage(cfg, RunDir(cfg.run_dir), info)
    return final_weights(cfg) if info.is_main else None


def final_weights(cfg: ExperimentConfig) -> dict[str, torch.Tensor]:
    return checkpoint.load_state(checkpoint.Checkpointer(RunDir(cfg.run_dir).ckpt).latest())["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((x.float() - b[k].float()).abs().max().item() for k, x in a.items())
    print(f"largest parameter difference {worst:.3g} (tolerance {atol})")
    assert worst <= atol, f"largest parameter difference {worst:.3g} > {atol}"


# Float32 sums taken in another order (per-rank gradients, then an all-reduce) differ in the last
# bits. SGD passes such differences on linearly (1e-6 after 10 steps); Adam divides each gradient by
# its running RMS, which magnifies them in components whose gradient is near zero, hence 1e-4.
@pytest.mark.parametrize("world, backbone, bn, optim, atol", [
    (2, "test_vit", "train", "sgd", 1e-6), (4, "test_vit", "train", "sgd", 1e-6),
    (2, "test_resnet", "frozen", "sgd", 1e-6), (2, "test_vit", "train", "adamw", 1e-4),
])


def test_n_ranks_update_like_one_process(tiny_data, tmp_path, world, backbone, bn, optim, atol):
    # 2 epochs x 5 steps with a cosine schedule and warm-up, two losses, a head lr multiplier
    shared = dict(model__backbone=backbone, model__batchnorm=bn, optim__name=optim)
    single = tiny_config(tiny_data, tmp_path, "single", **shared)
    from imret import train

    train.train_stage(single, RunDir(single.run_dir), DistInfo())
    multi = tiny_config(tiny_data, tmp_path, f"multi{world}", **shared)
    weights = run_ranks(train_rank, world, multi)[0]
    reference = final_weights(single)
    assert_same_weights(weights, reference, atol=atol)
    assert any((v.float() - init).abs().max() > 1e-3 for v, init in zip(reference.values(), initial(single).values()))


def initial(cfg: ExperimentConfig) -> dict[str, torch.Tensor]:
    from imret.models import build_model

    torch.manual_seed(cfg.train.seed)
    return build_model(cfg.model).state_dict()


def test_interrupted_run_resumes_to_identical_weights(tiny_data, tmp_path):
    from imret import train

    whole = tiny_config(tiny_data, tmp_path, "whole", train__checkpoint_every=2)
    train.train_stage(whole, RunDir(whole.run_dir), DistInfo())

    parts = tiny_config(tiny_data, tmp_path, "parts", train__checkpoint_every=2, train__max_steps=3)
    train.train_stage(parts, RunDir(parts.run_dir), DistInfo())  # stops mid-epoch 1 (a preemption would too)
    meta = checkpoint.read_meta(checkpoint.Checkpointer(RunDir(parts.run_dir).ckpt).latest())
    assert meta["global_step"] == 3 and not meta["epoch_end"]
    resumed = tiny_config(tiny_data, tmp_path, "parts", train__checkpoint_every=2, train__max_steps=7)
    train.train_stage(resumed, RunDir(resumed.run_dir), DistInfo())  # crosses the epoch boundary
    finished = tiny_config(tiny_data, tmp_path, "parts", train__checkpoint_every=2)
    train.train_stage(finished, RunDir(finished.run_dir), DistInfo())
    assert_same_weights(final_weights(finished), final_weights(whole), atol=0.0)
    whole_state = checkpoint.load_state(checkpoint.Checkpointer(RunDir(whole.run_dir).ckpt).latest())
    parts_state = checkpoint.load_state(checkpoint.Checkpointer(RunDir(finished.run_dir).ckpt).latest())
    assert whole_state["position"] == parts_state["position"] == {"epoch": 2, "step": 0, "global_step": 10}


def test_checkpoints_are_pruned_and_partial_ones_ignored(tiny_data, tmp_path):
    from imret import train

    cfg = tiny_config(tiny_data, tmp_path, "prune", train__checkpoint_every=1, train__keep_checkpoints=2,
                      train__keep_epoch_checkpoints=True)
    train.train_stage(cfg, RunDir(cfg.run_dir), DistInfo())
    saver = checkpoint.Checkpointer(RunDir(cfg.run_dir).ckpt)
    steps = [checkpoint.read_meta(p)["step"] for p in saver.valid()]
    assert steps == [5, 9, 10]  # the newest two, plus every epoch end
    partial = RunDir(cfg.run_dir).ckpt / "step-00000099"
    partial.mkdir()
    (partial / "state.pt").write_bytes(b"half a file")
    assert saver.latest().name == "step-00000010"
    assert checkpoint.find(RunDir(cfg.run_dir), "epoch-1").name == "step-00000005"
    with pytest.raises(ValueError, match="no checkpoint 'epoch-7'.*available: step-5 \\(epoch-1\\)"):
        checkpoint.find(RunDir(cfg.run_dir), "epoch-7")


@pytest.mark.parametrize("name, kwargs, expected", [
    ("constant", {}, [1, 1, 1, 1]),
    ("step", {"step_size": 2, "gamma": 0.5}, [1, 1, 0.5, 0.5]),
    ("multistep", {"milestones": [1, 3], "gamma": 0.1}, [1, 0.1, 0.1, 0.01]),
    ("exponential", {"gamma": 0.9}, [1, 0.9, 0.81, 0.729]),
    ("cosine", {"min_lr": 0.0}, [1, 0.853553, 0.5, 0.146447]),
])


def test_schedules(name, kwargs, expected):
    from imret.config import ScheduleConfig
    from imret.train import lr_factor

    sched = ScheduleConfig(name=name, **kwargs)
    assert [lr_factor(sched, e, 4, 1.0) for e in range(4)] == pytest.approx(expected, abs=1e-6)
    warm = ScheduleConfig(name=name, warmup_epochs=2.0, **kwargs)
    assert lr_factor(warm, 0.5, 4, 1.0) == pytest.approx(0.25 * lr_factor(sched, 0.5, 4, 1.0))


def test_gradient_accumulation_steps_the_optimizer_every_n_batches(tiny_data, tmp_path):
    from imret import train

    cfg = tiny_config(tiny_data, tmp_path, "acc", optim__accumulate=2, train__epochs=1, optim__name="sgd")
    train.train_stage(cfg, RunDir(cfg.run_dir), DistInfo())
    state = checkpoint.load_state(checkpoint.Checkpointer(RunDir(cfg.run_dir).ckpt).latest())
    assert state["position"]["global_step"] == 5  # batches
    assert state["scheduler"]["last_epoch"] == 2  # optimizer steps: after batches 2 and 4


def test_gradient_clipping_bounds_the_update(tiny_data, tmp_path):
    from imret import train

    cfg = tiny_config(tiny_data, tmp_path, "clip", optim__name="sgd", optim__lr=1.0, optim__momentum=0.0,
                      optim__weight_decay=0.0, optim__grad_clip=1e-3, optim__head_lr_mult=1.0,
                      schedule__name="constant", schedule__warmup_epochs=0.0, train__max_steps=1)
    train.train_stage(cfg, RunDir(cfg.run_dir), DistInfo())
    after = final_weights(cfg)
    before = initial(cfg)
    change = torch.sqrt(sum(((after[k].float() - before[k].float()) ** 2).sum() for k in before
                            if before[k].is_floating_point() and "running" not in k))
    assert 0 < change.item() <= 1e-3 * 1.0001  # one SGD step of lr 1 on a gradient clipped to norm 1e-3


def test_init_from_another_run(tiny_data, tmp_path):
    from imret import train

    first = tiny_config(tiny_data, tmp_path, "iter0", train__epochs=1)
    train.train_stage(first, RunDir(first.run_dir), DistInfo())
    second = tiny_config(tiny_data, tmp_path, "iter1", train__epochs=1, train__init_from="iter0",
                         train__max_steps=0)
    training = train.Training(second, RunDir(second.run_dir), DistInfo())
    for key, value in final_weights(first).items():
        assert torch.equal(training.model.state_dict()[key], value)
    with pytest.raises(ValueError, match="not a run, a checkpoint directory or a weights file"):
        train.Training(tiny_config(tiny_data, tmp_path, "x", train__init_from="nope"),
                       RunDir(tmp_path / "x"), DistInfo())
