"""Sweeps: one experiment, many configurations (a SLURM array).

``sweep.grid`` maps config key paths to lists of values, or to mappings from a short
name to a value (the name then stands for the value in the point's name, e.g.
``loss.terms: {angular30: [...], triplet02: [...]}``); the cross product gives the
points, named like ``lr-0.1_terms-angular30`` (every name matches the safe-name
pattern of ``imret.config.names``). ``sweep.points`` adds explicit override sets (a point may name itself with
``name:``). Each point becomes a full experiment config of its own, whose run
directory is ``runs/<experiment>/<point name>``, so every array task has its own
checkpoints, features and results, and ``tools/gather.py --exp '<experiment>/*'``
tabulates them.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any

from imret.config import SweepConfig
from imret.config.names import suggest


@dataclass(frozen=True)
class Point:
    name: str  # also the run directory under the experiment's
    overrides: tuple[str, ...]  # "key.path=value" strings, as --set takes them


def _axis(key: str, values: Any) -> list[tuple[str, Any]]:
    """(label, value) pairs of one grid axis: a list of values, or a mapping of names to values."""
    if isinstance(values, dict):
        return [(str(name), value) for name, value in values.items()]
    if isinstance(values, list) and values:
        return [(_label(key, v).split("=", 1)[1], v) for v in values]
    raise ValueError(f"sweep.grid.{key}: expected a non-empty list of values or a mapping of names to values")


def _label(key: str, value: Any) -> str:
    leaf = key.split(".")[-1]
    text = json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value)
    return f"{leaf}={text}"


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"  # JSON is YAML: --set parses it back to the same value


def expand(sweep: SweepConfig) -> list[Point]:
    """Every point of the sweep, in a fixed order (grid first, then explicit points)."""
    points: list[Point] = []
    keys = list(sweep.grid)
    axes = [_axis(k, sweep.grid[k]) for k in keys]
    combos = itertools.product(*axes) if keys else []  # product() of nothing would be one empty point
    for combo in combos:
        name = "_".join(f"{k.split('.')[-1]}={label}" for k, (label, _) in zip(keys, combo))
        points.append(Point(name, tuple(_override(k, v) for k, (_, v) in zip(keys, combo))))
    for i, point in enumerate(sweep.points):
        values = {k: v for k, v in point.items() if k != "name"}
        name = str(point.get("name") or "_".join(_label(k, v) for k, v in values.items()) or f"point{i}")
        points.append(Point(name, tuple(_override(k, v) for k, v in values.items())))
    # A point's name becomes a directory: made to match the one safe-name pattern (imret.config.names),
    # so "lr=0.1" is written "lr-0.1".
    return _unique([Point(suggest(p.name, "point")[:120].rstrip("-"), p.overrides) for p in points])


def _unique(points: list[Point]) -> list[Point]:
    seen: dict[str, int] = {}
    out = []
    for p in points:
        count = seen.get(p.name, 0)
        seen[p.name] = count + 1
        out.append(p if not count else Point(f"{p.name}-{count}", p.overrides))
    return out


def select(points: list[Point], only: list[str]) -> list[Point]:
    """The named subset (``--only``); unknown names are an error listing the valid ones."""
    if not only:
        return points
    names = {p.name for p in points}
    # names as written before points were made safe ("lr=0.1") still select their point ("lr-0.1")
    wanted = [n if n in names else suggest(n, "point") for n in only]
    unknown = [n for n, w in zip(only, wanted) if w not in names]
    if unknown:
        raise ValueError(f"--only: no sweep point named {', '.join(unknown)}; points: {', '.join(sorted(names))}")
    return [p for p in points if p.name in wanted]
