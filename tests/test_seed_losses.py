"""The seeds' own losses: TF's semi-hard triplet and the N-pair angular loss against the CBIR seed's code,
the sketch seed's pair losses and classifier on triples, and REIR's cross-entropy averaged over branches.

``tests/data/tf_semihard_reference.npz`` holds values computed by the CBIR seed's own
``ranking/semi_hard_triplet.py`` and ``ranking/angular.py`` under TensorFlow
(``bench/make_tf_semihard_reference.py`` says how it was made).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from imret.losses import build_loss
from imret.losses.npair_angular import consecutive_pairs

REFERENCE = Path(__file__).parent / "data" / "tf_semihard_reference.npz"


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(REFERENCE) as z:
        return {k: z[k] for k in z.files}


def case(ref: dict[str, np.ndarray], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(ref[f"{name}__emb"]), torch.from_numpy(ref[f"{name}__labels"]).long()


def margins(ref: dict[str, np.ndarray]) -> list[tuple[float, str]]:
    return [(float(m), f"m{float(m):.1f}") for m in ref["margins"]]


def test_the_reference_file_covers_the_cases_it_claims(ref):
    assert len(ref["cases"]) == 9 and [m for m, _ in margins(ref)] == pytest.approx([0.2, 0.5])
    assert any("tfr@548e014" in v for v in ref["versions"])


def test_tf_semihard_equals_the_seeds_loss_on_every_case_and_margin(ref):
    for name in ref["cases"]:
        emb, labels = case(ref, name)
        for margin, tag in margins(ref):
            loss = build_loss("tf_semihard", {"margin": margin}, emb.shape[1], int(labels.max()) + 1)
            expected = ref[f"{name}__{tag}__seed_per_pair"]
            per_pair = loss.per_pair(emb, labels)
            assert per_pair.shape == expected.shape, name
            # the same (anchor, positive) order as the seed's boolean mask
            rows, cols = torch.nonzero((labels[:, None] == labels[None, :]) & ~torch.eye(len(labels), dtype=torch.bool)).T
            assert np.array_equal(rows.numpy(), ref[f"{name}__pair_anchor"]) and \
                np.array_equal(cols.numpy(), ref[f"{name}__pair_positive"])
            if not len(expected):
                with pytest.raises(ValueError, match="no positive pair"):
                    loss(emb, labels)
                continue
            np.testing.assert_allclose(per_pair.numpy(), expected, atol=1e-6, err_msg=f"{name} {tag}")
            assert loss(emb, labels).item() == pytest.approx(float(ref[f"{name}__{tag}__seed"]), abs=1e-6)


def test_tf_semihard_is_not_tf_addons_default_nor_pml_semihard(ref):
    emb, labels = case(ref, "pk_P8_K2_D16")
    ours = build_loss("tf_semihard", {"margin": 0.2}, 16, 8)(emb, labels).item()
    assert ours == pytest.approx(float(ref["pk_P8_K2_D16__m0.2__tfa_sqL2"]), abs=1e-6)
    assert abs(ours - float(ref["pk_P8_K2_D16__m0.2__tfa_L2"])) > 0.02  # TF-Addons' default: non-squared L2
    pml = build_loss("triplet", {"margin": 0.2, "mining": "semihard"}, 16, 8)(emb, labels).item()
    assert abs(ours - pml) > 0.01


def test_tf_semihard_takes_the_closest_farther_negative_else_the_farthest():
    # anchor 0 and positive 1 at squared distance 1; negatives at squared distances 0.5, 1.5 and 3 from anchor 0
    emb = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5 ** 0.5, 0.0], [0.0, 1.5 ** 0.5], [-(3 ** 0.5), 0.0]])
    labels = torch.tensor([0, 0, 1, 2, 3])
    loss = build_loss("tf_semihard", {"margin": 1.0}, 2, 4)
    # pair (0, 1): closest negative strictly farther than 1 is 1.5 -> 1 - 1.5 + 1 = 0.5
    # pair (1, 0): from 1, negatives at 0.0858, 2.5, 7.4641 (squared); farther than 1: 2.5 -> 1 - 2.5 + 1 = 0
    assert loss.per_pair(emb, labels).tolist() == pytest.approx([0.5, 0.0], abs=1e-6)
    far = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.1, 0.0], [0.0, 0.2]])  # every negative closer than the positive
    assert build_loss("tf_semihard", {"margin": 0.5}, 2, 3).per_pair(far, torch.tensor([0, 0, 1, 2]))[0].item() == \
        pytest.approx(4.0 - 0.04 + 0.5, abs=1e-6)  # the farthest negative (0.2^2) is used


def test_tf_semihard_back_propagates_through_the_chosen_negative():
    torch.manual_seed(3)
    x = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(4).repeat_interleave(3)
    loss = build_loss("tf_semihard", {"margin": 0.5}, 5, 4)
    assert torch.autograd.gradcheck(lambda e: loss(F.normalize(e, dim=1), labels), (x,))


def test_npair_angular_equals_the_seeds_loss_on_every_pair_case(ref):
    checked = 0
    for name in ref["cases"]:
        emb, labels = case(ref, name)
        for alpha in (30, 45):
            key = f"{name}__alpha{alpha}__angular"
            if key in ref:
                ours = build_loss("npair_angular", {"alpha": float(alpha)}, emb.shape[1], 100)(emb, labels)
                assert ours.item() == pytest.approx(float(ref[key]), abs=1e-6), key
                checked += 1
    assert checked == 8  # the four K = 2 cases, two angles each


def test_npair_angular_pairs_each_class_in_batch_order_whatever_the_layout(ref):
    emb, labels = case(ref, "pk_P8_K2_D16")
    loss = build_loss("npair_angular", {"alpha": 45.0}, 16, 8)
    base = loss(emb, labels).item()
    pair_order = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    rows = torch.stack([2 * pair_order, 2 * pair_order + 1], dim=1).flatten()  # pairs shuffled, each kept whole
    assert loss(emb[rows], labels[rows]).item() == pytest.approx(base, abs=1e-6)
    a, p = consecutive_pairs(torch.tensor([3, 3, 3, 3, 1, 1, 5]))  # K = 4 reads as two pairs; a lone 5 is left out
    assert a.tolist() == [0, 2, 4] and p.tolist() == [1, 3, 5]
    a, p = consecutive_pairs(torch.tensor([2, 7, 2, 7]))
    assert a.tolist() == [0, 1] and p.tolist() == [2, 3]
    with pytest.raises(ValueError, match="no \\(anchor, positive\\) pair"):
        loss(emb[:3:2], labels[:3:2])


def test_npair_angular_is_not_pml_angular(ref):
    emb, labels = case(ref, "pk_P8_K2_D16")
    ours = build_loss("npair_angular", {"alpha": 45.0}, 16, 8)(emb, labels).item()
    assert abs(ours - build_loss("angular", {"alpha": 45.0}, 16, 8)(emb, labels).item()) > 0.05


# ----------------------------------------------------------------------------- the sketch seed's losses


def triple_batch(seed: int, n: int = 4, dim: int = 6, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (unnormalised) features of n triples laid out [a1, p1, n1, a2, ...]."""
    g = torch.Generator().manual_seed(seed)
    emb = scale * torch.randn(3 * n, dim, generator=g)
    cls = torch.arange(n) % 3
    labels = torch.stack([cls, cls, (cls + 1) % 3], dim=1).flatten()
    return emb, labels


def seed_contrastive(x: torch.Tensor, y: torch.Tensor, label: float, margin: float) -> torch.Tensor:
    """The sketch seed's formula, written out: 0.5 (y d^2 + (1 - y) relu(m - sqrt(d^2 + 1e-9))^2), batch mean."""
    d2 = ((y - x) ** 2).sum(1)
    return (0.5 * (label * d2 + (1 - label) * torch.relu(margin - torch.sqrt(d2 + 1e-9)) ** 2)).mean()


def test_pair_contrastive_on_triples_is_the_seeds_squared_hadsell_sum():
    emb, labels = triple_batch(0, scale=0.1)  # small features, so some negatives fall inside the margin
    a, p, n = emb[0::3], emb[1::3], emb[2::3]
    loss = build_loss("pair_contrastive", {"margin": 0.3, "pairs": "triplet"}, 6, 3)
    expected = seed_contrastive(a, p, 1.0, 0.3) + seed_contrastive(a, n, 0.0, 0.3)
    assert loss(emb, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    assert seed_contrastive(a, n, 0.0, 0.3).item() > 0  # the negative half is exercised
    # on raw features the scale matters: the same vectors normalised give another value
    assert abs(loss(F.normalize(emb, dim=1), labels).item() - loss(emb, labels).item()) > 1e-3


def test_pair_contrastive_over_all_pairs_uses_the_labels():
    emb, labels = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.2]]), torch.tensor([0, 0, 1])
    loss = build_loss("pair_contrastive", {"margin": 0.5}, 2, 2)
    d01, d02, d12 = 0.01, 0.04, 0.05  # squared distances
    expected = (0.5 * d01 + 0.5 * (0.5 - math.sqrt(d02 + 1e-9)) ** 2 + 0.5 * (0.5 - math.sqrt(d12 + 1e-9)) ** 2) / 3
    assert loss(emb, labels).item() == pytest.approx(expected, rel=1e-6)


def test_cosine_embedding_on_triples_adds_the_positive_and_negative_means():
    emb, labels = triple_batch(1)
    a, p, n = emb[0::3], emb[1::3], emb[2::3]
    loss = build_loss("cosine_embedding", {"margin": 0.3, "pairs": "triplet"}, 6, 3)
    cos_p, cos_n = F.cosine_similarity(a, p), F.cosine_similarity(a, n)
    expected = (1 - cos_p).mean() + torch.clamp(cos_n - 0.3, min=0).mean()
    assert loss(emb, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss(F.normalize(emb, dim=1), labels).item() == pytest.approx(expected.item(), rel=1e-5)  # norm-free


@pytest.mark.parametrize("name, params", [("cosine_embedding", {"pairs": "triplet"}),
                                          ("pair_contrastive", {"pairs": "triplet"})])
def test_triplet_pair_losses_refuse_a_batch_that_is_not_triples(name, params):
    loss = build_loss(name, params, 4, 3)
    with pytest.raises(ValueError, match="not a multiple of 3"):
        loss(torch.randn(4, 4), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="not laid out as \\(anchor, positive, negative\\) triples"):
        loss(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 0, 1]))  # the positive 1 is of another class


def test_triplet_ce_classifies_anchors_and_positives_but_not_negatives():
    torch.manual_seed(2)
    emb, labels = triple_batch(2)
    emb.requires_grad_(True)
    loss = build_loss("triplet_ce", {}, 6, 3)
    value = loss(emb, labels)
    fc = loss.fc
    expected = F.cross_entropy(fc(emb[0::3]), labels[0::3]) + F.cross_entropy(fc(emb[1::3]), labels[1::3])
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    value.backward()
    assert emb.grad[2::3].abs().sum() == 0 and emb.grad[0::3].abs().sum() > 0  # the negatives get no CE
    assert isinstance(fc, torch.nn.Linear) and fc.bias is not None and fc.weight.shape == (3, 6)
    every = build_loss("triplet_ce", {"roles": ["anchor", "positive", "negative"]}, 6, 3)
    assert len(every.roles) == 3
    with pytest.raises(ValueError, match="unknown triplet role 'query'"):
        build_loss("triplet_ce", {"roles": ["query"]}, 6, 3)(emb, labels)


def test_triplet_ce_dropout_acts_only_in_training():
    emb, labels = triple_batch(3)
    loss = build_loss("triplet_ce", {"dropout": 0.5}, 6, 3)
    loss.eval()
    assert loss(emb, labels).item() == loss(emb, labels).item()
    loss.train()
    torch.manual_seed(0)
    first = loss(emb, labels).item()
    assert any(loss(emb, labels).item() != first for _ in range(5))


# ----------------------------------------------------------------------------- REIR


def test_meta_ce_mean_is_the_seeds_cross_entropy_over_batch_and_branches():
    from torch.nn import CrossEntropyLoss

    from imret.reir import draw_codes

    torch.manual_seed(6)
    loss = build_loss("meta_ce", {"branches": 5, "meta_class_size": 3, "seed": 2, "reduction": "mean"}, 15, 9)
    logits, labels = torch.randn(7, 5, 3), torch.tensor([0, 8, 3, 3, 5, 1, 7])
    targets = torch.from_numpy(draw_codes(9, 5, 3, "fixed", seed=2))[:, labels].T  # B x E meta-labels
    # the seed: nn.CrossEntropyLoss() on the model's B x E x M output permuted to B x M x E, against B x E
    seed = CrossEntropyLoss()(logits.permute(0, 2, 1).contiguous(), targets)
    assert loss(logits, labels).item() == pytest.approx(seed.item(), rel=1e-6)
