"""Pretrained weights from a local cache, so that no job ever downloads.

Compute nodes usually have no route to the internet. Pretrained weights are therefore
fetched once, where there is one (``python -m tools.fetch_weights --exp NAME`` on a login
node), into the cache directory that ``model.weights_dir`` names, and every job reads
them from there. A recipe names its weights as timm does, in ``model.backbone``
(``resnet50.tv_in1k``: architecture ``resnet50``, weights ``tv_in1k``), and turns them
on with ``model.pretrained: true``. The cache holds one pair of files per weights name:

    <weights_dir>/<arch>.<tag>.safetensors   the state dict, under the timm model's own parameter names
    <weights_dir>/<arch>.<tag>.json          name, source, sha256 of the .safetensors, tensor count, timm version

The .safetensors file is written first and the .json last, each under a temporary name
renamed into place, so a .json marks a complete entry. Loading checks the hash and
insists that every parameter of the backbone is in the file with its shape: weights that
load only in part are an error, never a silent random initialisation.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from imret.rundir import atomic_write_bytes, atomic_write_json

# timm names are lower-case words, digits, '_' and '.'; anything else never reaches a path
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9][A-Za-z0-9_-]*)*")


class MissingWeights(ValueError):
    """The cache lacks the weights a config names; the message holds the command that fetches them."""


def weights_name(backbone: str) -> str:
    """The full timm weights name ``arch.tag`` of a backbone (timm's default tag when it names none)."""
    import timm

    if not timm.is_model(backbone.split(".", 1)[0]):
        raise ValueError(f"model.backbone: timm has no model '{backbone.split('.', 1)[0]}'")
    try:
        cfg = timm.models.get_pretrained_cfg(backbone)
    except RuntimeError as err:  # timm's way of saying the tag does not exist
        raise ValueError(f"model.backbone: {err} Tags of it: {', '.join(list_tags(backbone)) or 'none'}.") from None
    if cfg is None or not cfg.tag:
        raise ValueError(f"model.pretrained: timm has no pretrained weights for '{backbone}'")
    return f"{cfg.architecture}.{cfg.tag}"


def list_tags(backbone: str) -> list[str]:
    import timm

    return [name.split(".", 1)[1] for name in timm.list_pretrained(backbone.split(".", 1)[0] + ".*")]


def cache_dir(weights_dir: str | Path) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(str(weights_dir))))


def cache_files(weights_dir: str | Path, name: str) -> tuple[Path, Path]:
    """(.safetensors, .json) of ``name`` in the cache."""
    if not SAFE_NAME.fullmatch(name):
        raise ValueError(f"'{name}' is not a timm weights name (letters, digits, '_', '-' and '.' only)")
    directory = cache_dir(weights_dir)
    return directory / f"{name}.safetensors", directory / f"{name}.json"


def fetch_command(name: str, weights_dir: str | Path) -> str:
    return f"python -m tools.fetch_weights --model {name} --weights-dir {weights_dir}"


def is_cached(weights_dir: str | Path, name: str) -> bool:
    tensors, meta = cache_files(weights_dir, name)
    return tensors.is_file() and meta.is_file()


def require_cached(weights_dir: str | Path, name: str, experiment: str = "") -> None:
    """MissingWeights, naming the fetch command, unless ``name`` is complete in the cache."""
    if is_cached(weights_dir, name):
        return
    tensors, _ = cache_files(weights_dir, name)
    whole = f" (or `python -m tools.fetch_weights --exp {experiment}` for every weight it names)" if experiment else ""
    raise MissingWeights(
        f"model.pretrained: the weights {name} are not in the cache ({tensors} is missing). Jobs never download; "
        f"fetch them once where there is internet (a login node): `{fetch_command(name, weights_dir)}`{whole}, "
        f"then submit again."
    )


def write_weights(state: Mapping[str, torch.Tensor], name: str, weights_dir: str | Path, source: str) -> Path:
    """Put a state dict into the cache as ``name`` (the fetch tool's writer). Returns the .safetensors path."""
    from safetensors.torch import save

    import timm

    tensors, meta = cache_files(weights_dir, name)
    # clone: safetensors refuses tensors that share storage (tied weights)
    blob = save({k: v.detach().cpu().clone().contiguous() for k, v in state.items()})
    atomic_write_bytes(tensors, blob)
    atomic_write_json(meta, {"name": name, "source": source, "sha256": hashlib.sha256(blob).hexdigest(),
                             "tensors": len(state), "timm": timm.__version__,
                             "written": time.strftime("%Y-%m-%d %H:%M:%S")})
    return tensors


def read_weights(name: str, weights_dir: str | Path) -> dict[str, torch.Tensor]:
    """The cached state dict of ``name``, its hash checked against the .json."""
    from safetensors.torch import load

    require_cached(weights_dir, name)
    tensors, meta = cache_files(weights_dir, name)
    blob = tensors.read_bytes()
    expected = json.loads(meta.read_text()).get("sha256")
    if hashlib.sha256(blob).hexdigest() != expected:
        raise ValueError(f"{tensors} does not match the sha256 in {meta}: the file is damaged or was replaced. "
                         f"Fetch it again: `{fetch_command(name, weights_dir)}`")
    return load(blob)


def load_pretrained(model: nn.Module, name: str, weights_dir: str | Path) -> list[str]:
    """Load the cached weights ``name`` into a timm ``model``; returns the file's unused keys (its classifier).

    timm's own adapter of the architecture (``checkpoint_filter_fn``, where the model's
    module has one) runs first, so that e.g. a ViT's position embedding is resampled to
    another ``img_size`` exactly as timm would. Every parameter and buffer of ``model``
    must then be present with its shape.
    """
    state = read_weights(name, weights_dir)
    adapt = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if adapt is not None:
        state = adapt(state, model)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape]
    if missing or wrong:
        shown = ", ".join((missing + wrong)[:6]) + (" ..." if len(missing) + len(wrong) > 6 else "")
        raise ValueError(f"the cached weights {name} do not fit the backbone: {len(missing)} tensor(s) missing, "
                         f"{len(wrong)} of another shape ({shown}). Does model.backbone name the architecture the "
                         f"weights were fetched for, with compatible model.backbone_kwargs?")
    model.load_state_dict({k: state[k] for k in own})
    return sorted(set(state) - set(own))


# ----------------------------------------------------------------------------- frozen modules


def expand_freeze_name(name: str) -> list[str]:
    """``blocks.0-10`` -> ``blocks.0`` ... ``blocks.10``; other names as they are."""
    match = re.fullmatch(r"(.+)\.(\d+)-(\d+)", name)
    if not match:
        return [name]
    stem, lo, hi = match.group(1), int(match.group(2)), int(match.group(3))
    if lo > hi:
        raise ValueError(f"model.freeze: '{name}' is an empty range ({lo} > {hi})")
    return [f"{stem}.{i}" for i in range(lo, hi + 1)]


def freeze(backbone: nn.Module, names: list[str]) -> int:
    """Stop training the named modules or parameters of ``backbone``; returns how many tensors were frozen."""
    modules, params = dict(backbone.named_modules()), dict(backbone.named_parameters())
    frozen = 0
    for name in names:
        for target in expand_freeze_name(name):
            if target in modules and target:
                tensors = list(modules[target].parameters())
            elif target in params:
                tensors = [params[target]]
            else:
                top = ", ".join(n for n, _ in backbone.named_children())
                raise ValueError(f"model.freeze: the backbone has no module or parameter '{target}'; "
                                 f"its top-level modules: {top}")
            for p in tensors:
                p.requires_grad_(False)
            frozen += len(tensors)
    return frozen
