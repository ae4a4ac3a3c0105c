"""launch/submit.py: listing, dry runs and every user-error path, without running jobs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from launch.submit import main

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_shows_experiments_with_descriptions(capsys):
    code, out, _ = run(capsys, "--list")
    assert code == 0
    line = next(l for l in out.splitlines() if l.startswith("digits_demo"))
    assert "digits" in line.lower() and len(line.split()) > 3
    assert "_digits" not in out  # bases are not listed


def test_dry_run_local_shows_stages_and_ranks(capsys):
    code, out, _ = run(capsys, "--exp", "digits_demo", "--dry-run", "--cluster", "local",
                       "--set", "run.root=/nonexistent/runs")
    assert code == 0
    assert "stage train [to run]: 1 node(s) x 2 task(s) = 2 rank(s)" in out
    assert "stage evaluate [to run]: 1 node(s) x 1 task(s)" in out
    assert "dry run: nothing submitted" in out and not Path("/nonexistent/runs").exists()


def test_dry_run_slurm_shows_the_sbatch_parameters(capsys, tmp_path):
    code, out, _ = run(capsys, "--exp", "digits_demo", "--dry-run", "--cluster", "slurm", "--set", f"run.root={tmp_path}",
                       "--set", "resources.gpus_per_node=8", "--set", "resources.nodes=2",
                       "--set", "resources.partition=gpu", "--set", "data.batch_size=64",
                       "--set", "data.samples_per_class=4")
    assert code == 0
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --signal=USR2@120", "afterok:<train job id>"):
        assert line in out
    assert "2 node(s) x 8 task(s), 8 GPU(s) per node = 16 rank(s)" in out


def test_dry_run_slurm_works_where_slurm_was_never_installed(capsys, tmp_path, monkeypatch):
    # A PATH with nothing on it: no srun, sbatch or scontrol, as on a laptop.
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    code, out, err = run(capsys, "--exp", "inat_smoothap_iter1", "--dry-run", "--cluster", "slurm",
                         "--set", f"run.root={tmp_path}")
    assert code == 0, err
    assert "#SBATCH --gpus-per-node=8" in out and "srun --unbuffered" in out
    assert out.count("#!/bin/bash") >= 2 and "dry run: nothing submitted" in out


def test_sbatch_preview_is_the_script_submitit_writes(tmp_path, monkeypatch):
    from submitit.slurm.slurm import SlurmExecutor

    from imret.config import Experiments
    from slurm.executors import make_executor, sbatch_preview

    cfg = Experiments.load(ROOT / "experiments.yaml").resolve(
        "inat_smoothap_iter1", ["resources.mem_gb=64", "resources.partition=gpu", "resources.exclude=n3"])
    folder = tmp_path / "jobs" / "%j"
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    previews = {stage: sbatch_preview(cfg, stage, folder, "afterok:7") for stage in ("train", "evaluate")}
    # Submitting needs a SlurmExecutor, whose constructor insists on srun: pretend it is there.
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    for stage, preview in previews.items():
        executor, _ = make_executor(cfg, stage, "slurm", folder, dependency="afterok:7")
        written = executor._executor._make_submission_file_text("<python -u -m submitit.core._submit ...>", "uid")
        assert preview == written
    assert "#SBATCH --mem=64GB" in previews["train"] and "#SBATCH --exclude=n3" in previews["evaluate"]


def test_unknown_experiment_names_the_closest(capsys):
    code, _, err = run(capsys, "--exp", "digit_demo", "--dry-run")
    assert code == 2 and "no experiment named 'digit_demo'" in err and "digits_demo" in err


def test_unknown_yaml_key(capsys, tmp_path):
    exps = yaml.safe_load((ROOT / "experiments.yaml").read_text())
    exps["digits_demo"]["trian"] = {"epochs": 1}
    path = tmp_path / "experiments.yaml"
    path.write_text(yaml.safe_dump(exps))
    code, _, err = run(capsys, "--experiments", str(path), "--exp", "digits_demo", "--dry-run")
    assert code == 2 and "trian: unknown key; did you mean 'train'" in err


def test_bad_set(capsys):
    code, _, err = run(capsys, "--exp", "digits_demo", "--dry-run", "--set", "optim.learning_rate=0.1")
    assert code == 2 and "'optim.learning_rate' is not a config key" in err
    code, _, err = run(capsys, "--exp", "digits_demo", "--dry-run", "--set", "train.epochs=ten")
    assert code == 2 and "train.epochs: expected int" in err


def test_batch_must_divide_over_ranks(capsys):
    code, _, err = run(capsys, "--exp", "digits_demo", "--dry-run", "--cluster", "local",
                       "--set", "resources.local_ranks=7")
    assert code == 2 and "does not divide over the 7 training ranks" in err


def test_missing_shards_say_how_to_build_them(capsys, tmp_path):
    code, _, err = run(capsys, "--exp", "digits_demo", "--cluster", "local", "--set", f"data.root={tmp_path}/none",
                       "--set", f"run.root={tmp_path}/runs")
    assert code == 2 and "missing manifest.json" in err and "shards.write" in err
    assert not (tmp_path / "runs").exists()  # nothing written before the check


def test_changed_config_is_refused_unless_forced(capsys, tmp_path):
    from launch.submit import _write_config
    from imret.config import ConfigError, Experiments

    exps = Experiments.load(ROOT / "experiments.yaml")
    cfg = exps.resolve("digits_demo", [f"run.root={tmp_path}"])
    _write_config(cfg, force=False)
    _write_config(cfg, force=False)  # the same config again is fine
    changed = exps.resolve("digits_demo", [f"run.root={tmp_path}", "optim.lr=0.5"])
    with pytest.raises(ConfigError, match=r"optim.lr: 0.001 -> 0.5.*run.name=<new name>.*--force"):
        _write_config(changed, force=False)
    _write_config(changed, force=True)
    assert len(list((tmp_path / "digits_demo").glob("config.*.yaml"))) == 1  # the old one is kept
