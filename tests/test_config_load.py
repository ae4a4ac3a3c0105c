"""imret.config.load, the parts test_config.py and test_hostile_config.py leave out: read_yaml and
read_yaml_file on their own, the YAML merge key, the value conversions, inherit's edge cases, --set into
lists and empty values, and a run's config.yaml that is not a config."""

from __future__ import annotations

import textwrap

import pytest

from imret.config import ConfigError, Experiments, apply_override, from_dict, load_yaml, read_yaml, read_yaml_file


def experiments(tmp_path, text: str) -> Experiments:
    path = tmp_path / "experiments.yaml"
    path.write_text(textwrap.dedent(text))
    return Experiments.load(path)


def test_read_yaml_parses_safely():
    assert read_yaml("a: 1\nb: [x, 2.5, true]\nc: null\n", "t") == {"a": 1, "b": ["x", 2.5, True], "c": None}
    assert read_yaml("", "t") is None


def test_python_objects_are_not_constructed():
    with pytest.raises(ConfigError, match=r"^t: not valid YAML: .*python/object"):
        read_yaml("x: !!python/object/apply:os.system ['echo hi']\n", "t")


def test_a_yaml_error_is_one_line_with_its_place():
    with pytest.raises(ConfigError) as err:
        read_yaml("a: 1\nb: [1, 2\nc: 3\n", "experiments.yaml")
    message = str(err.value)
    assert message.startswith("experiments.yaml: not valid YAML: ") and "\n" not in message
    assert "at line 3, column 2" in message


def test_a_merge_key_may_be_overridden_by_an_explicit_key():
    text = "base: &b {lr: 0.1, name: sgd}\nchild:\n  <<: *b\n  lr: 0.5\n"
    assert read_yaml(text, "t")["child"] == {"lr": 0.5, "name": "sgd"}


def test_read_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"absent.yaml: no such file\. Run from the repository root"):
        read_yaml_file(tmp_path / "absent.yaml")
    (tmp_path / "latin1.yaml").write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1.yaml: cannot be read"):
        read_yaml_file(tmp_path / "latin1.yaml")
    (tmp_path / "ok.yaml").write_text("k: v\n")
    assert read_yaml_file(tmp_path / "ok.yaml") == {"k": "v"}


def test_values_are_converted_where_that_is_safe():
    cfg = from_dict({"optim": {"lr": 2}, "model": {"backbone": 18}, "evaluate": {"db_shards": 3}}, "x")
    assert cfg.optim.lr == 2.0 and isinstance(cfg.optim.lr, float)  # an int where a float is wanted
    assert cfg.model.backbone == "18"  # a number where text is wanted
    with pytest.raises(ConfigError, match=r"evaluate.db_shards: expected int, got True \(bool\)"):
        from_dict({"evaluate": {"db_shards": True}}, "x")
    with pytest.raises(ConfigError, match=r"optim.lr: expected float, got '0.1' \(str\)"):
        from_dict({"optim": {"lr": "0.1"}}, "x")
    with pytest.raises(ConfigError, match="evaluate.metrics: expected a list"):
        from_dict({"evaluate": {"metrics": "map"}}, "x")
    with pytest.raises(ConfigError, match="optim: expected a mapping"):
        from_dict({"optim": 3}, "x")


def test_an_empty_file_has_no_experiments_and_a_list_is_refused(tmp_path):
    assert experiments(tmp_path, "").runnable() == []
    with pytest.raises(ConfigError, match="expected a mapping of experiment names to mappings, got list"):
        experiments(tmp_path, "- a\n- b\n")


def test_inherit_of_a_missing_parent_names_it(tmp_path):
    exps = experiments(tmp_path, """
        _base: {data: {root: x}}
        child: {inherit: _bsae}
    """)
    with pytest.raises(ConfigError, match=r"child: inherit: no experiment named '_bsae'"):
        exps.resolve("child")


def test_inherit_must_be_names(tmp_path):
    exps = experiments(tmp_path, "child: {inherit: {a: 1}}\n")
    with pytest.raises(ConfigError, match="inherit: expected an experiment name or a list of names"):
        exps.resolve("child")


def test_a_grandchild_sees_every_generation(tmp_path):
    exps = experiments(tmp_path, """
        _a: {train: {epochs: 3, seed: 1}, optim: {lr: 0.1}}
        _b: {inherit: _a, train: {epochs: 5}}
        c: {inherit: _b, optim: {lr: 0.2}}
    """)
    raw = exps.raw("c")
    assert raw == {"train": {"epochs": 5, "seed": 1}, "optim": {"lr": 0.2}}
    assert exps.runnable() == ["c"]


def test_a_resolve_error_names_the_file_and_the_experiment(tmp_path):
    exps = experiments(tmp_path, "e: {train: {epochs: many}}\n")
    with pytest.raises(ConfigError, match=r"experiments.yaml: experiment 'e': train.epochs: expected int"):
        exps.resolve("e")


def test_overrides_into_lists_and_empty_values():
    data = {"data": {"train_splits": ["train", "extra"]}, "run": {"name": "x"}}
    assert apply_override(data, "data.train_splits.1=more")["data"]["train_splits"] == ["train", "more"]
    assert data["data"]["train_splits"] == ["train", "extra"]  # the input is not changed
    assert apply_override(data, "run.name=")["run"]["name"] == ""
    assert apply_override(data, "run.name=null")["run"]["name"] is None
    with pytest.raises(ConfigError, match="index 2 is past the end of a list of 2"):
        apply_override(data, "data.train_splits.2=x")
    with pytest.raises(ConfigError, match="index 0 is past the end of a list of 0"):
        apply_override({}, "data.train_splits.0=x")


def test_an_override_with_an_equals_sign_in_its_value_keeps_it():
    assert apply_override({}, "run.name=a=b")["run"]["name"] == "a=b"


def test_a_run_config_that_is_not_a_mapping_is_refused(tmp_path):
    (tmp_path / "config.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a resolved config .*got list; resubmit"):
        load_yaml(tmp_path / "config.yaml")
    (tmp_path / "config.yaml").write_text("optim: {lrr: 1}\n")
    with pytest.raises(ConfigError, match=r"config.yaml: optim.lrr: unknown key"):
        load_yaml(tmp_path / "config.yaml")
