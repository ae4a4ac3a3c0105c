"""The digits open-world loop end to end (2 gloo ranks): cumulative masks over 3 iterations, U_out clustered,
per-subset figures in results.json and TensorBoard, and the per-iteration report over the real runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imret.data.labels import FROZEN, LABELLED, SELECTED, UNSELECTED, load_sidecar
from imret.data.shards import ShardSplit
from imret.rundir import RunDir
from launch.submit import main as submit

# The recipe as it is (about 6 minutes on 2 loaded cores): shorter training collapses the digits features
# (every neighbour similarity ~1.0, so iteration 0 selects everything and there is no loop left to test).


@pytest.fixture(scope="module")
def open_loop(tmp_path_factory) -> Path:
    from shards.write import main as write_shards

    tmp = tmp_path_factory.mktemp("open")
    assert write_shards(["digits", "--protocol", "open", "--out", str(tmp / "digits_open"), "--no-progress"]) == 0
    assert submit(["--exp", "digits_open_iter2", "--cluster", "local", "--set", f"data.root={tmp}/digits_open",
                   "--set", f"run.root={tmp}/runs"]) == 0
    return tmp


def sidecar(root: Path, i: int) -> dict[str, dict[str, tuple[int, int]]]:
    side = load_sidecar(RunDir(root / "runs" / f"digits_open_iter{i}").cluster / "labels.npz")
    return {k: (int(m), int(lab)) for k, m, lab in zip(side["keys"].tolist(), side["mask"], side["labels"])}


def cluster_results(root: Path, i: int) -> dict:
    return json.loads((RunDir(root / "runs" / f"digits_open_iter{i}").cluster / "results.json").read_text())


def test_selections_are_cumulative_across_three_iterations(open_loop):
    sides = [sidecar(open_loop, i) for i in range(3)]
    uout = set(ShardSplit(open_loop / "digits_open", "uout").keys.tolist())
    assert all(sides[0][k][0] in (SELECTED, UNSELECTED) for k in uout)  # U_out is clustered, with U_in
    for i in (1, 2):
        before, now = sides[i - 1], sides[i]
        assert now.keys() == before.keys()
        earlier = {k for k, (m, _) in before.items() if m in (SELECTED, FROZEN)}
        assert earlier, f"iteration {i - 1} selected nothing; the test cannot show anything"
        # every earlier selection keeps its label, as frozen (mask 3), at the next iteration
        assert all(now[k] == (FROZEN, before[k][1]) for k in earlier)
        new = {k for k, (m, _) in now.items() if m == SELECTED}
        assert (new or i == 2) and not new & earlier  # the leftovers of iteration 2 may hold nothing dense enough
        assert all(now[k][1] > max(lab for _, lab in before.values()) for k in new)  # ids never collide
        results = cluster_results(open_loop, i)
        # only what was not selected before is clustered again
        assert results["samples"] == results["subsets"]["clustered"]["samples"] == len(before) - 64 - len(earlier)
        assert results["frozen"] == len(earlier) and results["pseudo_labelled"] == len(earlier) + len(new)
    # an image selected at iteration 1 keeps its label at iteration 2
    picked = [k for k, (m, _) in sides[1].items() if m == SELECTED]
    assert [sides[2][k] for k in picked] == [(FROZEN, sides[1][k][1]) for k in picked]
    assert all(m == LABELLED for m, _ in list(sides[2].values())[:64])


def test_per_subset_figures_are_in_results_and_tensorboard(open_loop):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for i in range(3):
        results = cluster_results(open_loop, i)
        subsets = results["subsets"]
        assert subsets["uout"]["samples"] == 285 and subsets["uin"]["samples"] == 1101
        assert subsets["all"]["samples"] == 1386
        assert subsets["selected"]["scored"] or i == 2  # iteration 2 may find nothing new dense enough
        scored = ("selected",) if subsets["selected"]["scored"] else ()
        for name in ("uin", "all", "unselected", "clustered", *scored):
            for metric in ("pairwise_f", "bcubed_f", "nmi"):
                assert 0.0 <= subsets[name][metric] <= 1.0 and results[f"{name}/{metric}"] == subsets[name][metric]
        acc = EventAccumulator(str(RunDir(open_loop / "runs" / f"digits_open_iter{i}").tb))
        acc.Reload()
        for tag in ("uin/pairwise_f", "all/bcubed_f", "unselected/nmi", "uout/samples"):
            assert acc.Scalars(f"cluster/{tag}")[-1].value == pytest.approx(results[tag]), (i, tag)


def test_report_tabulates_the_iterations(open_loop, capsys, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tools.report import main as report

    out = tmp_path / "report.md"
    capsys.readouterr()
    assert report(["--exp", "digits_open_iter*", "--runs-root", str(open_loop / "runs"), "--out", str(out),
                   "--tb", str(tmp_path / "tb")]) == 0
    text = out.read_text()
    assert text in capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in text.split("## ")[0].splitlines() if line.startswith("| ")]
    header, body = [c.strip() for c in rows[0]], [[c.strip() for c in r] for r in rows[1:]]
    assert [r[0] for r in body] == ["0", "1", "2"] and header[2:4] == ["R@1", "R@4"]
    for i, row in enumerate(body):
        run = RunDir(open_loop / "runs" / f"digits_open_iter{i}")
        evaluation, clusters = json.loads(run.results.read_text()), cluster_results(open_loop, i)
        assert float(row[2]) == pytest.approx(evaluation["recall@1"], abs=6e-5)
        assert row[header.index("U pseudo-labelled")] == f"{100 * clusters['pseudo_labelled_fraction']:.1f}%"
        uout_f = clusters["subsets"]["uout"].get("pairwise_f")  # absent while no U_out image has a pseudo-label
        shown = row[header.index("uout pairwise F")]
        assert shown == "-" if uout_f is None else float(shown) == pytest.approx(uout_f, abs=6e-5)
    fractions = [float(r[header.index("U pseudo-labelled")][:-1]) for r in body]
    assert fractions == sorted(fractions) and fractions[0] < fractions[-1]  # cumulative: it only grows
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("report/recall@1")] == [0, 1, 2]
    assert [e.step for e in acc.Scalars("report/uin/pairwise_f")] == [0, 1, 2]


def test_report_explains_a_pattern_that_matches_nothing(tmp_path, capsys):
    from tools.report import main as report

    (tmp_path / "runs").mkdir()
    assert report(["--exp", "nothing_iter*", "--runs-root", str(tmp_path / "runs")]) == 2
    assert "report: error: no run under" in capsys.readouterr().err
    assert report(["--exp", "x", "--runs-root", str(tmp_path / "absent")]) == 2
    assert "pass --runs-root" in capsys.readouterr().err
