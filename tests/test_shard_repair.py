"""Repairing a split: a rerun checks finished shards against the manifest and rewrites missing or damaged ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from imret.data.shards import ShardError, ShardSplit
from shards.writer import BadImage, Sample, SettingsChanged, SplitSource, write_split
from tests.helpers import encode_png, tiny_images

SHARD_BYTES = 2500  # a few samples per shard: several shards from a tiny split


def encode_or_refuse(item: tuple) -> Sample:
    """encode_png, but items whose key ends in 7 are bad images (for the skip policy)."""
    if item[0].endswith("7"):
        raise BadImage(item[0], "unreadable (test)")
    return encode_png(item)


def source(items: list, encode=encode_png) -> SplitSource:
    return SplitSource("train", ["a", "b", "c"], items, encode, {"source": "test"})


def write(items: list, root: Path, encode=encode_png, **kwargs) -> dict:
    return write_split(source(items, encode), root, dataset="tiny", converter_version=1, shard_bytes=SHARD_BYTES,
                       progress=False, **kwargs)


def snapshot(split: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(split.iterdir()) if p.suffix in (".tar", ".npz")}


@pytest.fixture
def written(tmp_path: Path) -> tuple[list, Path, dict[str, bytes]]:
    items = tiny_images(3, 6, seed=5)
    manifest = write(items, tmp_path)
    assert len(manifest["shards"]) >= 4
    return items, tmp_path / "train", snapshot(tmp_path / "train")


@pytest.mark.parametrize("damage", ["truncate", "delete", "delete-index", "truncate-last"])
def test_a_rerun_rewrites_a_damaged_shard_exactly(written, capsys, damage):
    items, split, before = written
    shards = sorted(split.glob("train-*.tar"))
    shard = shards[-1] if damage == "truncate-last" else shards[1]
    if damage.startswith("truncate"):
        shard.write_bytes(shard.read_bytes()[:700])
    elif damage == "delete":
        shard.unlink()
    else:
        shard.with_suffix(".idx.npz").unlink()
    untouched = {p: p.stat().st_mtime_ns for p in shards if p != shard}
    with pytest.raises(ShardError, match="rerunning the command that wrote the split"):
        ShardSplit(split.parent, "train")
    capsys.readouterr()
    write(items, split.parent)
    out = capsys.readouterr().out
    assert f"1 finished shard(s) missing or damaged ({shard.name}): rewriting them" in out
    assert "complete" not in out
    assert snapshot(split) == before  # byte-identical to the first write
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched  # the sound shards were not rewritten
    assert ShardSplit(split.parent, "train").keys.tolist() == [it[0] for it in items]


def test_overwrite_repairs_too(written, capsys):
    items, split, before = written
    shard = sorted(split.glob("train-*.tar"))[0]
    shard.write_bytes(b"")
    write(items, split.parent, overwrite=True)
    assert "rewriting them" in capsys.readouterr().out and snapshot(split) == before


def test_several_damaged_shards_are_rewritten_in_order(written):
    items, split, before = written
    for shard in sorted(split.glob("train-*.tar"))[:3]:
        shard.unlink()
    write(items, split.parent)
    assert snapshot(split) == before


def test_a_sound_split_is_still_skipped(written, capsys):
    items, split, before = written
    write(items, split.parent)
    assert "complete (18 samples" in capsys.readouterr().out and snapshot(split) == before


def test_a_changed_source_is_refused_not_mixed_in(written):
    items, split, _ = written
    sorted(split.glob("train-*.tar"))[1].unlink()
    other = tiny_images(3, 6, seed=99)  # the same keys and count, other pixels
    with pytest.raises(SettingsChanged, match="came out different from the one in the manifest.*--overwrite"):
        write(other, split.parent)
    write(other, split.parent, overwrite=True)  # the whole split again, from the new source
    split_again = ShardSplit(split.parent, "train")
    assert len(split_again) == 18 and np.array_equal(split_again.labels, [it[1] for it in other])


def test_repair_reproduces_skipped_items(tmp_path):
    items = tiny_images(3, 10, seed=6)  # keys ending in 7 are refused by the encoder
    write(items, tmp_path, encode_or_refuse, on_bad_image="skip")
    split = tmp_path / "train"
    before = snapshot(split)
    for shard in sorted(split.glob("train-*.tar"))[1::2]:
        shard.write_bytes(shard.read_bytes()[:100])
    manifest = write(items, tmp_path, encode_or_refuse, on_bad_image="skip")
    assert snapshot(split) == before and manifest["num_skipped"] == 3


def test_the_error_advice_works_through_the_command_line(tmp_path, capsys):
    from shards.write import main

    out = tmp_path / "digits"
    assert main(["digits", "--out", str(out), "--shard-size", "40KB", "--no-progress"]) == 0
    before = snapshot(out / "query")
    shard = sorted((out / "query").glob("query-*.tar"))[1]
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(ShardError) as err:
        ShardSplit(out, "query")
    assert f"python -m shards.write digits --out {out}" in str(err.value)
    capsys.readouterr()
    assert main(["digits", "--out", str(out), "--shard-size", "40KB", "--no-progress"]) == 0  # what it says to do
    assert "missing or damaged" in capsys.readouterr().out
    assert snapshot(out / "query") == before and len(ShardSplit(out, "query")) == 181
