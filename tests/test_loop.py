"""The cluster-finetune loop: one command chains the iterations; the iNat recipe on a tiny fake layout."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imret.data.labels import FROZEN, LABELLED, SELECTED, UNSELECTED, load_sidecar
from imret.rundir import RunDir
from launch.submit import main as submit
from tests.helpers import check_gathered, gather_table

SHRINK = ["--set", "data.image_size=32", "--set", "data.batch_size=8", "--set", "data.samples_per_class=2",
          "--set", "data.num_workers=0", "--set", "extract.num_workers=0", "--set", "model.backbone=test_vit",
          "--set", "model.embed_dim=16", "--set", "train.epochs=1", "--set", "train.checkpoint_every=0",
          "--set", "resources.local_ranks=2", "--set", "cluster.tau=0.5", "--set", "cluster.thresh=0.5",
          "--set", "data.eval_resize=0"]


def test_inat_iter1_dry_run_prints_the_whole_chain(capsys, tmp_path):
    assert submit(["--exp", "inat_smoothap_iter1", "--dry-run", "--cluster", "slurm",
                   "--set", f"run.root={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert out.index("experiment inat_smoothap_iter0") < out.index("experiment inat_smoothap_iter1")
    assert out.count("stage train [to run]: 1 node(s) x 8 task(s), 8 GPU(s) per node = 8 rank(s)") == 2
    assert out.count("#SBATCH --gpus-per-node=8") == 8  # train, extract, evaluate, cluster of both iterations
    assert "lr=1e-05 head_lr_mult=1; batch 384 (pk, K=4); epochs 400" in out and "embed_dim=128" in out
    assert "smooth_ap{'temperature': 0.01}" in out
    assert "train on lin, uin, uout with pseudo-labels from inat_smoothap_iter0; weights from pretrained" in out
    assert "--dependency='afterok:<inat_smoothap_iter0:cluster job id>'" in out


def fake_inat(root: Path) -> dict[str, list[str]]:
    """Generated images in iNat's folder structure, and split lists (labelled, unlabelled in and out, test)."""
    rng = np.random.default_rng(0)
    lists: dict[str, list[str]] = {"lin": [], "uin": [], "uout": [], "test": []}
    for c, (sup, cid) in enumerate([("Plantae", 5791), ("Plantae", 12), ("Aves", 3), ("Aves", 200), ("Fungi", 77)]):
        for i in range(12):
            rel = f"train_val2018/{sup}/{cid}/img{c}_{i}.jpg"
            pixels = rng.integers(0, 40, (24, 24, 3), dtype=np.uint8)
            pixels[:, 6 * c:6 * c + 6] = 220  # a class-specific band
            if c == 4:  # the class L_in never shows (U_out): a horizontal band
                pixels[:6] = 220
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / rel, quality=95)
            split = ("lin" if i < 4 else "uin" if i < 9 else "test") if c < 4 else "uout" if i < 9 else "test"
            lists[split].append(rel)
    for split, rels in lists.items():
        (root / f"{split}.txt").write_text("\n".join(rels) + "\n")
    return lists


def test_tiny_fake_inat_runs_iter1_end_to_end(tmp_path):
    from shards.write import main as write_shards

    src = tmp_path / "inat"
    fake_inat(src)
    assert write_shards(["inat2018", "--src", str(src), "--out", str(tmp_path / "shards"), "--no-progress",
                         "--list", "lin=lin.txt", "--list", "uin=uin.txt", "--list", "uout=uout.txt",
                         "--list", "test=test.txt"]) == 0
    import timm

    from imret.models.weights import write_weights

    # the recipe starts from pretrained weights: a tiny ViT's, in a cache made here (nothing downloads)
    write_weights(timm.create_model("test_vit").state_dict(), "test_vit.r160_in1k", tmp_path / "weights", "test")
    assert submit(["--exp", "inat_smoothap_iter1", "--cluster", "local", "--set", f"data.root={tmp_path}/shards",
                   "--set", f"run.root={tmp_path}/runs", "--set", f"model.weights_dir={tmp_path}/weights",
                   *SHRINK]) == 0
    for name in ("inat_smoothap_iter0", "inat_smoothap_iter1"):
        run = RunDir(tmp_path / "runs" / name)
        assert all(run.is_done(s) for s in ("train", "extract", "evaluate", "cluster")), name
        results = json.loads(run.results.read_text())
        assert {"recall@1", "recall@4", "recall@16", "recall@32"} <= set(results)
        sidecar = load_sidecar(run.cluster / "labels.npz")
        assert set(np.unique(sidecar["mask"]).tolist()) <= {LABELLED, SELECTED, UNSELECTED, FROZEN}  # 3: cumulative
        assert (sidecar["mask"] == LABELLED).sum() == 16 and (sidecar["mask"] != LABELLED).sum() == 20 + 9
    log = (tmp_path / "runs" / "inat_smoothap_iter1" / "jobs" / "submissions.json").read_text()
    assert "train" in log
    iter1 = RunDir(tmp_path / "runs" / "inat_smoothap_iter1").done_info("train")
    assert iter1["world_size"] == 2


@pytest.fixture(scope="module")
def digits_loop(tmp_path_factory) -> Path:
    from shards.write import main as write_shards

    tmp = tmp_path_factory.mktemp("loop")
    assert write_shards(["digits", "--protocol", "loop", "--out", str(tmp / "digits_loop"), "--no-progress"]) == 0
    return tmp


def test_digits_loop_runs_iter0_to_iter2_locally(digits_loop, capsys):
    common = ["--exp", "digits_loop_iter2", "--cluster", "local", "--set", f"data.root={digits_loop}/digits_loop",
              "--set", f"run.root={digits_loop}/runs"]
    assert submit(common) == 0
    out = capsys.readouterr().out
    order = [m.group(1) for m in re.finditer(r"(digits_loop_iter\d): train: submitted", out)]
    assert order == ["digits_loop_iter0", "digits_loop_iter1", "digits_loop_iter2"]
    for i in range(3):
        run = RunDir(digits_loop / "runs" / f"digits_loop_iter{i}")
        assert json.loads(run.results.read_text())["map"] > 0.3
        cluster = json.loads((run.cluster / "results.json").read_text())
        assert cluster["selected"] > 0 and cluster["pairwise_f"] > 0.4
    table = gather_table(digits_loop / "runs", "digits_loop_iter*", capsys)  # the loop's progress in one table
    assert sorted(table) == [f"digits_loop_iter{i}" for i in range(3)]
    check_gathered(digits_loop / "runs", table, ("map", "recall@1"))
    assert all(int(row["cluster/selected"]) > 0 for row in table.values())
    iter1 = RunDir(digits_loop / "runs" / "digits_loop_iter1")
    assert "initialised from digits_loop_iter0" in (iter1.jobs / next(
        e["job_id"] for e in json.loads((iter1.jobs / "submissions.json").read_text()) if e["stage"] == "train"
    ) / f"{json.loads((iter1.jobs / 'submissions.json').read_text())[0]['job_id']}_0_log.out").read_text()
