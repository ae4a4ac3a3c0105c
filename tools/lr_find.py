"""Learning-rate range test for an experiment: ``python tools/lr_find.py --exp NAME``.

Trains the experiment's model with its own loss and P x K batches while the learning
rate grows exponentially from --start-lr to --end-lr (Smith, "Cyclical Learning Rates",
2017), using the torch-lr-finder package. Prints the curve and the suggested learning
rate (the steepest descent of the smoothed loss) and writes a plot of loss against
learning rate. Runs in this process, one rank, without touching the run directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

import torch

from imret import checks
from imret.config import ConfigError, Experiments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/lr_find.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.add_argument("--experiments", type=Path, default=ROOT / "experiments.yaml")
    p.add_argument("--start-lr", type=float, default=1e-7)
    p.add_argument("--end-lr", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=100, help="batches in the range test")
    p.add_argument("--out", type=Path, default=Path("lr_find.png"), help="the plot (PNG)")
    return p


class _TotalLoss(torch.nn.Module):
    """torch-lr-finder wants criterion(outputs, labels) -> tensor; imret's Criterion also reports terms."""

    def __init__(self, criterion: torch.nn.Module) -> None:
        super().__init__()
        self.criterion = criterion

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.criterion(embeddings.float(), labels)[0]


def range_test(cfg: Any, start_lr: float, end_lr: float, steps: int) -> tuple[Any, list[float], list[float]]:
    from torch_lr_finder import LRFinder, TrainDataLoaderIter

    from imret.data.loader import TrainData
    from imret.distributed import DistInfo
    from imret.losses import build_criterion
    from imret.models import build_model
    from imret.train import build_optimizer, param_groups

    class Batches(TrainDataLoaderIter):  # imret's loaders yield (images, labels, indices)
        def inputs_labels_from_batch(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
            return batch[0], batch[1]

    torch.manual_seed(cfg.train.seed)
    data = TrainData(cfg, DistInfo())
    model = build_model(cfg.model)
    criterion = build_criterion(cfg.loss.terms, model.embed_dim, data.num_classes, data.labelled_classes)
    cfg.optim.lr = start_lr  # the range starts here; the head multiplier still applies
    optimizer = build_optimizer(param_groups(model, criterion, cfg.optim), cfg.optim)
    finder = LRFinder(model, optimizer, _TotalLoss(criterion), device="cpu")
    finder.range_test(Batches(data.epoch(0)), end_lr=end_lr, num_iter=steps, step_mode="exp", diverge_th=5)
    return finder, finder.history["lr"], finder.history["loss"]


MIN_POINTS_TO_SUGGEST = 17  # torch-lr-finder skips the first 10 and last 5 points, then needs 2


def plot(finder: Any, out: Path) -> float | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    suggest = len(finder.history["lr"]) >= MIN_POINTS_TO_SUGGEST
    result = finder.plot(ax=ax, suggest_lr=suggest, show_lr=None)
    suggested = result[1] if isinstance(result, tuple) else None
    ax.set_title("learning-rate range test")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return suggested


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = checks.resolve(Experiments.load(args.experiments), args.exp, args.overrides)
    except ConfigError as err:
        print(f"lr_find: error: {err}", file=sys.stderr)
        return 2
    finder, lrs, losses = range_test(cfg, args.start_lr, args.end_lr, args.steps)
    suggested = plot(finder, args.out)
    print(f"{'lr':>12}  loss")
    for lr, loss in list(zip(lrs, losses))[:: max(1, len(lrs) // 20)]:
        print(f"{lr:12.3e}  {loss:.4f}")
    print(f"tested {len(lrs)} learning rates from {lrs[0]:.2e} to {lrs[-1]:.2e}"
          + (" (stopped early: the loss diverged)" if len(lrs) < args.steps else ""))
    if suggested is not None:
        print(f"suggested learning rate: {suggested:.3e} (steepest descent of the smoothed loss)")
    else:
        print(f"no suggestion: it needs at least {MIN_POINTS_TO_SUGGEST} points (use more --steps)")
    print(f"plot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
