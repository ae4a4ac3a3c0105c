"""Where an experiment stands: ``python launch/status.py --exp NAME``.

For each stage (and each point of a sweep): the newest job submitted for it, its
SLURM state and elapsed time (squeue, then scontrol, then sacct where it exists),
the ``.done`` markers, the last lines of the log of a failed stage, and the headline
metrics once the run is evaluated.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from imret.config import ConfigError, Experiments
from imret.rundir import RunDir
from slurm.state import slurm_state

HEADLINE = ("map", "recall@1", "map@R", "precision@1", "recall@4")


def stage_rows(run: RunDir, stages: list[str]) -> list[dict[str, str]]:
    """One row per stage: its state, job, elapsed time and, on failure, where to look."""
    path = run.jobs / "submissions.json"
    submissions = json.loads(path.read_text()) if path.exists() else []
    newest = {entry["stage"]: entry for entry in submissions}  # later submissions replace earlier ones
    rows, failed = [], None
    for stage in stages:
        entry = newest.get(stage)
        row = {"stage": stage, "job": entry["job_id"] if entry else "-", "state": "NOT SUBMITTED",
               "elapsed": "", "note": ""}
        if run.is_done(stage):
            info = run.done_info(stage)
            row.update(state="DONE", elapsed=f"{info.get('seconds', '?')} s", note=f"finished {info.get('finished', '')}")
        elif entry:
            _fill_from_scheduler(row, entry, failed)
            if row.pop("failed", False) and failed is None:
                failed = stage
                row["note"] = f"log: {entry['stderr']}"
                row["log_tail"] = _tail(Path(entry["stderr"]))
        rows.append(row)
    return rows


def _fill_from_scheduler(row: dict[str, str], entry: dict[str, str], failed: str | None) -> None:
    if entry["mode"] != "slurm":
        row["state"] = "UNFINISHED (local job: see its log)"
        row["note"] = f"log: {entry['stderr']}"
        return
    state = slurm_state(entry["job_id"])
    if state is None:
        row["state"] = "UNKNOWN (no longer known to the scheduler)"
        return
    row.update(state=state.state, elapsed=state.elapsed, failed=state.failed and not failed)
    if failed and state.state in ("PENDING", "CANCELLED"):
        row["note"] = f"waits on the failed stage '{failed}': it will not run"
    elif state.reason:
        row["note"] = state.reason


def _tail(path: Path, lines: int = 12) -> str:
    if not path.exists():
        return "    (no log was written)"
    return "\n".join("    " + line for line in path.read_text(errors="replace").splitlines()[-lines:])


def headline(run: RunDir) -> str:
    if not run.results.exists():
        return ""
    results = json.loads(run.results.read_text())
    return "  ".join(f"{k} {results[k]:.4f}" for k in HEADLINE if isinstance(results.get(k), float))


def print_run(run: RunDir, stages: list[str]) -> bool:
    """Print one run's table; True when every stage is done."""
    rows = stage_rows(run, stages)
    print(f"{run.root}")
    for row in rows:
        print(f"  {row['stage']:<9} {row['state']:<12} job {row['job']:<12} {row['elapsed']:<12} {row['note']}")
        if "log_tail" in row:
            print(row["log_tail"])
    metrics = headline(run)
    if metrics:
        print(f"  results   {metrics}")
    return all(r["state"] == "DONE" for r in rows)


def runs_of(exps: Experiments, name: str, overrides: list[str]) -> list[tuple[RunDir, list[str]]]:
    cfg = exps.resolve(name, overrides)
    base = Path(cfg.run.root) / (cfg.run.name or cfg.name)
    if cfg.sweep.grid or cfg.sweep.points:
        from imret.sweep import expand

        return [(RunDir(base / p.name), cfg.stages) for p in expand(cfg.sweep)]
    return [(RunDir(base), cfg.stages)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="launch/status.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", required=True, help="experiment name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="the same overrides the experiment was submitted with (e.g. run.root)")
    p.add_argument("--experiments", type=Path, default=ROOT / "experiments.yaml")
    args = p.parse_args(argv)
    try:
        runs = runs_of(Experiments.load(args.experiments), args.exp, args.overrides)
    except ConfigError as err:
        print(f"status: error: {err}", file=sys.stderr)
        return 2
    complete = [print_run(run, stages) for run, stages in runs]
    return 0 if all(complete) else 1


if __name__ == "__main__":
    sys.exit(main())
