"""Reference values of the sketch seed's (vitasoftAI/ImageRetrievalResearch) 21-threshold ROC curve:
tests/data/sketch_roc_reference.npz, which tests/test_seed_metrics.py checks ``roc21_auc`` against.

How it was run (2 CPU cores, no GPU, Python 3.11.7):

    python3 -m venv /tmp/seedenv
    /tmp/seedenv/bin/pip install "numpy<2" pandas matplotlib
        # used: numpy 1.26.4, pandas 3.0.6, matplotlib 3.11.2
    /tmp/seedenv/bin/python bench/make_sketch_roc_reference.py --seed-git /path/to/ImageRetrievalResearch/.git

``--seed-git`` is the git directory of a clone of github.com/vitasoftAI/ImageRetrievalResearch
holding commit 9cfa2c6599afcd058c48e797bbe4388fce57b770 (whose README is the seed text).
This script holds none of the seed's code: it reads ``utils/roc_curve_from_scratch.py`` at
that commit out of the clone into a temporary directory and executes it UNCHANGED with
runpy. At import it calls ``roc_curve('binary-preds.csv')`` on the current directory, so
each case writes its pairs to a binary-preds.csv (columns actual, prediction) in a fresh
directory and runs it there. The function returns nothing (it plots), so two calls are
observed, not altered: ``matplotlib.pyplot.scatter`` (it receives the fpr and tpr, one
point per threshold) and ``numpy.trapz`` (its raw value; the seed prints
round(abs(.), 4)). The first version of this script (with the clone's path fixed in the
code) made the committed file; this one writes the same values (re-run and compared).

Seed arithmetic (roc_curve_from_scratch.py lines 18-50): thresholds 0.00, 0.05, ..., 1.00
(``np.array(range(0, 105, 5)) / 100``); at each, a pair is predicted positive when
prediction >= threshold; tpr = tp / (tp + fn), fpr = fp / (tn + fp); AUC =
round(abs(np.trapz(tpr, fpr)), 4) over those 21 points only.

Cases: random (300 seeded pairs, predictions in [-0.4, 1]); threshold_ties (predictions
exactly on the grid: ">=" puts them on the positive side); outside_grid (predictions below
0 and above 1); seed_file (the seed's own ``utils/binary_preds.csv``, 5,696 rows, read from
the clone and not stored here); one_class (only positive pairs: the seed raises
ZeroDivisionError).
"""

from __future__ import annotations

import argparse
import os
import runpy
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

COMMIT = "9cfa2c6599afcd058c48e797bbe4388fce57b770"
OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "sketch_roc_reference.npz"


def git_show(git_dir: str, commit: str, path: str) -> str:
    return subprocess.run(["git", f"--git-dir={git_dir}", "show", f"{commit}:{path}"],
                          check=True, capture_output=True, text=True).stdout


def write_pairs(work: str, actual: np.ndarray | None, prediction: np.ndarray | None, csv_text: str | None) -> None:
    with open(os.path.join(work, "binary-preds.csv"), "w") as f:
        if csv_text is not None:
            f.write(csv_text)
            return
        f.write("actual,prediction\n")
        for a, p in zip(actual, prediction):
            f.write(f"{float(a)!r},{float(p)!r}\n")


def run_seed(script: str, actual: np.ndarray | None, prediction: np.ndarray | None,
             csv_text: str | None = None) -> dict[str, Any]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen: dict[str, Any] = {}
    real_scatter, real_trapz = plt.scatter, np.trapz

    def scatter(x, y, *args, **kwargs):
        seen["fpr"], seen["tpr"], seen["label"] = np.asarray(x, float), np.asarray(y, float), kwargs.get("label")
        return real_scatter(x, y, *args, **kwargs)

    def trapz(*args, **kwargs):
        seen["trapz"] = float(real_trapz(*args, **kwargs))
        return seen["trapz"]

    work = tempfile.mkdtemp(prefix="roc_case_")
    write_pairs(work, actual, prediction, csv_text)
    old = os.getcwd()
    plt.scatter, np.trapz = scatter, trapz
    try:
        os.chdir(work)
        runpy.run_path(script, run_name="roc_curve_from_scratch")
        seen["error"] = ""
    except Exception as err:  # noqa: BLE001 - the seed's own failure is part of the reference
        seen["error"] = f"{type(err).__name__}: {err}"
    finally:
        os.chdir(old)
        plt.scatter, np.trapz = real_scatter, real_trapz
        plt.close("all")
    return seen


def cases(git_dir: str, commit: str) -> dict[str, tuple]:
    rng = np.random.default_rng(3)
    n = 300
    actual = (rng.random(n) < 0.4).astype(float)
    pred = np.clip(np.where(actual == 1, rng.normal(0.7, 0.2, n), rng.normal(0.25, 0.25, n)), -0.4, 1.0)
    grid = np.array(list(range(0, 105, 5))) / 100
    return {
        "random": (actual, pred, None),
        "threshold_ties": (np.tile([1.0, 0.0], 21), np.repeat(grid, 2), None),
        "outside_grid": (np.array([1, 1, 1, 0, 0, 0, 1, 0], float),
                         np.array([1.2, -0.1, 0.5, -0.5, 1.01, 0.3, 0.95, 0.0]), None),
        "seed_file": (None, None, git_show(git_dir, commit, "utils/binary_preds.csv")),
        "one_class": (np.ones(5), np.linspace(0.1, 0.9, 5), None),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed-git", required=True, help="git directory of a clone of the sketch seed")
    parser.add_argument("--commit", default=COMMIT)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    script = os.path.join(tempfile.mkdtemp(prefix="roc_seed_"), "roc_curve_from_scratch.py")
    with open(script, "w") as f:
        f.write(git_show(args.seed_git, args.commit, "utils/roc_curve_from_scratch.py"))
    data: dict[str, np.ndarray] = {"thresholds": np.array(list(range(0, 105, 5))) / 100}
    all_cases = cases(args.seed_git, args.commit)
    for name, (a, p, text) in all_cases.items():
        seen = run_seed(script, a, p, text)
        if a is not None:
            data[f"{name}__actual"], data[f"{name}__prediction"] = a, p
        data[f"{name}__error"] = np.array(seen["error"])
        if seen["error"]:
            print(f"{name:15s} error {seen['error']}")
            continue
        data[f"{name}__tpr"], data[f"{name}__fpr"] = seen["tpr"], seen["fpr"]
        data[f"{name}__trapz_raw"] = np.float64(seen["trapz"])
        data[f"{name}__auc_seed"] = np.float64(round(abs(seen["trapz"]), 4))
        data[f"{name}__label"] = np.array(seen["label"])
        print(f"{name:15s} AUC {round(abs(seen['trapz']), 4)}  label {seen['label']!r}")
    data["cases"] = np.array(list(all_cases))
    import matplotlib
    import pandas
    data["versions"] = np.array([f"numpy {np.__version__}", f"pandas {pandas.__version__}",
                                 f"matplotlib {matplotlib.__version__}",
                                 f"seed vitasoftAI/ImageRetrievalResearch@{args.commit} utils/roc_curve_from_scratch.py"])
    np.savez_compressed(args.out, **data)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
