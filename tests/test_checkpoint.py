"""imret.checkpoint on its own: saving, pruning, finding and loading checkpoints of a tiny model.

Damaged and unsafe files, and init_from through a whole training run, are in test_hostile_checkpoint.py;
these tests build their checkpoints directly with a Checkpointer, so each takes milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from imret import checkpoint
from imret.rundir import RunDir


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def save_steps(ckpt: checkpoint.Checkpointer, steps: list[int], **meta_of: dict) -> list[Path]:
    """One checkpoint per step; ``meta_of[str(step)]`` adds to that step's meta."""
    return [ckpt.save({"model": tiny_model(s).state_dict()}, s, {"epoch": 0, **meta_of.get(str(s), {})})
            for s in steps]


def step_of(path: Path) -> int:
    return checkpoint.read_meta(path)["step"]


def test_save_then_load_gives_back_the_same_state_and_meta(tmp_path):
    model = tiny_model(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "position": {"epoch": 2, "batch": 7}}
    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")
    path = ckpt.save(state, 12, {"epoch": 2, "note": "x"})
    assert path == tmp_path / "ckpt" / "step-00000012"
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "state.pt"]  # no temporary file left
    assert json.loads((path / "meta.json").read_text()) == {"step": 12, "epoch": 2, "note": "x"}
    loaded = checkpoint.load_state(path)
    assert loaded["position"] == {"epoch": 2, "batch": 7}
    assert loaded["model"].keys() == state["model"].keys()
    assert all(torch.equal(loaded["model"][k], v) for k, v in state["model"].items())
    momentum = loaded["optim"]["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, opt.state_dict()["state"][0]["momentum_buffer"])


def test_the_rng_states_come_back_through_a_weights_only_load(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path)
    torch.manual_seed(5)
    path = ckpt.save({"rng": checkpoint.rng_state()}, 1, {})
    expected = torch.rand(4)
    torch.manual_seed(99)  # move every generator elsewhere
    checkpoint.set_rng_state(checkpoint.load_state(path)["rng"])
    assert torch.equal(torch.rand(4), expected)


def test_only_the_newest_keep_checkpoints_survive(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path, keep=2)
    save_steps(ckpt, [1, 2, 3, 4, 5])
    assert [step_of(p) for p in ckpt.valid()] == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000005"]


def test_keep_is_at_least_one(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path, keep=0)
    save_steps(ckpt, [1, 2])
    assert [step_of(p) for p in ckpt.valid()] == [2]


def test_epoch_ends_are_kept_when_asked(tmp_path):
    ends = {"2": {"epoch_end": True, "epoch": 1}, "4": {"epoch_end": True, "epoch": 2}}
    kept = checkpoint.Checkpointer(tmp_path / "kept", keep=1, keep_epoch_ends=True)
    save_steps(kept, [1, 2, 3, 4, 5], **ends)
    assert [step_of(p) for p in kept.valid()] == [2, 4, 5]
    plain = checkpoint.Checkpointer(tmp_path / "plain", keep=1)
    save_steps(plain, [1, 2, 3, 4, 5], **ends)
    assert [step_of(p) for p in plain.valid()] == [5]


def test_the_best_checkpoint_named_by_the_newest_is_never_pruned(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path, keep=1)
    selection = {"selection": {"best_step": 2}}
    save_steps(ckpt, [1, 2, 3, 4], **{"3": selection, "4": selection})
    assert [step_of(p) for p in ckpt.valid()] == [2, 4]


def test_a_directory_without_meta_is_not_a_checkpoint_and_is_cleared_by_the_next_save(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path, keep=3)
    save_steps(ckpt, [1])
    partial = tmp_path / "step-00000009"
    partial.mkdir()
    (partial / "state.pt").write_bytes(b"half")
    assert [step_of(p) for p in ckpt.valid()] == [1]
    assert ckpt.latest() == tmp_path / "step-00000001"
    save_steps(ckpt, [2])
    assert not partial.exists()
    assert [step_of(p) for p in ckpt.valid()] == [1, 2]


def test_valid_orders_by_step_number_not_by_name(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path, keep=5)
    for step in (100, 9, 20):  # step-9 written by hand with a short name sorts after step-100 as text
        path = tmp_path / f"step-{step}"
        path.mkdir()
        (path / "meta.json").write_text(json.dumps({"step": step}))
    assert [p.name for p in ckpt.valid()] == ["step-9", "step-20", "step-100"]


def test_load_latest_of_an_empty_run_is_none(tmp_path):
    assert checkpoint.Checkpointer(tmp_path / "never-written").load_latest() is None
    assert checkpoint.Checkpointer(tmp_path / "never-written").latest() is None


def test_load_latest_returns_the_newest(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path, keep=3)
    save_steps(ckpt, [1, 2, 3])
    path, state = ckpt.load_latest()
    assert path.name == "step-00000003"
    assert torch.equal(state["model"]["0.weight"], tiny_model(3).state_dict()["0.weight"])


def run_with_steps(root: Path, steps: list[int], keep: int = 10, **meta_of: dict) -> RunDir:
    run = RunDir(root / "run")
    save_steps(checkpoint.Checkpointer(run.ckpt, keep=keep, keep_epoch_ends=True), steps, **meta_of)
    return run


def test_find_last_step_and_epoch(tmp_path):
    run = run_with_steps(tmp_path, [3, 6, 9], **{"6": {"epoch_end": True, "epoch": 1}})
    assert checkpoint.find(run, "last").name == "step-00000009"
    assert checkpoint.find(run, "step-3").name == "step-00000003"
    assert checkpoint.find(run, "epoch-1").name == "step-00000006"


def test_find_names_what_is_available_when_the_checkpoint_is_missing(tmp_path):
    run = run_with_steps(tmp_path, [3, 6], **{"6": {"epoch_end": True, "epoch": 1}})
    with pytest.raises(ValueError, match=r"no checkpoint 'step-4' .*available: step-3, step-6 \(epoch-1\)"):
        checkpoint.find(run, "step-4")
    with pytest.raises(ValueError, match="no checkpoint 'epoch-0'"):  # step 3 is not an epoch end
        checkpoint.find(run, "epoch-0")


@pytest.mark.parametrize("which", ["latest", "step-", "epoch-x", "step-3 ", "STEP-3"])
def test_find_refuses_a_name_it_does_not_know(tmp_path, which):
    run = run_with_steps(tmp_path, [3])
    with pytest.raises(ValueError, match="is not last, best, epoch-N, step-N or init"):
        checkpoint.find(run, which)


def test_find_in_a_run_without_checkpoints_asks_whether_train_finished(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint in .*has the train stage of this run finished"):
        checkpoint.find(RunDir(tmp_path / "empty"), "last")


def test_find_best_follows_the_newest_selection(tmp_path):
    selection = {"selection": {"best_step": 4}}
    run = run_with_steps(tmp_path, [2, 4, 6], keep=1, **{"6": selection})
    assert checkpoint.find(run, "best").name == "step-00000004"


def test_find_best_without_a_selection_is_an_error(tmp_path):
    run = run_with_steps(tmp_path, [2, 4])
    with pytest.raises(ValueError, match="no validation .* has chosen a checkpoint yet"):
        checkpoint.find(run, "best")


def test_find_best_that_was_removed_by_hand_is_an_error(tmp_path):
    run = run_with_steps(tmp_path, [2, 4], **{"4": {"selection": {"best_step": 3}}})
    with pytest.raises(ValueError, match=r"the best checkpoint \(step 3\) is missing"):
        checkpoint.find(run, "best")


def test_latest_step(tmp_path):
    assert checkpoint.latest_step(RunDir(tmp_path / "none")) == 0
    assert checkpoint.latest_step(run_with_steps(tmp_path, [5, 17])) == 17


def test_load_state_refuses_a_file_that_is_not_a_mapping(tmp_path):
    (tmp_path / "c").mkdir()
    torch.save(torch.zeros(3), tmp_path / "c" / "state.pt")
    with pytest.raises(checkpoint.UnreadableCheckpoint, match="holds a Tensor, not a checkpoint"):
        checkpoint.load_state(tmp_path / "c")


def test_model_weights_from_each_kind_of_source(tmp_path):
    run = run_with_steps(tmp_path, [1, 2])
    expected = tiny_model(2).state_dict()
    torch.save({"model": expected}, tmp_path / "wrapped.pt")
    torch.save(expected, tmp_path / "bare.pt")
    sources = [run.ckpt / "step-00000002", run.root, tmp_path / "wrapped.pt", tmp_path / "bare.pt"]
    for source in sources:
        got = checkpoint.model_weights(source)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected), source
    by_name = checkpoint.model_weights("run", runs_root=tmp_path)  # a run's name under the runs root
    assert all(torch.equal(by_name[k], expected[k]) for k in expected)


def test_model_weights_of_nothing_usable_are_errors(tmp_path):
    with pytest.raises(ValueError, match="is not a run, a checkpoint directory or a weights file"):
        checkpoint.model_weights(tmp_path / "absent")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(checkpoint.CheckpointError, match="holds a list, not a state dict"):
        checkpoint.model_weights(tmp_path / "list.pt")


def test_load_init_weights_loads_what_fits_and_skips_a_head_of_another_shape(tmp_path, capsys):
    source = tiny_model(1)
    weights = dict(source.state_dict())
    weights["2.weight"] = torch.ones(5, 3)  # a head with 5 outputs where the model has 2
    torch.save(weights, tmp_path / "w.pt")
    model = tiny_model(2)
    head_before = model.state_dict()["2.weight"].clone()
    checkpoint.load_init_weights(model, str(tmp_path / "w.pt"), str(tmp_path))
    now = model.state_dict()
    for key in ("0.weight", "0.bias", "2.bias"):
        assert torch.equal(now[key], weights[key]), key
    assert torch.equal(now["2.weight"], head_before)
    assert "3 tensors; not loaded: 2.weight; ignored from the source: 2.weight" in capsys.readouterr().out


def test_load_init_weights_where_only_the_names_match_is_an_error(tmp_path):
    weights = {k: torch.zeros(*v.shape, 2) for k, v in tiny_model().state_dict().items()}  # every shape differs
    torch.save(weights, tmp_path / "w.pt")
    with pytest.raises(checkpoint.CheckpointError, match="none of the 4 tensors of .*w.pt fits a parameter"):
        checkpoint.load_init_weights(tiny_model(), str(tmp_path / "w.pt"), str(tmp_path))


def test_load_init_weights_pretrained_leaves_the_model_alone(tmp_path):
    model = tiny_model(4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint.load_init_weights(model, checkpoint.PRETRAINED, str(tmp_path))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
