"""The loop's per-iteration view, as the PSS paper tabulates it: ``python -m tools.report --exp 'digits_open_iter*'``.

One row per iteration (runs ordered by the number after ``iter`` in their names): the
evaluation's Recall@K, the fraction of the unlabelled data that carries a pseudo-label
after the iteration (earlier selections included), the samples selected at it, and the
cluster stage's pairwise F, BCubed F and NMI per subset (U_in, U_out, all of U, newly
selected, not selected; ``imret.cluster.subsets``). A second table lists every subset's
figures in full. The tables are printed as markdown, written with ``--out FILE.md``, and
written into TensorBoard with ``--tb DIR`` (scalars with the iteration as the step, and
the markdown as a text summary). ``tools/gather.py`` shows every flat key instead.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from tools.gather import find_runs, read_run

SHOWN = ("pairwise_f", "bcubed_f", "nmi")
SUBSET_ORDER = ("all", "selected", "frozen", "unselected", "clustered")  # after the splits


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--exp", required=True, help="glob of the loop's run directories, e.g. 'inat_smoothap_iter*'")
    p.add_argument("--runs-root", type=Path, default=Path("runs"), help="where run directories live (default: runs)")
    p.add_argument("--out", type=Path, help="also write the markdown here")
    p.add_argument("--tb", type=Path, help="also write the report as one TensorBoard run in this directory")
    return p.parse_args(argv)


def iteration_of(name: str, position: int) -> int:
    """The number after ``iter`` in a run's name; runs without one count by their position."""
    found = re.findall(r"iter(\d+)", name)
    return int(found[-1]) if found else position


def collect(root: Path, pattern: str) -> list[dict[str, Any]]:
    """Per run, ordered by iteration: its name, iteration, flat figures and cluster subsets."""
    if not root.is_dir():
        raise ValueError(f"the runs root {root} does not exist; pass --runs-root")
    runs = find_runs(root, pattern)
    if not runs:
        raise ValueError(f"no run under {root} matching '{pattern}' has eval/results.json or "
                         "cluster/results.json; check --exp and --runs-root")
    rows = []
    for position, run in enumerate(runs):
        figures = read_run(run)  # ValueError for a file that is not JSON
        cluster = run / "cluster" / "results.json"
        subsets = json.loads(cluster.read_text()).get("subsets", {}) if cluster.is_file() else {}
        rows.append({"run": str(run.relative_to(root)), "iteration": iteration_of(run.name, position),
                     "figures": figures, "subsets": subsets})
    return sorted(rows, key=lambda r: (r["iteration"], r["run"]))


def recall_columns(rows: list[dict[str, Any]]) -> list[str]:
    keys = {k for r in rows for k in r["figures"] if re.fullmatch(r"recall@\d+", k)}
    return sorted(keys, key=lambda k: int(k.split("@")[1]))


def subset_names(rows: list[dict[str, Any]]) -> list[str]:
    names = list(dict.fromkeys(n for r in rows for n in r["subsets"]))
    return [n for n in names if n not in SUBSET_ORDER] + [n for n in SUBSET_ORDER if n in names]


def cell(value: Any, percent: bool = False) -> str:
    if value is None:
        return "-"
    if percent:
        return f"{100 * value:.1f}%"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def summary_table(rows: list[dict[str, Any]]) -> str:
    """Iteration, Recall@K, fraction pseudo-labelled, selected now, and pairwise F per subset."""
    recalls, names = recall_columns(rows), [n for n in subset_names(rows) if n not in ("frozen", "clustered")]
    header = (["iteration", "run"] + [f"R@{k.split('@')[1]}" for k in recalls] + ["U pseudo-labelled", "selected now"]
              + [f"{n} pairwise F" for n in names])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        f = r["figures"]
        cells = ([str(r["iteration"]), r["run"]] + [cell(f.get(k)) for k in recalls]
                 + [cell(f.get("cluster/pseudo_labelled_fraction"), percent=True),
                    cell(int(f["cluster/selected"]) if "cluster/selected" in f else None)]
                 + [cell(r["subsets"].get(n, {}).get("pairwise_f")) for n in names])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def subset_table(rows: list[dict[str, Any]]) -> str:
    """Every subset's size, pseudo-labelled fraction and the three quality figures, per iteration."""
    header = ["iteration", "subset", "samples", "pseudo-labelled", "scored", "pairwise F", "BCubed F", "NMI"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        for name in subset_names([r]):
            s = r["subsets"][name]
            lines.append("| " + " | ".join([str(r["iteration"]), name, str(s.get("samples", "-")),
                                            cell(s.get("pseudo_labelled_fraction"), percent=True),
                                            str(s.get("scored", "-"))] + [cell(s.get(m)) for m in SHOWN]) + " |")
    return "\n".join(lines)


def markdown(pattern: str, rows: list[dict[str, Any]]) -> str:
    return (f"# The loop, iteration by iteration: {pattern}\n\n{summary_table(rows)}\n\n"
            f"## Clustering quality per subset\n\n{subset_table(rows)}\n")


def write_tensorboard(logdir: Path, rows: list[dict[str, Any]], text: str) -> None:
    from imret.tb import TensorBoard

    board = TensorBoard(logdir)
    for r in rows:
        f = r["figures"]
        values = {k: f[k] for k in recall_columns([r]) + ["cluster/pseudo_labelled_fraction", "cluster/selected"]
                  if k in f}
        values.update({f"{n}/{m}": s[m] for n, s in r["subsets"].items() for m in SHOWN if m in s})
        board.scalars(values, r["iteration"], prefix="report/")
    board.text("report/table", text, 0)
    board.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rows = collect(args.runs_root, args.exp)
    except ValueError as err:
        print(f"report: error: {err}", file=sys.stderr)
        return 2
    text = markdown(args.exp, rows)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    if args.tb:
        write_tensorboard(args.tb, rows, text)
        print(f"wrote TensorBoard run {args.tb}  (tensorboard --logdir {args.tb})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
