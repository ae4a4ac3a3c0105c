"""Atomic checkpoints of every stateful thing, and finding them again.

A checkpoint is a directory ``ckpt/step-<N>/`` holding ``state.pt`` (model, loss
parameters, optimizer, scheduler, data position, RNG states) and ``meta.json``.
``state.pt`` is written under a temporary name and renamed into place, and
``meta.json`` is written last: a checkpoint without its metadata (a job killed while
saving) is not a checkpoint and is ignored. Only rank 0 writes; every rank reads.

Every file is read with ``torch.load(weights_only=True)``: unpickling anything else can
run code, and a checkpoint may come from another person's run (``train.init_from``). So
the state holds only tensors and plain types; the RNG states are stored as such too.
A file that needs more is refused, naming it. A damaged newest checkpoint (a truncated
``state.pt``) is set aside with a warning and training resumes from the one before.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imret.rundir import RunDir, atomic_write_bytes, atomic_write_json

_STEP_DIR = re.compile(r"step-(\d+)$")
PRETRAINED = "pretrained"  # train.init_from: start from model.pretrained's weights, not another run's


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


class UnreadableCheckpoint(CheckpointError):
    """A truncated or damaged checkpoint file."""


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint whose pickle needs more than tensors and plain types (it could run code)."""


def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors and plain types, so that a weights-only load restores it exactly."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),  # (version, tuple of ints, float or None)
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Saves, lists, prunes and loads the checkpoints of one run."""

    def __init__(self, directory: Path, keep: int = 2, keep_epoch_ends: bool = False) -> None:
        self.directory = Path(directory)
        self.keep = max(keep, 1)
        self.keep_epoch_ends = keep_epoch_ends
        self.damaged: list[Path] = []  # found by load_latest; set aside by the next save

    def valid(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir()
                 if (m := _STEP_DIR.match(p.name)) and (p / "meta.json").exists()]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        valid = self.valid()
        return valid[-1] if valid else None

    def load_latest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest readable checkpoint and its state; None when there is none to resume from.

        A damaged newest checkpoint is skipped with a warning (the one before it is used),
        and state files whose every ``meta.json`` is gone are refused rather than trained over.
        """
        valid = self.valid()
        if not valid:
            self._refuse_orphans()
            return None
        for path in reversed(valid):
            try:
                return path, load_state(path)
            except UnreadableCheckpoint as err:
                print(f"train: warning: {err}. Resuming from the checkpoint before it; the damaged one will be "
                      f"kept aside as {path.name}.damaged", file=sys.stderr, flush=True)
                self.damaged.append(path)
        raise CheckpointError(
            f"no readable checkpoint in {self.directory}: {', '.join(p.name for p in self.damaged)} are all damaged. "
            f"Move that directory away to train this run from the start, or restore the files from a backup.")

    def _refuse_orphans(self) -> None:
        orphans = sorted(self.directory.glob("step-*/state.pt")) if self.directory.is_dir() else []
        if orphans:
            shown = ", ".join(str(p) for p in orphans[:4]) + (f" ... ({len(orphans)} in all)" if len(orphans) > 4 else "")
            raise CheckpointError(
                f"{self.directory} holds checkpoint state without any meta.json ({shown}), so where this run stands "
                f"is unknown, and training from step 0 would overwrite them. Restore the meta.json files to resume, "
                f"or move {self.directory} away to train from the start.")

    def save(self, state: dict[str, Any], step: int, meta: dict[str, Any]) -> Path:
        """Write one checkpoint (call on rank 0 only) and prune old ones."""
        self._set_aside_damaged()
        path = self.directory / f"step-{step:08d}"
        path.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(path / "state.pt", buf.getvalue())
        atomic_write_json(path / "meta.json", {"step": step, **meta})
        self.prune()
        return path

    def _set_aside_damaged(self) -> None:
        """Rename damaged checkpoints out of the way (kept for inspection), so they are not resumed or counted."""
        for path in self.damaged:
            if path.is_dir():
                aside = path.with_name(f"{path.name}.damaged")
                if aside.exists():
                    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
                path.rename(aside)
        self.damaged = []

    def prune(self) -> None:
        valid = self.valid()
        keep = set(valid[-self.keep:]) | best_checkpoints(valid)
        if self.keep_epoch_ends:
            keep |= {p for p in valid if read_meta(p).get("epoch_end")}
        for path in valid:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)
        for partial in self.directory.glob("step-*"):
            if partial.is_dir() and not (partial / "meta.json").exists() and partial not in keep:
                shutil.rmtree(partial, ignore_errors=True)


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / "meta.json").read_text())


def load_state(path: Path) -> dict[str, Any]:
    """The state of a checkpoint directory (see ``load_file``)."""
    state = load_file(Path(path) / "state.pt")
    if not isinstance(state, dict):
        raise UnreadableCheckpoint(f"{Path(path) / 'state.pt'} holds a {type(state).__name__}, not a checkpoint")
    return state


def load_file(file: Path) -> Any:
    """A torch file loaded weights-only; CheckpointError naming the file when it is damaged or unsafe."""
    try:
        with warnings.catch_warnings():  # torch's note on a plain pickle's protocol: the refusal below says more
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = str(err).splitlines()
        detail = next((ln.strip() for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), _detail(err))
        raise UnsafeCheckpoint(
            f"{file} was refused: it holds more than tensors and plain values ({detail}), and unpickling that could "
            f"run code, so imret loads checkpoints weights-only. If this file was not written by this version of "
            f"imret, do not load it; if it is an older imret checkpoint of your own, train that run again.") from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError) as err:
        empty = file.exists() and file.stat().st_size == 0
        raise UnreadableCheckpoint(f"{file} cannot be read: it is truncated or damaged "
                                   f"({'an empty file' if empty else _detail(err)})") from None


def _detail(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:160] if lines else type(err).__name__


def find(run: RunDir, which: str) -> Path:
    """A run's checkpoint by name: ``last``, ``epoch-N`` (the end of epoch N, 1-based) or ``step-N``."""
    ckpt = Checkpointer(run.ckpt)
    valid = ckpt.valid()
    if not valid:
        raise ValueError(f"no checkpoint in {run.ckpt}: has the train stage of this run finished?")
    if which == "last":
        return valid[-1]
    if which == "best":
        return find_best(run, valid)
    match = re.fullmatch(r"(epoch|step)-(\d+)", which)
    if not match:
        raise ValueError(f"extract.checkpoint: '{which}' is not last, best, epoch-N, step-N or init")
    kind, number = match.group(1), int(match.group(2))
    for path in valid:
        meta = read_meta(path)
        if (kind == "step" and meta["step"] == number) or (kind == "epoch" and meta.get("epoch_end") and meta["epoch"] == number):
            return path
    names = ", ".join(f"step-{read_meta(p)['step']}" + (f" (epoch-{read_meta(p)['epoch']})" if read_meta(p).get("epoch_end") else "") for p in valid)
    raise ValueError(f"no checkpoint '{which}' in {run.ckpt}; available: {names}. "
                     "Set train.keep_epoch_checkpoints=true to keep every epoch's.")


def best_checkpoints(valid: list[Path]) -> set[Path]:
    """The best checkpoint that the newest one's selection names (``imret.selection``): never pruned."""
    if not valid:
        return set()
    step = read_meta(valid[-1]).get("selection", {}).get("best_step", -1)
    return {p for p in valid if int(_STEP_DIR.match(p.name).group(1)) == step}  # valid() names all match


def find_best(run: RunDir, valid: list[Path]) -> Path:
    """The checkpoint with the best validation metric, as the newest checkpoint's selection records it."""
    selection = read_meta(valid[-1]).get("selection")
    if selection is None or selection.get("best_step", -1) < 0:
        raise ValueError(f"extract.checkpoint=best, but no validation in {run.ckpt} has chosen a checkpoint yet "
                         "(train.validation decides when one runs); extract last or epoch-N instead")
    best = best_checkpoints(valid)
    if not best:
        raise ValueError(f"the best checkpoint (step {selection['best_step']}) is missing from {run.ckpt}; "
                         "it was removed by hand. Extract another checkpoint (last, epoch-N) or retrain.")
    return best.pop()


def latest_step(run: RunDir) -> int:
    """The step of the run's newest checkpoint (0 without one): where this run's scalars belong."""
    latest = Checkpointer(run.ckpt).latest()
    return int(read_meta(latest)["step"]) if latest else 0


def model_weights(source: str | Path, runs_root: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint directory, a run directory (its last checkpoint) or a state file."""
    path = Path(source)
    if not path.exists() and runs_root is not None and (Path(runs_root) / str(source)).exists():
        path = Path(runs_root) / str(source)
    if (path / "state.pt").exists():
        return load_state(path)["model"]
    if (path / "train" / "ckpt").is_dir():
        return load_state(find(RunDir(path), "last"))["model"]
    if path.is_file():
        state = load_file(path)
        state = state.get("model", state) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            raise CheckpointError(f"train.init_from: {path} holds a {type(state).__name__}, not a state dict of weights")
        return state
    raise ValueError(f"train.init_from: {source} is not a run, a checkpoint directory or a weights file")


def load_init_weights(model: torch.nn.Module, source: str, runs_root: str) -> None:
    """Start from another run's weights (the finetune iterations); heads of another shape are skipped.

    Weights of which nothing fits are an error: training on from random weights while the
    config says ``init_from`` would be a different experiment than the one asked for.
    ``pretrained``: the backbone's pretrained weights, which building the model loaded.
    """
    if source == PRETRAINED:
        return
    state = model_weights(source, runs_root)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and isinstance(v, torch.Tensor) and own[k].shape == v.shape}
    if not usable:
        theirs = ", ".join(list(state)[:5]) or "nothing"
        raise CheckpointError(
            f"train.init_from: none of the {len(state)} tensors of {source} fits a parameter of this model "
            f"(theirs begin: {theirs}; ours: {', '.join(list(own)[:5])}). It was trained with another model "
            f"config; point init_from at a run of the same model.backbone, or leave it empty.")
    skipped = sorted(set(own) - set(usable))
    ignored = sorted(set(state) - set(usable))
    model.load_state_dict(usable, strict=False)
    print(f"train: initialised from {source} ({len(usable)} tensors; not loaded: {', '.join(skipped) or 'none'}"
          + (f"; ignored from the source: {', '.join(ignored)}" if ignored else "") + ")")
