"""Reference values of the CBIR seed's (tanakafer/tfr) semi-hard triplet and angular losses:
tests/data/tf_semihard_reference.npz, which tests/test_seed_losses.py checks imret against.

How it was run (2 CPU cores, no GPU, Python 3.11.7):

    python3 -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install "tensorflow-cpu==2.15.*" "tensorflow-addons==0.23.0" "numpy<2"
        # installed: tensorflow-cpu 2.15.1, keras 2.15.0, tensorflow-addons 0.23.0, numpy 1.26.4
    /tmp/tfenv/bin/python bench/make_tf_semihard_reference.py --seed-git /path/to/tfr/.git

``--seed-git`` is the git directory of a clone of github.com/tanakafer/tfr (any clone that
holds commit 548e014bcecc5eb567ad3fbbdbbe91a8058a14e0). This script holds none of the
seed's code: it reads ``ranking/semi_hard_triplet.py`` and ``ranking/angular.py`` at that
commit out of the clone into a temporary directory and imports them from there. The first
version of this script (written for the seed survey, with the clone's path fixed in the
code) made the committed file; this one takes the path as an argument and writes the same
values (re-run and compared with ``np.testing.assert_array_equal``).

What it computes, on small seeded batches (embeddings L2-normalised, as the seed's
EmbeddingModel.call and train.py's train_step do):

* ``seed``: the seed's own ``triplet_semihard_loss``, then ``tf.reduce_mean`` as train.py
  (line 250) does. The per-pair vector is stored too, with the pair indices in the
  row-major order of ``tf.boolean_mask``.
* ``tfa_sqL2``: ``tfa.losses.triplet_semihard_loss(labels, emb, margin,
  distance_metric="squared-L2")`` (TF-Addons 0.23.0): numerically the seed's loss.
* ``tfa_L2``: the same TF-Addons call with its default ``distance_metric="L2"``, i.e. what
  ``tfa.losses.TripletSemiHardLoss()`` computes. Not the seed's loss; stored to show the
  difference.
* ``angular``: the seed's ``angular_loss(pids, anchors, positives, degree, batch_size=P,
  with_l2reg=True)`` with the batch laid out as train.py lays it out (consecutive [anchor,
  positive] pairs of one class, K = 2), for alpha 30 and 45.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

COMMIT = "548e014bcecc5eb567ad3fbbdbbe91a8058a14e0"
OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "tf_semihard_reference.npz"
MARGINS = (0.2, 0.5)
ALPHAS = (30.0, 45.0)


def seed_modules(git_dir: str, commit: str):
    """The seed's ranking package, read out of its clone into a temporary directory and imported."""
    root = tempfile.mkdtemp(prefix="tfr_seed_")
    os.makedirs(os.path.join(root, "ranking"))
    for path in ("ranking/__init__.py", "ranking/semi_hard_triplet.py", "ranking/angular.py"):
        text = subprocess.run(["git", f"--git-dir={git_dir}", "show", f"{commit}:{path}"],
                              check=True, capture_output=True, text=True).stdout
        with open(os.path.join(root, path), "w") as f:
            f.write(text)
    sys.path.insert(0, root)
    from ranking.angular import angular_loss
    from ranking.semi_hard_triplet import triplet_semihard_loss
    return triplet_semihard_loss, angular_loss


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(20240601)
    out = {}
    # P x K batches laid out class by class, as the seed's tf.data pipeline yields them
    out["pk_P8_K2_D16"] = (unit(rng.standard_normal((16, 16))), np.repeat(np.arange(8), 2))
    out["pk_P5_K4_D8"] = (unit(rng.standard_normal((20, 8))), np.repeat(np.arange(5), 4))
    out["seedlike_P20_K2_D128"] = (unit(rng.standard_normal((40, 128))), np.repeat(rng.permutation(20) * 3 + 7, 2))
    # a tie: negative 2 sits exactly on positive 1, so D(0,2) == D(0,1): not "greater", not semi-hard
    out["tie_neg_equals_pos"] = (np.array([[1, 0], [0, 1], [0, 1], [-1, 0]], np.float32), np.array([0, 0, 1, 1]))
    # no negative farther than the positive for anchor 0: the farthest negative is used
    out["no_semihard_negative"] = (unit(np.array([[1, 0], [-1, 0], [0, 1], [0, -1], [0.6, 0.8]], np.float32)),
                                   np.array([0, 0, 1, 1, 1]))
    # duplicated embeddings inside a class and across classes (zero distances, many ties)
    dup = unit(rng.standard_normal((3, 6)))
    out["duplicates"] = (np.stack([dup[0], dup[0], dup[1], dup[1], dup[0], dup[2]]).astype(np.float32),
                         np.array([0, 0, 1, 1, 2, 2]))
    # singleton labels: no positive pair of their own, but they serve as negatives
    out["singletons_mixed"] = (unit(rng.standard_normal((6, 4))), np.array([0, 0, 1, 2, 3, 3]))
    # every label a singleton: no positive pair at all (0 / 0)
    out["all_singletons"] = (unit(rng.standard_normal((4, 4))), np.array([0, 1, 2, 3]))
    # one class only: no negative at all
    out["single_class"] = (unit(rng.standard_normal((4, 4))), np.array([5, 5, 5, 5]))
    return out


def semihard_values(seed_semihard, tf, tfa, name: str, emb: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    data: dict[str, np.ndarray] = {}
    e, lab = tf.constant(emb), tf.constant(labels)
    for m in MARGINS:
        per_pair = seed_semihard(e, lab, m).numpy()
        seed_loss = float(tf.reduce_mean(per_pair).numpy()) if per_pair.size else float("nan")
        sq = float(tfa.losses.triplet_semihard_loss(lab, e, m, distance_metric="squared-L2").numpy())
        l2 = float(tfa.losses.triplet_semihard_loss(lab, e, m).numpy())
        data[f"{name}__m{m}__seed_per_pair"] = per_pair.astype(np.float32)
        data[f"{name}__m{m}__seed"] = np.float32(seed_loss)
        data[f"{name}__m{m}__tfa_sqL2"] = np.float32(sq)
        data[f"{name}__m{m}__tfa_L2"] = np.float32(l2)
        print(f"{name:24s} margin {m}: seed {seed_loss:.7f}  tfa squared-L2 {sq:.7f}  tfa L2 (default) {l2:.7f}")
    return data


def angular_values(seed_angular, tf, name: str, emb: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Only for the [anchor, positive] x P layout with P distinct classes, which the seed's loss needs."""
    pairs = len(labels) // 2
    if len(labels) % 2 or not np.all(labels[0::2] == labels[1::2]) or len(np.unique(labels[0::2])) != pairs:
        return {}
    data = {}
    anchors, positives = tf.constant(emb[0::2]), tf.constant(emb[1::2])
    for a in ALPHAS:
        val = float(seed_angular(tf.constant(labels[0::2]), anchors, positives, degree=a,
                                 batch_size=pairs, with_l2reg=True).numpy())
        data[f"{name}__alpha{int(a)}__angular"] = np.float32(val)
        print(f"{name:24s} angular alpha {a:.0f}: {val:.7f}")
    return data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed-git", required=True, help="git directory of a clone of tanakafer/tfr")
    parser.add_argument("--commit", default=COMMIT)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    import tensorflow as tf
    import tensorflow_addons as tfa

    seed_semihard, seed_angular = seed_modules(args.seed_git, args.commit)
    data: dict[str, np.ndarray] = {"margins": np.array(MARGINS, np.float32), "alphas_deg": np.array(ALPHAS, np.float32)}
    names = []
    for name, (emb, labels) in cases().items():
        names.append(name)
        labels = labels.astype(np.int32)
        data[f"{name}__emb"], data[f"{name}__labels"] = emb, labels
        pos = (labels[:, None] == labels[None, :]) & ~np.eye(len(labels), dtype=bool)
        a_idx, p_idx = np.nonzero(pos)  # row-major, the order tf.boolean_mask uses
        data[f"{name}__pair_anchor"], data[f"{name}__pair_positive"] = a_idx.astype(np.int32), p_idx.astype(np.int32)
        data.update(semihard_values(seed_semihard, tf, tfa, name, emb, labels))
        data.update(angular_values(seed_angular, tf, name, emb, labels))
    data["cases"] = np.array(names)
    data["versions"] = np.array([f"tensorflow {tf.__version__}", f"tensorflow-addons {tfa.__version__}",
                                 f"numpy {np.__version__}", f"seed tanakafer/tfr@{args.commit}"])
    np.savez(args.out, **data)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
