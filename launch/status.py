"""Where an experiment stands: ``python launch/status.py --exp NAME``.

For each stage (and each point of a sweep): the newest job submitted for it, its
SLURM state, elapsed time and requeue count (scontrol, then sacct where it exists),
the ``.done`` markers, the root cause of a failed stage (``slurm.diagnose``: the
scheduler's exit code and signal, srun's ``task N: Killed``, each rank's exception)
with the last lines of its log, and the headline metrics once the run is evaluated.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

from imret.config import ConfigError, Experiments
from imret.rundir import RunDir
from slurm.diagnose import Report, report
from slurm.state import slurm_state

HEADLINE = ("map", "recall@1", "map@R", "precision@1", "recall@4")


def stage_rows(run: RunDir, stages: list[str]) -> list[dict[str, str]]:
    """One row per stage: its state, job, elapsed time, requeues and, on failure, its root cause."""
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
            requeues = _requeues(entry) if entry else 0
            row["note"] += f"; requeued {requeues} time(s)" if requeues else ""
        elif entry:
            _fill_from_scheduler(row, entry, failed, run)
            if row.pop("failed", False) and failed is None:
                failed = stage
        rows.append(row)
    return rows


def _fill_from_scheduler(row: dict[str, Any], entry: dict[str, str], failed: str | None, run: RunDir) -> None:
    state = slurm_state(entry["job_id"]) if entry["mode"] == "slurm" else None
    rep = report(entry, state)
    if entry["mode"] != "slurm":
        _fill_local(row, entry, run, rep)
    elif state is None:  # ended long ago (or on a scheduler restarted since): its logs still tell how
        row.update(state="UNKNOWN (no longer known to the scheduler)", ended=bool(rep.causes))
    else:
        row.update(state=state.state, elapsed=state.elapsed, failed=state.failed and not failed)
        if failed and state.state in ("PENDING", "CANCELLED"):
            row["note"] = f"waits on the failed stage '{failed}': it will not run"
        elif state.reason:
            row["note"] = state.reason
    ended = row.pop("ended", False) or row.get("failed") or row["state"].startswith("STOPPED")
    notes = [f"requeued {rep.requeues} time(s)"] if rep.requeues else []
    if ended:
        notes.append("stopped on request after saving: submit again to continue" if rep.stopped else
                     f"log: {Path(entry['stderr']).parent}")
        row["report"] = "\n".join(rep.lines())
    row["note"] = "; ".join(notes + ([row["note"]] if row["note"] and not ended else []))


def _requeues(entry: dict[str, str]) -> int:
    return report(entry, slurm_state(entry["job_id"]) if entry["mode"] == "slurm" else None).requeues or 0


def _fill_local(row: dict[str, Any], entry: dict[str, str], run: RunDir, rep: Report) -> None:
    """A local job: running while its controller lives; afterwards stopped on request, or failed."""
    from slurm.ownership import controller_alive

    if controller_alive(entry, run.root):
        row["state"] = "RUNNING"
        row["note"] = f"local, controller pid {entry['job_id']}"
    elif rep.stopped:
        row["state"] = "STOPPED"
    else:
        row.update(state="FAILED", failed=True)


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
        if "report" in row:
            print(row["report"])
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
    from launch import run_program

    run_program(main)
