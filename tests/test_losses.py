"""Every loss on hand-made cases, Smooth-AP against the original block-layout formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from imret.losses import build_loss, check_term
from imret.losses.smooth_ap import SmoothAPLoss, clamped_sigmoid


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def original_block_smooth_ap(preds: torch.Tensor, num_id: int, temperature: float) -> torch.Tensor:
    """The original Smooth-AP computation, which assumes the batch holds ``num_id`` classes laid
    out one after another with equal counts: positive ranks are computed inside each class
    block, and the block's queries are divided by the matching block of the all-items ranks."""
    b, group = preds.shape[0], preds.shape[0] // num_id
    sim = preds @ preds.T
    diff = sim[:, None, :] - sim[:, :, None]  # [q, i, j] = s_qj - s_qi
    rank_all = (clamped_sigmoid(diff, temperature) * (1 - torch.eye(b))[None]).sum(-1) + 1
    blocks = preds.view(num_id, group, -1)
    sim_pos = blocks @ blocks.transpose(1, 2)  # per class: [c, q, j]
    diff_pos = sim_pos[:, :, None, :] - sim_pos[:, :, :, None]  # [c, q, i, j]
    rank_pos = (clamped_sigmoid(diff_pos, temperature) * (1 - torch.eye(group))).sum(-1) + 1  # [c, q, i]
    ap = preds.new_zeros(())
    for c in range(num_id):
        block = rank_all[c * group:(c + 1) * group, c * group:(c + 1) * group]
        ap = ap + (rank_pos[c] / block).sum() / group / b
    return 1 - ap


@pytest.mark.parametrize("classes, per_class", [(3, 5), (5, 3), (4, 4), (2, 7)])
def test_smooth_ap_equals_the_original_on_class_contiguous_batches(classes, per_class):
    torch.manual_seed(classes * 10 + per_class)
    emb = unit(torch.randn(classes * per_class, 16))
    labels = torch.arange(classes).repeat_interleave(per_class)
    for temperature in (0.01, 0.1):
        ours = SmoothAPLoss(temperature)(emb, labels)
        assert ours.item() == pytest.approx(original_block_smooth_ap(emb, classes, temperature).item(), abs=1e-6)


def test_smooth_ap_is_invariant_to_batch_order_and_handles_unequal_classes():
    torch.manual_seed(0)
    emb = unit(torch.randn(14, 8))
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 3])
    loss = SmoothAPLoss(0.05)
    base = loss(emb, labels)
    for seed in range(3):
        perm = torch.randperm(14, generator=torch.Generator().manual_seed(seed))
        assert loss(emb[perm], labels[perm]).item() == pytest.approx(base.item(), abs=1e-6)


def test_smooth_ap_of_a_perfect_ranking_is_near_zero_and_gradchecks():
    emb = unit(torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]]))
    labels = torch.tensor([0, 0, 1, 1])
    assert SmoothAPLoss(0.01)(emb, labels).item() < 1e-3
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    lab = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    assert torch.autograd.gradcheck(lambda e: SmoothAPLoss(0.5)(unit(e), lab), (x,))


def test_contrastive_hand_case():
    # two classes on the unit circle: positives 0.2 apart, negatives sqrt(2) apart
    a = torch.tensor([[1.0, 0.0], [math.cos(0.2), math.sin(0.2)], [0.0, 1.0], [-math.sin(0.2), math.cos(0.2)]])
    labels = torch.tensor([0, 0, 1, 1])
    d_pos = 2 * math.sin(0.1)  # chord of a 0.2 rad arc
    loss = build_loss("contrastive", {"pos_margin": 0.0, "neg_margin": 1.0}, 2, 2)
    # every positive pair pays its distance; no negative pair is closer than 1
    assert loss(a, labels).item() == pytest.approx(d_pos, abs=1e-5)
    tight = build_loss("contrastive", {"pos_margin": 0.0, "neg_margin": 2.0}, 2, 2)
    negs = [torch.dist(a[i], a[j]).item() for i, j in [(0, 2), (0, 3), (1, 2), (1, 3)]]
    assert tight(a, labels).item() == pytest.approx(d_pos + sum(2.0 - d for d in negs) / 4, abs=1e-5)


def test_triplet_semihard_hand_case():
    # anchor 0, positive 1 at distance d_ap; negative 2 farther than the positive but inside the margin
    # (semi-hard); negative 3 far away (easy, no loss)
    emb = unit(torch.tensor([[1.0, 0.0], [math.cos(0.3), math.sin(0.3)], [math.cos(0.5), -math.sin(0.5)],
                             [-1.0, 0.0]]))
    labels = torch.tensor([0, 0, 1, 2])
    d = torch.cdist(emb, emb)
    loss = build_loss("triplet", {"margin": 0.5}, 2, 3)(emb, labels)
    # the expected value: the mean over exactly the semi-hard triplets, found by brute force
    terms = []
    for a_, p_ in [(0, 1), (1, 0)]:
        for n in (2, 3):
            if d[a_, p_] < d[a_, n] < d[a_, p_] + 0.5:
                terms.append(d[a_, p_] - d[a_, n] + 0.5)
    assert terms  # the case has semi-hard triplets
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), abs=1e-5)


def test_angular_agrees_with_pml():
    from pytorch_metric_learning import losses

    torch.manual_seed(1)
    emb, labels = unit(torch.randn(12, 6)), torch.arange(4).repeat(3)
    ours = build_loss("angular", {"alpha": 45.0}, 6, 4)(emb, labels)
    assert ours.item() == pytest.approx(losses.AngularLoss(alpha=45)(emb, labels).item())
    assert ours.item() > 0


def test_cosine_embedding_hand_case():
    emb = unit(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]))
    labels = torch.tensor([0, 0, 1])
    # pairs (0,1) positive: 1 - cos45; (0,2) negative: max(0, 0 - m); (1,2) negative: max(0, cos45 - m)
    c45 = math.cos(math.pi / 4)
    loss = build_loss("cosine_embedding", {"margin": 0.5}, 2, 2)(emb, labels)
    assert loss.item() == pytest.approx(((1 - c45) + 0 + (c45 - 0.5)) / 3, abs=1e-6)


def test_ams_and_ce_logits():
    torch.manual_seed(2)
    emb, labels = unit(torch.randn(6, 4)), torch.tensor([0, 1, 2, 0, 1, 2])
    ams = build_loss("ams", {"margin": 0.3, "scale": 30.0}, 4, 3)
    cos = unit(emb) @ unit(ams.heads[0].weight).T
    expected = F.cross_entropy(30.0 * (cos - 0.3 * F.one_hot(labels, 3)), labels)
    assert ams(emb, labels).item() == pytest.approx(expected.item(), rel=1e-5)
    ce = build_loss("ce", {"scale": 16.0}, 4, 3)
    cos = unit(emb) @ unit(ce.heads[0].weight).T
    assert ce(emb, labels).item() == pytest.approx(F.cross_entropy(16.0 * cos, labels).item(), rel=1e-5)
    linear = build_loss("ce", {"cosine": False}, 4, 3)
    assert linear(emb, labels).item() == pytest.approx(F.cross_entropy(linear.heads[0](emb), labels).item(), rel=1e-5)


def test_two_heads_split_real_and_pseudo_classes():
    torch.manual_seed(3)
    emb = unit(torch.randn(8, 4))
    labels = torch.tensor([0, 1, 2, 0, 3, 4, 3, 4])  # 3 real classes, 2 pseudo-classes
    two = build_loss("ams", {"heads": 2}, 4, 5, labelled_classes=3)
    assert [h.weight.shape[0] for h in two.heads] == [3, 2]
    real, pseudo = labels < 3, labels >= 3
    part_real = F.cross_entropy(two.logits(0, emb[real], labels[real]), labels[real], reduction="sum")
    part_pseudo = F.cross_entropy(two.logits(1, emb[pseudo], labels[pseudo] - 3), labels[pseudo] - 3, reduction="sum")
    assert two(emb, labels).item() == pytest.approx(((part_real + part_pseudo) / 8).item(), rel=1e-5)
    one = build_loss("ams", {}, 4, 5)
    assert len(one.heads) == 1 and one.heads[0].weight.shape[0] == 5


def test_classifier_checks_labels_and_class_count():
    loss = build_loss("ce", {}, 4, 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        loss(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="num_classes=2 but the training labels reach 4"):
        build_loss("ams", {"num_classes": 2}, 4, 5)
    assert build_loss("ams", {"num_classes": 1024}, 4, 5).heads[0].weight.shape == (1024, 4)


def test_every_registered_loss_runs_and_back_propagates():
    from imret.losses import LOSSES, build_criterion
    from imret.config import LossTerm

    torch.manual_seed(4)
    x = torch.randn(12, 8, requires_grad=True)
    labels = torch.arange(4).repeat(3)
    terms = [LossTerm(name=n) for n in LOSSES]
    criterion = build_criterion(terms, 8, 4)
    total, parts = criterion(unit(x), labels)
    total.backward()
    assert set(parts) == set(LOSSES) and torch.isfinite(total) and x.grad.abs().sum() > 0
    check_term("ams", {"num_classes": 1024, "heads": 2})
