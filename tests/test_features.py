"""imret.features: the feature store written part by part with write_part and write_manifest, and read back
whole, by row range, by row subset and labels only. (The extract stage writing it across ranks, and resuming,
is in test_extract.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest

from imret import features
from imret.rundir import RunDir

SIZES = (4, 0, 5, 3)  # an empty part too: a rank may be given no sample


def store(tmp_path, sizes=SIZES, dim: int = 3, dtype=np.float16, split: str = "query", manifest: bool = True):
    """A split written as ``len(sizes)`` ranks would; returns (run, embeddings, keys, labels) of the whole split."""
    run = RunDir(tmp_path / "run")
    n = sum(sizes)
    rng = np.random.default_rng(len(sizes))
    emb = rng.standard_normal((n, dim)).astype(dtype)
    keys = np.array([f"k{i:03d}" for i in range(n)])
    labels = rng.integers(0, 5, n).astype(np.int32)
    out = run.features(split)
    lo = 0
    for rank, size in enumerate(sizes):
        part = features.part_path(out, rank, len(sizes))
        features.write_part(part, emb[lo:lo + size], keys[lo:lo + size], labels[lo:lo + size], lo, lo + size)
        lo += size
    if manifest:
        features.write_manifest(out, len(sizes), {"split": split, "num_samples": n, "dtype": np.dtype(dtype).name})
    return run, emb, keys, labels


def test_parts_are_named_by_rank_and_world(tmp_path):
    part = features.part_path(tmp_path, 3, 12)
    assert part == tmp_path / "part-00003-of-00012.npz"
    assert features.embeddings_path(part) == tmp_path / "part-00003-of-00012.npy"


def test_a_part_is_an_npy_of_embeddings_and_an_npz_of_keys_labels_and_range(tmp_path):
    run, emb, keys, labels = store(tmp_path, manifest=False)
    part = features.part_path(run.features("query"), 2, 4)
    assert np.array_equal(np.load(features.embeddings_path(part)), emb[4:9])
    with np.load(part) as z:
        assert sorted(z.files) == ["keys", "labels", "range"]
        assert z["keys"].tolist() == keys[4:9].tolist() and z["range"].tolist() == [4, 9]


def test_the_manifest_records_the_parts(tmp_path):
    run, *_ = store(tmp_path)
    manifest = json.loads((run.features("query") / "manifest.json").read_text())
    assert manifest == {"parts": [f"part-{r:05d}-of-00004.npz" for r in range(4)], "format": features.FORMAT,
                        "part_sizes": list(SIZES), "dim": 3, "split": "query", "num_samples": 12,
                        "dtype": "float16"}
    assert features.read_manifest(run, "query") == manifest


def test_the_whole_split_comes_back_in_order_as_float32(tmp_path):
    run, emb, keys, labels = store(tmp_path)
    got = features.load_features(run, "query")
    assert got.embeddings.dtype == np.float32 and np.array_equal(got.embeddings, emb.astype(np.float32))
    assert got.keys.tolist() == keys.tolist()
    assert got.labels.dtype == np.int64 and got.labels.tolist() == labels.tolist()
    assert got.manifest["num_samples"] == 12


@pytest.mark.parametrize("start, stop", [(0, 12), (2, 7), (4, 9), (9, 12), (5, 5), (11, 40)])
def test_a_row_range_is_the_same_rows_of_the_whole(tmp_path, start, stop):
    run, emb, keys, labels = store(tmp_path)
    got = features.load_feature_rows(run, "query", start, stop)
    assert np.array_equal(got.embeddings, emb[start:stop].astype(np.float32))
    assert got.keys.tolist() == keys[start:stop].tolist() and got.labels.tolist() == labels[start:stop].tolist()
    assert got.embeddings.shape == (len(keys[start:stop]), 3)


def test_a_row_range_opens_only_the_parts_it_overlaps(tmp_path):
    run, _, keys, _ = store(tmp_path)
    out = run.features("query")
    for rank in (0, 3):  # rows 0-3 and 9-11
        part = features.part_path(out, rank, 4)
        part.unlink()
        features.embeddings_path(part).unlink()
    got = features.load_feature_rows(run, "query", 4, 9)  # touches both deleted parts' edges, reads neither
    assert got.keys.tolist() == keys[4:9].tolist()
    with pytest.raises(FileNotFoundError):
        features.load_feature_rows(run, "query", 3, 5)


def test_a_row_subset_picks_those_rows(tmp_path):
    run, emb, keys, labels = store(tmp_path)
    rows = np.array([0, 3, 4, 8, 11])
    got = features.load_feature_subset(run, "query", rows)
    assert got.keys.tolist() == keys[rows].tolist() and got.labels.tolist() == labels[rows].tolist()
    assert np.array_equal(got.embeddings, emb[rows].astype(np.float32))


def test_labels_are_read_without_any_embedding(tmp_path):
    run, _, keys, labels = store(tmp_path)
    for npy in run.features("query").glob("*.npy"):
        npy.unlink()
    got_keys, got_labels = features.load_labels(run, "query")
    assert got_keys.tolist() == keys.tolist()
    assert got_labels.dtype == np.int64 and got_labels.tolist() == labels.tolist()


def test_a_split_without_a_manifest_is_not_complete(tmp_path):
    run, *_ = store(tmp_path, manifest=False)
    assert not features.is_complete(run, "query")
    with pytest.raises(ValueError, match=r"no complete features for split 'query' .*run the extract stage"):
        features.load_features(run, "query")
    with pytest.raises(ValueError, match="no complete features for split 'other'"):
        features.load_labels(run, "other")
    store(tmp_path)
    assert features.is_complete(run, "query")


def test_the_manifest_is_refused_while_a_part_is_missing(tmp_path):
    run, *_ = store(tmp_path, manifest=False)
    out = run.features("query")
    features.part_path(out, 1, 4).unlink()  # rank 1 wrote its embeddings, not its keys
    features.embeddings_path(features.part_path(out, 3, 4)).unlink()
    with pytest.raises(RuntimeError, match="parts part-00001-of-00004.npz, part-00003-of-00004.npz are missing"):
        features.write_manifest(out, 4, {"num_samples": 12})
    assert not (out / "manifest.json").exists()


def test_a_format_1_store_with_embeddings_inside_the_npz_still_reads(tmp_path):
    run = RunDir(tmp_path / "old")
    out = run.features("db")
    emb = np.arange(10, dtype=np.float32).reshape(5, 2)
    names = []
    for rank, (lo, hi) in enumerate([(0, 2), (2, 5)]):
        part = features.part_path(out, rank, 2)
        out.mkdir(parents=True, exist_ok=True)
        np.savez(part, embeddings=emb[lo:hi], keys=np.array([f"d{i}" for i in range(lo, hi)]),
                 labels=np.arange(lo, hi), range=np.array([lo, hi]))
        names.append(part.name)
    (out / "manifest.json").write_text(json.dumps({"parts": names, "num_samples": 5}))  # no format, no sizes
    got = features.load_features(run, "db")
    assert np.array_equal(got.embeddings, emb) and got.keys.tolist() == [f"d{i}" for i in range(5)]
    assert features.load_feature_rows(run, "db", 1, 4).labels.tolist() == [1, 2, 3]
