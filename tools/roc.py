"""Plot a run's ROC curve to PNG: ``python tools/roc.py --exp NAME [--out roc.png]``.

Reads ``eval/roc.npz``, which the evaluate stage writes when the experiment asks for
``roc_auc`` (or ``cos_sim_pos``/``cos_sim_neg``): the curve of (query, database item)
pairs, positive when their labels agree, called positive when their cosine similarity
is at least the threshold. Several runs (``--exp a --exp b``) are drawn on one plot,
each labelled with its AUC. Needs matplotlib (``pip install -e .[tools]``).

    python tools/roc.py --exp sketchy_rexnet --exp sketchy_effnet --out roc.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/roc.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--exp", action="append", required=True,
                   help="run name under the runs root ('exp/point' for a sweep point); repeat to compare runs")
    p.add_argument("--runs-root", type=Path, default=Path("runs"), help="where run directories live (default: runs)")
    p.add_argument("--out", type=Path, help="PNG to write (default: <first run>/eval/roc.png)")
    return p.parse_args(argv)


def read_curve(runs_root: Path, name: str) -> dict[str, np.ndarray]:
    from imret.config.names import run_dir

    path = run_dir(runs_root, name) / "eval" / "roc.npz"  # a name with '..' or a leading '/' is refused
    if not (runs_root / name).is_dir():
        raise ValueError(f"no run '{name}' under {runs_root}; pass --runs-root or check the name with `ls {runs_root}`")
    if not path.exists():
        raise ValueError(f"{path} is missing: the run has no ROC curve. Add roc_auc to evaluate.metrics and run "
                         "its evaluate stage again (delete eval/.done or submit with --force)")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def plot(curves: list[tuple[str, dict[str, np.ndarray]]], out: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise ValueError("tools/roc.py needs matplotlib: pip install -e '.[tools]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    for name, c in curves:
        sampled = " (sampled pairs)" if bool(c.get("sampled", False)) else ""
        ax.plot(c["fpr"], c["tpr"], label=f"{name}: AUC {float(c['auc']):.4f}{sampled}")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01),
           title="ROC of (query, item) pairs by cosine similarity")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        curves = [(name, read_curve(args.runs_root, name)) for name in args.exp]
        out = args.out or args.runs_root / args.exp[0] / "eval" / "roc.png"
        plot(curves, out)
    except ValueError as err:
        print(f"roc: error: {err}", file=sys.stderr)
        return 2
    for name, c in curves:
        print(f"{name}: AUC {float(c['auc']):.4f} over {int(c.get('pairs', 0))} pairs")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
