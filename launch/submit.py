"""Submit an experiment by name: ``python launch/submit.py --exp digits_demo``.

Resolves the experiment from experiments.yaml (with --set overrides), checks it,
writes the resolved config into its run directory, and submits the stages that are
not done yet: on SLURM as a chain of dependent jobs, otherwise through submitit's
local executor (one process per rank, gloo on CPU) while this command waits.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

from imret import checks
from imret.config import ConfigError, Experiments, ExperimentConfig, save_yaml

HEADLINE = ("map", "recall@1", "map@R", "precision@1", "recall@4")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/submit.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", help="experiment name from experiments.yaml")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value (repeatable), e.g. --set optim.lr=1e-3")
    p.add_argument("--cluster", choices=("auto", "slurm", "local", "debug"), default="auto",
                   help="auto: SLURM when a controller answers, else local processes (default)")
    p.add_argument("--dry-run", action="store_true", help="show stages, job shapes and sbatch parameters; submit nothing")
    p.add_argument("--wait", action="store_true", help="on SLURM, wait for the chain and show the results")
    p.add_argument("--force", action="store_true",
                   help="accept a config that differs from the one already in the run directory (the old one is "
                        "kept), and submit even while jobs of an earlier submission still live in it")
    p.add_argument("--pdb", action="store_true",
                   help="with --cluster debug: stop in the debugger (pdb) where a stage fails")
    p.add_argument("--only", nargs="+", default=[], metavar="POINT",
                   help="for a sweep: run only these points (names as --dry-run lists them)")
    p.add_argument("--experiments", type=Path, default=ROOT / "experiments.yaml", help="experiments file")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (with --set overrides) as YAML and exit; nothing is submitted or written")
    return p


def list_experiments(exps: Experiments) -> None:
    names = exps.runnable()
    width = max(len(n) for n in names) if names else 10
    print(f"{'experiment':<{width}}  description")
    for name in names:
        description = exps.raw(name).get("description", "")
        print(f"{name:<{width}}  {description}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM)
    if on_main_thread:
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill <pid>` stops the submission as Ctrl-C does
    try:
        return _main(args)
    except KeyboardInterrupt:  # before or between submissions; a running local job is stopped in slurm.waiting
        hint = f" See what it submitted with `{status_command(args)}`." if args.exp else ""
        print(f"\nsubmit: interrupted.{hint}", file=sys.stderr)
        return 130
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace) -> int:
    try:
        exps = Experiments.load(args.experiments)
        if args.list:
            list_experiments(exps)
            return 0
        if not args.exp:
            raise ConfigError("name an experiment with --exp NAME (see --list)")
        if args.pdb and args.cluster != "debug":
            raise ConfigError("--pdb opens the debugger in this process, and only --cluster debug runs stages in it; "
                              "add --cluster debug")
        cfg = checks.resolve(exps, args.exp, args.overrides)
        if args.print_config:
            print(yaml_text(cfg), end="")
            return 0
        if cfg.sweep.grid or cfg.sweep.points:
            return _submit_sweep(cfg, exps, args)
        if args.only:
            raise ConfigError(f"--only selects sweep points, but '{args.exp}' has no sweep")
        return _submit(cfg, exps, args)
    except (ConfigError, ValueError) as err:
        print(f"submit: error: {err}", file=sys.stderr)
        return 2


def yaml_text(cfg: ExperimentConfig) -> str:
    """The resolved config as the run directory's config.yaml would hold it."""
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def upstream(exps: Experiments, cfg: ExperimentConfig, overrides: list[str],
             _seen: tuple[str, ...] = ()) -> list[ExperimentConfig]:
    """Experiments this one builds on, in the order they must run (deepest first).

    ``train.init_from`` and ``data.pseudo_labels`` may name other experiments (an
    iteration of the cluster-finetune loop starts from the previous one's weights and
    trains on its pseudo-labels). Upstream experiments are resolved with the same
    ``--set`` overrides, so one shrinking override shrinks the whole chain.
    """
    refs = [r for r in (cfg.train.init_from, cfg.data.pseudo_labels) if r in exps.entries and r != cfg.name]
    chain: list[ExperimentConfig] = []
    for name in dict.fromkeys(refs):
        if name in _seen:
            raise ConfigError(f"experiments form a cycle: {' -> '.join(_seen + (name,))}")
        up = checks.resolve(exps, name, overrides)
        chain += upstream(exps, up, overrides, _seen + (cfg.name,)) + [up]
    unique: dict[str, ExperimentConfig] = {}
    for c in chain:
        unique.setdefault(c.name, c)
    return list(unique.values())


def _submit(cfg: ExperimentConfig, exps: Experiments, args: argparse.Namespace) -> int:
    from slurm.executors import resolve_mode

    mode = "slurm" if args.dry_run and args.cluster == "slurm" else (
        args.cluster if args.dry_run and args.cluster != "auto" else resolve_mode(args.cluster))
    chain = upstream(exps, cfg, args.overrides) + [cfg]
    for link in chain:
        _check_ranks(link, mode)
    if args.dry_run:
        for i, link in enumerate(chain):
            if i:
                print(f"\n-- then {link.name}, after {chain[i - 1].name}'s last stage --\n")
            _dry_run(link, mode, after=f"{chain[i - 1].name}:{chain[i - 1].stages[-1]}" if i else None)
        return 0
    for link in chain:
        _check_data(link)
    from slurm.ownership import owned

    with owned([link.run_dir for link in chain], args.force, status_command(args)):
        paths = [_write_config(link, args.force) for link in chain]
        return _submit_links(chain, paths, mode, args)


def _submit_links(chain: list[ExperimentConfig], paths: list[Path], mode: str, args: argparse.Namespace) -> int:
    from slurm.chain import Interrupted, StageFailed, submit_chain

    print(f"submit: {' -> '.join(c.name for c in chain)} ({mode})")
    started = time.time()
    submitted, last = [], None
    try:
        for link, path in zip(chain, paths):
            entries = submit_chain(link, mode, path, wait=args.wait, after=last, pdb=args.pdb)
            submitted += entries
            last = entries[-1].job_id if entries else last
    except StageFailed as err:
        print(f"submit: {err}", file=sys.stderr)
        return 1
    except Interrupted as err:
        return _interrupted(err, chain, mode, args)
    if mode == "slurm" and not args.wait and submitted:
        print(f"submit: {len(submitted)} job(s) queued; follow them with `{status_command(args)}`")
        return 0
    _summary(chain[-1], time.time() - started)
    return 0


def _interrupted(err: Exception, chain: list[ExperimentConfig], mode: str, args: argparse.Namespace) -> int:
    """What a stopped submission kept, and the command that continues it."""
    if mode == "slurm":
        print(f"submit: {err}; follow them with `{status_command(args)}`", file=sys.stderr)
        return 130
    from imret.checkpoint import Checkpointer
    from imret.rundir import RunDir

    kept = []
    for link in chain:
        run = RunDir(link.run_dir)
        latest = Checkpointer(run.ckpt).latest() if "train" in link.stages and not run.is_done("train") else None
        if latest is not None:
            kept.append(f"{link.name}'s training is saved in {latest}")
    print(f"submit: interrupted: {err}. {'; '.join(kept) + '. ' if kept else ''}Finished stages are kept. "
          f"Continue with `{resume_command(args)}`: finished stages are skipped and training resumes from its "
          f"newest checkpoint.", file=sys.stderr)
    return 130


def _argv_of(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    argv = ["--exp", args.exp]
    if Path(args.experiments).resolve() != (ROOT / "experiments.yaml").resolve():
        argv += ["--experiments", str(args.experiments)]
    for override in overrides:
        argv += ["--set", override]
    return argv


def status_command(args: argparse.Namespace) -> str:
    """The status command that finds this submission's run directories (the overrides that place them)."""
    placing = [o for o in args.overrides if o.split("=", 1)[0].strip().startswith(("run.", "stages", "sweep"))]
    return shlex.join(["python", "launch/status.py", *_argv_of(args, placing)])


def resume_command(args: argparse.Namespace) -> str:
    """This submission again, with every override (a different config would be refused)."""
    argv = _argv_of(args, args.overrides)
    if args.cluster != "auto":
        argv += ["--cluster", args.cluster]
    if args.only:
        argv += ["--only", *args.only]
    return shlex.join(["python", "launch/submit.py", *argv])


def _sweep_configs(cfg: ExperimentConfig, exps: Experiments, args: argparse.Namespace) -> list[ExperimentConfig]:
    from imret.sweep import expand, select

    base = cfg.run.name or cfg.name
    points = select(expand(cfg.sweep), args.only)
    return [checks.resolve(exps, args.exp, [*args.overrides, *p.overrides, f"run.name={base}/{p.name}", "sweep={}"])
            for p in points]


def _submit_sweep(cfg: ExperimentConfig, exps: Experiments, args: argparse.Namespace) -> int:
    from slurm.executors import resolve_mode, stage_shape

    configs = _sweep_configs(cfg, exps, args)
    mode = args.cluster if args.dry_run and args.cluster != "auto" else resolve_mode(args.cluster)
    for point in configs:
        _check_ranks(point, mode)
    shapes = {tuple(vars(stage_shape(c, s, mode)).values()) for c in configs for s in c.stages if s == c.stages[0]}
    if mode == "slurm" and len(shapes) > 1:
        raise ConfigError("the points of a sweep must share their job shape (one SLURM array per stage); "
                          "move resource changes out of the sweep")
    if args.dry_run:
        print(f"sweep {cfg.name}: {len(configs)} point(s), one {mode} array per stage "
              f"(at most {cfg.sweep.array_parallelism} running at once)")
        for point in configs:
            print(f"  {point.run_dir}")
        _dry_run(configs[0], mode)
        return 0
    for point in configs:
        _check_data(point)
    from slurm.ownership import owned

    with owned([point.run_dir for point in configs], args.force, status_command(args)):
        paths = [_write_config(point, args.force) for point in configs]
        return _submit_points(cfg, configs, paths, mode, args)


def _submit_points(cfg: ExperimentConfig, configs: list[ExperimentConfig], paths: list[Path], mode: str,
                   args: argparse.Namespace) -> int:
    print(f"submit: sweep {cfg.name}: {len(configs)} point(s) -> {Path(cfg.run.root) / (cfg.run.name or cfg.name)} ({mode})")
    if mode == "slurm":
        from slurm.chain import submit_sweep

        log_dir = Path(cfg.run.root) / (cfg.run.name or cfg.name) / "jobs"
        submitted = submit_sweep(list(zip(configs, paths)), mode, log_dir, cfg.sweep.array_parallelism)
        print(f"submit: {len(submitted)} array task(s) queued; follow them with `{status_command(args)}`")
        return 0
    return _run_points_locally(configs, paths, mode, args)


def _run_points_locally(configs: list[ExperimentConfig], paths: list[Path], mode: str,
                        args: argparse.Namespace) -> int:
    from slurm.chain import Interrupted, StageFailed, submit_chain

    failed = []
    for point, path in zip(configs, paths):
        print(f"\n== {point.run_dir}")
        try:
            submit_chain(point, mode, path, pdb=args.pdb)
        except StageFailed as err:  # the other points still run: one failure hides nothing
            print(f"submit: {err}", file=sys.stderr)
            failed.append(str(point.run_dir))
        except Interrupted as err:  # the user stops the whole sweep
            return _interrupted(err, [point], mode, args)
    print(f"\nsubmit: sweep done: {len(configs) - len(failed)} of {len(configs)} point(s) finished"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def _check_ranks(cfg: ExperimentConfig, mode: str) -> None:
    from slurm.executors import stage_shape

    if "train" not in cfg.stages:
        return
    ranks = stage_shape(cfg, "train", mode).ranks
    if cfg.data.batch_size % ranks:
        raise ConfigError(f"data.batch_size ({cfg.data.batch_size}) does not divide over the {ranks} training ranks "
                          f"of this job shape ({mode}); choose a multiple of {ranks}.")
    if cfg.data.sampler == "pk" and (cfg.data.batch_size // ranks) < 1:
        raise ConfigError("data.batch_size is smaller than the number of ranks")


def _needed_splits(cfg: ExperimentConfig) -> list[str]:
    from imret.extract import splits_to_extract

    splits = list(cfg.data.train_splits) if "train" in cfg.stages else []
    val = cfg.train.validation
    if "train" in cfg.stages and val.every:
        splits += [s for s in (val.query, val.database) if s]
    if "extract" in cfg.stages:
        splits += splits_to_extract(cfg)
    if "cluster" in cfg.stages:
        splits += cfg.cluster.splits + cfg.cluster.labelled
    return list(dict.fromkeys(splits))


def _check_data(cfg: ExperimentConfig) -> None:
    from imret.data.shards import read_manifest

    for split in _needed_splits(cfg):
        read_manifest(cfg.data.root, split)  # raises ShardError (a ValueError) naming the fix
    checks.check_weights(cfg)  # pretrained weights in the local cache: jobs never download


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def _write_config(cfg: ExperimentConfig, force: bool) -> Path:
    from imret.config.load import read_yaml_file
    from imret.rundir import RunDir

    run = RunDir(cfg.run_dir)
    if run.config.exists():
        old = read_yaml_file(run.config)
        changes = _diff(old, cfg.to_dict())
        if changes and not force:
            raise ConfigError(
                f"{run.config} holds a different config for this run ({len(changes)} change(s): "
                f"{'; '.join(changes[:5])}). Finished stages were computed with the old one. Start a separate run "
                f"with --set run.name=<new name>, or pass --force to replace the config and keep the finished stages."
            )
        if changes:
            print(f"submit: --force: the previous config is kept as {_keep(run.config)}")
    save_yaml(cfg, run.config)
    return run.config


def _keep(config: Path) -> Path:
    """Copy the config to a backup name no file has yet (two --force runs in one second keep both)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = config.read_text()
    for n in range(1, 10_000):
        backup = config.with_name(f"config.{stamp}{f'-{n}' if n > 1 else ''}.yaml")
        try:
            with open(backup, "x") as f:  # exclusive creation: never replaces an earlier backup
                f.write(text)
            return backup
        except FileExistsError:
            continue
    raise AssertionError(f"no free backup name beside {config}")


def _dry_run(cfg: ExperimentConfig, mode: str, after: str | None = None) -> None:
    from imret.pipeline import pending
    from imret.rundir import RunDir
    from slurm.executors import sbatch_preview, stage_shape

    done, todo = pending(cfg)
    run = RunDir(cfg.run_dir)
    print(f"experiment {cfg.name}: {cfg.description}")
    print(f"run directory {cfg.run_dir} (config digest {cfg.digest()}), cluster: {mode}")
    loss = " + ".join(f"{t.weight:g}*{t.name}{t.params or ''}" for t in cfg.loss.terms)
    print(f"model {cfg.model.backbone} pool={cfg.model.pool} embed_dim={cfg.model.embed_dim}; loss {loss}; "
          f"optim {cfg.optim.name} lr={cfg.optim.lr:g} head_lr_mult={cfg.optim.head_lr_mult:g}; "
          f"batch {cfg.data.batch_size} ({cfg.data.sampler}, K={cfg.data.samples_per_class}); epochs {cfg.train.epochs}")
    print(f"data {cfg.data.root}: train on {', '.join(cfg.data.train_splits)}"
          + (f" with pseudo-labels from {cfg.data.pseudo_labels}" if cfg.data.pseudo_labels else "")
          + (f"; weights from {cfg.train.init_from}" if cfg.train.init_from else ""))
    previous = after
    for stage in done + todo:
        state = "done, skipped" if stage in done else "to run"
        shape = stage_shape(cfg, stage.name, mode)
        print(f"\nstage {stage.name} [{state}]: {shape.nodes} node(s) x {shape.tasks_per_node} task(s)"
              f"{f', {shape.gpus_per_node} GPU(s) per node' if shape.gpus_per_node else ''} = {shape.ranks} rank(s)")
        if mode == "slurm" and stage in todo:
            dependency = f"afterok:<{previous} job id>" if previous else None
            print(sbatch_preview(cfg, stage.name, run.jobs / "%j", dependency))
            previous = stage.name
    print("\ndry run: nothing submitted")


def _summary(cfg: ExperimentConfig, seconds: float) -> None:
    from imret.rundir import RunDir

    run = RunDir(cfg.run_dir)
    print(f"\nsubmit: {cfg.name} finished in {seconds:.0f} s")
    print(f"  run directory  {run.root}")
    if run.results.exists():
        results = json.loads(run.results.read_text())
        print(f"  results        {run.results}")
        shown = [k for k in HEADLINE if k in results][:4]
        print("  " + "  ".join(f"{k} {results[k]:.4f}" for k in shown))
    print(f"  TensorBoard    tensorboard --logdir {run.tb}")


if __name__ == "__main__":
    from launch import run_program

    run_program(main)
