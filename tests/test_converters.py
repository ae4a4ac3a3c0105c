"""Converters from each dataset's native layout to shards: splits, keys, labels, meta and pixels.

Every test builds a tiny fake copy of the native layout (a few generated images) in
tmp_path, runs ``shards.write.main`` as a user would, and reads the result back with
``imret.data.shards.ShardSplit``.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imret.data.shards import IMAGE_EXTENSIONS, ShardSplit, image_bytes, sample_meta
from shards import writer
from shards.write import main

RNG_SEED = 1234


# ---------------------------------------------------------------------------- helpers


def pixels_for(n: int, size: tuple[int, int] = (20, 16)) -> np.ndarray:
    """A colourful image whose pixels depend on ``n``: a class-like base colour plus noise."""
    rng = np.random.default_rng(RNG_SEED + n)
    base = np.array([(n * 67) % 256, (n * 131) % 256, (n * 29) % 256], dtype=np.int16)
    noise = rng.integers(-30, 30, size=(size[1], size[0], 3), dtype=np.int16)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def save_image(path: Path, n: int, size: tuple[int, int] = (20, 16)) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = pixels_for(n, size)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.fromarray(pixels).save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return pixels


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def convert(*argv: str) -> int:
    return main([*argv, "--no-progress"])


def read_split(out: Path, split: str) -> tuple[dict, list[dict]]:
    """The manifest and every sample of a split, as dicts."""
    s = ShardSplit(out, split)
    rows = []
    for i in range(len(s)):
        members, label = s.read(i), int(s.labels[i])
        rows.append({"key": str(s.keys[i]), "label": label, "class": s.class_names[label] if label >= 0 else None,
                     "meta": sample_meta(members), "ext": next(e for e in IMAGE_EXTENSIONS if e in members),
                     "image": image_bytes(members, s.ref(i))})
    return s.manifest, rows


def shard_contents(out: Path) -> dict[str, object]:
    """Every tar's bytes and every index's arrays (np.savez stamps the time into its zip)."""
    contents: dict[str, object] = {}
    for path in sorted(out.rglob("*.tar")):
        contents[str(path.relative_to(out))] = path.read_bytes()
    for path in sorted(out.rglob("*.idx.npz")):
        with np.load(path) as z:
            contents[str(path.relative_to(out))] = {k: z[k].tolist() for k in z.files}
    return contents


def crop_close(stored: bytes, source: Path, box: tuple[int, int, int, int]) -> None:
    expected = np.asarray(Image.open(source).convert("RGB").crop(box), dtype=np.int16)
    got = decode(stored).astype(np.int16)
    assert got.shape == expected.shape
    assert np.abs(got - expected).mean() < 4  # JPEG q95 re-encoding


# ---------------------------------------------------------------------------- cifar100


def make_cifar(root: Path) -> dict[str, dict]:
    """CIFAR-100's python version as Python 2 pickled it: byte-string keys and values."""
    root.mkdir(parents=True)
    fine, coarse = [b"apple", b"bear", b"cloud"], [b"fruit", b"animal"]
    coarse_of = {0: 0, 1: 1, 2: 1}
    files = {}
    for file, per_class in (("train", 4), ("test", 2)):
        labels = [c for i in range(per_class) for c in (2, 0, 1)]  # classes interleaved, as in the real file
        images = [pixels_for(100 * (file == "test") + i, (32, 32)) for i in range(len(labels))]
        data = {b"data": np.stack([im.transpose(2, 0, 1).reshape(-1) for im in images]),
                b"fine_labels": labels, b"coarse_labels": [coarse_of[c] for c in labels],
                b"filenames": [f"img_{file}_{i}.png".encode() for i in range(len(labels))], b"batch_label": b"x"}
        (root / file).write_bytes(pickle.dumps(data, protocol=2))
        files[file] = {"images": images, "labels": labels}
    meta = {b"fine_label_names": fine, b"coarse_label_names": coarse}
    (root / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return files


def test_cifar100_train_valid_test(tmp_path):
    files = make_cifar(tmp_path / "cifar-100-python")
    out = tmp_path / "out"
    src = str(tmp_path / "cifar-100-python")
    assert convert("cifar100", "--src", src, "--out", str(out), "--valid-every", "2") == 0
    manifest, test = read_split(out, "test")
    assert manifest["class_names"] == ["apple", "bear", "cloud"] and manifest["image_format"] == "png"
    assert [r["key"] for r in test] == [f"test_{i:05d}" for i in range(6)]
    for i, row in enumerate(test):
        assert row["label"] == files["test"]["labels"][i] and row["ext"] == "png"
        assert np.array_equal(decode(row["image"]), files["test"]["images"][i])  # lossless, R/G/B planes right
        assert row["meta"]["filename"] == f"img_test_{i}.png" and row["meta"]["index"] == i
        assert row["meta"]["coarse_name"] == ("fruit" if row["label"] == 0 else "animal")
    _, train = read_split(out, "train")
    _, valid = read_split(out, "valid")
    # every 2nd image of each class from the first: ranks 0 and 2 of 4
    valid_index = [r["meta"]["index"] for r in valid]
    assert valid_index == [0, 1, 2, 6, 7, 8]
    assert [r["meta"]["index"] for r in train] == [3, 4, 5, 9, 10, 11]
    for row in train + valid:
        i = row["meta"]["index"]
        assert row["key"] == f"train_{i:05d}" and row["label"] == files["train"]["labels"][i]
        assert np.array_equal(decode(row["image"]), files["train"]["images"][i])


def test_cifar100_valid_ratio_is_seeded_and_stratified(tmp_path):
    make_cifar(tmp_path / "c")
    picks = []
    for seed, out in ((0, "a"), (0, "b"), (5, "c5")):
        assert convert("cifar100", "--src", str(tmp_path / "c"), "--out", str(tmp_path / out),
                       "--valid-ratio", "0.25", "--seed", str(seed)) == 0
        _, valid = read_split(tmp_path / out, "valid")
        _, train = read_split(tmp_path / out, "train")
        assert sorted(r["label"] for r in valid) == [0, 1, 2]  # 0.25 of 4 per class
        assert sorted(r["meta"]["index"] for r in train + valid) == list(range(12))
        picks.append([r["meta"]["index"] for r in valid])
    assert picks[0] == picks[1]
    assert convert("cifar100", "--src", str(tmp_path / "c"), "--out", str(tmp_path / "d")) == 0
    assert not (tmp_path / "d" / "valid").exists() and len(ShardSplit(tmp_path / "d", "train")) == 12


# ---------------------------------------------------------------------------- inat2018


def make_inat(root: Path) -> dict[str, Path]:
    paths = {}
    for n, rel in enumerate(["train_val2018/Plantae/5791/a1.jpg", "train_val2018/Plantae/5791/a2.jpg",
                             "train_val2018/Plantae/12/b1.jpg", "train_val2018/Aves/3/c.1.jpg",
                             "train_val2018/Aves/3/c2.jpg", "train_val2018/Plantae/12/b2.jpg"]):
        save_image(root / rel, n)
        paths[rel] = root / rel
    return paths


def test_inat2018_lists(tmp_path, monkeypatch):
    src = tmp_path / "inat"
    paths = make_inat(src)
    rels = list(paths)
    (src / "lin.txt").write_text(f"{rels[0]}\n{rels[2]}\n\n")
    (src / "uin.txt").write_text(f"{rels[1]}\n{rels[3]}\n")
    (tmp_path / "test.txt").write_text(f"{rels[4]}\n{rels[5]}\n")  # not under --src: the working directory's
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    argv = ["inat2018", "--src", str(src), "--out", str(out), "--list", "lin=lin.txt", "--list", "uin=uin.txt",
            "--list", "test=test.txt"]
    assert convert(*argv) == 0
    expect = {"lin": [rels[0], rels[2]], "uin": [rels[1], rels[3]], "test": [rels[4], rels[5]]}
    for split, split_rels in expect.items():
        manifest, rows = read_split(out, split)
        assert manifest["class_names"] == ["Aves/3", "Plantae/12", "Plantae/5791"]  # by class id, numerically
        for rel, row in zip(split_rels, rows, strict=True):
            assert row["key"] == rel[:-4].replace(".", "_")  # c.1.jpg -> .../c_1
            assert row["class"] == "/".join(rel.split("/")[1:3])  # unlabelled splits keep their true class
            assert row["meta"]["path"] == rel and row["meta"]["supercategory"] == rel.split("/")[1]
            assert row["meta"]["class_id"] == int(rel.split("/")[2])
            assert row["ext"] == "jpg" and row["image"] == paths[rel].read_bytes()  # original bytes


def test_inat2018_annotations_and_max_side(tmp_path):
    src = tmp_path / "inat"
    paths = make_inat(src)
    big = "train_val2018/Aves/3/big.jpg"
    save_image(src / big, 9, size=(40, 30))
    cats = [{"id": 3, "name": "Corvus corax", "supercategory": "Aves"},
            {"id": 12, "name": "Acer rubrum", "supercategory": "Plantae"},
            {"id": 5791, "name": "Quercus alba", "supercategory": "Plantae"},
            {"id": 7000, "name": "Unused", "supercategory": "Plantae"}]
    rels = list(paths)

    def ann_file(name: str, files: list[str], labelled: bool = True) -> None:
        images = [{"id": 100 + i, "file_name": f, "width": 1, "height": 1} for i, f in enumerate(files)]
        anns = [{"id": i, "image_id": 100 + i, "category_id": int(f.split("/")[2])} for i, f in enumerate(files)]
        (src / name).write_text(json.dumps({"images": images, "annotations": anns if labelled else [],
                                            "categories": cats}))

    ann_file("train2018.json", [rels[0], rels[2], big])
    ann_file("val2018.json", [rels[3], rels[5]])
    ann_file("test2018.json", [rels[4]], labelled=False)
    out = tmp_path / "out"
    assert convert("inat2018", "--src", str(src), "--out", str(out), "--annotations", "train=train2018.json",
                   "--annotations", "val=val2018.json", "--annotations", "test=test2018.json", "--max-side", "20") == 0
    manifest, train = read_split(out, "train")
    assert manifest["class_names"] == ["Corvus corax", "Acer rubrum", "Quercus alba"]  # used categories only
    assert [(r["label"], r["meta"]["class_id"], r["meta"]["image_id"]) for r in train] == [(2, 5791, 100), (1, 12, 101),
                                                                                           (0, 3, 102)]
    assert train[0]["image"] == paths[rels[0]].read_bytes()  # small enough: original bytes
    resized = train[2]
    assert resized["meta"]["resized_to"] == [20, 15] and resized["meta"]["image_size"] == [40, 30]
    expected = np.asarray(Image.open(src / big).convert("RGB").resize((20, 15), Image.Resampling.LANCZOS), np.int16)
    assert np.abs(decode(resized["image"]).astype(np.int16) - expected).mean() < 4
    _, val = read_split(out, "val")
    assert [(r["label"], r["meta"]["supercategory"]) for r in val] == [(0, "Aves"), (1, "Plantae")]
    _, test = read_split(out, "test")
    assert [(r["label"], r["meta"]["class_id"]) for r in test] == [(-1, None)]  # test2018 has no labels


# ---------------------------------------------------------------------------- cub200


CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross", "004.Groove_billed_Ani"]


def make_cub(root: Path, per_class: int = 2, size: tuple[int, int] = (20, 16)) -> list[dict]:
    rows = []
    for c, name in enumerate(CUB_CLASSES, 1):
        for i in range(per_class):
            rel = f"{name}/{name.split('.')[1]}_{c:04d}_{i}.jpg"
            rows.append({"id": len(rows) + 1, "class": c, "rel": rel, "bbox": (2.0 + i, 3.0, 10.0, 8.5 + c)})
            save_image(root / "images" / rel, len(rows), size)
    (root / "images.txt").write_text("".join(f"{r['id']} {r['rel']}\n" for r in rows))
    (root / "image_class_labels.txt").write_text("".join(f"{r['id']} {r['class']}\n" for r in rows))
    (root / "bounding_boxes.txt").write_text("".join(f"{r['id']} {' '.join(map(str, r['bbox']))}\n" for r in rows))
    (root / "classes.txt").write_text("".join(f"{c} {n}\n" for c, n in enumerate(CUB_CLASSES, 1)))
    return rows


def test_cub200_unseen_classes_and_crop(tmp_path):
    src = tmp_path / "CUB_200_2011"
    rows = make_cub(src)
    for crop in (False, True):
        out = tmp_path / f"out{crop}"
        assert convert("cub200", "--src", str(src), "--out", str(out), *(["--crop"] if crop else [])) == 0
        for split, classes in (("train", (1, 2)), ("test", (3, 4))):
            manifest, got = read_split(out, split)
            assert manifest["class_names"] == CUB_CLASSES and manifest["crop"] is crop
            expect = [r for r in rows if r["class"] in classes]
            assert [g["key"] for g in got] == [r["rel"][:-4].replace(".", "_") for r in expect]
            for r, g in zip(expect, got, strict=True):
                assert g["label"] == r["class"] - 1 and g["class"] == CUB_CLASSES[r["class"] - 1]
                assert g["meta"]["bbox"] == list(r["bbox"]) and g["meta"]["path"] == r["rel"]
                assert g["meta"]["image_id"] == r["id"] and g["meta"]["class_id"] == r["class"]
                source = src / "images" / r["rel"]
                if not crop:
                    assert g["image"] == source.read_bytes()
                else:
                    x, y, w, h = r["bbox"]
                    box = (round(x), round(y), min(20, int(x + w + 0.5)), min(16, int(y + h + 0.5)))
                    assert g["meta"]["crop_box"] == list(box)
                    crop_close(g["image"], source, box)


# ---------------------------------------------------------------------------- cars196


def make_cars(root: Path) -> list[dict]:
    from scipy.io import savemat

    rows = []
    for n in range(8):
        cls = n % 4 + 1
        rel = f"car_ims/{n + 1:06d}.jpg"
        save_image(root / rel, 50 + n)
        rows.append({"rel": rel, "box": (1 + n % 3, 2, 15, 13), "class": cls, "test": n % 2})
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    ann = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])  # a 1 x N struct array, as in the devkit
    for i, r in enumerate(rows):
        ann[0, i] = (r["rel"], *(np.array([[v]], dtype=np.uint16) for v in r["box"]),
                     np.array([[r["class"]]], dtype=np.uint8), np.array([[r["test"]]], dtype=np.uint8))
    names = np.empty((1, 4), dtype=object)
    names[0, :] = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 2012", "BMW M3 2012"]
    savemat(root / "cars_annos.mat", {"annotations": ann, "class_names": names})
    return rows


def test_cars196_mat_file_and_crop(tmp_path):
    src = tmp_path / "cars"
    rows = make_cars(src)
    for crop in (False, True):
        out = tmp_path / f"out{crop}"
        assert convert("cars196", "--src", str(src), "--out", str(out), *(["--crop"] if crop else [])) == 0
        for split, classes in (("train", (1, 2)), ("test", (3, 4))):
            manifest, got = read_split(out, split)
            assert manifest["class_names"][0] == "AM General Hummer SUV 2000" and len(manifest["class_names"]) == 4
            expect = [r for r in rows if r["class"] in classes]
            assert [g["key"] for g in got] == [r["rel"][:-4] for r in expect]
            for r, g in zip(expect, got, strict=True):
                x1, y1, x2, y2 = r["box"]
                assert g["label"] == r["class"] - 1 and g["meta"]["class_id"] == r["class"]
                assert g["meta"]["bbox"] == [x1, y1, x2 - x1, y2 - y1]
                assert g["meta"]["official_split"] == ("test" if r["test"] else "train")
                if crop:
                    crop_close(g["image"], src / r["rel"], (x1, y1, x2, y2))
                else:
                    assert g["image"] == (src / r["rel"]).read_bytes()


# ---------------------------------------------------------------------------- sop


def test_sop_files_define_splits(tmp_path):
    src = tmp_path / "Stanford_Online_Products"
    header = "image_id class_id super_class_id path\n"
    train = [(1, 1, 1, "bicycle_final/111_0.JPG"), (2, 1, 1, "bicycle_final/111_1.JPG"),
             (3, 2, 2, "chair_final/222_0.JPG")]
    test = [(4, 4, 1, "bicycle_final/444_0.JPG"), (5, 3, 2, "chair_final/333.v2_0.JPG")]
    for n, row in enumerate(train + test):
        save_image(src / row[3], n)
    for file, rows in (("Ebay_train.txt", train), ("Ebay_test.txt", test)):
        (src / file).write_text(header + "".join(" ".join(map(str, r)) + "\n" for r in rows))
    out = tmp_path / "out"
    assert convert("sop", "--src", str(src), "--out", str(out)) == 0
    for split, rows in (("train", train), ("test", test)):
        manifest, got = read_split(out, split)
        assert manifest["class_names"] == ["1", "2", "3", "4"]
        for (image_id, cls, sup, rel), g in zip(rows, got, strict=True):
            assert g["key"] == rel[:-4].replace(".", "_") and g["label"] == cls - 1 and g["class"] == str(cls)
            assert g["meta"] == {"label": cls - 1, "path": rel, "image_id": image_id, "class_id": cls,
                                 "super_class_id": sup, "super_class": rel.split("_final")[0],
                                 "image_size": [20, 16]}
            assert g["image"] == (src / rel).read_bytes()


# ---------------------------------------------------------------------------- inshop


def test_inshop_query_gallery_share_item_labels(tmp_path):
    src = tmp_path / "inshop"
    rows = [("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "train"),
            ("img/WOMEN/Dresses/id_00000002/02_2_side.jpg", "id_00000002", "train"),
            ("img/MEN/Denim/id_00000080/01_1_front.jpg", "id_00000080", "query"),
            ("img/MEN/Denim/id_00000080/01_2_side.jpg", "id_00000080", "gallery"),
            ("img/WOMEN/Skirts/id_00000007/01_1_front.jpg", "id_00000007", "gallery"),
            ("img/WOMEN/Skirts/id_00000007/01_4_full.jpg", "id_00000007", "query")]
    for n, (rel, _, _) in enumerate(rows):
        save_image(src / "Img" / rel, n)  # the download's own layout: Img/img/...
    (src / "Eval").mkdir()
    (src / "Eval" / "list_eval_partition.txt").write_text(
        f"{len(rows)}\nimage_name item_id evaluation_status\n"
        + "".join(f"{rel}     {item}  {status}\n" for rel, item, status in rows))
    (src / "Anno").mkdir()
    (src / "Anno" / "list_bbox_inshop.txt").write_text(
        f"{len(rows)}\nimage_name clothes_type pose_type x_1 y_1 x_2 y_2\n"
        + "".join(f"{rel}  1  {n % 3 + 1}  {n} 1 {n + 12} 14\n" for n, (rel, _, _) in enumerate(rows)))
    out = tmp_path / "out"
    assert convert("inshop", "--src", str(src), "--out", str(out)) == 0
    items = ["id_00000002", "id_00000007", "id_00000080"]
    for split in ("train", "query", "gallery"):
        manifest, got = read_split(out, split)
        assert manifest["class_names"] == items
        expect = [(n, r) for n, r in enumerate(rows) if r[2] == split]
        for (n, (rel, item, status)), g in zip(expect, got, strict=True):
            assert g["key"] == rel[:-4] and g["class"] == item and g["label"] == items.index(item)
            assert g["meta"]["item_id"] == item and g["meta"]["evaluation_status"] == status
            assert g["meta"]["gender"] == rel.split("/")[1] and g["meta"]["category"] == rel.split("/")[2]
            assert g["meta"]["bbox"] == [n, 1, 12, 13] and g["meta"]["pose_type"] == n % 3 + 1
            assert g["image"] == (src / "Img" / rel).read_bytes()
    _, query = read_split(out, "query")
    _, gallery = read_split(out, "gallery")
    assert sorted(r["label"] for r in query) == sorted(r["label"] for r in gallery) == [1, 2]


# ---------------------------------------------------------------------------- sketchy


def make_sketchy(root: Path, tx: bool = True) -> dict[str, Path]:
    level = "tx_000000000000/" if tx else ""
    files = {}
    for c, category in enumerate(["airplane", "zebra"]):
        for p in range(4):
            photo_id = f"n0{c}_{p}"
            files[f"photo/{category}/{photo_id}"] = root / f"photo/{level}{category}/{photo_id}.jpg"
            save_image(files[f"photo/{category}/{photo_id}"], 10 * c + p)
            for s in (1, 2):
                files[f"sketch/{category}/{photo_id}-{s}"] = root / f"sketch/{level}{category}/{photo_id}-{s}.png"
                save_image(files[f"sketch/{category}/{photo_id}-{s}"], 100 + 10 * c + p + s)
    return files


def test_sketchy_photo_split_and_modalities(tmp_path):
    src = tmp_path / "sketchy"
    files = make_sketchy(src)
    out = tmp_path / "out"
    assert convert("sketchy", "--src", str(src), "--out", str(out), "--test-ratio", "0.25", "--seed", "3") == 0
    seen = set()
    for split in ("train", "test"):
        manifest, got = read_split(out, split)
        assert manifest["class_names"] == ["airplane", "zebra"]
        photos = {(g["meta"]["category"], g["meta"]["photo_id"]) for g in got if g["meta"]["modality"] == "photo"}
        assert len(photos) == (2 if split == "test" else 6)  # 0.25 of 4 photos per category
        for g in got:
            meta = g["meta"]
            assert (meta["category"], meta["photo_id"]) in photos  # sketches follow their photo
            assert g["class"] == meta["category"] and g["key"].split("/")[0] == meta["modality"]
            assert g["image"] == files[g["key"]].read_bytes()  # jpg photos and png sketches as they are
            assert meta["path"] == files[g["key"]].relative_to(src).as_posix() and "tx_000000000000" in meta["path"]
            assert g["ext"] == ("jpg" if meta["modality"] == "photo" else "png")
            if meta["modality"] == "sketch":
                assert g["key"].endswith(f"{meta['photo_id']}-{meta['sketch_index']}")
        assert sum(g["meta"]["modality"] == "sketch" for g in got) == 2 * len(photos)
        seen |= {g["key"] for g in got}
    assert seen == set(files)


def test_sketchy_test_list_and_flat_layout(tmp_path):
    src = tmp_path / "sketchy"
    make_sketchy(src, tx=False)
    (tmp_path / "test_photos.txt").write_text("airplane/n00_1.jpg\nn01_3\n")
    out = tmp_path / "out"
    test_list = str(tmp_path / "test_photos.txt")
    assert convert("sketchy", "--src", str(src), "--out", str(out), "--test-list", test_list) == 0
    _, test = read_split(out, "test")
    assert [g["key"] for g in test] == ["photo/airplane/n00_1", "sketch/airplane/n00_1-1", "sketch/airplane/n00_1-2",
                                        "photo/zebra/n01_3", "sketch/zebra/n01_3-1", "sketch/zebra/n01_3-2"]
    assert len(ShardSplit(out, "train")) == 18
    (tmp_path / "bad.txt").write_text("n09_9\n")
    assert convert("sketchy", "--src", str(src), "--out", str(tmp_path / "o2"), "--test-list",
                   str(tmp_path / "bad.txt")) == 2


def test_sketchy_modality_splits(tmp_path):
    src = tmp_path / "sketchy"
    make_sketchy(src)
    out = tmp_path / "out"
    assert convert("sketchy", "--src", str(src), "--out", str(out), "--test-ratio", "0.25", "--modality-splits") == 0
    sizes = {}
    for split in ("train_photo", "train_sketch", "test_photo", "test_sketch"):
        _, got = read_split(out, split)
        modality = split.split("_")[1]
        assert got and all(g["meta"]["modality"] == modality and g["key"].startswith(modality) for g in got)
        sizes[split] = len(got)
    assert sizes == {"train_photo": 6, "train_sketch": 12, "test_photo": 2, "test_sketch": 4}
    test_photos = {g["meta"]["photo_id"] for g in read_split(out, "test_photo")[1]}
    assert {g["meta"]["photo_id"] for g in read_split(out, "test_sketch")[1]} == test_photos


# ---------------------------------------------------------------------------- folder


def test_folder_seeded_split(tmp_path):
    src = tmp_path / "catalogue"
    made = {}
    layout = {"boots": ["a.jpg"], "coats": ["x.PNG", "y.jpeg"],
              "shirts": ["s1.jpg", "s2.JPG", "sub/s3.webp", "sub/s.4.png", "s5.jpg"]}
    for c, (cls, names) in enumerate(layout.items()):
        for i, name in enumerate(names):
            path = src / cls / name
            if name.endswith(".webp"):
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels_for(10 * c + i)).save(path, format="WEBP", lossless=True)
            else:
                save_image(path, 10 * c + i)
            made[f"{cls}/{name}"] = path
    (src / "shirts" / "notes.txt").write_text("not an image")
    (src / "shirts" / ".hidden.jpg").write_bytes(b"AppleDouble junk")
    out = tmp_path / "out"
    assert convert("folder", "--src", str(src), "--out", str(out), "--split", "train=0.6,test=0.4") == 0
    _, train = read_split(out, "train")
    _, test = read_split(out, "test")
    counts = {cls: (sum(g["class"] == cls for g in train), sum(g["class"] == cls for g in test)) for cls in layout}
    # 1 image: all in train; 2: one each (every split gets one); 5: 3 + 2
    assert counts == {"boots": (1, 0), "coats": (1, 1), "shirts": (3, 2)}
    assert sorted(g["meta"]["path"] for g in train + test) == sorted(made)
    for g in train + test:
        rel = g["meta"]["path"]
        assert g["key"] == rel.rsplit(".", 1)[0].replace(".", "_") and g["class"] == rel.split("/")[0]
        assert g["label"] == sorted(layout).index(g["class"]) and g["meta"]["class"] == g["class"]
        assert g["image"] == made[rel].read_bytes()
        assert g["ext"] == {"jpg": "jpg", "jpeg": "jpg", "png": "png", "webp": "webp"}[rel.rsplit(".", 1)[1].lower()]
    assert read_split(out, "train")[0]["split"] == "train" and read_split(out, "test")[0]["split_ratios"] == "train=0.6,test=0.4"
    for split in (train, test):  # ordered by class, then path
        order = [(g["label"], g["meta"]["path"]) for g in split]
        assert order == sorted(order)
    again = tmp_path / "again"
    assert convert("folder", "--src", str(src), "--out", str(again), "--split", "train=0.6,test=0.4") == 0
    assert shard_contents(out) == shard_contents(again)


def test_folder_given_split_folders(tmp_path):
    src = tmp_path / "catalogue"
    for split, classes in (("train", ["a", "b"]), ("val", ["b", "c"])):
        for n, cls in enumerate(classes):
            save_image(src / split / cls / f"{cls}{n}.jpg", n)
    out = tmp_path / "out"
    assert convert("folder", "--src", str(src), "--out", str(out)) == 0
    manifest, val = read_split(out, "val")
    assert manifest["class_names"] == ["a", "b", "c"] and manifest["splits_from"] == "folders"
    assert [(g["key"], g["label"], g["meta"]["path"]) for g in val] == [("b/b0", 1, "val/b/b0.jpg"),
                                                                       ("c/c1", 2, "val/c/c1.jpg")]
    assert not (out / "test").exists()
    assert convert("folder", "--src", str(src), "--out", str(tmp_path / "o2"), "--split", "train=1") == 2


# ---------------------------------------------------------------------------- bad images, resume, workers


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 200])  # cut inside the entropy-coded data


def make_bad_cub(src: Path) -> list[str]:
    """A CUB layout with a truncated JPEG, a non-image and a missing file among the train images."""
    rows = make_cub(src, per_class=5, size=(48, 40))
    bad = [rows[3]["rel"], rows[6]["rel"], rows[8]["rel"]]  # all in class 1 or 2: train
    truncate(src / "images" / bad[0])
    (src / "images" / bad[1]).write_bytes(b"this is not a JPEG")
    (src / "images" / bad[2]).unlink()
    return [str(src / "images" / b) for b in bad]


def test_bad_images_fail_then_skip_resumes(tmp_path, capsys):
    src = tmp_path / "cub"
    bad = make_bad_cub(src)
    out = tmp_path / "out"
    argv = ["cub200", "--src", str(src), "--out", str(out), "--shard-size", "2000"]
    assert convert(*argv) == 1
    err = capsys.readouterr().err
    assert bad[0] in err and "truncated" in err and "--on-bad-image skip" in err
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("*.tar")}
    assert finished and not (out / "train" / "manifest.json").exists()  # the shards before it are kept

    assert convert(*argv, "--on-bad-image", "skip") == 0
    captured = capsys.readouterr()
    assert all(b in captured.err for b in bad)  # one warning per file
    manifest, train = read_split(out, "train")
    assert manifest["num_skipped"] == 3 and manifest["num_samples"] == 7 and manifest["num_items"] == 10
    assert [s["path"] for s in manifest["skipped"]] == bad
    reasons = [s["reason"] for s in manifest["skipped"]]
    assert "truncated" in reasons[0] and "not an image" in reasons[1] and reasons[2] == "file not found"
    assert all((out / "train" / n).stat().st_mtime_ns == t for n, t in finished.items())
    assert len(ShardSplit(out, "test")) == 10

    clean = tmp_path / "clean"  # the same, in one go, with two workers
    assert convert("cub200", "--src", str(src), "--out", str(clean), "--shard-size", "2000", "--workers", "2",
                   "--on-bad-image", "skip") == 0
    assert shard_contents(out) == shard_contents(clean)
    assert json.loads((clean / "train" / "manifest.json").read_text())["skipped"] == manifest["skipped"]

    assert convert(*argv) == 1  # complete, but only with images left out: fail does not accept it
    assert "left out 3 bad images" in capsys.readouterr().err


def interrupt_after(monkeypatch, writes: int) -> None:
    """Make the writer stop (as a killed job would) after ``writes`` samples."""
    real = writer.ShardStream.write
    calls = {"n": 0}

    def write(self, sample):
        calls["n"] += 1
        if calls["n"] > writes:
            raise KeyboardInterrupt("injected")
        real(self, sample)

    monkeypatch.setattr(writer.ShardStream, "write", write)


def test_interrupted_write_resumes_to_the_same_shards(tmp_path, monkeypatch):
    src = tmp_path / "cub"
    bad = make_bad_cub(src)
    argv = ["--src", str(src), "--shard-size", "2000", "--on-bad-image", "skip"]
    assert convert("cub200", *argv, "--out", str(tmp_path / "clean")) == 0
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        interrupt_after(m, 6)  # train has 7 good images: stops after the skipped ones
        with pytest.raises(KeyboardInterrupt):
            convert("cub200", *argv, "--out", str(out))
    done = writer.finished_shards(out / "train", "train")
    assert 1 < len(done) and sum(d["num_samples"] for d in done) < 7
    assert writer.resume_point(out / "train", done)[1] != []  # the finished shards hold skipped items
    assert convert("cub200", *argv, "--out", str(out)) == 0
    assert shard_contents(out) == shard_contents(tmp_path / "clean")
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    assert [s["path"] for s in manifest["skipped"]] == bad


def test_workers_give_identical_shards(tmp_path):
    src = tmp_path / "sketchy"
    make_sketchy(src)
    for workers in ("1", "2"):
        assert convert("sketchy", "--src", str(src), "--out", str(tmp_path / workers), "--workers", workers,
                       "--shard-size", "3000") == 0
    one, two = shard_contents(tmp_path / "1"), shard_contents(tmp_path / "2")
    assert len([k for k in one if k.endswith(".tar")]) > 2 and one == two


def test_changed_options_are_refused_unless_overwrite(tmp_path, capsys):
    src = tmp_path / "cub"
    make_cub(src)
    out = tmp_path / "out"
    assert convert("cub200", "--src", str(src), "--out", str(out)) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")}
    capsys.readouterr()
    assert convert("cub200", "--src", str(src), "--out", str(out), "--crop") == 2
    err = capsys.readouterr().err
    assert "written with other settings (changed: crop" in err and "Nothing was deleted" in err and "--overwrite" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")} == before  # finished work untouched
    assert convert("cub200", "--src", str(src), "--out", str(out), "--crop", "--overwrite") == 0
    assert "--overwrite: rewriting it" in capsys.readouterr().out
    _, train = read_split(out, "train")
    assert all("crop_box" in g["meta"] for g in train)


# ---------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize("dataset, extra, missing", [
    ("cub200", [], "{src}/missing"),
    ("folder", [], "{src}/missing"),
    ("cifar100", [], "{src}/missing"),
    ("cub200", ["MAKE"], "{src}/bounding_boxes.txt"),
    ("cars196", ["MAKE", "--annotations", "nope.mat"], "{src}/nope.mat"),
    ("sop", ["MAKE"], "{src}/Ebay_test.txt"),
    ("inshop", ["MAKE"], "list_eval_partition.txt"),
    ("inat2018", ["MAKE", "--list", "lin=lin.txt"], "{src}/lin.txt"),
    ("inat2018", ["MAKE", "--annotations", "train=train2018.json"], "{src}/train2018.json"),
    ("sketchy", ["MAKE"], "{src}/photo"),
])
def test_missing_inputs_are_named(tmp_path, capsys, dataset, extra, missing):
    src = tmp_path / "src"
    if "MAKE" in extra:
        src.mkdir()
        (src / "images.txt").write_text("1 a/b.jpg\n")
        (src / "image_class_labels.txt").write_text("1 1\n")
        (src / "Ebay_train.txt").write_text("image_id class_id super_class_id path\n")
        root = src
    else:
        root = src / "missing"
    argv = [dataset, "--src", str(root), "--out", str(tmp_path / "out"), *(e for e in extra if e != "MAKE")]
    assert convert(*argv) == 2
    err = capsys.readouterr().err
    assert missing.format(src=src) in err and "Traceback" not in err


def test_src_is_required(capsys):
    assert convert("sop") == 2
    assert "--src is required" in capsys.readouterr().err


def test_keys_are_unique_within_a_split(tmp_path, capsys):
    src = tmp_path / "c"
    save_image(src / "a" / "x.jpg", 1)
    save_image(src / "a" / "x.png", 2)
    assert convert("folder", "--src", str(src), "--out", str(tmp_path / "o"), "--split", "train=1") == 2
    assert "both give the sample key 'a/x'" in capsys.readouterr().err
