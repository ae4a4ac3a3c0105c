"""The converters' options for the seeds' own splits: the sketch seed's photo split with a shared
sketch gallery, and the CIFAR seed's held-out images in Python set order with a whole-train database."""

from __future__ import annotations

from pathlib import Path

from shards.cifar100 import set_order_head
from tests.test_converters import convert, make_cifar, make_sketchy, read_split, save_image

SEED_SKETCHY = ("--val-ratio", "0.1", "--test-ratio", "0.1", "--counts", "floor1", "--modality-splits",
                "--sketches", "shared")


def photo_ids(out: Path, split: str) -> set[tuple[str, str]]:
    return {(g["meta"]["category"], g["meta"]["photo_id"]) for g in read_split(out, split)[1]}


def test_sketchy_seed_protocol_splits_photos_and_shares_every_sketch(tmp_path):
    make_sketchy(tmp_path / "src")  # 2 categories x 4 photos x 2 sketches
    out = tmp_path / "out"
    assert convert("sketchy", "--src", str(tmp_path / "src"), "--out", str(out), *SEED_SKETCHY) == 0
    splits = {name: photo_ids(out, f"{name}_photo") for name in ("train", "val", "test")}
    # per category: val max(int(4 * 0.1), 1) = 1, test 1, train the other 2; disjoint, covering every photo
    assert [len(splits[n]) for n in ("train", "val", "test")] == [4, 2, 2]
    assert set.union(*splits.values()) == {(c, f"n0{i}_{p}") for i, c in enumerate(["airplane", "zebra"]) for p in range(4)}
    assert sum(map(len, splits.values())) == 8
    for name in ("train", "val", "test"):
        assert all(g["meta"]["modality"] == "photo" for g in read_split(out, f"{name}_photo")[1])
    manifest, sketches = read_split(out, "sketch")
    assert len(sketches) == 16 and {g["meta"]["modality"] for g in sketches} == {"sketch"}
    assert manifest["sketches"] == "shared" and manifest["counts"] == "floor1" and manifest["val_ratio"] == 0.1
    assert not (out / "train_sketch").exists() and not (out / "test_sketch").exists()


def test_sketchy_floor1_puts_a_too_small_category_in_every_split(tmp_path):
    src = tmp_path / "src"
    for category, photos in (("ant", 2), ("bee", 12)):
        for p in range(photos):
            save_image(src / "photo" / category / f"{category}{p}.jpg", p)
            save_image(src / "sketch" / category / f"{category}{p}-1.png", 50 + p)
    out = tmp_path / "out"
    assert convert("sketchy", "--src", str(src), "--out", str(out), *SEED_SKETCHY) == 0
    ants = {(c, p) for c, p in photo_ids(out, "train_photo") if c == "ant"}
    assert ants == {("ant", "ant0"), ("ant", "ant1")}
    assert ants <= photo_ids(out, "val_photo") and ants <= photo_ids(out, "test_photo")
    bees = [len({p for c, p in photo_ids(out, f"{s}_photo") if c == "bee"}) for s in ("train", "val", "test")]
    assert bees == [10, 1, 1]  # int(12 * 0.1) = 1 each


def test_sketchy_val_split_follows_the_photos_without_shared_sketches(tmp_path):
    make_sketchy(tmp_path / "src")
    out = tmp_path / "out"
    assert convert("sketchy", "--src", str(tmp_path / "src"), "--out", str(out), "--val-ratio", "0.25",
                   "--test-ratio", "0.25") == 0
    by_split = {s: read_split(out, s)[1] for s in ("train", "val", "test")}
    assert [sum(g["meta"]["modality"] == "photo" for g in rows) for rows in by_split.values()] == [4, 2, 2]
    for rows in by_split.values():  # every sketch sits with its photo
        photos = {g["meta"]["photo_id"] for g in rows if g["meta"]["modality"] == "photo"}
        assert {g["meta"]["photo_id"] for g in rows if g["meta"]["modality"] == "sketch"} == photos


def test_sketchy_shared_sketches_need_modality_splits(tmp_path, capsys):
    make_sketchy(tmp_path / "src")
    assert convert("sketchy", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
                   "--sketches", "shared") == 2
    err = capsys.readouterr().err
    assert "--sketches shared" in err and "it needs --modality-splits" in err


def test_set_order_is_cpythons_layout_of_an_int_set():
    # hand-derived: a set of 8 slots takes 3, 7, 2050 (slot 2), 9 (slot 1); the fifth item 4100 (slot 4)
    # pushes it past 3/5 full, and it is rebuilt with 32 slots in old-slot order: 2050, 3, 4100, 7, 9
    assert set_order_head([3, 7, 2050, 9, 4100], 1) == [2050, 3, 4100, 7, 9]
    assert set_order_head([3, 7, 2050, 9, 4100], 2) == [2050, 3]
    assert len(set_order_head(list(range(0, 50_000, 100)), 25)) == 20  # 500 images per class -> 20 held out


def test_cifar_seed_holdout_and_whole_train_database(tmp_path):
    files = make_cifar(tmp_path / "cifar-100-python")  # 3 classes x 4 train images, interleaved
    out = tmp_path / "out"
    assert convert("cifar100", "--src", str(tmp_path / "cifar-100-python"), "--out", str(out),
                   "--valid-set-order", "2", "--database-split") == 0
    manifest, valid = read_split(out, "valid")
    labels = files["train"]["labels"]
    expected = sorted(i for c in range(3) for i in set_order_head([j for j, lab in enumerate(labels) if lab == c], 2))
    assert sorted(g["meta"]["index"] for g in valid) == expected and len(expected) == 6
    assert manifest["valid_set_order"] == 2
    train = [g["meta"]["index"] for g in read_split(out, "train")[1]]
    assert sorted(train + expected) == list(range(12)) and not set(train) & set(expected)
    database = [g["meta"]["index"] for g in read_split(out, "database")[1]]
    assert database == list(range(12))  # every train image, the held-out ones too, in file order
