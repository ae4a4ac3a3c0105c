"""imret's training step vs a bare PyTorch loop: same model, batch, loss and optimizer.

imret's side runs the real training loop (``imret.train._loop``: DDP-ready forward over
the gathered batch, non-finite check, gradient-norm clipping, scheduler, stop
agreement, meters and logging) fed from a batch held in memory, so the data loader is
out of the picture; checkpoint saving is switched off on both sides. The bare loop is
forward, loss, backward, optimizer step. Rounds alternate the order (A B, B A, ...) in
one process, so neither side always runs first; medians are reported.

    python bench/train_overhead.py [--backbone resnet18] [--size 64] [--batch 32] [--steps 20]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def make_training(tmp: Path, args: argparse.Namespace):
    from imret.config import from_dict
    from imret.distributed import DistInfo
    from imret.rundir import RunDir
    from imret.train import Training
    from tests.helpers import tiny_images, write_tiny_split

    write_tiny_split(tmp / "d", "train", tiny_images(8, 8, seed=0), 8)  # only to construct the Training
    cfg = from_dict({
        "run": {"root": str(tmp / "runs")},
        "data": {"root": str(tmp / "d"), "image_size": args.size, "batch_size": args.batch,
                 "samples_per_class": 4, "num_workers": 0, "steps_per_epoch": 10_000},
        "model": {"backbone": args.backbone, "embed_dim": 128},
        "loss": {"terms": [{"name": "smooth_ap", "params": {"temperature": 0.01}}]},
        "optim": {"name": "adamw", "lr": 1e-4},
        "train": {"epochs": 1, "log_every": 10},
    }, "bench")
    training = Training(cfg, RunDir(cfg.run_dir), DistInfo())
    training.save = lambda epoch_end: None  # no checkpoint files on either side
    return training


def batch(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    labels = torch.arange(args.batch // 4).repeat_interleave(4)
    return images, labels, torch.arange(args.batch)


def time_imret(training, data, steps: int) -> float:
    from imret.tb import NullBoard
    from imret.train import Position, _loop

    training.data.epoch = lambda epoch, start=0: [data] * steps
    training.cfg.train.max_steps = 0
    training.position = Position()
    start = time.perf_counter()
    _loop(training, NullBoard())
    return (time.perf_counter() - start) / steps


def time_bare(model: torch.nn.Module, loss_fn: torch.nn.Module, opt: torch.optim.Optimizer, data, steps: int) -> float:
    images, labels, _ = data
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        loss = loss_fn(model(images), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    from imret.losses.smooth_ap import SmoothAPLoss
    from imret.models import build_model
    from imret.config import ModelConfig

    data = batch(args)
    with tempfile.TemporaryDirectory() as tmp:
        training = make_training(Path(tmp), args)
        torch.manual_seed(0)
        bare_model = build_model(ModelConfig(backbone=args.backbone, embed_dim=128))
        bare_opt = torch.optim.AdamW(bare_model.parameters(), lr=1e-4)
        bare_loss = SmoothAPLoss(0.01)
        time_imret(training, data, 2), time_bare(bare_model, bare_loss, bare_opt, data, 2)  # warm-up
        ours, theirs = [], []
        for i in range(args.rounds):
            if i % 2:
                theirs.append(time_bare(bare_model, bare_loss, bare_opt, data, args.steps))
                ours.append(time_imret(training, data, args.steps))
            else:
                ours.append(time_imret(training, data, args.steps))
                theirs.append(time_bare(bare_model, bare_loss, bare_opt, data, args.steps))
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"machine: {platform.machine()}, CPU, {torch.get_num_threads()} torch threads; {args.backbone} at "
          f"{args.size} px, batch {args.batch}, Smooth-AP, AdamW, {args.steps} steps x {args.rounds} rounds")
    print(f"imret training loop : {a * 1000:8.1f} ms/step  (rounds: {', '.join(f'{x * 1000:.1f}' for x in ours)})")
    print(f"bare PyTorch loop   : {b * 1000:8.1f} ms/step  (rounds: {', '.join(f'{x * 1000:.1f}' for x in theirs)})")
    print(f"ratio imret / bare  : {a / b:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
