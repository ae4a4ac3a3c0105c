"""The one-pass scan's parts against brute force: counting, top-k lists, block sizes under a budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imret.search import counting
from imret.search.blocks import GEMM_ROWS, Workspace, gpu_path, rows_within
from imret.search.counting import Counter
from imret.search.knn import search_shard
from imret.search.scan import plan_rows, scan
from imret.search.topk import block_topk


def brute_at_least(scores: np.ndarray, thresholds: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    return np.array([[(scores[r] >= thresholds[r, j]).sum() if j < sizes[r] else 0
                      for j in range(thresholds.shape[1])] for r in range(len(scores))]).reshape(thresholds.shape)


def hard_scores(rng: np.random.Generator, kind: str, rows: int, n: int) -> np.ndarray:
    """Scores that make a counting kernel slip: ties, signed zeros, neighbouring floats, huge values."""
    if kind == "continuous":
        scores = rng.normal(size=(rows, n)).astype(np.float32)
    elif kind == "signed zeros and ties":
        scores = rng.choice(np.array([0.0, -0.0, 1.0, -1.0, 0.5], np.float32), size=(rows, n))
    elif kind == "neighbouring floats":
        scores = (rng.integers(-5, 6, (rows, n)) * np.float32(2 ** -24)).astype(np.float32)
    elif kind == "tiny":
        scores = (rng.normal(size=(rows, n)) * 1e-30).astype(np.float32)
    else:  # a cluster one ulp wide next to a few huge outliers: the cell map's offsets are large
        base = np.float32(1000.0)
        scores = (base + rng.integers(-3, 4, (rows, n)).astype(np.float32) * np.spacing(base)).astype(np.float32)
        scores[:, :2] = rng.normal(size=(rows, 2)).astype(np.float32) * 1e3
    scores[rng.random((rows, n)) < 0.05] = -np.inf  # items left out (a query's own row)
    return scores


@pytest.mark.parametrize("kind", ["continuous", "signed zeros and ties", "neighbouring floats", "tiny", "outliers"])
@pytest.mark.parametrize("bins", [None, 8, 64])
def test_counter_over_several_tiles_equals_brute_force(kind, bins):
    rng = np.random.default_rng(len(kind) * 7 + (bins or 0))
    rows, n, width = 37, 600, 50
    scores = hard_scores(rng, kind, rows, n)
    sizes = rng.integers(0, width + 1, rows)
    sizes[:3] = 0, 1, width  # a row without thresholds, one with a single one, one full
    thresholds = np.full((rows, width), np.nan, np.float32)  # padding is ignored, whatever it holds
    for r in range(rows):
        pool = scores[r][np.isfinite(scores[r])]
        sizes[r] = min(sizes[r], len(pool))
        thresholds[r, :sizes[r]] = np.sort(rng.choice(pool, sizes[r], replace=False))
    counter = Counter(torch.from_numpy(thresholds), torch.from_numpy(sizes), bins)
    work = Workspace()
    for lo, hi in ((0, 250), (250, 251), (251, n)):  # counts add up over tiles of any width
        counter.add(torch.from_numpy(np.ascontiguousarray(scores[:, lo:hi])), work)
    real = np.arange(width)[None, :] < sizes[:, None]
    got = counter.result().numpy()
    assert np.array_equal(got[real], brute_at_least(scores, thresholds, sizes)[real])
    assert (got[~real] == 0).all()


def test_crowded_cells_are_counted_exactly():
    """Few cells per threshold: most cells hold several thresholds, and their scores are placed by search."""
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(9, 2000)).astype(np.float32)
    thresholds = np.sort(scores[:, :300], axis=1)
    counter = Counter(torch.from_numpy(thresholds), torch.full((9,), 300), bins=8)
    assert len(counter.crowded) > 0  # the case this test is for
    counter.add(torch.from_numpy(scores), Workspace())
    assert np.array_equal(counter.result().numpy(), brute_at_least(scores, thresholds, np.full(9, 300)))


def test_counting_rows_in_groups_equals_one_group(monkeypatch):
    rng = np.random.default_rng(4)
    scores = rng.normal(size=(64, 3000)).astype(np.float32)
    thresholds = np.sort(scores[:, ::7], axis=1)
    sizes = torch.full((64,), thresholds.shape[1])

    def counts(table_bytes: int) -> tuple[np.ndarray, int]:
        monkeypatch.setattr(counting, "TABLE_BYTES", table_bytes)
        counter = Counter(torch.from_numpy(thresholds), sizes)
        counter.add(torch.from_numpy(scores), Workspace())
        return counter.result().numpy(), counter.groups

    many, groups = counts(1 << 12)
    one, single = counts(1 << 30)
    assert groups > 4 and single == 1
    assert np.array_equal(many, one) and np.array_equal(one, brute_at_least(scores, thresholds, sizes.numpy()))


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def embeddings(seed: int, tied: bool, nq: int, ndb: int, d: int = 16) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    if tied:  # a few distinct vectors: most scores tie
        base = unit(rng.normal(size=(7, d)))
        return base[rng.integers(0, 7, nq)], rng.integers(0, 5, nq), base[rng.integers(0, 7, ndb)], rng.integers(0, 4, ndb)
    return unit(rng.normal(size=(nq, d))), rng.integers(0, 5, nq), unit(rng.normal(size=(ndb, d))), rng.integers(0, 4, ndb)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("self_search", [False, True])
@pytest.mark.parametrize("k", [1, 9, 40])
def test_scan_lists_equal_faiss_lists(tied, self_search, k):
    """Descending score, equal scores by ascending id, the query's own row never listed."""
    q, ql, db, dl = embeddings(k, tied, 70, 300)
    own = np.arange(len(q)) if self_search else None
    if self_search:
        db, dl = q, ql
    ours = scan(q, ql, db, dl, k, own, rows=GEMM_ROWS)
    faiss = search_shard(q, db, 0, k, own)
    assert np.array_equal(ours.ids, faiss.ids)
    np.testing.assert_allclose(ours.scores, faiss.scores, atol=1e-6)
    same = ours.scores[:, 1:] == ours.scores[:, :-1]
    assert (ours.ids[:, 1:][same] > ours.ids[:, :-1][same]).all()
    if self_search:
        assert not (ours.ids == np.arange(len(q))[:, None]).any()


def test_block_topk_pads_rows_with_fewer_items_than_k():
    scores = torch.tensor([[0.5, -torch.inf, 0.5, 0.1], [-torch.inf] * 4])
    values, ids = block_topk(scores, 6)
    assert ids.tolist() == [[0, 2, 3, -1, -1, -1], [-1] * 6]
    assert values[0, :3].tolist() == [0.5, 0.5, pytest.approx(0.1)] and np.isneginf(values[0, 3:]).all()


def test_gpu_path_on_cpu_gives_the_cpu_path_results():
    q, ql, db, dl = embeddings(5, True, 90, 700)
    runs = []

    def run() -> tuple:
        parts: list = []
        neigh = scan(q, ql, db, dl, 12, consume=lambda idx, r: parts.append((int(idx[0]), r)))
        parts.sort(key=lambda p: p[0])
        return neigh, np.concatenate([p[1].ranks for p in parts]), np.concatenate([p[1].hits for p in parts])

    runs.append(run())
    with gpu_path():
        runs.append(run())
    (n1, r1, h1), (n2, r2, h2) = runs
    assert np.array_equal(r1, r2) and np.array_equal(h1, h2)
    assert np.array_equal(n1.ids, n2.ids) and np.array_equal(n1.scores, n2.scores)


def test_block_rows_follow_the_budget():
    cpu = torch.device("cpu")
    small, large = plan_rows(200_000, 2000, 1, cpu), plan_rows(200_000, 2000, 4096, cpu)
    assert small == GEMM_ROWS and large > small and large % GEMM_ROWS == 0
    rows = plan_rows(800_000, 8000, 512, cpu)
    assert rows % GEMM_ROWS == 0 and rows_within(512, cpu, 10**9) == GEMM_ROWS  # never below one product
