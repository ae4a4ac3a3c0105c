"""Collect the results of many runs into one table: ``python tools/gather.py --exp PATTERN``.

PATTERN is a glob over run directories under the runs root: ``cub_*``, or
``cbir_grid/*`` for the points of a sweep (an experiment directory whose runs are its
subdirectories is expanded by itself). From each run it reads every flat numeric key
of ``eval/results.json`` and, when present, of ``cluster/results.json`` (as
``cluster/<key>``), then prints an aligned table, and optionally writes it as CSV
(``--csv``) and as one TensorBoard run (``--tb``): one scalar per metric with the run's
row number as the step, plus a text table naming the rows.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

RESULT_FILES = (("eval/results.json", ""), ("cluster/results.json", "cluster/"))
FIRST = ("map", "map@R", "r_precision", "precision@1")  # columns shown first, then recall@K by K, then the rest


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/gather.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--exp", required=True, help="glob of run directories under the runs root, e.g. 'cbir_grid/*'")
    p.add_argument("--runs-root", type=Path, default=Path("runs"), help="where run directories live (default: runs)")
    p.add_argument("--csv", type=Path, help="also write the table as CSV here")
    p.add_argument("--tb", type=Path, help="also write the table as one TensorBoard run in this directory")
    return p.parse_args(argv)


def has_results(run: Path) -> bool:
    return any((run / name).is_file() for name, _ in RESULT_FILES)


def find_runs(root: Path, pattern: str) -> list[Path]:
    """Run directories matching the glob; a matched directory without results contributes its subdirectories."""
    found: list[Path] = []
    for path in sorted(p for p in root.glob(pattern) if p.is_dir()):
        found += [path] if has_results(path) else sorted(c for c in path.iterdir() if c.is_dir() and has_results(c))
    return list(dict.fromkeys(found))


def read_run(run: Path) -> dict[str, float]:
    """Every flat numeric key of the run's result files (booleans and nested values left out)."""
    row: dict[str, float] = {}
    for name, prefix in RESULT_FILES:
        path = run / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); is a job still writing it?") from None
        row.update({f"{prefix}{k}": float(v) for k, v in data.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return row


def column_order(keys: set[str]) -> list[str]:
    def key(name: str) -> tuple[int, float, str]:
        if name in FIRST:
            return 0, FIRST.index(name), name
        if name.startswith("recall@") and name[7:].isdigit():
            return 1, int(name[7:]), name
        return 2 if not name.startswith("cluster/") else 3, 0, name
    return sorted(keys, key=key)


def gather(root: Path, pattern: str) -> tuple[list[str], list[str], list[dict[str, float]]]:
    if not root.is_dir():
        raise ValueError(f"the runs root {root} does not exist; pass --runs-root")
    runs = find_runs(root, pattern)
    if not runs:
        there = ", ".join(sorted(p.name for p in root.iterdir() if p.is_dir())[:20]) or "none"
        raise ValueError(f"no run under {root} matching '{pattern}' has eval/results.json or cluster/results.json "
                         f"(runs there: {there})")
    rows = [read_run(r) for r in runs]
    names = [str(r.relative_to(root)) for r in runs]
    return names, column_order(set().union(*rows)), rows


def format_table(names: list[str], columns: list[str], rows: list[dict[str, float]]) -> str:
    def cell(value: float | None) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{value:.4f}" if abs(value) < 1e4 and value != int(value) else f"{value:g}"
    header = ["run"] + columns
    body = [[name] + [cell(row.get(c)) for c in columns] for name, row in zip(names, rows)]
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
             for r in [header] + body]
    return "\n".join(lines)


def write_csv(path: Path, names: list[str], columns: list[str], rows: list[dict[str, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run"] + columns)
        for name, row in zip(names, rows):
            writer.writerow([name] + [row.get(c, "") for c in columns])


def write_tensorboard(logdir: Path, names: list[str], columns: list[str], rows: list[dict[str, float]]) -> None:
    from imret.tb import TensorBoard

    board = TensorBoard(logdir)
    for step, row in enumerate(rows):
        board.scalars({c: row[c] for c in columns if c in row}, step, prefix="gather/")
    table = "| row | run |\n|---|---|\n" + "\n".join(f"| {i} | {n} |" for i, n in enumerate(names))
    board.text("gather/runs", table, 0)
    board.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        names, columns, rows = gather(args.runs_root, args.exp)
    except ValueError as err:
        print(f"gather: error: {err}", file=sys.stderr)
        return 2
    print(format_table(names, columns, rows))
    if args.csv:
        write_csv(args.csv, names, columns, rows)
        print(f"wrote {args.csv}")
    if args.tb:
        write_tensorboard(args.tb, names, columns, rows)
        print(f"wrote TensorBoard run {args.tb}  (tensorboard --logdir {args.tb})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
