"""Writing one split as WebDataset shards, resumably.

Layout (read by ``imret.data.shards``)::

    <out>/<split>/<split>-000000.tar       samples: <key>.<img>, <key>.cls, <key>.json
    <out>/<split>/<split>-000000.idx.npz   keys, labels and byte ranges of that shard
    <out>/<split>/manifest.json            written last: the split is complete

A shard is written under a temporary name and renamed into place when full, then its
index is written beside it; a shard counts as finished only when both exist
(``shards.stream`` writes them). An interrupted write therefore leaves no half-written
shard under a final name, and a rerun keeps the finished shards and continues with the
next item: converters list their items in a fixed order, so the first finished shards
always hold the first samples.

Bad images. A converter's ``encode`` raises :class:`BadImage` for an image it cannot
use (missing, unreadable, truncated). The worker turns it into a :class:`Skipped`
marker, so the decision reaches the writer in item order whatever the number of
workers; the writer then either stops with :class:`BadImageError` (policy ``fail``,
the default) or leaves the item out, prints a warning and lists it in the manifest
(policy ``skip``). Each shard's index records the number of the item after its last
sample (``next_item``) and the items skipped before it, so a resumed write starts at
the right item even when items were skipped; the decision depends only on the file,
so a resumed write makes the same decisions as an uninterrupted one.

A split remembers what wrote it (dataset, converter version, the converter's options
and the number of items, in ``.writer-state.json`` and in the manifest). A rerun with
different options or a different source rewrites the split from scratch instead of
keeping shards that hold other samples.

Repair. A rerun over a complete split checks every shard against the manifest (the
tar's size, the index's sample count and byte ranges) and rewrites the missing or
damaged ones, each from its own items: the index of the shard before says where its
items start, and the manifest's ``shard_bytes`` where it ends. A rewritten shard must
come out as the manifest describes it (size, samples and SHA-256); if the source
changed, that is an error (``--overwrite`` then writes the whole split again).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from shards.stream import (  # re-exported: converters and tests import them from here
    DEFAULT_SHARD_BYTES, BadImage, Sample, ShardStream, Skipped, SplitSource, encoded, finished_shards, index_tar,
    resume_point, shard_name,
)

__all__ = ["DEFAULT_SHARD_BYTES", "BadImage", "Sample", "SplitSource", "finished_shards", "index_tar", "shard_name",
           "BAD_IMAGE_POLICIES", "BadImageError", "SettingsChanged", "write_split", "write_dataset", "clear_split"]

BAD_IMAGE_POLICIES = ("fail", "skip")
STATE_FILE = ".writer-state.json"


class BadImageError(Exception):
    """A bad image under the ``fail`` policy: the write stops (finished shards are kept)."""


def bad_image_message(split: str, bad: Skipped) -> str:
    return (f"{split}: bad image {bad.path}: {bad.reason}. Fix or remove the file, or rerun with "
            f"--on-bad-image skip to leave such images out (they are then listed in the manifest); "
            f"finished shards are kept and the rerun resumes.")


def _check_earlier_skips(split: str, skipped: list[dict[str, str]], on_bad_image: str) -> None:
    """Under ``fail``, shards that an earlier ``skip`` run wrote without some images are not accepted."""
    if skipped and on_bad_image == "fail":
        first = skipped[0]
        raise BadImageError(
            f"{split}: an earlier run with --on-bad-image skip left out {len(skipped)} bad images "
            f"(first: {first['path']}: {first['reason']}). Rerun with --on-bad-image skip to accept that, "
            f"or fix the files and delete the split's shards to write it again.")


class SettingsChanged(ValueError):
    """A split on disk was written with other settings; rewriting it needs --overwrite."""


def damaged_shards(split_dir: Path, manifest: dict[str, Any]) -> list[int]:
    """The numbers of a complete split's shards that are missing or do not match the manifest.

    Checked: the tar exists with the manifest's size, and its index exists, reads, and
    holds the manifest's number of samples within the tar's bytes.
    """
    damaged = []
    for number, entry in enumerate(manifest["shards"]):
        tar = split_dir / entry["name"]
        try:
            size = tar.stat().st_size
            with np.load(tar.with_suffix(".idx.npz")) as z:
                keys, ends = z["keys"], z["ends"]
            ok = size == entry["bytes"] and len(keys) == entry["num_samples"] and int(ends.max(initial=0)) <= size
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            ok = False
        if not ok:
            damaged.append(number)
    return damaged


def repair_shards(source: SplitSource, split_dir: Path, manifest: dict[str, Any], damaged: list[int],
                  workers: int, on_bad_image: str, overwrite: bool) -> bool:
    """Rewrite the damaged shards of a complete split, each from its own items; False if the split must be
    written again from scratch (``overwrite``: the source no longer gives the same shards)."""
    names = ", ".join(manifest["shards"][n]["name"] for n in damaged)
    print(f"{source.name}: {len(damaged)} finished shard(s) missing or damaged ({names}): rewriting them")
    for stale in split_dir.glob(".*.tmp"):
        stale.unlink()
    shard_bytes = int(manifest.get("shard_bytes", DEFAULT_SHARD_BYTES))
    for number in damaged:  # in order: the shard before each one is sound by the time it is rewritten
        first = resume_point(split_dir, manifest["shards"][:number])[0]
        written = _rewrite_shard(source, split_dir, number, first, shard_bytes, workers, on_bad_image)
        expected = manifest["shards"][number]
        if not _same_shard(written, expected):
            if overwrite:
                print(f"{source.name}: the rewritten shard differs from the manifest; --overwrite: rewriting the split")
                clear_split(split_dir, source.name)
                return False
            raise SettingsChanged(
                f"{source.name}: shard {expected['name']} came out different from the one in the manifest "
                f"({written or 'nothing written'} vs {expected}): the source files or --shard-size changed since the "
                f"split was written. Pass --overwrite to write the whole split again.")
    return True


def _rewrite_shard(source: SplitSource, split_dir: Path, number: int, first: int, shard_bytes: int, workers: int,
                   on_bad_image: str) -> list[dict[str, Any]]:
    """Write shard ``number`` again from item ``first`` on; the entries it closed (one, when all went well)."""
    stream = ShardStream(split_dir, source.name, number, shard_bytes, first)
    with contextlib.closing(encoded(source, first, workers)) as results:
        for result in results:
            if isinstance(result, Skipped):
                if on_bad_image == "fail":
                    raise BadImageError(bad_image_message(source.name, result))
                stream.skip(result)
            else:
                stream.write(result)
            if stream.number > number:
                break
        stream.close()  # the split's last shard ends with the items, not with the byte budget
    return stream.entries


def _same_shard(written: list[dict[str, Any]], expected: dict[str, Any]) -> bool:
    """The rewritten shard is the one the manifest describes (its digest too, where the manifest has one)."""
    keys = [k for k in ("name", "num_samples", "bytes", "sha256") if k in expected]
    return len(written) == 1 and all(written[0].get(k) == expected[k] for k in keys)


def write_split(source: SplitSource, out: Path, *, dataset: str, converter_version: int,
                shard_bytes: int = DEFAULT_SHARD_BYTES, workers: int = 1, progress: bool = True,
                on_bad_image: str = "fail", overwrite: bool = False) -> dict[str, Any]:
    """Write (or finish writing) one split; returns its manifest.

    A split already on disk that was written with other settings (converter version,
    options, source, item count) is never deleted silently: without ``overwrite`` this
    raises ``SettingsChanged`` naming the differences.
    """
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, not {on_bad_image!r}")
    split_dir = Path(out) / source.name
    state = _state(source, dataset, converter_version)
    manifest = _complete_manifest(split_dir, source.name, state, overwrite)
    if manifest is not None:
        _check_earlier_skips(source.name, manifest.get("skipped", []), on_bad_image)
        damaged = damaged_shards(split_dir, manifest)
        if not damaged:
            print(f"{source.name}: complete ({manifest['num_samples']} samples in {len(manifest['shards'])} shards), "
                  f"skipped")
            return manifest
        if repair_shards(source, split_dir, manifest, damaged, workers, on_bad_image, overwrite):
            return manifest
    split_dir.mkdir(parents=True, exist_ok=True)
    for stale in split_dir.glob(".*.tmp"):
        stale.unlink()
    _write_json(split_dir / STATE_FILE, state)
    done = finished_shards(split_dir, source.name)
    skip, skipped = resume_point(split_dir, done)
    if skip:
        print(f"{source.name}: resuming after {len(done)} finished shards ({skip} items)")
    _check_earlier_skips(source.name, skipped, on_bad_image)
    if skipped:
        print(f"{source.name}: the finished shards left out {len(skipped)} bad images (listed in the manifest)")
    stream = ShardStream(split_dir, source.name, len(done), shard_bytes, skip)
    bar = tqdm(total=len(source.items), initial=skip, desc=source.name, unit="img", disable=not progress)
    with contextlib.closing(encoded(source, skip, workers)) as results, bar:
        for result in results:
            if isinstance(result, Skipped):
                if on_bad_image == "fail":
                    raise BadImageError(bad_image_message(source.name, result))
                tqdm.write(f"warning: {source.name}: skipping bad image {result.path}: {result.reason}",
                           file=sys.stderr)
                stream.skip(result)
            else:
                stream.write(result)
            bar.update()
        stream.close()
    manifest = _manifest(source, done + stream.entries, dataset, converter_version)
    manifest["class_counts"] = class_counts(split_dir, manifest["shards"], len(source.class_names))
    manifest.update(num_items=len(source.items), num_skipped=len(skipped + stream.skipped),
                    skipped=skipped + stream.skipped, on_bad_image=on_bad_image, shard_bytes=shard_bytes)
    _write_json(split_dir / "manifest.json", manifest)
    return manifest


def _state(source: SplitSource, dataset: str, version: int) -> dict[str, Any]:
    """What decides a split's content, besides the source files: kept to refuse mixing runs."""
    info = json.loads(json.dumps(source.info))  # as it reads back from JSON (tuples -> lists)
    return {"dataset": dataset, "converter_version": version, "num_items": len(source.items), "info": info}


def _complete_manifest(split_dir: Path, split: str, state: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The manifest of a complete split written with this state; a split written otherwise is an
    error, or is cleared when ``overwrite``."""
    manifest_path, state_path = split_dir / "manifest.json", split_dir / STATE_FILE
    written = None
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        items = manifest.get("num_items", manifest.get("num_samples"))  # manifests before bad-image handling
        written = {"dataset": manifest.get("dataset"), "converter_version": manifest.get("converter_version"),
                   "num_items": items, "info": {k: manifest.get(k) for k in state["info"]}}
        if written == state:
            return manifest
    elif state_path.exists():
        written = json.loads(state_path.read_text())
    if written is not None and written != state:
        changed = ", ".join(_differences(written, state))
        if not overwrite:
            raise SettingsChanged(
                f"{split}: {split_dir} holds shards written with other settings (changed: {changed}). Nothing was "
                f"deleted. Write to another --out, or pass --overwrite to replace this split's shards."
            )
        print(f"{split}: {split_dir} was written with other settings ({changed}); --overwrite: rewriting it")
        clear_split(split_dir, split)
    return None


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    names = [k for k in ("dataset", "converter_version", "num_items") if a.get(k) != b.get(k)]
    info_a, info_b = a.get("info") or {}, b.get("info") or {}
    return names + [k for k in sorted(set(info_a) | set(info_b)) if info_a.get(k) != info_b.get(k)]


def clear_split(split_dir: Path, split: str) -> None:
    """Remove what the writer wrote for one split (and nothing else in the directory)."""
    for path in [*split_dir.glob(f"{split}-*.tar"), *split_dir.glob(f"{split}-*.idx.npz"),
                 split_dir / "manifest.json", split_dir / STATE_FILE]:
        path.unlink(missing_ok=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _manifest(source: SplitSource, shards: list[dict[str, Any]], dataset: str, version: int) -> dict[str, Any]:
    return {
        "dataset": dataset,
        "split": source.name,
        "converter_version": version,
        "num_samples": sum(s["num_samples"] for s in shards),
        "num_classes": len(source.class_names),
        "class_names": source.class_names,
        "shards": shards,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        **source.info,
    }


def class_counts(split_dir: Path, shards: list[dict[str, Any]], num_classes: int) -> list[int]:
    """Samples per class, read back from the shard indices."""
    counts = np.zeros(max(num_classes, 1), dtype=np.int64)
    for entry in shards:
        with np.load(split_dir / Path(entry["name"]).with_suffix(".idx.npz")) as z:
            labels = z["labels"][z["labels"] >= 0]
        counts = np.pad(counts, (0, max(0, int(labels.max(initial=-1)) + 1 - len(counts))))
        counts += np.bincount(labels, minlength=len(counts))
    return counts[:num_classes].tolist() if num_classes else counts.tolist()


def write_dataset(sources: Iterable[SplitSource], out: Path, **kwargs: Any) -> list[dict[str, Any]]:
    return [write_split(s, out, **kwargs) for s in sources]
