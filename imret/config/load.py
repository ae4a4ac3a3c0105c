"""Strict loading of configs: safe YAML, experiments.yaml with inheritance, and ``--set`` overrides.

Every YAML file or value imret reads goes through ``read_yaml`` here: PyYAML's safe
loader, with duplicate keys refused (naming the key and both lines) and the expansion
of anchors and aliases bounded, so an alias bomb is refused in milliseconds.

An unknown key is an error naming the nearest valid key, a value of the wrong type is
an error naming the expected type, and ``imret.config.validate`` runs before a config
is handed out. ``experiments.yaml`` maps experiment names to partial configs. An entry
may ``inherit`` one or more other entries; they are deep-merged in order (mappings
merge key by key, lists and scalars are replaced, ``null`` deletes a key), then the
entry itself is merged on top. Names starting with ``_`` are abstract bases: they can
be inherited but not run.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from imret.config.errors import ConfigError
from imret.config.names import check_name
from imret.config.schema import ExperimentConfig
from imret.config.validate import closest, validate

# ----------------------------------------------------------------------------- safe YAML


# The most values a YAML document may expand to once its aliases are followed. imret's own
# experiments.yaml expands to a few thousand; a "billion laughs" document (aliases of aliases)
# would expand to billions, and every later step (merging, type checks, hashing) walks them all.
MAX_YAML_VALUES = 200_000


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys and bounding what aliases expand to.

    A duplicate key would otherwise be dropped silently (the last one wins), so a config
    would not be what its file says. Anchors and aliases stay allowed (``yaml.safe_dump``
    writes them for repeated values) as long as the document they expand to is small.
    """

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {}, set())
        if size > MAX_YAML_VALUES:
            raise _Refused(f"its anchors and aliases expand to {size:,} values, more than the {MAX_YAML_VALUES:,} a "
                           f"config may hold (an alias bomb?); write the values out instead of nesting aliases")
        return self.construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *base": explicit keys may override merged ones
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            line = key_node.start_mark.line + 1
            if first is not None:
                raise _Refused(f"line {line}: duplicate key {key!r} (first at line {first}); a mapping may hold a "
                               f"key once, so remove one of them")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, memo: dict[int, int], open_nodes: set[int]) -> int:
    """How many values ``node`` stands for with every alias followed; counted once per node, so fast."""
    if id(node) in memo:
        return memo[id(node)]
    if id(node) in open_nodes:
        raise _Refused(f"line {node.start_mark.line + 1}: an alias refers to a value that contains it (a recursive "
                       f"structure); a config cannot hold one")
    open_nodes.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    total = 1 + sum(_expanded_size(child, memo, open_nodes) for child in children)
    open_nodes.discard(id(node))
    memo[id(node)] = total
    return total


class _Refused(Exception):
    """Raised inside the loader; turned into a ConfigError naming the source."""


def read_yaml(text: str, source: str) -> Any:
    """Parse YAML text safely (see ``_StrictLoader``); ConfigError naming ``source`` and the line."""
    loader = _StrictLoader(text)
    try:
        return loader.get_single_data()
    except _Refused as err:
        raise ConfigError(f"{source}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {_yaml_problem(err)}") from None
    except RecursionError:
        raise ConfigError(f"{source}: the YAML is nested too deeply to be a config") from None
    finally:
        loader.dispose()


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's error on one line: what is wrong, where, and in what (its own text spans several lines)."""
    if not isinstance(err, yaml.MarkedYAMLError) or err.problem_mark is None:
        return " ".join(str(err).split())
    mark = err.problem_mark
    context = f" ({err.context})" if err.context else ""
    return f"{err.problem} at line {mark.line + 1}, column {mark.column + 1}{context}"


def read_yaml_file(path: str | Path) -> Any:
    """A YAML file read with ``read_yaml``; a missing, unreadable or non-file path is a ConfigError."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file. Run from the repository root or pass --experiments PATH.")
    if not path.is_file():
        raise ConfigError(f"{path}: is a directory, not a YAML file; give the path of the file itself.")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot be read ({err})") from None
    return read_yaml(text, str(path))


# ----------------------------------------------------------------------------- typed building


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against type ``tp`` and build dataclasses; raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not allowed; expected {_type_name(tp)}. "
                              f"{closest(str(value), [str(a) for a in args])}".rstrip())
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _convert(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"{path}: unknown key; {closest(str(key), names)}"
                              f"valid keys here: {', '.join(names)}")
        kwargs[key] = _convert(value, hints[key], path)
    return cls(**kwargs)


def from_dict(data: dict[str, Any], name: str = "") -> ExperimentConfig:
    """Build a config from a plain mapping and check its cross-field rules."""
    cfg = _build(ExperimentConfig, data, "")
    if name:
        cfg.name = name
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------- experiments.yaml


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Merge ``top`` into a copy of ``base``: mappings recursively, the rest replaced, null deletes."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@dataclass
class Experiments:
    """The parsed experiments.yaml: raw entries by name."""

    path: Path
    entries: dict[str, dict[str, Any]]

    @classmethod
    def load(cls, path: str | Path) -> Experiments:
        path = Path(path)
        entries = read_yaml_file(path) or {}
        if not isinstance(entries, dict):
            raise ConfigError(f"{path}: expected a mapping of experiment names to mappings, got "
                              f"{type(entries).__name__}")
        for name, entry in entries.items():
            if not isinstance(name, str):
                raise ConfigError(f"{path}: experiment name {name!r} is a {type(name).__name__}; names are text "
                                  f"(quote it: '{name}')")
            check_name(name, f"{path}: experiment {name!r}")
            if not isinstance(entry, dict):
                raise ConfigError(f"{path}: experiment '{name}' must be a mapping of config sections, got {entry!r}")
        return cls(path, entries)

    def runnable(self) -> list[str]:
        return [n for n in self.entries if not n.startswith("_")]

    def unknown_name_error(self, name: str) -> ConfigError:
        close = difflib.get_close_matches(name, self.runnable(), n=5, cutoff=0.4)
        hint = f" Closest: {', '.join(close)}." if close else ""
        return ConfigError(f"no experiment named '{name}' in {self.path}.{hint} "
                           f"`python launch/submit.py --list` shows them all.")

    def raw(self, name: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
        """The entry with its inheritance resolved (a plain mapping, not yet typed)."""
        if name not in self.entries:
            raise self.unknown_name_error(name)
        if name in _seen:
            raise ConfigError(f"{self.path}: inheritance cycle: {' -> '.join(_seen + (name,))}")
        entry = dict(self.entries[name])
        parents = entry.pop("inherit", [])
        parents = [parents] if isinstance(parents, str) else parents
        if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
            raise ConfigError(f"{self.path}: {name}: inherit: expected an experiment name or a list of names, "
                              f"got {self.entries[name]['inherit']!r}")
        merged: dict[str, Any] = {}
        for parent in parents:
            if parent not in self.entries:
                raise ConfigError(f"{self.path}: {name}: inherit: {self.unknown_name_error(parent)}")
            merged = deep_merge(merged, self.raw(parent, _seen + (name,)))
        return deep_merge(merged, entry)

    def resolve(self, name: str, overrides: typing.Sequence[str] = ()) -> ExperimentConfig:
        """The typed config of experiment ``name`` with ``--set`` overrides applied."""
        if name.startswith("_") and name in self.entries:
            raise ConfigError(f"'{name}' is an abstract base (its name starts with '_'); run an experiment that inherits it.")
        data = self.raw(name)
        for item in overrides:
            data = apply_override(data, item)
        try:
            return from_dict(data, name)
        except ConfigError as err:
            raise ConfigError(f"{self.path}: experiment '{name}': {err}") from None


# ----------------------------------------------------------------------------- --set overrides

_LIST_INDEX = re.compile(r"^\d+$")


def apply_override(data: dict[str, Any], item: str) -> dict[str, Any]:
    """Apply one ``key.path=value`` override; the value is parsed as YAML (``[1,2]``, ``true``, ``1e-4``)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. --set optim.lr=0.001")
    key, _, text = item.partition("=")
    value = read_yaml(text, f"--set {item!r}") if text.strip() else ""
    parts = key.strip().split(".")
    _check_override_path(parts, item)
    out = copy.deepcopy(data)
    node: Any = out
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[int(part)]
            continue
        if not isinstance(node.get(part), (dict, list)):
            node[part] = {} if not _LIST_INDEX.match(parts[i + 1]) else node.get(part, [])
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        idx = int(last)
        if idx >= len(node):
            raise ConfigError(f"--set {item!r}: index {idx} is past the end of a list of {len(node)}")
        node[idx] = value
    else:
        node[last] = value
    return out


def _check_override_path(parts: list[str], item: str) -> None:
    """Walk the schema so that a typo in --set is reported before anything else."""
    tp: Any = ExperimentConfig
    for i, part in enumerate(parts):
        where = ".".join(parts[: i + 1])
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
            origin = typing.get_origin(tp)
        if dataclasses.is_dataclass(tp):
            names = [f.name for f in dataclasses.fields(tp)]
            if part not in names:
                raise ConfigError(f"--set {item!r}: '{where}' is not a config key; "
                                  f"{closest(part, names)}valid keys here: {', '.join(names)}")
            tp = typing.get_type_hints(tp)[part]
        elif origin is list:
            if not _LIST_INDEX.match(part):
                raise ConfigError(f"--set {item!r}: '{where}' indexes a list; use a number, e.g. .0")
            tp = typing.get_args(tp)[0]
        elif origin is dict:
            tp = typing.get_args(tp)[1]
        elif tp is Any:
            return
        else:
            raise ConfigError(f"--set {item!r}: '{'.'.join(parts[:i])}' is a value, it has no key '{part}'")


# ----------------------------------------------------------------------------- a run's resolved config


def save_yaml(cfg: ExperimentConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tmp.replace(path)


def load_yaml(path: str | Path) -> ExperimentConfig:
    """Load a resolved config written by ``save_yaml`` (a run directory's config.yaml)."""
    data = read_yaml_file(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a resolved config (a mapping), got {type(data).__name__}; "
                          f"resubmit the experiment to write it again")
    try:
        return from_dict(data, data.get("name", ""))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
