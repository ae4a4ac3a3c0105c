"""What every converter needs: sample keys, checked paths, and seeded, stable splits."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Sequence
from fractions import Fraction
from pathlib import Path, PurePosixPath
from typing import Any

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def key_from_path(relative: str) -> str:
    """The sample key of a file: its relative path without extension, dots made underscores.

    WebDataset splits a member name into key and extension at the first dot of its base
    name, so a key must hold no dot; "/" is kept (the key's directory parts).
    """
    return str(PurePosixPath(relative).with_suffix("")).replace(".", "_")


def check_unique_keys(split: str, keys: Iterable[str], paths: Iterable[str]) -> None:
    seen: dict[str, str] = {}
    for key, path in zip(keys, paths):
        if key in seen:
            raise ValueError(f"split {split}: {seen[key]} and {path} both give the sample key {key!r} "
                             f"(keys are relative paths without extension, dots made underscores); rename one")
        seen[key] = path


def require_src(args: Any, what: str) -> Path:
    """``--src`` as an existing directory, or a clear error naming it."""
    if getattr(args, "src", None) is None:
        raise ValueError(f"--src is required: the directory holding {what}")
    src = Path(args.src)
    if not src.is_dir():
        raise FileNotFoundError(f"--src {src} does not exist or is not a directory (expected {what})")
    return src


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    return path


def first_existing(candidates: Sequence[Path], what: str) -> Path:
    for path in candidates:
        if path.exists():
            return path
    raise FileNotFoundError(f"{what} not found; looked for {', '.join(str(p) for p in candidates)}")


def resolve_against(src: Path, name: str | Path) -> Path:
    """A file named on the command line: absolute, else relative to --src, else to the working directory."""
    path = Path(name)
    if path.is_absolute() or (src / path).exists() or not path.exists():
        return path if path.is_absolute() else src / path
    return path


def split_name(name: str) -> str:
    if not SPLIT_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a split name (letters, digits, '_' and '-', not starting with '_' or '-')")
    return name


def parse_assignments(values: Sequence[str] | None, option: str) -> list[tuple[str, str]]:
    """Repeated ``--option SPLIT=VALUE`` into [(split, value)], splits unique, in the order given."""
    pairs: list[tuple[str, str]] = []
    for value in values or []:
        name, sep, rest = value.partition("=")
        if not sep or not rest:
            raise ValueError(f"{option} {value!r}: expected SPLIT=FILE, e.g. {option} train=train.txt")
        if name in dict(pairs):
            raise ValueError(f"{option}: split {name!r} is given twice")
        pairs.append((split_name(name), rest))
    return pairs


def parse_ratios(text: str) -> list[tuple[str, Fraction]]:
    """``"train=0.8,test=0.2"`` -> [("train", 4/5), ("test", 1/5)]; exact fractions that sum to 1."""
    pairs = []
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        try:
            ratio = Fraction(value.strip()) if sep else None
        except ValueError:
            ratio = None
        if ratio is None or ratio < 0:
            raise ValueError(f"--split {text!r}: {part!r} is not SPLIT=RATIO with a ratio >= 0 "
                             f"(e.g. train=0.8,test=0.2)")
        pairs.append((split_name(name.strip()), ratio))
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"--split {text!r}: a split is named twice")
    if sum(r for _, r in pairs) != 1:
        raise ValueError(f"--split {text!r}: the ratios add up to {float(sum(r for _, r in pairs)):g}, not 1")
    return pairs


def split_counts(n: int, ratios: Sequence[Fraction]) -> list[int]:
    """How many of ``n`` items each split gets.

    ``n * ratio`` rounded by largest remainder (ties to the earlier split), so the counts
    add up to ``n``. Then, if ``n`` is at least the number of splits with a ratio above
    zero, each such split that got nothing takes one item from the largest split: every
    class with at least two items has items on both sides of a two-way split.
    """
    exact = [n * Fraction(r) for r in ratios]
    counts = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(ratios)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    positive = [i for i, r in enumerate(ratios) if r > 0]
    if n >= len(positive):
        for i in positive:
            if counts[i] == 0:
                donor = max(range(len(counts)), key=lambda j: (counts[j], -j))
                counts[donor] -= 1
                counts[i] += 1
    return counts


def seeded_order(names: Iterable[str], seed: int) -> list[str]:
    """A seeded shuffle that never changes: sorted by SHA-256 of ``"<seed>:<name>"``.

    Unlike a random generator's permutation, it depends on nothing but the seed and
    the names (not on their order, the library version or the platform), and adding
    a name does not move the others.
    """
    return sorted(names, key=lambda n: (hashlib.sha256(f"{seed}:{n}".encode()).digest(), n))


def seeded_split(names: Sequence[str], ratios: Sequence[Fraction], seed: int) -> list[list[str]]:
    """Cut ``names`` into len(ratios) parts of ``split_counts`` sizes, in seeded order."""
    order = seeded_order(names, seed)
    parts, start = [], 0
    for count in split_counts(len(order), ratios):
        parts.append(order[start:start + count])
        start += count
    return parts


def dense_labels(classes: Iterable[Any], sort_key: Any = None) -> dict[Any, int]:
    """Class -> label 0..C-1, in sorted class order (one mapping for all splits of a conversion)."""
    return {c: i for i, c in enumerate(sorted(set(classes), key=sort_key))}


def numeric_first(name: str) -> tuple[int, int, str]:
    """Sort key: numbers numerically (2 before 10), then other names alphabetically."""
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def read_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped line) of the non-empty lines of a text file."""
    with open(path, encoding="utf-8") as f:
        return [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]
