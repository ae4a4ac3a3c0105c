"""Atomic checkpoints of every stateful thing, and finding them again.

A checkpoint is a directory ``ckpt/step-<N>/`` holding ``state.pt`` (model, loss
parameters, optimizer, scheduler, data position, RNG states) and ``meta.json``.
``state.pt`` is written under a temporary name and renamed into place, and
``meta.json`` is written last: a checkpoint without its metadata (a job killed while
saving) is not a checkpoint and is ignored. Only rank 0 writes; every rank reads.
"""

from __future__ import annotations

import io
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imret.rundir import RunDir, atomic_write_bytes, atomic_write_json

_STEP_DIR = re.compile(r"step-(\d+)$")
PRETRAINED = "pretrained"  # train.init_from: start from model.pretrained's weights, not another run's


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Saves, lists, prunes and loads the checkpoints of one run."""

    def __init__(self, directory: Path, keep: int = 2, keep_epoch_ends: bool = False) -> None:
        self.directory = Path(directory)
        self.keep = max(keep, 1)
        self.keep_epoch_ends = keep_epoch_ends

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

    def save(self, state: dict[str, Any], step: int, meta: dict[str, Any]) -> Path:
        """Write one checkpoint (call on rank 0 only) and prune old ones."""
        path = self.directory / f"step-{step:08d}"
        path.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(path / "state.pt", buf.getvalue())
        atomic_write_json(path / "meta.json", {"step": step, **meta})
        self.prune()
        return path

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
    # The state holds optimizer/RNG objects (tuples, numpy arrays): our own files, so a full load.
    return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)


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
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state.get("model", state)
    raise ValueError(f"train.init_from: {source} is not a run, a checkpoint directory or a weights file")


def load_init_weights(model: torch.nn.Module, source: str, runs_root: str) -> None:
    """Start from another run's weights (the finetune iterations); heads of another shape are skipped."""
    if source == PRETRAINED:
        return  # the backbone's pretrained weights: building the model loaded them
    state = model_weights(source, runs_root)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(own) - set(usable))
    model.load_state_dict(usable, strict=False)
    print(f"train: initialised from {source} ({len(usable)} tensors; not loaded: {', '.join(skipped) or 'none'})")
