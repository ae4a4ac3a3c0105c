"""The one rule for names that become paths or sbatch lines.

An experiment's name, ``run.name`` and a sweep point's name become a directory under
the runs root, and the experiment's name also becomes the SLURM job name on an
``#SBATCH`` line. A name holding ``..``, a leading ``/`` or a newline would let a run
write outside the runs root, or put text of its own into a batch script that the
shell then runs. So every such name matches one pattern, checked when a config is
loaded, before anything is written or submitted.
"""

from __future__ import annotations

import re
from pathlib import Path

from imret.config.errors import ConfigError

SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
"""Letters, digits, ``.``, ``_`` and ``-``, not starting with ``.`` or ``-``."""
NAME_RULE = "letters, digits, '.', '_' and '-', not starting with '.' or '-'"
MAX_NAME = 200  # below the 255 bytes a file name may have on common file systems

_UNSAFE_RUN = re.compile(r"[^A-Za-z0-9._-]+")


def is_safe(name: str) -> bool:
    return isinstance(name, str) and len(name) <= MAX_NAME and SAFE_NAME.fullmatch(name) is not None


def check_name(name: str, where: str) -> None:
    """ConfigError unless ``name`` is one safe name (no ``/``)."""
    if not is_safe(name):
        raise ConfigError(f"{where}: {name!r} is not an accepted name. Names become directories and SLURM job "
                          f"names, so they may hold only {NAME_RULE} (at most {MAX_NAME} characters). "
                          f"Rename it, e.g. to {suggest(str(name))!r}.")


def check_run_name(name: str, where: str) -> None:
    """ConfigError unless every ``/``-separated part of ``name`` is a safe name.

    ``run.name`` may nest a run under another (``<experiment>/<point>`` for a sweep
    point), but never leave the runs root: no empty part, no ``..``, no absolute path.
    """
    parts = str(name).split("/")
    if not all(is_safe(p) for p in parts):
        fixed = "/".join(s for s in (suggest(p, "") for p in parts) if s)
        raise ConfigError(f"{where}: {name!r} is not an accepted run name. It names a directory inside run.root, "
                          f"so each '/'-separated part may hold only {NAME_RULE}; '..', absolute paths and empty "
                          f"parts are refused. To write elsewhere, set run.root instead"
                          + (f"; or use e.g. {fixed!r}." if fixed else "."))


def suggest(text: str, fallback: str = "run") -> str:
    """A safe name made from ``text``: unsafe runs become '-', leading '.'/'-' go; ``fallback`` if nothing is left."""
    return _UNSAFE_RUN.sub("-", text).lstrip(".-")[:MAX_NAME].rstrip("-") or fallback


def run_dir(root: str | Path, name: str) -> Path:
    """``root / name`` after checking that ``name`` keeps the run directory inside ``root``."""
    if not name:
        raise ConfigError("the run has no name: give the experiment a name, or set run.name")
    check_run_name(name, "run.name")
    return Path(root) / name
