"""Grad-CAM overlays for a few queries of a trained run: ``python tools/gradcam.py --exp NAME``.

For retrieval there is no class score to explain, so the target is the similarity
between a query's embedding and the embedding of its top-1 database neighbour (from
the run's eval/neighbours.npz): the heat map shows which regions of the query make it
match what it retrieved. Uses the pytorch-grad-cam package on the backbone's last
spatial feature map. Writes one PNG per query (image | overlay) and an index grid.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imret.config import ConfigError, load_yaml
from imret.config.names import run_dir
from imret.rundir import RunDir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/gradcam.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", required=True, help="experiment (its run directory under --runs-root)")
    p.add_argument("--runs-root", type=Path, default=Path("runs"))
    p.add_argument("--queries", type=int, nargs="+", default=[0, 1, 2, 3], help="query indices (rows of the query split)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: <run>/eval/gradcam)")
    return p


def last_spatial_layer(model: torch.nn.Module, example: torch.Tensor, min_side: int = 4) -> torch.nn.Module:
    """The backbone's deepest module whose output is a B x C x H x W map at least ``min_side`` wide.

    On small inputs the last stage's map can be 1 x 1 (ResNets at 32 px), where a
    class-activation map has nothing to show; an earlier, finer map is more useful.
    """
    found: list[tuple[torch.nn.Module, int]] = []

    def record(mod: torch.nn.Module, _inputs: Any, out: Any) -> None:
        if torch.is_tensor(out) and out.ndim == 4:
            found.append((mod, min(out.shape[-2:])))

    hooks = [m.register_forward_hook(record) for m in model.backbone.modules() if m is not model.backbone]
    with torch.no_grad():
        model.backbone.forward_features(example)
    for h in hooks:
        h.remove()
    if not found:
        raise ValueError("Grad-CAM needs a convolutional feature map; this backbone produces none")
    wide = [mod for mod, side in found if side >= min_side]
    return wide[-1] if wide else found[-1][0]


class SimilarityTo:
    """pytorch-grad-cam target: cosine similarity of the model output to a fixed embedding."""

    def __init__(self, reference: torch.Tensor) -> None:
        self.reference = reference

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cosine_similarity(output, self.reference, dim=-1)


def overlays(run: RunDir, query_indices: list[int]) -> list[tuple[int, str, np.ndarray, np.ndarray]]:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image

    from imret.data.loader import decode_image
    from imret.data.shards import ShardSplit
    from imret.data.transforms import eval_transform
    from imret.extract import load_model
    from imret.features import load_features

    cfg = load_yaml(run.config)
    model, _ = load_model(cfg, run, torch.device("cpu"))
    query_split = ShardSplit(cfg.data.root, cfg.evaluate.query)
    database = load_features(run, cfg.evaluate.database or cfg.evaluate.query)
    with np.load(run.eval / "neighbours.npz") as z:
        neighbour_ids, evaluated = z["ids"], z["queries"]
    transform = eval_transform(cfg.data, cfg.model.backbone)
    images = [transform(decode_image(query_split, i)) for i in query_indices]
    layer = last_spatial_layer(model, images[0][None])
    out = []
    with GradCAM(model=model, target_layers=[layer]) as cam:
        for i, tensor in zip(query_indices, images):
            row = int(np.flatnonzero(evaluated == i)[0]) if (evaluated == i).any() else None
            if row is None:
                raise ValueError(f"query {i} was not evaluated (eval/neighbours.npz holds a sample of queries)")
            reference = torch.from_numpy(database.embeddings[neighbour_ids[row, 0]]).float()[None]
            heat = cam(input_tensor=tensor[None], targets=[SimilarityTo(reference)])[0]
            rgb = _unnormalise(tensor, cfg)
            out.append((i, str(query_split.keys[i]), rgb, show_cam_on_image(rgb, heat, use_rgb=True)))
    return out


def _unnormalise(tensor: torch.Tensor, cfg: Any) -> np.ndarray:
    from imret.data.transforms import norm_config

    norm = norm_config(cfg.data, cfg.model.backbone)
    mean, std = torch.tensor(norm["mean"])[:, None, None], torch.tensor(norm["std"])[:, None, None]
    return (tensor * std + mean).clamp(0, 1).permute(1, 2, 0).numpy().astype(np.float32)


def write(results: list[tuple[int, str, np.ndarray, np.ndarray]], out: Path) -> list[Path]:
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    paths, rows = [], []
    for i, key, rgb, overlay in results:
        pair = np.concatenate([(rgb * 255).astype(np.uint8), overlay], axis=1)
        scale = max(1, 128 // pair.shape[0])  # small inputs (32 px digits) are enlarged to be seen
        pair = np.kron(pair, np.ones((scale, scale, 1), dtype=np.uint8))
        path = out / f"query-{i:05d}.png"
        Image.fromarray(pair).save(path)
        paths.append(path)
        rows.append(pair)
    Image.fromarray(np.concatenate(rows, axis=0)).save(out / "grid.png")
    return paths + [out / "grid.png"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run = RunDir(run_dir(args.runs_root, args.exp))  # a name with '..' or a leading '/' is refused
        if not run.config.exists() or not (run.eval / "neighbours.npz").exists():
            raise ValueError(f"{run.root} has no evaluated run (config.yaml and eval/neighbours.npz); "
                             f"run `python launch/submit.py --exp {args.exp}` first")
        results = overlays(run, args.queries)
    except (ConfigError, ValueError) as err:
        print(f"gradcam: error: {err}", file=sys.stderr)
        return 2
    for path in write(results, args.out or run.eval / "gradcam"):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
