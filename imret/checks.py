"""An experiment's config checked against the components that will run it.

``imret.config`` decides what a config can decide alone (types, keys, rules between
fields) and imports no component, so that everything can stand on it. The rules that
need a component's own knowledge belong to that component: the losses know their
parameters, the metrics their names, the models which timm backbones exist, the
clusterer its methods. This module, one floor above the components, asks each of
them about its section. Launchers resolve experiments through ``resolve`` so that a
config is fully checked before anything is written or submitted.
"""

from __future__ import annotations

from collections.abc import Sequence

from imret.config import ConfigError, Experiments, ExperimentConfig


def check(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg``, once every component it names has accepted its section; ConfigError otherwise."""
    for where, probe in (("cluster", _check_cluster), ("loss", _check_losses), ("model", _check_model),
                         ("evaluate", _check_metrics)):
        try:
            probe(cfg)
        except ConfigError:
            raise
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return cfg


def resolve(exps: Experiments, name: str, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Experiment ``name`` with ``overrides``, typed and checked by every component."""
    cfg = exps.resolve(name, overrides)
    try:
        return check(cfg)
    except ConfigError as err:
        raise ConfigError(f"{exps.path}: experiment '{name}': {err}") from None


def _check_cluster(cfg: ExperimentConfig) -> None:
    if "cluster" in cfg.stages:
        from imret.cluster.methods import check  # late: pulls in faiss

        check(cfg.cluster)


def _check_losses(cfg: ExperimentConfig) -> None:
    if "train" not in cfg.stages:
        return
    from imret.losses import check_term  # late: pulls in torch

    for i, term in enumerate(cfg.loss.terms):
        try:
            check_term(term.name, term.params)
        except ValueError as err:
            raise ConfigError(f"loss.terms[{i}]: {err}") from None


def _check_model(cfg: ExperimentConfig) -> None:
    from imret.models import check  # late: pulls in timm

    check(cfg.model)


def _check_metrics(cfg: ExperimentConfig) -> None:
    from imret.metrics import check_metric_name, is_triplet_metric

    named = [("evaluate.metrics", name) for name in cfg.evaluate.metrics]
    if cfg.train.validation.every:
        named.append(("train.validation.metric", cfg.train.validation.metric))
    for where, name in named:
        try:
            check_metric_name(name)
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None
        if where == "evaluate.metrics" and is_triplet_metric(name) and cfg.evaluate.db_shards > 1:
            raise ConfigError(f"evaluate.metrics: {name} draws (query, positive, negative) triples from the whole "
                              f"database, which a sharded evaluation (evaluate.db_shards: {cfg.evaluate.db_shards}) "
                              "never holds at once; set evaluate.db_shards: 1 or leave the triplet metrics out")


def check_weights(cfg: ExperimentConfig) -> None:
    """ConfigError naming the fetch command when the pretrained weights a job will load are not cached.

    Asked at submit, before anything is written or queued (it needs the machine's files, so
    it is not part of ``check``, which ``--dry-run`` and ``--print-config`` also run). The
    weights are loaded where a model is built from scratch: training, and extracting ``init``.
    """
    if not cfg.model.pretrained or not ("train" in cfg.stages or cfg.extract.checkpoint == "init"):
        return
    from imret.models.weights import require_cached, weights_name  # late: pulls in torch

    try:
        require_cached(cfg.model.weights_dir, weights_name(cfg.model.backbone), cfg.name)
    except ValueError as err:
        raise ConfigError(f"experiment '{cfg.name}': {err}") from None
