"""Checkpoints that are hostile, damaged or half gone: nothing runs, nothing finished is lost, the file is named."""

from __future__ import annotations

import io
import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from imret import checkpoint
from imret.distributed import DistInfo
from imret.rundir import RunDir
from tests.test_train import final_weights, tiny_config


class RunsCode:
    """A pickle payload: unpickling it runs a shell command (it would create ``marker``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def hostile_checkpoint(directory: Path, marker: Path, raw: bool = False) -> Path:
    """``directory/step-00000001`` with a state.pt whose pickle calls os.system, and a valid meta.json."""
    path = directory / "step-00000001"
    path.mkdir(parents=True)
    state = {"model": {"embed.weight": torch.zeros(2)}, "payload": RunsCode(marker)}
    if raw:  # a plain pickle, not torch's zip container
        (path / "state.pt").write_bytes(pickle.dumps(state))
    else:
        buf = io.BytesIO()
        torch.save(state, buf)
        (path / "state.pt").write_bytes(buf.getvalue())
    (path / "meta.json").write_text(json.dumps({"step": 1, "epoch": 1, "epoch_end": True}))
    return path


def outcome(fn, *args) -> BaseException | None:
    """The exception ``fn(*args)`` raised, or None (so that a test can check side effects first)."""
    try:
        fn(*args)
    except Exception as err:  # the test asserts which one
        return err
    return None


def train(cfg) -> dict:
    from imret import train as train_lib

    return train_lib.train_stage(cfg, RunDir(cfg.run_dir), DistInfo())


@pytest.mark.parametrize("raw", [False, True], ids=["torch-zip", "raw-pickle"])
def test_init_from_a_pickle_that_runs_code_is_refused_and_runs_nothing(tiny_data, tmp_path, raw):
    marker = tmp_path / "payload-ran"
    ckpt = hostile_checkpoint(tmp_path / "other" / "train" / "ckpt", marker, raw)
    cfg = tiny_config(tiny_data, tmp_path / "runs", "victim", train__init_from=str(ckpt), train__epochs=1)
    err = outcome(train, cfg)
    assert not marker.exists(), "unpickling the checkpoint ran its command"
    assert isinstance(err, checkpoint.UnsafeCheckpoint), err
    assert f"{ckpt / 'state.pt'} was refused" in str(err) and "could run code" in str(err)
    assert not RunDir(cfg.run_dir).ckpt.exists()  # the run did not go on


def test_resuming_from_a_hostile_checkpoint_is_refused(tiny_data, tmp_path):
    marker = tmp_path / "payload-ran"
    cfg = tiny_config(tiny_data, tmp_path / "runs", "resumed", train__epochs=1)
    hostile_checkpoint(RunDir(cfg.run_dir).ckpt, marker)
    err = outcome(train, cfg)
    assert not marker.exists(), "unpickling the checkpoint ran its command"
    assert isinstance(err, checkpoint.UnsafeCheckpoint) and "state.pt was refused" in str(err)


def test_checkpoints_are_weights_only_and_restore_every_rng_exactly(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, "plain", train__epochs=1)
    train(cfg)
    latest = checkpoint.Checkpointer(RunDir(cfg.run_dir).ckpt).latest()
    state = torch.load(latest / "state.pt", map_location="cpu", weights_only=True)  # no error: nothing but weights
    assert {"model", "criterion", "optimizer", "scheduler", "position", "rng"} <= set(state)
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    buf = io.BytesIO()
    torch.save(checkpoint.rng_state(), buf)
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.rand(1).item())
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    buf.seek(0)
    checkpoint.set_rng_state(torch.load(buf, weights_only=True))
    assert (random.random(), np.random.normal(), np.random.rand(), torch.rand(1).item()) == expected


def truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 3])


def test_a_truncated_newest_checkpoint_resumes_from_the_one_before(tiny_data, tmp_path, capsys):
    shared = dict(train__checkpoint_every=2, train__keep_checkpoints=2)
    reference = tiny_config(tiny_data, tmp_path, "reference", **shared)
    train(reference)
    cfg = tiny_config(tiny_data, tmp_path, "damaged", **shared)
    train(cfg)
    ckpt = checkpoint.Checkpointer(RunDir(cfg.run_dir).ckpt)
    before, newest = ckpt.valid()[-2:]
    truncate(newest / "state.pt")
    capsys.readouterr()
    train(cfg)  # resumes from `before`, trains the steps again, and saves a good newest checkpoint
    out, err = capsys.readouterr()
    assert f"warning: {newest / 'state.pt'} cannot be read: it is truncated or damaged" in err
    assert f"resumed from {before}" in out
    assert (newest.parent / f"{newest.name}.damaged" / "state.pt").exists()  # kept aside, not deleted
    a, b = final_weights(reference), final_weights(cfg)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the resumed run ends exactly where the uninterrupted one did


def test_no_readable_checkpoint_is_a_clear_error(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, "all-damaged", train__epochs=1, train__checkpoint_every=2)
    train(cfg)
    valid = checkpoint.Checkpointer(RunDir(cfg.run_dir).ckpt).valid()
    for path in valid:
        truncate(path / "state.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"no readable checkpoint in .*all damaged.*Move"):
        train(cfg)


def test_state_files_without_any_meta_json_are_not_trained_over(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, "no-meta", train__epochs=1)
    train(cfg)
    ckpt = RunDir(cfg.run_dir).ckpt
    states = sorted(ckpt.glob("step-*/state.pt"))
    for meta in ckpt.glob("step-*/meta.json"):
        meta.unlink()
    before = {p: p.read_bytes() for p in states}
    with pytest.raises(checkpoint.CheckpointError) as err:
        train(cfg)
    message = str(err.value)
    assert str(states[0]) in message and "without any meta.json" in message and "Restore the meta.json" in message
    assert {p: p.read_bytes() for p in sorted(ckpt.glob("step-*/state.pt"))} == before  # nothing overwritten


def test_init_from_weights_that_fit_nothing_is_an_error(tiny_data, tmp_path):
    weights = tmp_path / "unrelated.pt"
    torch.save({"encoder.layer9.weight": torch.zeros(3, 3), "decoder.bias": torch.zeros(3)}, weights)
    cfg = tiny_config(tiny_data, tmp_path / "runs", "fits-nothing", train__init_from=str(weights), train__epochs=1)
    with pytest.raises(checkpoint.CheckpointError, match="none of the 2 tensors of .*unrelated.pt fits a parameter"):
        train(cfg)
    assert not RunDir(cfg.run_dir).ckpt.exists()


def test_init_from_a_partial_match_says_what_it_skipped(tiny_data, tmp_path, capsys):
    source = tiny_config(tiny_data, tmp_path, "source", train__epochs=1)
    train(source)
    weights = dict(final_weights(source))
    weights["extra.unused"] = torch.zeros(1)
    weights.pop(next(iter(weights)))
    torch.save(weights, tmp_path / "partial.pt")
    from imret.models import build_model

    model = build_model(source.model)
    capsys.readouterr()
    checkpoint.load_init_weights(model, str(tmp_path / "partial.pt"), str(tmp_path))
    out = capsys.readouterr().out
    assert "not loaded: " in out and "ignored from the source: extra.unused" in out
