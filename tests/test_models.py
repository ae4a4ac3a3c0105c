"""Backbones by timm name, pooling, local weights, frozen BatchNorm."""

from __future__ import annotations

import pytest
import torch

from imret.config import ModelConfig
from imret.models import build_model
from imret.models.pooling import GeM


@pytest.mark.parametrize("backbone, size, kwargs", [
    ("resnet18", 64, {}), ("resnet34", 64, {}), ("resnet50", 64, {}), ("resnext50_32x4d", 64, {}),
    ("swin_tiny_patch4_window7_224", 56, {"img_size": 56}), ("vit_base_patch16_224", 32, {"img_size": 32}),
    ("efficientnet_b3a", 64, {}), ("rexnet_150", 64, {}),
])
def test_backbones_embed_small_inputs(backbone, size, kwargs):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, backbone_kwargs=kwargs, embed_dim=128,
                                    pool="token" if "vit" in backbone else "gem"))
    x = torch.randn(2, 3, size, size)
    emb = model(x)
    assert emb.shape == (2, 128)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    emb.sum().backward()
    assert model.head.weight.grad is not None


def test_vit_with_768d_embeddings_and_gem_over_patch_tokens():
    model = build_model(ModelConfig(backbone="vit_base_patch16_224", backbone_kwargs={"img_size": 32},
                                    embed_dim=768, pool="gem"))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 768)
    features = model.features(torch.randn(1, 3, 32, 32))
    assert features.shape == (1, 768, 5)  # class token + 4 patches; pooling skips the class token


@pytest.mark.parametrize("pool", ["gem", "avg", "max"])
def test_pooling_kinds(pool):
    model = build_model(ModelConfig(backbone="test_resnet", pool=pool, embed_dim=0))
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, model.feature_dim)


def test_gem_values_and_learnable_p():
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    assert GeM(p=1.0)(x).item() == pytest.approx(2.5)
    assert GeM(p=3.0)(x).item() == pytest.approx(((1 + 8 + 27 + 64) / 4) ** (1 / 3))
    assert GeM(learnable=True).p.requires_grad and not GeM(learnable=False).p.requires_grad


def test_local_weights_safetensors_and_state_dict(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = build_model(ModelConfig(backbone="test_resnet")).backbone
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": state, "fc.weight": torch.zeros(3)}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        torch.manual_seed(2)
        loaded = build_model(ModelConfig(backbone="test_resnet", pretrained_path=str(tmp_path / name))).backbone
        for key, value in state.items():
            assert torch.equal(loaded.state_dict()[key], value), (name, key)


def test_missing_or_foreign_weights_are_clear_errors(tmp_path):
    from imret.models.embedding import load_local_weights

    with pytest.raises(ValueError, match="does not exist.*never downloads"):
        load_local_weights(build_model(ModelConfig(backbone="test_resnet")).backbone, str(tmp_path / "none.pth"))
    torch.save({"unrelated": torch.zeros(2)}, tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match="no tensor .* matches"):
        load_local_weights(build_model(ModelConfig(backbone="test_resnet")).backbone, str(tmp_path / "foreign.pth"))


def test_frozen_batchnorm_stays_in_eval_mode():
    model = build_model(ModelConfig(backbone="test_resnet", batchnorm="frozen"))
    model.train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    before = bns[0].running_mean.clone()
    model(torch.randn(4, 3, 32, 32))
    assert torch.equal(bns[0].running_mean, before)
