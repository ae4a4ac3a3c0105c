"""Shard writing and random-access reading: round trip, resume, and damaged files."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from imret.data.shards import ShardError, ShardSplit, image_bytes, sample_meta
from shards import writer
from shards.writer import SplitSource, finished_shards, write_split
from tests.helpers import encode_png, tiny_images, write_tiny_split


def pixels(split: ShardSplit, i: int) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image_bytes(split.read(i), split.ref(i)))))


def test_round_trip_keys_labels_pixels(tmp_path):
    items = tiny_images(3, 7, seed=0)
    manifest = write_tiny_split(tmp_path, "train", items, 3, shard_bytes=4000)  # several shards
    assert len(manifest["shards"]) > 1 and manifest["num_samples"] == 21
    assert manifest["class_counts"] == [7, 7, 7] and manifest["class_names"] == ["0", "1", "2"]
    split = ShardSplit(tmp_path, "train")
    assert len(split) == 21
    for i, (key, label, img) in enumerate(items):
        assert split.keys[i] == key and split.labels[i] == label
        assert np.array_equal(pixels(split, i), img)
        assert sample_meta(split.read(i))["label"] == label


def test_resume_keeps_finished_shards(tmp_path, monkeypatch):
    items = tiny_images(2, 10, seed=1)
    source = SplitSource("train", ["0", "1"], items, encode_png)
    real_encode = encode_png
    calls = {"n": 0}

    def failing(item):
        calls["n"] += 1
        if calls["n"] == 14:
            raise KeyboardInterrupt("interrupted")
        return real_encode(item)

    with pytest.raises(KeyboardInterrupt):
        write_split(SplitSource("train", ["0", "1"], items, failing), tmp_path, dataset="t", converter_version=1,
                    shard_bytes=3000, progress=False)
    done = finished_shards(tmp_path / "train", "train")
    assert done and not (tmp_path / "train" / "manifest.json").exists()
    finished_names = {d["name"] for d in done}
    # the shard being written when the interruption came exists only under its temporary name
    assert {p.name for p in (tmp_path / "train").glob("*.tar")} == finished_names
    assert len(list((tmp_path / "train").glob(".*.tar.tmp"))) == 1
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "train").glob("*.tar") if p.name in finished_names}
    skipped = sum(d["num_samples"] for d in done)
    encoded = []
    monkeypatch.setattr(source, "encode", lambda item: encoded.append(item[0]) or real_encode(item))
    write_split(source, tmp_path, dataset="t", converter_version=1, shard_bytes=3000, progress=False)
    assert encoded == [it[0] for it in items[skipped:]]  # only the samples after the finished shards
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    split = ShardSplit(tmp_path, "train")
    assert split.keys.tolist() == [it[0] for it in items]


def test_truncated_shard_is_named(tmp_path):
    write_tiny_split(tmp_path, "train", tiny_images(2, 5), 2)
    shard = tmp_path / "train" / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(ShardError, match=r"train-000000.tar is 3000 bytes but its manifest says \d+.*truncated"):
        ShardSplit(tmp_path, "train")


def test_corrupt_image_is_named(tmp_path):
    from imret.data.loader import decode_image

    write_tiny_split(tmp_path, "train", tiny_images(2, 3), 2)
    split = ShardSplit(tmp_path, "train")
    ref = split.ref(4)
    shard = bytearray(ref.shard.read_bytes())
    # overwrite the PNG data of sample 4 (after its members' headers) with garbage of the same length
    with open(ref.shard, "rb") as f:
        f.seek(ref.start)
        chunk = f.read(ref.end - ref.start)
    png_at = ref.start + chunk.index(b"\x89PNG")
    shard[png_at + 16:png_at + 200] = b"\x00" * 184
    ref.shard.write_bytes(bytes(shard))
    with pytest.raises(ShardError, match=rf"{ref.shard}.*sample {ref.key}.*cannot be decoded"):
        decode_image(ShardSplit(tmp_path, "train"), 4)


def test_missing_split_says_how_to_build_it(tmp_path):
    write_tiny_split(tmp_path, "train", tiny_images(2, 2), 2)
    with pytest.raises(ShardError, match=r"no split 'query'.*Splits there: train.*shards.write"):
        ShardSplit(tmp_path, "query")


def test_digits_converter(tmp_path):
    from shards.write import main

    assert main(["digits", "--out", str(tmp_path), "--no-progress"]) == 0
    counts = {s: json.loads((tmp_path / s / "manifest.json").read_text())["num_samples"] for s in
              ("train", "query", "database")}
    assert counts == {"train": 901, "query": 181, "database": 715}
    train, query = ShardSplit(tmp_path, "train"), ShardSplit(tmp_path, "query")
    assert set(train.labels.tolist()) == {0, 1, 2, 3, 4} and set(query.labels.tolist()) == {5, 6, 7, 8, 9}
    assert pixels(train, 0).shape == (32, 32)
    from sklearn.datasets import load_digits

    first = load_digits().images[0]  # digits_0000 is a 0, the first training sample
    img = pixels(train, 0).astype(float)
    small = np.asarray(Image.fromarray(img.astype(np.uint8)).resize((8, 8), Image.Resampling.BOX), dtype=float)
    assert np.corrcoef(small.ravel(), first.ravel())[0, 1] > 0.95
    assert main(["digits", "--out", str(tmp_path), "--no-progress"]) == 0  # rerun: skipped, still complete


def test_parse_size():
    from shards.write import parse_size

    assert parse_size("256MB") == 256 << 20 and parse_size("1g") == 1 << 30 and parse_size("5000") == 5000
    with pytest.raises(Exception, match="not a size"):
        parse_size("big")


def test_keys_with_dots_are_refused(tmp_path):
    with pytest.raises(AssertionError, match="contains a dot"):
        write_tiny_split(tmp_path, "train", [("a.b", 0, np.zeros((4, 4, 3), np.uint8))], 1)


def test_writer_default_shard_size_is_hundreds_of_megabytes():
    assert 100 << 20 <= writer.DEFAULT_SHARD_BYTES <= 1 << 30


def test_long_keys_round_trip(tmp_path):
    # keys over 100 characters: the writer's GNU tar format stores them as long-name members
    long_dir = "/".join(["category_with_a_long_name"] * 6)
    items = [(f"{long_dir}/sample_{i:03d}", i % 2, img) for i, (_, _, img) in enumerate(tiny_images(2, 3))]
    write_tiny_split(tmp_path, "train", items, 2)
    split = ShardSplit(tmp_path, "train")
    assert len(split.keys[0]) > 150
    for i, (key, label, img) in enumerate(items):
        assert split.keys[i] == key and np.array_equal(pixels(split, i), img)
