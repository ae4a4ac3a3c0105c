"""The loop as PSS runs it: cumulative masks, U = U_in + U_out, the per-subset report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from imret import features
from imret.cluster import methods, stage
from imret.cluster.clustering import Clustering, Known
from imret.cluster.subsets import subset_report
from imret.data.labels import (FROZEN, LABELLED, SELECTED, UNSELECTED, build_sidecar, earlier_labels,
                               frozen_labels, load_sidecar, save_sidecar)
from imret.distributed import DistInfo
from imret.extract import extract_stage
from imret.rundir import RunDir
from tests.helpers import tiny_images, write_tiny_split
from tests.test_train import tiny_config

LAB_KEYS, LAB_LABELS = np.array(["a", "b", "c"]), np.array([7, 3, 7])  # C = 2 true classes: 3 -> 0, 7 -> 1
U_KEYS = np.array(["u0", "u1", "u2", "u3", "u4", "u5"])


def as_dict(side) -> dict[str, np.ndarray]:
    return {"keys": side.keys, "labels": side.labels, "mask": side.mask}


# ----------------------------------------------------------------------------- the sidecar, cumulative


def test_earlier_selections_keep_their_labels_and_new_pseudo_classes_follow_them():
    first = build_sidecar(LAB_KEYS, LAB_LABELS, U_KEYS, np.array([4, 4, 9, 1, 1, 6]),
                          np.array([True, True, False, True, True, False]))
    assert first.labels.tolist() == [1, 0, 1, 3, 3, -1, 2, 2, -1]  # clusters 1 < 4 -> C + 0, C + 1
    earlier = earlier_labels(as_dict(first), U_KEYS)
    assert earlier.tolist() == [3, 3, -1, 2, 2, -1]
    # the next iteration: the method's answer for the frozen samples (u0, u1, u3, u4) must not matter
    second = build_sidecar(LAB_KEYS, LAB_LABELS, U_KEYS, np.array([0, 0, 5, 0, 0, 5]),
                           np.array([True, True, True, False, False, True]), earlier)
    assert second.mask[3:].tolist() == [FROZEN, FROZEN, SELECTED, FROZEN, FROZEN, SELECTED]
    assert second.labels[3:].tolist() == [3, 3, 4, 2, 2, 4]  # frozen labels as before; new ids from C + F = 4
    assert (second.classes, second.frozen_classes, second.clusters) == (2, 2, 1)
    # and once more: everything selected so far stays, nothing is left to select
    third = build_sidecar(LAB_KEYS, LAB_LABELS, U_KEYS, np.zeros(6, np.int64), np.ones(6, bool),
                          earlier_labels(as_dict(second), U_KEYS))
    assert third.labels[3:].tolist() == second.labels[3:].tolist() and (third.mask[3:] == FROZEN).all()
    assert third.clusters == 0 and (third.mask[:3] == LABELLED).all()


def test_only_earlier_selections_are_carried_over():
    previous = {"keys": np.array(["a", "u0", "u1", "u2", "gone"]), "labels": np.array([0, 5, -1, 4, 6]),
                "mask": np.array([LABELLED, SELECTED, UNSELECTED, FROZEN, SELECTED], np.int8)}
    # labelled and unselected samples are not carried; keys the previous sidecar lacks are clustered
    assert earlier_labels(previous, np.array(["a", "u0", "u1", "u2", "new"])).tolist() == [-1, 5, -1, 4, -1]
    assert earlier_labels(None, U_KEYS).tolist() == [-1] * 6


def test_frozen_labels_move_only_when_the_labelled_classes_change():
    earlier = np.array([-1, 5, 6, 5, -1])
    assert frozen_labels(earlier, 5) == (pytest.approx(np.array([-1, 5, 6, 5, -1])), 2)
    moved, count = frozen_labels(earlier, 8)  # more labelled classes now: the pseudo-classes move up, together
    assert moved.tolist() == [-1, 8, 9, 8, -1] and count == 2


def test_subsets_score_pseudo_labels_per_split_and_clusters_of_the_unselected():
    split_of = np.array(["uin"] * 4 + ["uout"] * 4, dtype=object)
    mask = np.array([FROZEN, SELECTED, SELECTED, UNSELECTED, SELECTED, SELECTED, UNSELECTED, UNSELECTED])
    pseudo = np.array([10, 11, 11, -1, 12, 12, -1, -1])
    clusters = np.array([-1, 0, 0, 1, 2, 2, 3, 3])
    truth = np.array([0, 1, 1, 0, 5, 6, 7, 7])
    report = subset_report(split_of, ["uin", "uout"], mask, pseudo, clusters, truth)
    assert report["uin"]["samples"] == 4 and report["uin"]["pseudo_labelled"] == 3
    assert report["uin"]["scored"] == 3 and report["uin"]["pairwise_f"] == 1.0  # {10} {11, 11} vs {0} {1, 1}
    assert report["uout"]["scored"] == 2 and report["uout"]["pairwise_f"] == 0.0  # one cluster, two classes
    assert report["all"]["pseudo_labelled"] == 5 and report["frozen"]["samples"] == 1
    assert report["unselected"]["scored"] == 3 and report["unselected"]["pairwise_f"] == 1.0  # by cluster: 1, 3, 3
    assert report["clustered"]["samples"] == 7  # everything but the frozen sample
    renamed = subset_report(np.array(["all"] * 8, dtype=object), ["all"], mask, pseudo, clusters, truth)
    assert "split_all" in renamed and renamed["split_all"]["samples"] == 8  # a split named like a subset


# ----------------------------------------------------------------------------- the stage, on extracted features


class Recorder:
    """A cluster method that learns (listed in LEARNS for the test): it records what it is given."""

    def __init__(self) -> None:
        self.calls: list[tuple[np.ndarray, Known | None]] = []

    def __call__(self, features: np.ndarray, params: object, known: Known | None) -> Clustering:
        self.calls.append((features, known))
        n = len(features)
        selected = np.arange(n) % 2 == 0
        return Clustering(np.arange(n) // 2, np.ones(n, np.float32), selected, {"method": "recorder"})


@pytest.fixture()
def recorded(monkeypatch) -> Recorder:
    recorder = Recorder()
    monkeypatch.setitem(methods.METHODS, "recorder", "tests.test_cluster_loop:RECORDER")
    monkeypatch.setattr(stage, "LEARNS", frozenset({"recorder"}))
    monkeypatch.setattr(sys.modules[__name__], "RECORDER", recorder)
    return recorder


RECORDER = Recorder()


def loop_config(tmp_path: Path, name: str, **extra: object):
    return tiny_config(tmp_path / "d", tmp_path / "runs", name, extract__checkpoint="init",
                       extract__splits=["lab", "uin", "uout"], cluster__splits=["uin", "uout"],
                       cluster__labelled=["lab"], cluster__method="recorder", **extra)


def test_stage_keeps_earlier_selections_and_gives_a_learning_method_what_it_knows(tmp_path, recorded):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_tiny_split(tmp_path / "d", "lab", tiny_images(3, 4, seed=1, prefix="l"), 5)
    write_tiny_split(tmp_path / "d", "uin", tiny_images(3, 4, seed=2, prefix="i"), 5)
    write_tiny_split(tmp_path / "d", "uout", [(key, 3 + c, img) for key, c, img in  # classes lab never shows
                                              tiny_images(2, 4, seed=3, prefix="o")], 5)
    cfg0 = loop_config(tmp_path, "iter0")
    run0 = RunDir(cfg0.run_dir)
    extract_stage(cfg0, run0, DistInfo())
    stage.cluster_stage(cfg0, run0, DistInfo())
    features0, known0 = recorded.calls[-1]
    assert len(features0) == 20 and len(known0.features) == 12 and known0.labels.tolist() == sorted([0, 1, 2] * 4)
    assert known0.workdir == run0.cluster / "recorder" and known0.workdir.is_dir()
    side0 = load_sidecar(run0.cluster / "labels.npz")
    chosen0 = side0["mask"] == SELECTED
    assert chosen0.sum() == 10 and set(side0["mask"][12:].tolist()) == {SELECTED, UNSELECTED}

    # iteration 1 reads iteration 0's sidecar (data.pseudo_labels): its selections are frozen, the rest clustered
    cfg1 = loop_config(tmp_path, "iter1", data__pseudo_labels="iter0")
    run1 = RunDir(cfg1.run_dir)
    extract_stage(cfg1, run1, DistInfo())
    summary = stage.cluster_stage(cfg1, run1, DistInfo())
    features1, known1 = recorded.calls[-1]
    assert len(features1) == 10  # only the ten not selected before
    assert len(known1.features) == 12 + 10 and known1.labels[12:].tolist() == side0["labels"][chosen0].tolist()
    side1 = load_sidecar(run1.cluster / "labels.npz")
    assert side1["keys"].tolist() == side0["keys"].tolist()
    assert (side1["mask"][chosen0] == FROZEN).all() and (side1["labels"][chosen0] == side0["labels"][chosen0]).all()
    new = side1["mask"] == SELECTED
    assert new.sum() == 5 and side1["labels"][new].min() > side0["labels"].max()  # no id collides with iter0's
    assert summary["frozen"] == 10 and summary["samples"] == 10 and summary["pseudo_labelled"] == 15

    results = json.loads((run1.cluster / "results.json").read_text())
    assert set(results["subsets"]) == {"uin", "uout", "all", "selected", "frozen", "unselected", "clustered"}
    assert results["subsets"]["uout"]["samples"] == 8 and results["subsets"]["clustered"]["samples"] == 10
    for subset in ("uin", "uout", "all", "selected", "unselected"):
        assert results[f"{subset}/pairwise_f"] == results["subsets"][subset]["pairwise_f"]
    assert results["meta"]["cumulative"] and results["meta"]["previous_sidecar"].endswith("iter0/cluster/labels.npz")
    acc = EventAccumulator(str(run1.tb))
    acc.Reload()
    assert acc.Scalars("cluster/uout/bcubed_f")[0].value == pytest.approx(results["uout/bcubed_f"])
    assert acc.Scalars("cluster/frozen")[0].value == 10

    # cluster.cumulative false: the PSS-less behaviour, every sample clustered again
    stage.cluster_stage(loop_config(tmp_path, "iter1", data__pseudo_labels="iter0", cluster__cumulative=False),
                        run1, DistInfo())
    assert len(recorded.calls[-1][0]) == 20 and FROZEN not in load_sidecar(run1.cluster / "labels.npz")["mask"]


def test_one_sample_left_is_left_unselected_without_running_the_method(tmp_path):
    write_tiny_split(tmp_path / "d", "lab", tiny_images(2, 3, seed=1, prefix="l"), 2)
    write_tiny_split(tmp_path / "d", "uin", tiny_images(2, 3, seed=2, prefix="i"), 2)
    cfg = tiny_config(tmp_path / "d", tmp_path / "runs", "late", extract__checkpoint="init",
                      extract__splits=["uin"], cluster__splits=["uin"], cluster__labelled=["lab"],
                      data__pseudo_labels=str(tmp_path / "previous.npz"))
    run = RunDir(cfg.run_dir)
    extract_stage(cfg, run, DistInfo())
    keys = features.load_features(run, "uin").keys
    # an earlier iteration selected all but the last sample: density peaks cannot run on one point
    save_sidecar(tmp_path / "previous.npz", keys, np.array([2, 2, 3, 3, 3, -1]),
                 np.array([SELECTED] * 5 + [UNSELECTED], np.int8))
    summary = stage.cluster_stage(cfg, run, DistInfo())
    side = load_sidecar(run.cluster / "labels.npz")
    assert side["mask"][6:].tolist() == [FROZEN] * 5 + [UNSELECTED] and side["labels"][-1] == -1
    assert summary["samples"] == 1 and summary["selected"] == 0 and summary["frozen"] == 5


def test_a_learning_method_needs_the_labelled_features(tmp_path, recorded):
    write_tiny_split(tmp_path / "d", "lab", tiny_images(2, 3, seed=1, prefix="l"), 2)
    write_tiny_split(tmp_path / "d", "uin", tiny_images(2, 3, seed=2, prefix="i"), 2)
    cfg = tiny_config(tmp_path / "d", tmp_path / "runs", "nolab", extract__checkpoint="init",
                      extract__splits=["uin"], cluster__splits=["uin"], cluster__labelled=["lab"],
                      cluster__method="recorder")
    run = RunDir(cfg.run_dir)
    extract_stage(cfg, run, DistInfo())
    with pytest.raises(ValueError, match="add them to extract.splits"):
        stage.cluster_stage(cfg, run, DistInfo())


def test_a_missing_previous_sidecar_is_named(tmp_path):
    write_tiny_split(tmp_path / "d", "lab", tiny_images(2, 3, seed=1, prefix="l"), 2)
    write_tiny_split(tmp_path / "d", "uin", tiny_images(2, 3, seed=2, prefix="i"), 2)
    cfg = tiny_config(tmp_path / "d", tmp_path / "runs", "orphan", extract__checkpoint="init",
                      extract__splits=["uin"], cluster__splits=["uin"], cluster__labelled=["lab"],
                      data__pseudo_labels="never_ran")
    run = RunDir(cfg.run_dir)
    extract_stage(cfg, run, DistInfo())
    with pytest.raises(ValueError, match="never_ran/cluster/labels.npz does not exist"):
        stage.cluster_stage(cfg, run, DistInfo())


# ----------------------------------------------------------------------------- U_out in the data


def test_inat_uout_is_the_rest_of_the_seeds_train_list(tmp_path):
    from imret.data.shards import ShardSplit
    from shards.write import main as write_shards
    from tests.test_loop import fake_inat

    lists = fake_inat(tmp_path / "inat")
    # PSS's train_set1.txt is L_in, U_in, U_out in that order; here its U_out part is listed nowhere else
    everything = lists["lin"] + lists["uin"] + lists["uout"]
    (tmp_path / "inat" / "train.txt").write_text("\n".join(everything) + "\n")
    assert write_shards(["inat2018", "--src", str(tmp_path / "inat"), "--out", str(tmp_path / "shards"),
                         "--no-progress", "--list", "lin=lin.txt", "--list", "uin=uin.txt",
                         "--list-rest", "uout=train.txt"]) == 0
    uout = ShardSplit(tmp_path / "shards", "uout")
    assert uout.keys.tolist() == [rel[:-4] for rel in lists["uout"]]
    lin = ShardSplit(tmp_path / "shards", "lin")
    assert not set(uout.labels.tolist()) & set(lin.labels.tolist())  # the out-of-distribution class
    assert write_shards(["inat2018", "--src", str(tmp_path / "inat"), "--out", str(tmp_path / "again"),
                         "--no-progress", "--list-rest", "uout=train.txt", "--annotations", "x=y.json"]) == 2


def test_digits_open_protocol_keeps_the_loops_test_split_and_hides_two_digits():
    from shards.digits import OPEN_DIGITS, split_of

    from sklearn.datasets import load_digits

    seen, splits = np.zeros(10, int), {"loop": [], "open": []}
    for digit in load_digits().target:
        for protocol in splits:
            splits[protocol].append((split_of(int(digit), seen[digit], protocol), int(digit)))
        seen[digit] += 1
    loop, open_ = np.array(splits["loop"]), np.array(splits["open"])
    assert ((loop[:, 0] == "test") == (open_[:, 0] == "test")).all()  # the same held-out images
    labelled = {int(d) for s, d in open_ if s == "lab"}
    assert labelled == set(range(8)) and not labelled & set(OPEN_DIGITS)
    assert {int(d) for s, d in open_ if s == "uout"} == set(OPEN_DIGITS)
    assert (open_[:, 0] == "uin").sum() == 1101 and (open_[:, 0] == "uout").sum() == 285
