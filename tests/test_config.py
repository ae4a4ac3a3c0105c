"""Config loading: inheritance, strictness, overrides and cross-field rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from imret.config import (ConfigError, Experiments, ExperimentConfig, apply_override, deep_merge, from_dict,
                          load_yaml, save_yaml)
from imret.checks import check
from slurm.executors import stage_resources


def write_experiments(tmp_path: Path, entries: dict) -> Experiments:
    path = tmp_path / "experiments.yaml"
    path.write_text(yaml.safe_dump(entries))
    return Experiments.load(path)


BASE = {"data": {"root": "x", "batch_size": 8, "samples_per_class": 2}, "model": {"backbone": "resnet18"}}


def test_defaults_and_types():
    cfg = from_dict({"data": {"batch_size": 12, "samples_per_class": 3}, "optim": {"lr": 1}}, "x")
    assert cfg.data.batch_size == 12 and cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.name == "x" and cfg.run_dir == Path("runs/x")


def test_inherit_deep_merges_and_null_deletes(tmp_path):
    exps = write_experiments(tmp_path, {
        "_base": {**BASE, "optim": {"lr": 0.1, "name": "sgd"}, "evaluate": {"database": "db"}},
        "child": {"inherit": "_base", "optim": {"lr": 0.5}, "evaluate": {"database": None}},
    })
    cfg = exps.resolve("child")
    assert cfg.optim.lr == 0.5 and cfg.optim.name == "sgd"  # merged key by key
    assert cfg.evaluate.database == "database"  # null deleted the inherited value: back to the default
    assert exps.runnable() == ["child"]


def test_multiple_inheritance_in_order(tmp_path):
    exps = write_experiments(tmp_path, {
        "_a": {**BASE, "train": {"epochs": 3, "seed": 1}},
        "_b": {"train": {"epochs": 7}},
        "c": {"inherit": ["_a", "_b"]},
    })
    cfg = exps.resolve("c")
    assert (cfg.train.epochs, cfg.train.seed) == (7, 1)


def test_inheritance_cycle_is_an_error(tmp_path):
    exps = write_experiments(tmp_path, {"a": {"inherit": "b"}, "b": {"inherit": "a"}})
    with pytest.raises(ConfigError, match="cycle"):
        exps.resolve("a")


def test_unknown_key_names_the_nearest(tmp_path):
    exps = write_experiments(tmp_path, {"e": {**BASE, "data": {**BASE["data"], "batchsize": 4}}})
    with pytest.raises(ConfigError) as err:
        exps.resolve("e")
    assert "data.batchsize: unknown key" in str(err.value) and "did you mean 'batch_size'" in str(err.value)
    assert "experiment 'e'" in str(err.value)


def test_unknown_top_level_key(tmp_path):
    exps = write_experiments(tmp_path, {"e": {**BASE, "optimizer": {"lr": 1}}})
    with pytest.raises(ConfigError, match="did you mean 'optim'"):
        exps.resolve("e")


def test_wrong_type_and_bad_choice():
    with pytest.raises(ConfigError, match="data.batch_size: expected int"):
        from_dict({"data": {"batch_size": "lots"}})
    with pytest.raises(ConfigError, match=r"optim.name: 'adma' is not allowed.*did you mean 'adam'"):
        from_dict({"optim": {"name": "adma"}})
    with pytest.raises(ConfigError, match="expected int, got True"):
        from_dict({"train": {"epochs": True}})


def test_batch_must_divide_by_samples_per_class():
    with pytest.raises(ConfigError, match=r"data.batch_size \(10\) must be divisible by data.samples_per_class \(4\)"):
        from_dict({"data": {"batch_size": 10, "samples_per_class": 4}})


def test_other_rules():
    with pytest.raises(ConfigError, match="unknown stage 'extrakt'; did you mean 'extract'"):
        from_dict({"stages": ["train", "extrakt"]})
    with pytest.raises(ConfigError, match="must be distinct and in the order"):
        from_dict({"stages": ["evaluate", "train"]})
    with pytest.raises(ConfigError, match="one rank per GPU"):
        from_dict({"resources": {"gpus_per_node": 8, "tasks_per_node": 4}})
    with pytest.raises(ConfigError, match="pretrained_path.*does not exist.*never downloads"):
        from_dict({"model": {"pretrained_path": "/nonexistent/w.safetensors"}})


def test_unknown_experiment_lists_closest(tmp_path):
    exps = write_experiments(tmp_path, {"digits_demo": BASE, "digits_loop": BASE})
    with pytest.raises(ConfigError) as err:
        exps.resolve("digit_demo")
    assert "no experiment named 'digit_demo'" in str(err.value) and "digits_demo" in str(err.value)
    with pytest.raises(ConfigError, match="abstract base"):
        write_experiments(tmp_path, {"_b": BASE}).resolve("_b")


def test_overrides():
    data = apply_override({}, "optim.lr=0.003")
    assert data == {"optim": {"lr": 0.003}}
    data = apply_override({"evaluate": {}}, "evaluate.metrics=[map, recall@1]")
    assert data["evaluate"]["metrics"] == ["map", "recall@1"]
    terms = {"loss": {"terms": [{"name": "contrastive", "params": {}}]}}
    assert apply_override(terms, "loss.terms.0.weight=2")["loss"]["terms"][0]["weight"] == 2
    assert apply_override({}, "model.backbone_kwargs.img_size=32")["model"]["backbone_kwargs"] == {"img_size": 32}


@pytest.mark.parametrize("item, message", [
    ("optim.lrr=1", "'optim.lrr' is not a config key; did you mean 'lr'"),
    ("optim.lr", "expected KEY.PATH=VALUE"),
    ("optim.lr.x=1", "'optim.lr' is a value, it has no key 'x'"),
    ("loss.terms.first.weight=1", "indexes a list"),
    ("data.batch_size=[1", "not valid YAML"),
])


def test_bad_overrides(item, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        apply_override({}, item)


def test_override_value_is_type_checked(tmp_path):
    exps = write_experiments(tmp_path, {"e": BASE})
    with pytest.raises(ConfigError, match="train.epochs: expected int"):
        exps.resolve("e", ["train.epochs=many"])


def test_deep_merge_does_not_mutate():
    base = {"a": {"b": 1, "c": [1, 2]}}
    merged = deep_merge(base, {"a": {"c": [3]}})
    assert merged == {"a": {"b": 1, "c": [3]}} and base == {"a": {"b": 1, "c": [1, 2]}}


def test_yaml_round_trip_and_digest(tmp_path):
    cfg = from_dict({**BASE, "description": "d"}, "e")
    save_yaml(cfg, tmp_path / "c.yaml")
    again = load_yaml(tmp_path / "c.yaml")
    assert again == cfg and again.digest() == cfg.digest()
    moved = from_dict({**BASE, "description": "other", "resources": {"nodes": 4}}, "e")
    assert moved.digest() == cfg.digest()  # where it runs does not change what it computes
    assert from_dict({**BASE, "optim": {"lr": 0.5}}, "e").digest() != cfg.digest()


def test_stage_resources_override():
    cfg = from_dict({"resources": {"nodes": 2, "gpus_per_node": 8, "stages": {"evaluate": {"nodes": 1, "time_min": 5}}}})
    ev = stage_resources(cfg, "evaluate")
    assert (ev.nodes, ev.gpus_per_node, ev.time_min) == (1, 8, 5)
    assert stage_resources(cfg, "train").nodes == 2


def test_the_shipped_experiments_all_load():
    root = Path(__file__).resolve().parents[1]
    exps = Experiments.load(root / "experiments.yaml")
    assert "digits_demo" in exps.runnable()
    for name in exps.runnable():
        assert isinstance(check(exps.resolve(name)), ExperimentConfig)
        assert exps.raw(name).get("description"), f"{name} has no description"
