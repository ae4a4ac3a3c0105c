"""bench/cluster_open_world.py: the --scale timing and the paired comparison table."""

from __future__ import annotations

import json

import pytest

from bench.cluster_open_world import COLUMNS, final_losses, scale, table


def test_scale_trains_on_a_subset_and_clusters_every_point():
    out = scale(600, epochs=1, train_points=240)
    assert (out["n"], out["train_points"]) == (600, 240)
    assert out["graph_nodes"][0] == 240  # the first training graph holds exactly the training subset
    assert out["levels_nodes"][0] == 600  # inference's first level holds every point
    assert (out["train_knn"], out["infer_knn"]) == ("exact", "exact")  # both below cluster.exact_below
    assert 0.0 <= out["selected_fraction"] <= 1.0
    assert out["rss_after_infer_gb"] >= out["rss_data_gb"] > 0


def test_scale_without_train_points_trains_on_every_point():
    out = scale(300, epochs=1)
    assert out["train_points"] == 300 and out["graph_nodes"][0] == 300


def run(seed: int, value: float, losses: list[float] | None = None) -> dict:
    return {"seed": seed, **{key: value for key, _ in COLUMNS}, "final_losses": losses}


def test_table_pairs_the_seeds_and_gives_the_standard_error():
    ours = [run(0, 0.9, [0.10, 0.04, 0.06]), run(1, 0.7, [0.20, 0.08, 0.12]), run(5, 0.1)]
    ref = [run(0, 0.8, [0.12, 0.05, 0.07]), run(1, 0.5, [0.22, 0.09, 0.13]), run(2, 0.3)]
    text = table({"imret hilander": ours, "DGL reference": ref})
    paired_row = next(line for line in text.splitlines() if "paired (0, 1)" in line)
    # differences 0.1 and 0.2: mean 0.15, standard error sd / sqrt(2) = 0.0707 / 1.414 = 0.05
    assert paired_row.count("+0.150 ± 0.050") == len(COLUMNS)
    assert "paired, 2 seeds" in text and "loss 0.1700, imret -0.0200 ± 0.0000" in text


def test_final_losses_average_the_last_epochs(tmp_path):
    log = tmp_path / "train.jsonl"
    rows = [{"epoch": e, "loss": float(e), "density": 0.0, "edge": float(e)} for e in range(1, 61)]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert final_losses(log) == pytest.approx([35.5, 0.0, 35.5])  # epochs 11..60
    assert final_losses(tmp_path / "missing.jsonl") is None
