"""The whole demo pipeline through submitit's local executor (2 gloo ranks), on a small setting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.submit import main


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    from shards.write import main as write_shards

    tmp = tmp_path_factory.mktemp("demo")
    assert write_shards(["digits", "--out", str(tmp / "digits"), "--no-progress"]) == 0
    common = ["--exp", "digits_demo", "--cluster", "local", "--set", f"data.root={tmp}/digits",
              "--set", f"run.root={tmp}/runs", "--set", "train.epochs=3"]
    assert main(common) == 0
    baseline = common + ["--set", "run.name=init", "--set", "extract.checkpoint=init",
                         "--set", "stages=[extract,evaluate]"]
    assert main(baseline) == 0
    return {"tmp": tmp, "common": common, "run": tmp / "runs" / "digits_demo", "init": tmp / "runs" / "init"}


def test_run_directory_holds_every_stage_output(demo):
    run: Path = demo["run"]
    for path in ("config.yaml", "train.done", "extract.done", "evaluate.done", "eval/results.json",
                 "features/query/manifest.json", "features/database/manifest.json"):
        assert (run / path).exists(), path
    assert list((run / "train" / "ckpt").glob("step-*/meta.json"))
    results = json.loads((run / "eval" / "results.json").read_text())
    for key in ("map", "map@R", "r_precision", "precision@1", "recall@1", "recall@2", "recall@4", "recall@8"):
        assert 0.0 <= results[key] <= 1.0
    assert results["meta"]["num_queries"] == 181 and results["meta"]["num_database"] == 715


def test_tensorboard_reads_back_the_scalars(demo):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(demo["run"] / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"train/loss", "train/lr/backbone", "train/lr/head", "train/images_per_s", "train/step_time_s",
                "train/data_wait_s", "train/grad_norm", "train/epoch", "eval/map", "eval/recall@1", "eval/recall@8"}
    assert expected <= tags, expected - tags
    results = json.loads((demo["run"] / "eval" / "results.json").read_text())
    assert acc.Scalars("eval/map")[-1].value == pytest.approx(results["map"], rel=1e-6)
    assert len(acc.Scalars("train/loss")) >= 3


def test_trained_embeddings_beat_random_init_on_unseen_classes(demo):
    trained = json.loads((demo["run"] / "eval" / "results.json").read_text())
    init = json.loads((demo["init"] / "eval" / "results.json").read_text())
    print(f"trained map {trained['map']:.3f} recall@1 {trained['recall@1']:.3f}; "
          f"random init map {init['map']:.3f} recall@1 {init['recall@1']:.3f}")
    assert trained["map"] > init["map"] + 0.1
    assert trained["recall@1"] > init["recall@1"] + 0.2


def test_a_second_submission_skips_finished_stages(demo, capsys):
    submissions = demo["run"] / "jobs" / "submissions.json"
    before = json.loads(submissions.read_text())
    capsys.readouterr()
    assert main(demo["common"]) == 0
    out = capsys.readouterr().out
    for stage in ("train", "extract", "evaluate"):
        assert f"{stage}: already done" in out and "skipped" in out
    assert json.loads(submissions.read_text()) == before  # nothing was submitted


def valid_png(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def test_gradcam_writes_overlays(demo, capsys):
    from tools.gradcam import main as gradcam

    out = demo["tmp"] / "gradcam"
    assert gradcam(["--exp", "digits_demo", "--runs-root", str(demo["tmp"] / "runs"), "--queries", "0", "5",
                    "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "query-00000.png"), str(out / "query-00005.png"), str(out / "grid.png")]
    width, height = valid_png(out / "query-00005.png")
    assert width == 2 * height  # image | overlay
    assert valid_png(out / "grid.png") == (width, 2 * height)


def test_lr_find_plots_and_suggests(demo, capsys, tmp_path):
    from tools.lr_find import main as lr_find

    out = tmp_path / "lr.png"
    assert lr_find(["--exp", "digits_demo", "--set", f"data.root={demo['tmp']}/digits", "--set",
                    "model.backbone=test_resnet", "--steps", "12", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tested 12 learning rates from 1.00e-07" in printed and f"plot: {out}" in printed
    assert "no suggestion: it needs at least 17 points" in printed
    assert valid_png(out)[0] > 100
