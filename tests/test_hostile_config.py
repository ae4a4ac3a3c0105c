"""Hostile and careless configs: names that leave the runs root or split sbatch lines, unsafe YAML, bad ranges.

Each case goes through ``launch.submit.main`` where a user would meet it: it must return 2 with one
``submit: error:`` paragraph naming the problem, no traceback, and nothing written.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from imret.config import ConfigError, Experiments, SweepConfig, from_dict, load_yaml, save_yaml
from imret.sweep import expand

SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")  # the rule as the README states it
from launch.submit import main

ROOT = Path(__file__).resolve().parents[1]


def submit(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *argv: str) -> str:
    """Run submit, expect the one-paragraph refusal, and return its text."""
    code, out, err = submit(capsys, *argv)
    assert code == 2, (out, err)
    assert err.startswith("submit: error: ") and "Traceback" not in err + out
    return err


def experiments_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "experiments.yaml"
    path.write_text(textwrap.dedent(text))
    return path


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize("where", ["evaluate.query", "evaluate.database", "extract.splits", "data.train_splits",
                                   "cluster.splits", "train.validation.query"])
def test_split_names_that_would_leave_a_directory_are_refused(capsys, tmp_path, where):
    # splits become directories under data.root and the run directory (features/<split>/)
    value = "[../../etc]" if where.endswith("splits") else "../../etc"
    err = refused(capsys, "--exp", "digits_demo", "--dry-run", "--cluster", "local", "--set", f"run.root={tmp_path}",
                  "--set", f"{where}={value}")
    assert where in err and "not an accepted name" in err


@pytest.mark.parametrize("name", ["../../x", "/tmp/x", "..", "a/../../b", "a//b", ".hidden", "-rf", "a b"])
def test_run_names_that_leave_the_runs_root_are_refused(capsys, tmp_path, name):
    runs = tmp_path / "deep" / "runs"
    err = refused(capsys, "--exp", "digits_demo", "--dry-run", "--cluster", "local", "--set", f"run.root={runs}",
                  "--set", f"run.name={name}")
    assert "run.name" in err and "not an accepted run name" in err and "run.root" in err
    with pytest.raises(ConfigError, match="not an accepted run name"):
        from_dict({"run": {"root": str(runs), "name": name}}, "x")


def test_a_nested_run_name_stays_inside_the_runs_root(tmp_path):
    cfg = from_dict({"run": {"root": str(tmp_path), "name": "exp/point-1"}}, "exp")
    assert cfg.run_dir == tmp_path / "exp" / "point-1"


def test_a_newline_in_run_name_cannot_reach_an_sbatch_line(capsys, tmp_path):
    marker = tmp_path / "injected"
    err = refused(capsys, "--exp", "digits_demo", "--dry-run", "--cluster", "slurm", "--set", f"run.root={tmp_path}",
                  "--set", f'run.name="x\\ntouch {marker}"')
    assert "not an accepted run name" in err and not marker.exists()


def test_a_newline_in_an_experiment_name_is_refused_at_load(capsys, tmp_path):
    marker = tmp_path / "injected"
    entries = yaml.safe_load((ROOT / "experiments.yaml").read_text())
    entries[f"demo\ntouch {marker}"] = {"inherit": "digits_demo"}
    path = tmp_path / "experiments.yaml"
    path.write_text(yaml.safe_dump(entries))
    err = refused(capsys, "--experiments", str(path), "--exp", f"demo\ntouch {marker}", "--dry-run",
                  "--cluster", "slurm", "--set", f"run.root={tmp_path}")
    assert "not an accepted name" in err and "letters, digits" in err and not marker.exists()
    with pytest.raises(ConfigError, match="not an accepted name"):
        Experiments.load(path)  # even --list refuses the file: the name is never shown to a shell


@pytest.mark.parametrize("key", ["../up", "has space", "-dash"])
def test_unsafe_experiment_names_are_refused(tmp_path, key):
    path = experiments_file(tmp_path, f"'{key}': {{data: {{root: x}}}}\n")
    with pytest.raises(ConfigError, match=r"not an accepted name.*letters, digits, '\.', '_' and '-'"):
        Experiments.load(path)


def test_sweep_point_names_match_the_safe_pattern():
    sweep = SweepConfig(grid={"data.root": ["/data/cat 13", "../../etc", "-x\nrm -rf ~"], "optim.lr": [1e-3, -1]},
                        points=[{"name": "../escape"}, {"name": ".\n"}, {"model.embed_dim": 64}])
    names = [p.name for p in expand(sweep)]
    assert len(set(names)) == len(names) == 9
    assert all(SAFE_NAME.fullmatch(n) for n in names), names
    assert "root-data-cat-13_lr-0.001" in names and "escape" in names


def test_the_shipped_sweeps_resolve_to_safe_run_directories():
    from launch.submit import _sweep_configs, build_parser

    exps = Experiments.load(ROOT / "experiments.yaml")
    for name in ("cbir_sweep", "sketchy_margin_sweep"):
        cfg = exps.resolve(name)
        args = build_parser().parse_args(["--exp", name])
        for point in _sweep_configs(cfg, exps, args):
            assert point.run_dir.parent == Path("runs") / name
            assert SAFE_NAME.fullmatch(point.run_dir.name)


def test_a_line_break_in_an_sbatch_option_is_refused():
    with pytest.raises(ConfigError, match="resources.partition.*line break"):
        from_dict({"resources": {"partition": "gpu\n#SBATCH --account=other"}}, "x")


# ----------------------------------------------------------------------------- YAML


def test_duplicate_keys_in_experiments_yaml_name_the_key_and_line(capsys, tmp_path):
    path = experiments_file(tmp_path, """\
        demo:
          inherit: digits_demo
          optim: {lr: 0.1}
          optim: {lr: 0.2}
        """)
    err = refused(capsys, "--experiments", str(path), "--exp", "demo", "--dry-run")
    assert "duplicate key 'optim'" in err and "line 4" in err and "first at line 3" in err and str(path) in err


def test_duplicate_experiment_names_are_an_error(tmp_path):
    path = experiments_file(tmp_path, "a: {train: {epochs: 1}}\nb: {}\na: {train: {epochs: 2}}\n")
    with pytest.raises(ConfigError, match="line 3: duplicate key 'a' \\(first at line 1\\)"):
        Experiments.load(path)


def test_duplicate_keys_in_a_set_value_are_an_error(capsys):
    err = refused(capsys, "--exp", "digits_demo", "--dry-run", "--set", "optim={lr: 0.1, lr: 0.5}")
    assert "--set" in err and "duplicate key 'lr'" in err and "line 1" in err


def test_duplicate_keys_in_a_run_config_yaml_are_an_error(tmp_path):
    cfg = from_dict({"data": {"root": "x"}}, "e")
    path = tmp_path / "config.yaml"
    save_yaml(cfg, path)
    path.write_text(path.read_text() + "name: other\n")
    with pytest.raises(ConfigError, match=f"{path}: line \\d+: duplicate key 'name'"):
        load_yaml(path)


def test_a_resubmission_over_a_config_yaml_with_duplicate_keys_is_refused(tmp_path):
    from launch.submit import _write_config

    cfg = Experiments.load(ROOT / "experiments.yaml").resolve("digits_demo", [f"run.root={tmp_path}"])
    _write_config(cfg, force=False)
    path = tmp_path / "digits_demo" / "config.yaml"
    path.write_text(path.read_text() + "name: digits_demo\n")
    with pytest.raises(ConfigError, match=f"{path}: line \\d+: duplicate key 'name'"):
        _write_config(cfg, force=False)


BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
demo: {inherit: digits_demo, sweep: {points: [{model.backbone_kwargs: {x: *h}}]}}
"""


def test_an_alias_bomb_is_refused_within_a_second(tmp_path):
    path = tmp_path / "experiments.yaml"
    path.write_text(BOMB)
    # In a child process with a memory cap: without a bound the expansion would take minutes and all memory.
    code = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)); "
            f"sys.path.insert(0, {str(ROOT)!r}); from launch.submit import main; "
            f"sys.exit(main(['--experiments', {str(path)!r}, '--exp', 'demo', '--dry-run']))")
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail("the alias bomb was still expanding after 60 s")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "aliases expand to" in done.stderr and "Traceback" not in done.stderr
    start = time.monotonic()
    with pytest.raises(ConfigError, match="more than the 200,000"):
        Experiments.load(path)
    assert time.monotonic() - start < 1.0
    print(f"alias bomb refused: {time.monotonic() - started:.2f} s in a fresh process")


def test_a_recursive_alias_is_refused():
    from imret.config import read_yaml

    with pytest.raises(ConfigError, match="recursive"):
        read_yaml("a: &x [1, *x]\n", "inline")


def test_repeated_values_written_by_yaml_dump_still_load(tmp_path):
    shared = {"root": "x", "batch_size": 8, "samples_per_class": 2}
    path = tmp_path / "experiments.yaml"
    path.write_text(yaml.safe_dump({"a": {"data": shared}, "b": {"data": shared}}))
    assert "&id001" in path.read_text()  # PyYAML writes an anchor for the repeated mapping
    assert Experiments.load(path).resolve("b").data.batch_size == 8


def test_inherit_must_name_experiments(capsys, tmp_path):
    path = experiments_file(tmp_path, "demo: {inherit: 5}\n")
    err = refused(capsys, "--experiments", str(path), "--exp", "demo", "--dry-run")
    assert "inherit: expected an experiment name or a list of names, got 5" in err


def test_a_non_text_experiment_name_is_an_error(capsys, tmp_path):
    path = experiments_file(tmp_path, "5: {data: {root: x}}\ndemo: {inherit: digits_demo}\n")
    err = refused(capsys, "--experiments", str(path), "--list")
    assert "experiment name 5 is a int" in err and "quote it" in err


def test_experiments_that_is_a_directory_is_an_error(capsys, tmp_path):
    err = refused(capsys, "--experiments", str(tmp_path), "--list")
    assert str(tmp_path) in err and "is a directory" in err


def test_an_experiment_entry_that_is_not_a_mapping_is_named(capsys, tmp_path):
    path = experiments_file(tmp_path, "demo: [1, 2]\n")
    err = refused(capsys, "--experiments", str(path), "--list")
    assert "experiment 'demo' must be a mapping" in err


# ----------------------------------------------------------------------------- ranges


@pytest.mark.parametrize("override, message", [
    ("train.max_steps=-5", "train.max_steps: must be >= 0, got -5"),
    ("optim.lr=-0.1", "optim.lr: must be >= 0, got -0.1"),
    ("optim.lr=.nan", "optim.lr: must be a finite number"),
    ("data.image_size=0", "data.image_size: must be >= 1, got 0"),
    ("data.batch_size=-8", "data.batch_size: must be >= 1, got -8"),
    ("extract.batch_size=0", "extract.batch_size: must be >= 1, got 0"),
    ("data.num_workers=-1", "data.num_workers: must be >= 0, got -1"),
    ("extract.num_workers=-2", "extract.num_workers: must be >= 0, got -2"),
    ("train.epochs=0", "train.epochs: must be >= 1, got 0"),
    ("cluster.k=0", "cluster.k: must be >= 1, got 0"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints: must be >= 1, got 0"),
    ("train.log_every=0", "train.log_every: must be >= 1, got 0"),
    ("data.steps_per_epoch=-1", "data.steps_per_epoch: must be >= 0, got -1"),
    ("evaluate.sample_queries=-3", "evaluate.sample_queries: must be >= 0, got -3"),
    ("resources.cpus_per_task=0", "resources.cpus_per_task: must be >= 1, got 0"),
    ("resources.stages={train: {time_min: -1}}", "resources.stages.train.time_min: must be >= 1, got -1"),
    ("optim.momentum=1.5", "optim.momentum / optim.betas: expected values in [0, 1)"),
])
def test_values_out_of_range_are_refused_at_load(capsys, override, message):
    err = refused(capsys, "--exp", "digits_demo", "--dry-run", "--set", override)
    assert message in err, err


def test_the_shipped_experiments_are_in_range():
    exps = Experiments.load(ROOT / "experiments.yaml")
    for name in exps.runnable():
        exps.resolve(name)  # raises on any value out of range
