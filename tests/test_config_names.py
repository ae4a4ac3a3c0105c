"""imret.config.names on its own: the safe-name rule, run names that nest but never leave the runs root,
and the suggested fixes. (The same refusals as a user meets them through submit are in test_hostile_config.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from imret.config import ConfigError
from imret.config import names

SAFE = ["a", "A9", "_private", "resnet50_cub-200.v2", "9lives", "x" * names.MAX_NAME]
UNSAFE = ["", ".", "..", ".hidden", "-rf", "a/b", "a b", "tab\there", "new\nline", "semi;colon", "$(id)", "é",
          "x" * (names.MAX_NAME + 1)]


@pytest.mark.parametrize("name", SAFE)
def test_safe_names(name):
    assert names.is_safe(name)
    names.check_name(name, "where")  # no error


@pytest.mark.parametrize("name", UNSAFE)
def test_unsafe_names(name):
    assert not names.is_safe(name)
    with pytest.raises(ConfigError, match="where: .* is not an accepted name") as err:
        names.check_name(name, "where")
    assert "\n" not in str(err.value).replace(repr(name), "")  # one paragraph (the name is shown escaped)


def test_a_name_that_is_not_text_is_not_safe():
    assert not names.is_safe(12)
    assert not names.is_safe(None)


def test_the_refusal_suggests_a_safe_name():
    with pytest.raises(ConfigError, match=r"Rename it, e\.g\. to 'my-run-2'\.") as err:
        names.check_name("my run #2", "experiment")
    assert "letters, digits, '.', '_' and '-'" in str(err.value)


@pytest.mark.parametrize("text, suggestion", [
    ("my run #2", "my-run-2"), ("../../etc", "etc"), ("--force", "force"), (".env", "env"),
    ("a/b", "a-b"), ("ok_name.1", "ok_name.1"), ("", "run"), ("///", "run"), ("x" * 300, "x" * names.MAX_NAME),
])
def test_suggest(text, suggestion):
    assert names.suggest(text) == suggestion
    assert names.is_safe(suggestion)


@pytest.mark.parametrize("name", ["exp", "exp/point-1", "a/b/c"])
def test_run_names_may_nest(tmp_path, name):
    names.check_run_name(name, "run.name")
    assert names.run_dir(tmp_path, name) == tmp_path / name
    assert (tmp_path / name).resolve().is_relative_to(tmp_path.resolve())


@pytest.mark.parametrize("name", ["../x", "a/../../b", "a/..", "/abs", "a//b", "a/", "./a", "a/.b"])
def test_run_names_that_could_leave_the_root_are_refused(tmp_path, name):
    with pytest.raises(ConfigError, match="is not an accepted run name. It names a directory inside run.root"):
        names.run_dir(tmp_path, name)


def test_the_run_name_refusal_suggests_a_nested_fix():
    with pytest.raises(ConfigError, match=r"or use e\.g\. 'exp/point-1'\.$"):
        names.check_run_name("exp/../point 1", "run.name")
    with pytest.raises(ConfigError, match=r"set run.root instead\.$"):  # nothing safe is left to suggest
        names.check_run_name("../..", "run.name")


def test_a_run_needs_a_name():
    with pytest.raises(ConfigError, match="the run has no name"):
        names.run_dir(Path("runs"), "")
