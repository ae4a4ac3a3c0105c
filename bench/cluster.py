"""Clustering at scale: planted clusters on the unit sphere through imret.cluster's density method.

Generates ``--clusters`` planted clusters (seeded centres, members at within-cluster
cosine about 0.94) plus ``--noise`` uniformly random points, runs the full density
method (approximate FAISS index above ``--exact-below`` points) and prints the time of
each phase, the peak memory, the k-NN recall against exact search on a sample, the
clustering quality against the planted labels and the counts, as Markdown rows ready
for BENCHMARKS.md. Noise points are each their own true class: a perfect clustering
leaves them alone.

    python bench/cluster.py [--points 1000000] [--clusters 10000] [--dim 128] [--index hnsw]
    python bench/cluster.py --small      # 100,000 points, 1,000 clusters: a quick run

``--open-world`` runs the planted open-world comparison of Hi-LANDER instead
(bench/cluster_open_world.py; run as ``python -m bench.cluster --open-world``): imret's
hilander and density methods through ``tools.cluster`` on long-tailed planted data,
beside the DGL reference's recorded figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time

import numpy as np

from imret.cluster.clustering import Clustering
from imret.cluster.density import density_peaks
from imret.metrics import quality
from imret.config import ClusterConfig

CHUNK = 100_000  # rows generated at a time: keeps float64 temporaries out of the peak


def planted(points: int, clusters: int, dim: int, noise: float, sigma: float,
            seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors and their true labels: clusters around random centres, then noise points.

    A member is its centre plus Gaussian noise of norm about ``sigma``, normalised, so
    two members have cosine about 1 / (1 + sigma^2) (0.94 for sigma 0.25).
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    num_noise = int(round(points * noise))
    labels = np.concatenate([rng.integers(0, clusters, points - num_noise),
                             clusters + np.arange(num_noise)])  # each noise point its own class
    labels = labels[rng.permutation(points)]
    x = np.empty((points, dim), np.float32)
    for lo in range(0, points, CHUNK):
        part = labels[lo:lo + CHUNK]
        jitter = rng.standard_normal((len(part), dim), dtype=np.float32)
        clustered = part < clusters
        x[lo:lo + CHUNK] = np.where(clustered[:, None], centres[np.minimum(part, clusters - 1)] +
                                    sigma / np.sqrt(dim) * jitter, jitter)
        x[lo:lo + CHUNK] /= np.linalg.norm(x[lo:lo + CHUNK], axis=1, keepdims=True)
    return x, labels


def within_cosine(x: np.ndarray, labels: np.ndarray, clusters: int, seed: int, pairs: int = 2000) -> float:
    """Mean cosine of random pairs of members of the same planted cluster."""
    rng = np.random.default_rng(seed + 1)
    order = np.argsort(labels, kind="stable")
    starts = np.searchsorted(labels[order], np.arange(clusters))
    sizes = np.bincount(labels[labels < clusters], minlength=clusters)
    chosen = rng.choice(np.flatnonzero(sizes >= 2), pairs)
    a = order[starts[chosen] + rng.integers(0, sizes[chosen] - 1)]
    b = order[starts[chosen] + sizes[chosen] - 1]
    return float(np.einsum("ij,ij->i", x[a], x[b]).mean())


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--clusters", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--noise", type=float, default=0.01, help="fraction of uniformly random points")
    parser.add_argument("--sigma", type=float, default=0.25, help="member jitter: within-cluster cosine ~1/(1+s^2)")
    parser.add_argument("--index", choices=["hnsw", "ivf"], default="hnsw")
    parser.add_argument("--exact-below", type=int, default=ClusterConfig.exact_below)
    parser.add_argument("--recall-sample", type=int, default=1000)
    parser.add_argument("--levels", type=int, default=ClusterConfig.levels)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="100,000 points in 1,000 clusters")
    parser.add_argument("--open-world", action="store_true",
                        help="the Hi-LANDER comparison of bench/cluster_open_world.py (its own flags follow)")
    argv = sys.argv[1:] if argv is None else argv
    if "--open-world" in argv:
        from bench.cluster_open_world import main as open_world

        open_world([a for a in argv if a != "--open-world"])
        return
    args = parser.parse_args(argv)
    if args.small:
        args.points, args.clusters = 100_000, 1_000
    run(args)


def run(args: argparse.Namespace) -> None:
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    x, truth = planted(args.points, args.clusters, args.dim, args.noise, args.sigma, args.seed)
    gen_s = time.perf_counter() - t0
    rss_data = peak_rss_gb()
    params = ClusterConfig(exact_below=args.exact_below, index=args.index, recall_sample=args.recall_sample,
                           levels=args.levels)
    t0 = time.perf_counter()
    result = density_peaks(x, params)
    total_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sel = result.selected
    q_sel = quality(result.labels[sel], truth[sel]) if sel.any() else {}
    q_all = quality(result.labels, truth)
    quality_s = time.perf_counter() - t0
    report(args, x, truth, result, q_sel, q_all,
           {"generate": gen_s, "total": total_s, "quality": quality_s, "rss_data": rss_data,
            "load_before": load_before, "load_after": os.getloadavg()[0]})


def report(args: argparse.Namespace, x: np.ndarray, truth: np.ndarray, result: Clustering,
           q_sel: dict[str, float], q_all: dict[str, float], extra: dict[str, float]) -> None:
    info, n = result.info, len(truth)
    noise = truth >= args.clusters
    sel = result.selected
    nxn_gb = n * n * 4 / 1e9
    print(f"# bench/cluster.py: {n:,} points, {args.clusters:,} planted clusters + {int(noise.sum()):,} noise, "
          f"{args.dim}-d, within-cluster cosine {within_cosine(x, truth, args.clusters, args.seed):.3f}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, load {extra['load_before']:.1f} "
          f"before / {extra['load_after']:.1f} after; k={info['k']}, tau {ClusterConfig.tau}, "
          f"thresh {ClusterConfig.thresh}, index {info['method']} {info.get('params', {})} on {info['device']}")
    print("\n| phase | seconds |\n|---|---|")
    for name, key in (("generate data", None), ("index build", "build_s"), ("k-NN search (all points)", "search_s"),
                      ("recall check (exact on sample)", "recall_s"), ("density + links", "link_s"),
                      ("levels (cluster the clusters)", "levels_s")):
        print(f"| {name} | {extra['generate'] if key is None else info[key]:.1f} |")
    print(f"| clustering total (build to selection) | {extra['total']:.1f} |")
    print(f"| quality (pairwise, BCubed, NMI twice) | {extra['quality']:.1f} |")
    print("\n| figure | value |\n|---|---|")
    rows = [
        ("peak RSS (whole process)", f"{peak_rss_gb():.2f} GB (data alone {extra['rss_data']:.2f} GB; "
                                     f"a dense n x n float32 matrix would be {nxn_gb:,.0f} GB)"),
        (f"k-NN recall@{info['k']} vs exact ({args.recall_sample} points)",
         "exact search" if info["recall"] is None else f"{info['recall']:.4f}"),
        ("clusters per level", " -> ".join(f"{c:,}" for c in info["clusters_per_level"])),
        ("pseudo-classes selected / planted", f"{len(np.unique(result.labels[sel])):,} / {args.clusters:,}"),
        ("selected", f"{int(sel.sum()):,} ({sel.mean():.1%}); of the noise points {int(sel[noise].sum())}"),
    ]
    for suffix, q in (("selected", q_sel), ("all points, before selection", q_all)):
        if q:
            rows.append((f"pairwise F / P / R ({suffix})",
                         f"{q['pairwise_f']:.4f} / {q['pairwise_precision']:.4f} / {q['pairwise_recall']:.4f}"))
            rows.append((f"BCubed F / P / R ({suffix})",
                         f"{q['bcubed_f']:.4f} / {q['bcubed_precision']:.4f} / {q['bcubed_recall']:.4f}"))
            rows.append((f"NMI ({suffix})", f"{q['nmi']:.4f}"))
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
