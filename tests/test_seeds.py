"""The tiny twins of the CIFAR-100, CBIR and Sketchy seeds, end to end on generated native layouts.

Each twin is the experiment of the same name in experiments.yaml, with its data roots
pointed at shards converted here from fake copies of the seed dataset's native layout
(CIFAR-100 python pickles, class-per-folder catalogues, Sketchy's photo/sketch tree).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from launch.submit import main as submit
from shards.write import main as write_shards
from tests.helpers import check_gathered, gather_table
from tests.test_converters import make_cifar, make_sketchy, save_image
from tests.test_demo import valid_png

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, Path]:
    """Shards of each twin's data, and an experiments.yaml whose data roots point at them."""
    tmp = tmp_path_factory.mktemp("seeds")
    make_cifar(tmp / "cifar-100-python")
    assert write_shards(["cifar100", "--src", str(tmp / "cifar-100-python"), "--out", str(tmp / "cifar"),
                         "--valid-set-order", "4", "--database-split", "--no-progress"]) == 0
    make_sketchy(tmp / "sketchy_src")
    assert write_shards(["sketchy", "--src", str(tmp / "sketchy_src"), "--out", str(tmp / "sketchy"),
                         "--val-ratio", "0.25", "--test-ratio", "0.5", "--counts", "floor1", "--modality-splits",
                         "--sketches", "shared", "--no-progress"]) == 0
    for c, name in enumerate(("a", "b")):
        src = tmp / f"catalogue_{name}"
        for k, cls in enumerate(("boots", "coats", "shirts")):
            for i in range(5):
                save_image(src / cls / f"{cls}{i}.jpg", 50 * c + 10 * k + i, (24, 24))
        assert write_shards(["folder", "--src", str(src), "--out", str(tmp / f"cbir_{name}"),
                             "--split", "train=0.6,test=0.4", "--no-progress"]) == 0
    text = (ROOT / "experiments.yaml").read_text()
    for relative, there in (("data/cifar100_tiny", tmp / "cifar"), ("data/sketchy_tiny", tmp / "sketchy"),
                            ("data/cbir_tiny_a", tmp / "cbir_a"), ("data/cbir_tiny_b", tmp / "cbir_b")):
        assert relative in text
        text = text.replace(relative, str(there))
    (tmp / "experiments.yaml").write_text(text)
    return {"tmp": tmp, "experiments": tmp / "experiments.yaml"}


def run_twin(seeds: dict[str, Path], exp: str, runs: Path, *extra: str) -> int:
    return submit(["--experiments", str(seeds["experiments"]), "--exp", exp, "--set", f"run.root={runs}", *extra])


def test_cifar_twin_encodes_train_as_database_from_a_chosen_epoch(seeds, tmp_path, capsys):
    assert run_twin(seeds, "cifar100_tiny", tmp_path, "--cluster", "local") == 0
    run = tmp_path / "cifar100_tiny"
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["meta"]["num_queries"] == 6 and results["meta"]["num_database"] == 12  # test vs all of train
    assert 0 < results["mips_map@500"] <= results["map@500"]
    assert 0 < results["map"] <= 1 and set(results) >= {"precision@1", "recall@1", "recall@8"}
    # one step per epoch here: every epoch's checkpoint is kept, and epoch-1 is the one encoded
    assert sorted(p.name for p in (run / "train" / "ckpt").glob("step-*")) == ["step-00000001", "step-00000002"]
    for split in ("database", "test"):
        manifest = json.loads((run / "features" / split / "manifest.json").read_text())
        assert manifest["checkpoint"].endswith("step-00000001")

    from tools.show_topk import main as show_topk

    capsys.readouterr()
    for split, index in (("query", 2), ("database", 4)):
        out = tmp_path / f"{split}.png"
        assert show_topk(["--exp", "cifar100_tiny", "--runs-root", str(tmp_path), "--split", split,
                          "--query-index", str(index), "-k", "3", "--out", str(out)]) == 0
        assert valid_png(out)[0] == 4 * 96 + 5 * 4
    printed = capsys.readouterr().out
    assert "query 2 (test_00002" in printed and "query 4 (train_" in printed


def test_sketchy_twin_trains_on_triples_and_reports_the_seeds_metrics(seeds, tmp_path, capsys):
    assert run_twin(seeds, "sketchy_tiny", tmp_path, "--cluster", "local") == 0
    run = tmp_path / "sketchy_tiny"
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["meta"]["query_split"] == "test_photo" and results["meta"]["database_split"] == "sketch"
    for key in ("top1", "top3", "map", "roc_auc", "roc21_auc", "inbatch_top1", "inbatch_top3"):
        assert 0 <= results[key] <= 1, key
    assert results["top3"] >= results["top1"] and -1 <= results["cos_sim_neg"] <= 1 and -1 <= results["cos_sim_pos"] <= 1
    assert results["inbatch_top3"] >= results["inbatch_top1"] and results["meta"]["triplet_batches"] == 1
    assert results["meta"]["roc_pairs"] == 4 * 16  # every (test photo, sketch) pair: the sketches are not split
    # training drew (photo, sketch of its class, sketch of another class) triples from the shards
    from imret.checkpoint import Checkpointer, read_meta
    from imret.config import load_yaml
    from imret.data.loader import TrainData
    from imret.distributed import DistInfo

    data = TrainData(load_yaml(run / "config.yaml"), DistInfo())
    triples = data.plan.epoch(0).reshape(-1, 3)
    keys, labels = data.source.keys, data.labels
    assert all(str(keys[a]).startswith("photo/") and str(keys[p]).startswith("sketch/")
               and str(keys[n]).startswith("sketch/") for a, p, n in triples)
    assert (labels[triples[:, 0]] == labels[triples[:, 1]]).all() and (labels[triples[:, 0]] != labels[triples[:, 2]]).all()
    assert read_meta(Checkpointer(run / "train" / "ckpt").latest())["step"] == 2 * data.steps_per_epoch == 2

    from tools.roc import main as roc

    capsys.readouterr()
    assert roc(["--exp", "sketchy_tiny", "--runs-root", str(tmp_path)]) == 0
    assert f"sketchy_tiny: AUC {results['roc_auc']:.4f} over 64 pairs" in capsys.readouterr().out
    assert valid_png(run / "eval" / "roc.png")[0] >= 500


def check_table(runs: Path, table: dict[str, dict[str, str]]) -> None:
    check_gathered(runs, table, ("ap_hits@3", "map@3", "map", "precision@1"))
    for name in table:  # the seed's "mAP of r retrievals over t random test queries"
        meta = json.loads((runs / name / "eval" / "results.json").read_text())["meta"]
        assert meta["sampled_queries"] and meta["num_queries"] == 4


POINTS = ["root-cat_a_terms-angular45", "root-cat_a_terms-triplet02", "root-cat_b_terms-angular45",
          "root-cat_b_terms-triplet02"]


def test_cbir_twin_sweep_runs_through_the_local_executor(seeds, tmp_path, capsys):
    only = POINTS[1:3]  # a named subset of the grid: one catalogue each, one loss each
    assert run_twin(seeds, "cbir_tiny", tmp_path, "--cluster", "local", "--only", *only) == 0
    table = gather_table(tmp_path, "cbir_tiny/*", capsys)
    assert sorted(table) == [f"cbir_tiny/{p}" for p in only]
    check_table(tmp_path, table)
    cfg = (tmp_path / "cbir_tiny" / POINTS[2] / "config.yaml").read_text()
    assert "cbir_b" in cfg and "npair_angular" in cfg


@pytest.mark.slurm
def test_cbir_twin_sweep_runs_as_one_slurm_array(slurm_cluster, seeds, tmp_path, capsys):
    from tests.helpers import wait_until

    assert run_twin(seeds, "cbir_tiny", tmp_path, "--cluster", "slurm") == 0
    out = capsys.readouterr().out
    arrays = re.findall(r"(train|extract|evaluate): submitted array (\d+) of 4 task", out)
    assert [stage for stage, _ in arrays] == ["train", "extract", "evaluate"], out
    runs = [tmp_path / "cbir_tiny" / p for p in POINTS]
    assert wait_until(lambda: all((r / "evaluate.done").exists() for r in runs), 600)
    shown = subprocess.run(["scontrol", "show", "job", f"{arrays[0][1]}_3"], capture_output=True, text=True).stdout
    assert f"ArrayJobId={arrays[0][1]}" in shown and "ArrayTaskId=3" in shown
    table = gather_table(tmp_path, "cbir_tiny/*", capsys)
    assert sorted(table) == [f"cbir_tiny/{p}" for p in POINTS]
    check_table(tmp_path, table)
    maps = {name: float(row["map"]) for name, row in table.items()}
    assert len(set(np.round(list(maps.values()), 6))) > 1, maps  # four different runs, not one copied
