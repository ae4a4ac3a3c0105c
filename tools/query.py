"""Search a run's database with any image: ``python tools/query.py --exp NAME IMAGE [IMAGE...]``.

Embeds each image file with the experiment's trained model (the checkpoint its
extract stage used, ``extract.checkpoint``) and its evaluation transform, searches the
extracted features of the evaluate stage's database split, and prints the top-k keys,
labels, scores and the shard holding each result. ``--grid OUT.png`` also draws each
query beside its results.

    python tools/query.py --exp digits_demo my_digit.png -k 5 --grid topk.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/query.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--exp", required=True, help="run name (a directory under the runs root; 'exp/point' for a sweep)")
    p.add_argument("images", nargs="+", type=Path, help="image files to search with")
    p.add_argument("-k", type=int, default=10, help="results per image (default 10)")
    p.add_argument("--runs-root", type=Path, default=Path("runs"), help="where run directories live (default: runs)")
    p.add_argument("--grid", type=Path, help="write a PNG of each query and its results")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return p.parse_args(argv)


def open_run(runs_root: Path, name: str) -> tuple[object, object]:
    from imret.config import load_yaml
    from imret.config.names import run_dir
    from imret.rundir import RunDir

    run = RunDir(run_dir(runs_root, name))  # a name with '..' or a leading '/' is refused
    if not run.config.exists():
        raise ValueError(f"no run '{name}' under {runs_root} ({run.config} is missing); pass --runs-root or "
                         "check the name with `ls runs`")
    return load_yaml(run.config), run


def load_images(paths: list[Path]) -> list[object]:
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        try:
            with Image.open(path) as img:
                images.append(img.convert("RGB"))
        except (OSError, UnidentifiedImageError) as err:
            raise ValueError(f"cannot read image {path}: {err}") from None
    return images


def embed(cfg: object, run: object, images: list[object], device: str | None) -> np.ndarray:
    """The run's model on the images, with the transform the extract stage used."""
    import torch

    from imret.data.transforms import eval_transform
    from imret.extract import load_model

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, _ = load_model(cfg, run, dev)
    transform = eval_transform(cfg.data, cfg.model.backbone)
    batch = torch.stack([transform(img) for img in images]).to(dev)
    with torch.no_grad():
        return model(batch).float().cpu().numpy()


def search(cfg: object, run: object, embeddings: np.ndarray, k: int) -> tuple[object, object, str]:
    from imret.evaluate.inputs import stage_input
    from imret.features import load_features
    from imret.search.knn import knn

    split = stage_input(cfg).database_split
    database = load_features(run, split)
    return knn(embeddings, database.embeddings, min(k, len(database.labels))), database, split


def print_results(paths: list[Path], neigh: object, database: object, names: list[str], shard_of: object) -> None:
    for row, path in enumerate(paths):
        print(f"{path}:")
        print(f"  {'rank':>4}  {'score':>7}  {'label':<12} key (shard)")
        for rank, (i, score) in enumerate(zip(neigh.ids[row], neigh.scores[row]), 1):
            label = int(database.labels[i])
            name = names[label] if 0 <= label < len(names) else str(label)
            print(f"  {rank:>4}  {score:7.4f}  {name:<12} {database.keys[i]} ({shard_of(int(i))})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.k < 1:
            raise ValueError(f"-k {args.k}: ask for at least one result")
        cfg, run = open_run(args.runs_root, args.exp)
        images = load_images(args.images)
        neigh, database, split = search(cfg, run, embed(cfg, run, images, args.device), args.k)
        reader = _shards(cfg, split)
    except ValueError as err:
        print(f"query: error: {err}", file=sys.stderr)
        return 2
    names = reader.class_names if reader is not None else []
    print_results(args.images, neigh, database, names,
                  (lambda i: reader.ref(i).shard.name) if reader is not None else (lambda i: "shards not found"))
    if args.grid:
        write_grid(args.grid, images, neigh, reader)
    return 0


def _shards(cfg: object, split: str) -> object:
    from imret.data.shards import ShardError, ShardSplit

    try:
        return ShardSplit(cfg.data.root, split)
    except ShardError:
        return None  # the table needs only the features; thumbnails need the shards


def write_grid(path: Path, images: list[object], neigh: object, reader: object) -> None:
    from PIL import Image

    from imret.data.loader import decode_image
    from imret.tb import QUERY, grid, thumbnail

    if reader is None:
        print("query: no grid: the run's shards are not at its data.root", file=sys.stderr)
        return
    rows = [[thumbnail(img, 96, QUERY)] + [thumbnail(decode_image(reader, int(i)), 96) for i in ids if i >= 0]
            for img, ids in zip(images, neigh.ids)]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid(rows)).save(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
