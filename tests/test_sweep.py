"""Sweep expansion: grid x explicit points, names, subsets; each point resolves to its own run."""

from __future__ import annotations

import pytest
import yaml

from imret.config import Experiments, SweepConfig
from imret.sweep import expand, select


def test_grid_cross_product_and_points():
    sweep = SweepConfig(grid={"optim.lr": [0.1, 0.01], "loss.terms.0.params.margin": [0.2, 0.5]},
                        points=[{"name": "special", "train.epochs": 3}, {"model.embed_dim": 64}])
    points = expand(sweep)
    assert [p.name for p in points] == ["lr-0.1_margin-0.2", "lr-0.1_margin-0.5", "lr-0.01_margin-0.2",
                                        "lr-0.01_margin-0.5", "special", "embed_dim-64"]
    assert points[1].overrides == ("optim.lr=0.1", "loss.terms.0.params.margin=0.5")
    assert points[4].overrides == ("train.epochs=3",)


def test_grid_axes_may_name_their_values():
    angular = [{"name": "angular", "params": {"alpha": 30}}]
    triplet = [{"name": "triplet", "params": {"margin": 0.2}}]
    sweep = SweepConfig(grid={"data.root": {"cat13": "data/cat13", "cat40": "data/cat40"},
                              "loss.terms": {"angular30": angular, "triplet02": triplet}})
    points = expand(sweep)
    assert [p.name for p in points] == ["root-cat13_terms-angular30", "root-cat13_terms-triplet02",
                                        "root-cat40_terms-angular30", "root-cat40_terms-triplet02"]
    assert points[1].overrides[1] == 'loss.terms=[{"name": "triplet", "params": {"margin": 0.2}}]'
    with pytest.raises(ValueError, match="sweep.grid.optim.lr: expected a non-empty list"):
        expand(SweepConfig(grid={"optim.lr": []}))


def test_names_are_safe_and_unique():
    points = expand(SweepConfig(points=[{"data.root": "/data/cat 13"}, {"data.root": "/data/cat 13"}]))
    assert [p.name for p in points] == ["root-data-cat-13", "root-data-cat-13-1"]


def test_select_subset():
    points = expand(SweepConfig(grid={"optim.lr": [1, 2, 3]}))
    assert [p.name for p in select(points, ["lr=2"])] == ["lr-2"]
    with pytest.raises(ValueError, match="no sweep point named lr=9; points: lr-1, lr-2, lr-3"):
        select(points, ["lr=9"])


def test_each_point_resolves_to_its_own_run_directory(tmp_path):
    path = tmp_path / "experiments.yaml"
    path.write_text(yaml.safe_dump({"grid": {
        "data": {"root": "x", "batch_size": 8, "samples_per_class": 2},
        "sweep": {"grid": {"optim.lr": [0.1, 0.2]}},
    }}))
    exps = Experiments.load(path)
    cfg = exps.resolve("grid")
    configs = [exps.resolve("grid", [*p.overrides, f"run.name=grid/{p.name}"]) for p in expand(cfg.sweep)]
    assert [c.optim.lr for c in configs] == [0.1, 0.2]
    assert [str(c.run_dir) for c in configs] == ["runs/grid/lr-0.1", "runs/grid/lr-0.2"]
