"""Pseudo-label any features with any cluster method, outside an experiment.

    python -m tools.cluster --method hilander --labelled L.npz --unlabelled U.npz --out r.json \\
        [--set cluster.KEY=VALUE ...] [--labels-out r.npz]

``L.npz`` holds ``embeddings`` (m x d) and ``labels`` (m): a learning method
(``imret.cluster.methods.LEARNS``, e.g. hilander) trains on them; the others need no
``--labelled``. ``U.npz`` holds ``embeddings`` (n x d) and, optionally, ``labels``, used
only to score the result. Settings are the experiment config's ``cluster`` section, with
its defaults, changed by ``--set`` (``--set cluster.hilander.epochs=50``). Writes
``r.json`` (the method, its settings, counts, the fraction selected, timings and, when U
has labels, pairwise / BCubed F and NMI of the selected samples and of all samples) and
``r.npz`` beside it (``labels``, ``selected``, ``density`` per row of U). A learning
method keeps its checkpoint and log in ``r.<method>/`` next to ``--out``. Bad input
prints ``cluster: error: ...`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from imret.cluster.clustering import Clustering, Known
from imret.cluster.methods import LEARNS, METHODS, check, get_method
from imret.config import ClusterConfig, ConfigError, apply_override, from_dict


class UsageError(ValueError):
    """Bad input: reported in one paragraph, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see python -m tools.cluster --help)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog="python -m tools.cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="density", help=f"a cluster method: {', '.join(sorted(METHODS))}")
    p.add_argument("--labelled", type=Path, help=".npz with embeddings and labels to learn from (learning methods)")
    p.add_argument("--unlabelled", type=Path, required=True, help=".npz with embeddings (and optional labels)")
    p.add_argument("--out", type=Path, required=True, help="the result as JSON")
    p.add_argument("--labels-out", type=Path, help="pseudo-labels, selection and density (default: --out as .npz)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="cluster.KEY=VALUE",
                   help="change a cluster setting (repeatable)")
    return p.parse_args(argv)


def settings(method: str, overrides: list[str]) -> ClusterConfig:
    """The cluster section: defaults, the method, the overrides; checked as an experiment's would be."""
    data: dict[str, Any] = {"stages": ["cluster"], "cluster": {"method": method, "splits": ["unlabelled"]}}
    for item in overrides:
        if not item.startswith("cluster."):
            raise UsageError(f"--set {item!r}: only cluster settings apply here (e.g. --set cluster.k=20)")
        data = apply_override(data, item)
    params = from_dict(data).cluster
    check(params)
    return params


def load_npz(path: Path, what: str, need_labels: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(embeddings float32 (n, d), labels int64 (n) or None), or UsageError saying what is wrong."""
    if not path.is_file():
        raise UsageError(f"{what} file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k in ("embeddings", "labels")}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise UsageError(f"{what} file {path} is not a readable .npz ({err}); write it with numpy.savez") from None
    x, y = arrays.get("embeddings"), arrays.get("labels")
    if x is None or (need_labels and y is None):
        keys = "'embeddings' and 'labels'" if need_labels else "'embeddings'"
        raise UsageError(f"{what} file {path} needs the key(s) {keys}; it has {sorted(arrays) or 'neither'}")
    if x.ndim != 2 or len(x) < 2 or not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
        raise UsageError(f"{what} file {path}: embeddings must be a finite 2-D array of at least 2 rows, got shape "
                         f"{x.shape} ({x.dtype})")
    if y is not None and (y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer)):
        raise UsageError(f"{what} file {path}: labels must be integers, one per embedding row ({len(x)}), got shape "
                         f"{y.shape} ({y.dtype})")
    return x.astype(np.float32), None if y is None else y.astype(np.int64)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Clusters ``--unlabelled`` as ``args`` say and writes the result files; returns the JSON written."""
    params = settings(args.method, args.overrides)
    x, truth = load_npz(args.unlabelled, "--unlabelled", need_labels=False)
    known = None
    if args.method in LEARNS:
        if args.labelled is None:
            raise UsageError(f"--method {args.method} learns from labelled features: give --labelled L.npz "
                             "(embeddings and labels)")
        lx, ly = load_npz(args.labelled, "--labelled", need_labels=True)
        assert ly is not None
        if lx.shape[1] != x.shape[1]:
            raise UsageError(f"--labelled embeddings are {lx.shape[1]}-d and --unlabelled ones {x.shape[1]}-d: "
                             "both must come from the same model")
        known = Known(lx, ly, args.out.parent / f"{args.out.stem}.{args.method}")
    result = get_method(args.method)(x, params, known)
    labels_out = args.labels_out or args.out.with_suffix(".npz")
    summary = describe(args, params, result, truth, known, labels_out)
    write_outputs(args.out, labels_out, summary, result)
    return summary


def describe(args: argparse.Namespace, params: ClusterConfig, result: Clustering, truth: np.ndarray | None,
             known: Known | None, labels_out: Path) -> dict[str, Any]:
    """The JSON summary: settings, counts, selection, timings and (with true labels) the metrics."""
    sel = result.selected
    out: dict[str, Any] = {
        "method": args.method, "settings": dataclasses.asdict(params), "unlabelled": str(args.unlabelled),
        "labelled": str(args.labelled) if known is not None else None, "labels_file": str(labels_out),
        "workdir": str(known.workdir) if known is not None else None,
        "counts": {"unlabelled": len(sel), "labelled": len(known.labels) if known is not None else 0,
                   "clusters": int(len(np.unique(result.labels))), "selected": int(sel.sum()),
                   "clusters_selected": int(len(np.unique(result.labels[sel])))},
        "selected_fraction": float(sel.mean()), "info": result.info,
    }
    if truth is not None:
        from imret.metrics import quality

        out["metrics"] = {"all": quality(result.labels, truth),
                          "selected": quality(result.labels[sel], truth[sel]) if sel.any() else None}
    return out


def write_outputs(out: Path, labels_out: Path, summary: dict[str, Any], result: Clustering) -> None:
    """The labels file, then the JSON (each written aside and renamed: never half a file)."""
    for path in (out, labels_out):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = labels_out.with_name(labels_out.name + ".tmp.npz")
    np.savez(tmp, labels=result.labels, selected=result.selected, density=result.density)
    tmp.replace(labels_out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1, default=_plain) + "\n")
    tmp.replace(out)


def _plain(value: Any) -> Any:
    """numpy scalars and arrays, and paths, as JSON values."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def main(argv: list[str] | None = None) -> int:
    try:
        summary = run(parse_args(argv))
    except (UsageError, ConfigError, ValueError, OSError) as err:
        print(f"cluster: error: {err}", file=sys.stderr)
        return 2
    counts = summary["counts"]
    print(f"cluster: {summary['method']}: {counts['clusters']} clusters over {counts['unlabelled']} points, "
          f"{counts['selected']} selected ({summary['selected_fraction']:.1%}); wrote {summary['labels_file']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
