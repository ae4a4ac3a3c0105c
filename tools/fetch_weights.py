"""Fetch pretrained weights into the local cache, where there is internet: ``python -m tools.fetch_weights --exp NAME``.

Jobs never download: compute nodes usually cannot, so they read only the cache that
``model.weights_dir`` names (layout in ``imret.models.weights``). Run this once where
there is internet, e.g. on a login node, before submitting. ``--exp`` fetches every
pretrained weight the experiment needs: its own, its sweep points', and those of the
experiments it builds on (``train.init_from``, ``data.pseudo_labels``). ``--model``
names timm weights directly (``resnet50.tv_in1k``). ``--from-file`` converts a local
checkpoint (torchvision's ``resnet50-0676ba61.pth``, DINO's
``dino_vitbase16_pretrain.pth``) through timm's own loader instead of downloading.

Getting a state dict (timm, through the Hugging Face hub or the weights' URL) is kept
apart from writing it into the cache (``imret.models.weights.write_weights``), so that
everything but the download itself runs, and is tested, without a network.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from urllib.parse import urlparse
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

Getter = Callable[[str, Path | None], tuple[dict[str, torch.Tensor], str]]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.fetch_weights", description=__doc__.split("\n\n")[0])
    p.add_argument("--exp", help="every pretrained weight this experiment (and what it builds on) needs")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="config overrides, as submit.py takes them (e.g. --set model.weights_dir=/shared/weights)")
    p.add_argument("--model", action="append", default=[], metavar="TIMM_NAME",
                   help="timm weights to fetch, e.g. resnet50.tv_in1k (repeatable)")
    p.add_argument("--weights-dir", help="the cache directory (default: the experiment's model.weights_dir, "
                                         "or 'weights')")
    p.add_argument("--from-file", type=Path, help="with one --model: convert this local checkpoint file instead "
                                                  "of downloading")
    p.add_argument("--force", action="store_true", help="fetch again even when the cache has the weights")
    p.add_argument("--experiments", type=Path, default=ROOT / "experiments.yaml", help="experiments file")
    return p.parse_args(argv)


def timm_state_dict(name: str, file: Path | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The weights ``name`` as timm loads them (its converters applied), and where they came from.

    This is the only function that downloads (without ``file``); it is never called in a job.
    """
    import timm

    if file is None:
        check_reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    overlay = {"file": str(file)} if file is not None else None
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
    cfg = model.pretrained_cfg
    source = str(file) if file is not None else (
        f"hf-hub:{cfg['hf_hub_id']}" if cfg.get("hf_hub_id") else str(cfg.get("url") or "timm"))
    return model.state_dict(), source


def check_reachable(endpoint: str, timeout_s: float = 5.0) -> None:
    """OSError at once when the weights' host cannot be reached, instead of the hub's minute of retries."""
    host = urlparse(endpoint).hostname or endpoint
    port = urlparse(endpoint).port or 443
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        raise OSError(f"{host} cannot be reached ({err})") from None


def fetch(name: str, weights_dir: str, file: Path | None = None, force: bool = False,
          getter: Getter = timm_state_dict) -> Path:
    """Put ``name`` into the cache at ``weights_dir`` (unless it is there already); returns its file."""
    from imret.models.weights import cache_files, is_cached, write_weights

    tensors, _ = cache_files(weights_dir, name)
    if is_cached(weights_dir, name) and not force:
        print(f"fetch_weights: {name} is already in the cache ({tensors}); --force fetches it again")
        return tensors
    try:
        state, source = getter(name, file)
    except (OSError, RuntimeError, ValueError) as err:
        where = f"from {file}" if file else "(this needs internet: run it on a login node, or pass --from-file)"
        raise ValueError(f"could not get the weights {name} {where}: {err}") from None
    path = write_weights(state, name, weights_dir, source)
    count = sum(v.numel() for v in state.values() if v.is_floating_point())
    print(f"fetch_weights: {name} -> {path} ({len(state)} tensors, {count / 1e6:.1f}M values, from {source})")
    return path


def experiment_weights(experiments: Path, name: str, overrides: Sequence[str]) -> dict[str, str]:
    """{weights name: cache directory} of every config the experiment runs or builds on."""
    from imret import checks
    from imret.config import Experiments
    from imret.models.weights import weights_name
    from imret.sweep import expand

    exps = Experiments.load(experiments)
    needed: dict[str, str] = {}
    todo, seen = [name], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        cfg = checks.resolve(exps, current, overrides)
        points = [checks.resolve(exps, current, [*overrides, *p.overrides, "sweep={}"]) for p in expand(cfg.sweep)]
        for c in points or [cfg]:
            if c.model.pretrained:
                needed.setdefault(weights_name(c.model.backbone), c.model.weights_dir)
        todo += [r for r in (cfg.train.init_from, cfg.data.pseudo_labels) if r in exps.entries]
    return needed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # its retry warnings; our error says it all
    try:
        wanted = _wanted(args)
        if not wanted:
            print(f"fetch_weights: experiment '{args.exp}' uses no pretrained weights (model.pretrained is false)")
        for name, weights_dir in wanted.items():
            fetch(name, args.weights_dir or weights_dir, args.from_file, args.force)
    except ValueError as err:  # ConfigError is one
        print(f"fetch_weights: error: {err}", file=sys.stderr)
        return 2
    return 0


def _wanted(args: argparse.Namespace) -> dict[str, str]:
    from imret.models.weights import weights_name

    if not args.exp and not args.model:
        raise ValueError("name the weights: --exp NAME (every weight of an experiment) or --model TIMM_NAME")
    if args.from_file and (args.exp or len(args.model) != 1):
        raise ValueError("--from-file converts one file: give exactly one --model with it, and no --exp")
    if args.from_file and not args.from_file.is_file():
        raise ValueError(f"--from-file: {args.from_file} does not exist")
    wanted = {weights_name(m): "weights" for m in args.model}
    if args.exp:
        wanted.update(experiment_weights(args.experiments, args.exp, args.overrides))
    return wanted


if __name__ == "__main__":
    sys.exit(main())
