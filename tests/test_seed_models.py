"""``model.normalize: false``: the losses see the raw pooled features (the sketch seed trains on them), while
extraction still stores L2-normalised embeddings for the inner-product search."""

from __future__ import annotations

import torch

from imret.config import ModelConfig
from imret.extract import _embed
from imret.models import build_model


def test_raw_features_reach_the_loss_and_extraction_normalises_them():
    torch.manual_seed(0)
    raw = build_model(ModelConfig(backbone="test_resnet", embed_dim=0, pool="avg", normalize=False)).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = raw(images)
        pooled = raw.pooled(images)
        stored = _embed(raw, images)
    assert torch.equal(out, pooled)  # no head, no normalisation: the average-pooled features
    assert not torch.allclose(out.norm(dim=1), torch.ones(3))
    assert torch.allclose(stored.norm(dim=1), torch.ones(3), atol=1e-6)
    assert torch.allclose(stored, torch.nn.functional.normalize(out, dim=1))


def test_the_default_still_normalises():
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="test_resnet", embed_dim=8, pool="avg")).eval()
    with torch.no_grad():
        assert torch.allclose(model(torch.randn(2, 3, 32, 32)).norm(dim=1), torch.ones(2), atol=1e-6)
