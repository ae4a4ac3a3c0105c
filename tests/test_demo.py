"""The whole demo pipeline through submitit's local executor (2 gloo ranks), on a small setting."""

from __future__ import annotations

import json
import os
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


def test_tensorboard_holds_the_retrieval_grid_projector_and_hparams(demo):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(demo["run"] / "tb"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert "eval/top_k" in acc.Tags()["images"]
    top_k = acc.Images("eval/top_k")[-1]
    assert top_k.width > 8 * 64 and top_k.height > 64  # 8 queries x (query + 8 results) tiles of 64 px
    projector = (demo["run"] / "tb" / "projector_config.pbtxt").read_text()
    assert 'tensor_name: "database' in projector and "sprite" in projector
    hparams = {}
    for root, _, files in os.walk(demo["run"] / "tb"):
        for name in files:
            if name.startswith("events.out"):
                sub = EventAccumulator(os.path.join(root, name))
                sub.Reload()
                try:
                    contents = sub.PluginTagToContent("hparams")
                except KeyError:  # an event file without hparams (the scalars' own)
                    continue
                for content in contents.values():
                    data = plugin_data_pb2.HParamsPluginData.FromString(content)
                    if data.HasField("session_start_info"):
                        hparams = dict(data.session_start_info.hparams)
    assert hparams["backbone"].string_value == "resnet18" and hparams["embed_dim"].number_value == 64


def test_gather_tabulates_the_runs(demo, capsys, tmp_path):
    from tools.gather import main as gather

    assert gather(["--exp", "*", "--runs-root", str(demo["tmp"] / "runs"), "--csv", str(tmp_path / "t.csv")]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    rows = {line.split()[0]: line.split() for line in lines[1:3]}
    assert header[:3] == ["run", "map", "map@R"] and set(rows) == {"digits_demo", "init"}
    for name, cells in rows.items():
        results = json.loads((demo["tmp"] / "runs" / name / "eval" / "results.json").read_text())
        assert float(cells[header.index("map")]) == pytest.approx(results["map"], abs=6e-5)
        assert float(cells[header.index("recall@1")]) == pytest.approx(results["recall@1"], abs=6e-5)
    assert (tmp_path / "t.csv").read_text().startswith("run,map,map@R")
    assert gather(["--exp", "nope*", "--runs-root", str(demo["tmp"] / "runs")]) == 2
    assert "no run under" in capsys.readouterr().err


def test_query_finds_a_database_image_as_its_own_nearest_neighbour(demo, capsys, tmp_path):
    from imret.data.loader import decode_image
    from imret.data.shards import ShardSplit
    from tools.query import main as query

    database = ShardSplit(demo["tmp"] / "digits", "database")
    picks = [3, 200]
    for i in picks:
        decode_image(database, i).save(tmp_path / f"item{i}.png")
    grid_png = tmp_path / "grid.png"
    assert query(["--exp", "digits_demo", "--runs-root", str(demo["tmp"] / "runs"), "-k", "4",
                  str(tmp_path / "item3.png"), str(tmp_path / "item200.png"), "--grid", str(grid_png)]) == 0
    out = capsys.readouterr().out.splitlines()
    firsts = [out[i + 2].split() for i, line in enumerate(out) if line.endswith(".png:")]
    for i, first in zip(picks, firsts):
        rank, score, _label, key = first[:4]
        assert rank == "1" and key == database.keys[i] and float(score) == pytest.approx(1.0, abs=1e-3)
    assert valid_png(grid_png)[0] > 4 * 96
    assert query(["--exp", "digits_demo", "--runs-root", str(demo["tmp"] / "runs"), str(tmp_path / "none.png")]) == 2
    assert "cannot read image" in capsys.readouterr().err


def test_show_topk_and_roc_draw_pngs_that_agree_with_the_results(demo, capsys, tmp_path):
    import numpy as np

    from tools.roc import main as roc
    from tools.show_topk import main as show_topk

    runs = str(demo["tmp"] / "runs")
    assert show_topk(["--exp", "digits_demo", "--runs-root", runs, "--query-index", "7", "-k", "5",
                      "--out", str(tmp_path / "top.png")]) == 0
    listed = capsys.readouterr().out.splitlines()[1:6]
    with np.load(demo["run"] / "eval" / "neighbours.npz") as z:
        row = int(np.flatnonzero(z["queries"] == 7)[0])
        expected = z["scores"][row, :5]
    assert [float(line.split()[1]) for line in listed] == pytest.approx(expected.tolist(), abs=1e-4)
    assert valid_png(tmp_path / "top.png") == (6 * 96 + 7 * 4, 96 + 2 * 4)
    # a database item as the query: never itself among its results, the rest by descending score
    assert show_topk(["--exp", "digits_demo", "--runs-root", runs, "--split", "database", "--query-index", "3",
                      "-k", "4", "--out", str(tmp_path / "db.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    own_key = lines[0].split("(")[1].split(",")[0]
    listed = [line.split() for line in lines[1:5]]
    assert own_key not in {cells[3] for cells in listed} and len(listed) == 4
    assert [float(c[1]) for c in listed] == sorted((float(c[1]) for c in listed), reverse=True)

    results = json.loads((demo["run"] / "eval" / "results.json").read_text())
    assert 0.5 < results["roc_auc"] <= 1 and results["cos_sim_pos"] > results["cos_sim_neg"]
    assert roc(["--exp", "digits_demo", "--exp", "init", "--runs-root", runs, "--out", str(tmp_path / "roc.png")]) == 0
    printed = capsys.readouterr().out
    assert f"digits_demo: AUC {results['roc_auc']:.4f}" in printed
    assert valid_png(tmp_path / "roc.png")[0] >= 500
    assert roc(["--exp", "missing", "--runs-root", runs]) == 2
