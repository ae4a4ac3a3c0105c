"""Hi-LANDER on planted open-world data: imret's port, the DGL reference and density peaks, side by side.

The parity test (tests/test_hilander_reference.py) fixes the numerics on a tiny graph;
this checks the whole method on data shaped like PSS's problem. 240 classes of power-law
sizes (300 down to 3 points), each spread over its own 6-d subspace of a 32-d space, so
within-class cosine is about 0.6, far below tau 0.9; 5% noise points, each its own class.
Classes alternate by size rank between a labelled part (1,017 points) and an unlabelled
part (792 points): the unlabelled classes are never seen in training (open world).

imret's ``hilander`` trains on the labelled part with PSS's full recipe (1000 epochs;
PSS/train.sh:29-34) and clusters the unlabelled part (train.sh:37-44); ``density``
clusters it with the same k, tau and thresh on raw cosines. Both run through
``tools.cluster``, one seed each. The reference's figures come from
bench/hilander_planted_reference.json: the DGL code run once per seed on the identical
file (bench/hilander_reference.py says how), scored with the same ``imret.metrics.quality``.

    OMP_NUM_THREADS=1 python -m bench.cluster --open-world --seeds 0 1 2 --out-dir runs/bench/open_world
    python -m bench.cluster --open-world --table --out-dir runs/bench/open_world   # the table of finished runs
    OMP_NUM_THREADS=1 python -m bench.cluster --open-world --scale 100000 --epochs 1   # time and memory
    python -m bench.cluster --open-world --cross-check DIR   # imret's inference on the reference's weights

``--scale N`` times Hi-LANDER instead: N points, 128-d (PSS's embedding size), in classes
of Pareto-distributed sizes (mean about 100); ``--epochs`` of PSS's recipe on all N
points, then inference on the same N points with that model. ``--train-points M`` trains
on a random M of them instead, to time inference at a size where training would not fit
the machine. The k-NN is exact below ``cluster.exact_below`` points and HNSW above, as in
the cluster stage. It prints the wall and CPU seconds of each and the process's peak RSS
after each (a running maximum).

    OMP_NUM_THREADS=2 python -m bench.cluster --open-world --scale 1000000 --train-points 20000 --epochs 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

REFERENCE = Path(__file__).with_name("hilander_planted_reference.json")
COLUMNS = [("selected_fraction", "selected"), ("pairwise_f", "pairwise F (sel.)"), ("bcubed_f", "BCubed F (sel.)"),
           ("nmi", "NMI (sel.)"), ("pairwise_f_all", "pairwise F (all)"), ("bcubed_f_all", "BCubed F (all)"),
           ("nmi_all", "NMI (all)")]
LOSS_TAIL = 50  # epochs averaged for the end-of-training losses


def planted_classes(rng: np.random.Generator, sizes: np.ndarray, dim: int, rank: int = 6, spread: float = 0.35,
                    jitter: float = 0.2, common: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """Each class: a unit centre plus Gaussian spread in its own random rank-``rank`` subspace, plus jitter.

    The centres share a common direction (weight ``common``), so k-NN cosines stay
    positive as for real embeddings (the reference asserts they lie in [0, 1]).
    """
    shared = np.ones(dim) / np.sqrt(dim)
    xs = []
    for size in sizes:
        centre = common * shared + rng.normal(size=dim) / np.sqrt(dim)
        basis = np.linalg.qr(rng.normal(size=(dim, rank)))[0]
        spread_part = (rng.normal(size=(size, rank)) * spread) @ basis.T
        xs.append(centre / np.linalg.norm(centre) + spread_part + jitter * rng.normal(size=(size, dim)) / np.sqrt(dim))
    return np.concatenate(xs).astype(np.float32), np.repeat(np.arange(len(sizes)), sizes)


def open_world(seed: int = 0, classes: int = 240, biggest: int = 300, alpha: float = 1.1, dim: int = 32,
               noise: float = 0.05) -> dict[str, np.ndarray]:
    """``lab_x/lab_y`` and ``unl_x/unl_y`` (and ``*_noise`` flags): alternate classes by size rank, plus noise."""
    rng = np.random.default_rng(seed)
    sizes = np.maximum(3, np.round(biggest * np.arange(1, classes + 1) ** -alpha)).astype(int)
    x, y = planted_classes(rng, sizes, dim)
    parts: dict[str, np.ndarray] = {}
    for name, which in (("lab", 0), ("unl", 1)):
        keep = y % 2 == which  # every other class by size: both parts are long-tailed
        px, py = x[keep], y[keep]
        n_noise = int(round(noise * len(px)))
        noise_x = 0.8 * np.ones(dim) / np.sqrt(dim) + rng.normal(size=(n_noise, dim)) / np.sqrt(dim)
        noise_y = classes + (0 if which == 0 else 10**6) + np.arange(n_noise)  # each noise point its own class
        order = rng.permutation(len(px) + n_noise)  # the row order means nothing
        parts[f"{name}_x"] = np.concatenate([px, noise_x.astype(np.float32)])[order]
        parts[f"{name}_y"] = np.concatenate([py, noise_y]).astype(np.int64)[order]
        parts[f"{name}_noise"] = (np.arange(len(px) + n_noise) >= len(px))[order]
    return parts


def write_inputs(out_dir: Path) -> tuple[Path, Path]:
    """L.npz and U.npz for tools.cluster (the same arrays as the reference's planted_data.npz)."""
    data = open_world()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "L.npz", out_dir / "U.npz"
    np.savez(paths[0], embeddings=data["lab_x"], labels=data["lab_y"])
    np.savez(paths[1], embeddings=data["unl_x"], labels=data["unl_y"])
    return paths


def run_one(method: str, seed: int, epochs: int, out_dir: Path, paths: tuple[Path, Path]) -> dict[str, Any]:
    """One tools.cluster run; its figures (as in the reference json) and timings."""
    from tools.cluster import parse_args, run

    out = out_dir / f"{method}_seed{seed}.json"
    argv = ["--method", method, "--unlabelled", str(paths[1]), "--out", str(out)]
    if method == "hilander":
        argv += ["--labelled", str(paths[0]), "--set", f"cluster.hilander.seed={seed}",
                 "--set", f"cluster.hilander.epochs={epochs}", "--set", "cluster.hilander.device=cpu"]
    started = time.perf_counter()
    summary = run(parse_args(argv))
    figures = figures_of(summary)
    figures.update(seed=seed, method=method, epochs=epochs if method == "hilander" else None,
                   wall_s=time.perf_counter() - started, train_s=summary["info"].get("train_s"),
                   infer_s=summary["info"].get("seconds"), peak_rss_gb=_rss_gb(),
                   levels_nodes=summary["info"].get("nodes"), threads=os.environ.get("OMP_NUM_THREADS"))
    (out_dir / f"{method}_seed{seed}.figures.json").write_text(json.dumps(figures, indent=1) + "\n")
    return figures


def figures_of(summary: dict[str, Any]) -> dict[str, Any]:
    """The columns of the table from a tools.cluster summary."""
    sel, everything = summary["metrics"]["selected"] or {}, summary["metrics"]["all"]
    out = {"selected_fraction": summary["selected_fraction"],
           "clusters_selected": summary["counts"]["clusters_selected"]}
    out.update({k: sel.get(k, float("nan")) for k in ("pairwise_f", "bcubed_f", "nmi")})
    out.update({f"{k}_all": everything[k] for k in ("pairwise_f", "bcubed_f", "nmi")})
    return out


def mean_sd(rows: list[dict[str, Any]], key: str) -> tuple[float, float]:
    values = np.array([r[key] for r in rows], dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def table(groups: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown: mean ± sd over seeds per group, and imret minus the reference."""
    lines = ["| method (seeds) | " + " | ".join(name for _, name in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for name, rows in groups.items():
        if rows:
            stats = [mean_sd(rows, k) for k, _ in COLUMNS]
            cells = [f"{m:.3f} ± {sd:.3f}" if len(rows) > 1 else f"{m:.3f}" for m, sd in stats]
            seeds = ", ".join(str(r["seed"]) for r in rows)
            lines.append(f"| {name} ({seeds}) | " + " | ".join(cells) + " |")
    ours, ref = groups.get("imret hilander"), groups.get("DGL reference")
    if ours and ref:
        gaps = [mean_sd(ours, k)[0] - mean_sd(ref, k)[0] for k, _ in COLUMNS]
        lines.append("| imret − reference (means) | " + " | ".join(f"{g:+.3f}" for g in gaps) + " |")
        pairs = paired(ours, ref)
        if len(pairs) > 1:  # seed S gives both the same initial weights
            seeds = ", ".join(str(a["seed"]) for a, _ in pairs)
            cells = [f"{m:+.3f} ± {se:.3f}" for m, se in (paired_gap(pairs, k) for k, _ in COLUMNS)]
            lines.append(f"| imret − reference, paired ({seeds}): mean ± standard error | " + " | ".join(cells) + " |")
            lines += ["", loss_line(pairs)]
    return "\n".join(lines)


def paired(ours: list[dict[str, Any]], ref: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(imret run, reference run) for every seed run by both."""
    by_seed = {r["seed"]: r for r in ref}
    return [(r, by_seed[r["seed"]]) for r in ours if r["seed"] in by_seed]


def paired_gap(pairs: list[tuple[dict[str, Any], dict[str, Any]]], key: str) -> tuple[float, float]:
    """Mean and standard error of imret − reference over the paired seeds."""
    d = np.array([a[key] - b[key] for a, b in pairs], dtype=np.float64)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))


def loss_line(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> str:
    """The training losses at the end (mean of the last LOSS_TAIL epochs), imret against the reference."""
    pairs = [(a, b) for a, b in pairs if a.get("final_losses") and b.get("final_losses")]
    if len(pairs) < 2:
        return "Training losses: not recorded for two or more paired seeds."
    d = np.array([np.subtract(a["final_losses"], b["final_losses"]) for a, b in pairs])
    ref = np.array([b["final_losses"] for _, b in pairs]).mean(0)
    parts = [f"{name} {r:.4f}, imret {m:+.4f} ± {se:.4f}" for name, r, m, se in
             zip(("loss", "density loss", "edge loss"), ref, d.mean(0), d.std(0, ddof=1) / np.sqrt(len(d)))]
    return (f"Training loss, mean of the last {LOSS_TAIL} epochs, reference and imret − reference (paired, "
            f"{len(pairs)} seeds): " + "; ".join(parts) + ".")


def final_losses(log: Path) -> list[float] | None:
    """(loss, density loss, edge loss) averaged over the last LOSS_TAIL epochs of a train.jsonl."""
    if not log.is_file():
        return None
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    tail = np.array([[r["loss"], r["density"], r["edge"]] for r in rows[-LOSS_TAIL:]])
    return tail.mean(0).tolist()


def load_groups(out_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Every finished run in ``out_dir``, and the reference's recorded figures."""
    from imret.cluster.hilander import TRAIN_LOG

    def runs(method: str) -> list[dict[str, Any]]:
        files = sorted(out_dir.glob(f"{method}_seed*.figures.json"))
        rows = sorted((json.loads(f.read_text()) for f in files), key=lambda r: r["seed"])
        for r in rows:  # tools.cluster's work folder for --out X.json is X.<method>, beside it
            r.setdefault("final_losses", final_losses(out_dir / f"{method}_seed{r['seed']}.{method}" / TRAIN_LOG))
        return rows

    reference = json.loads(REFERENCE.read_text())["runs"]
    return {"imret hilander": runs("hilander"), "DGL reference": reference, "imret density": runs("density")}


def cross_check(ref_dir: Path) -> list[dict[str, Any]]:
    """imret's inference with each reference run's final weights, against that run's own clustering.

    ``ref_dir`` holds the reference's ``planted_ref_seed<S>.npz`` files (bench/hilander_reference.py
    ``planted`` writes the final weights, labels, selection and level-0 densities). Equal
    partitions and selections for every seed mean the difference between the two programs'
    scores comes from training, not from inference.
    """
    import torch

    from imret.cluster.hilander import LanderParams, infer_hilander, make_model

    x = open_world()["unl_x"]
    params = LanderParams(device="cpu")
    out = []
    for path in sorted(ref_dir.glob("planted_ref_seed*.npz"), key=lambda q: int(q.stem.removeprefix("planted_ref_seed"))):
        ref = np.load(path)
        model = make_model(x.shape[1], params)
        model.load_state_dict({k[2:]: torch.from_numpy(ref[k]) for k in ref.files if k.startswith("w.")})
        labels, density, selected, info = infer_hilander(model, x, params)
        pairs = np.unique(np.stack([labels, ref["labels"]]), axis=1).shape[1]
        out.append({"seed": int(path.stem.removeprefix("planted_ref_seed")),
                    "same_partition": pairs == len(np.unique(labels)) == len(np.unique(ref["labels"])),
                    "same_selection": bool((selected == ref["selected"]).all()),
                    "max_density_diff": float(np.abs(density - ref["density"]).max()),
                    "levels_nodes": info["nodes"]})
    return out


def scale_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n points, 128-d, in classes of Pareto-distributed sizes; the last class takes the remainder."""
    rng = np.random.default_rng(seed)
    sizes = np.round(rng.pareto(1.5, size=n // 50) * 50 + 5).astype(int)
    sizes = sizes[np.cumsum(sizes) <= n]
    sizes = np.append(sizes, n - sizes.sum())
    return planted_classes(rng, sizes[sizes > 0], 128)


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def scale(n: int, epochs: int, train_points: int = 0) -> dict[str, Any]:
    """Training (``epochs`` of PSS's recipe) and inference time and peak RSS on ``n`` points.

    Training uses ``train_points`` of them (all when 0), drawn at random.
    """
    import dataclasses

    import torch

    from imret.cluster.hilander import LanderParams, infer_hilander, train_hilander
    from imret.config import ClusterConfig, HilanderConfig

    x, y = scale_data(n)
    train = np.sort(np.random.default_rng(1).permutation(len(x))[:train_points]) if 0 < train_points < len(x) \
        else np.arange(len(x))
    config = ClusterConfig(hilander=HilanderConfig(epochs=epochs, device="cpu"))
    params = LanderParams.from_config(config, len(train))
    out: dict[str, Any] = {"n": len(x), "classes": int(y.max()) + 1, "train_points": len(train), "epochs": epochs,
                           "torch_threads": torch.get_num_threads(), "rss_data_gb": _rss_gb(),
                           "train_knn": params.knn}
    wall, cpu = time.perf_counter(), cpu_s()
    model, log = train_hilander(x[train], y[train], params)
    out.update(train_wall_s=time.perf_counter() - wall, train_cpu_s=cpu_s() - cpu, graphs_s=log["graphs_s"],
               steps=log["steps"], graph_nodes=log["graph_nodes"], rss_after_train_gb=_rss_gb())
    params = dataclasses.replace(params, knn=LanderParams.from_config(config, len(x)).knn)
    out["infer_knn"] = params.knn
    wall, cpu = time.perf_counter(), cpu_s()
    _, _, selected, info = infer_hilander(model, x, params)
    out.update(infer_wall_s=time.perf_counter() - wall, infer_cpu_s=cpu_s() - cpu, knn_s=info["knn_s"],
               model_s=info["model_s"], levels_nodes=info["nodes"], selected_fraction=float(selected.mean()),
               rss_after_infer_gb=_rss_gb(), load=os.getloadavg()[0])
    return out


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster --open-world", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0], help="hilander seeds to run (one run each)")
    parser.add_argument("--epochs", type=int, default=1000, help="hilander epochs (PSS: 1000)")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/bench/open_world"))
    parser.add_argument("--table", action="store_true", help="only print the table of the runs in --out-dir")
    parser.add_argument("--no-density", action="store_true", help="skip the density-peak run")
    parser.add_argument("--scale", type=int, default=0, help="time training and inference on this many points")
    parser.add_argument("--train-points", type=int, default=0,
                        help="with --scale: train on this many of the points (default all), infer on all")
    parser.add_argument("--cross-check", type=Path, metavar="DIR",
                        help="infer with the final weights of the reference's runs in DIR and compare clusterings")
    args = parser.parse_args(argv)
    if args.cross_check:
        rows = cross_check(args.cross_check)
        if not rows:
            raise SystemExit(f"--cross-check: no planted_ref_seed<S>.npz in {args.cross_check}; point it at the "
                             "folder where bench/hilander_reference.py planted wrote the reference's runs")
        for row in rows:
            print(json.dumps(row))
        return
    if args.scale:
        print(json.dumps(scale(args.scale, args.epochs, args.train_points)))
        return
    if not args.table:
        paths = write_inputs(args.out_dir)
        if not args.no_density:
            print(json.dumps(run_one("density", 0, 0, args.out_dir, paths)))
        for seed in args.seeds:
            print(json.dumps(run_one("hilander", seed, args.epochs, args.out_dir, paths)))
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}")
    print(table(load_groups(args.out_dir)))


if __name__ == "__main__":
    main()
