"""Pretrained weights from the local cache: the fetch tool's layout, loading, and the submit-time check.

Nothing downloads here: the weights are tiny timm test models made in the test, put into a
temporary cache through the fetch tool (``--from-file``, timm's own loader on a local file)
or through its writer.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

TINY = "test_resnet.r160_in1k"


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach the Hugging Face hub fails instead of downloading."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def saved_tiny_resnet(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A randomly initialised test_resnet, saved as a plain torch state dict (as torchvision ships weights)."""
    import timm

    torch.manual_seed(7)
    state = timm.create_model("test_resnet", pretrained=False).state_dict()
    path = tmp_path / "tiny_resnet.pth"
    torch.save(state, path)
    return path, state


def test_fetched_weights_load_into_the_backbone(tmp_path):
    from imret.config import ModelConfig
    from imret.models import build_model
    from tools.fetch_weights import main as fetch_weights

    source, state = saved_tiny_resnet(tmp_path)
    cache = tmp_path / "cache"
    assert fetch_weights(["--model", TINY, "--from-file", str(source), "--weights-dir", str(cache)]) == 0
    meta = yaml.safe_load((cache / f"{TINY}.json").read_text())
    assert meta["name"] == TINY and meta["source"] == str(source) and len(meta["sha256"]) == 64
    model = build_model(ModelConfig(backbone=TINY, pretrained=True, weights_dir=str(cache), embed_dim=8))
    loaded = model.backbone.state_dict()
    assert set(loaded) == set(state) - {"fc.weight", "fc.bias"}  # the classifier is not part of the backbone
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    fresh = build_model(ModelConfig(backbone=TINY, embed_dim=8)).backbone.state_dict()
    assert not torch.equal(fresh["conv1.0.weight"], state["conv1.0.weight"])  # pretrained: false stays random


def test_the_fetch_tool_keeps_getting_and_writing_apart(tmp_path, capsys):
    """The download is one injectable function; everything after it runs here without a network."""
    from imret.models.weights import read_weights
    from tools.fetch_weights import fetch

    calls = []

    def getter(name: str, file: Path | None) -> tuple[dict[str, torch.Tensor], str]:
        calls.append(name)
        return {"w": torch.full((2, 3), float(len(calls)))}, "test-getter"

    cache = str(tmp_path / "cache")
    fetch(TINY, cache, getter=getter)
    fetch(TINY, cache, getter=getter)  # cached: not fetched again
    assert calls == [TINY] and "already in the cache" in capsys.readouterr().out
    fetch(TINY, cache, force=True, getter=getter)
    assert torch.equal(read_weights(TINY, cache)["w"], torch.full((2, 3), 2.0))


def test_without_a_network_the_fetch_tool_says_what_to_do(tmp_path, capsys):
    from tools.fetch_weights import main as fetch_weights

    assert fetch_weights(["--model", TINY, "--weights-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fetch_weights: error:") and "needs internet" in err and "--from-file" in err
    assert not any(tmp_path.iterdir())
    assert fetch_weights(["--model", "resnet50.no_such_tag"]) == 2
    assert "tv_in1k" in capsys.readouterr().err  # the tags timm does have are listed


def experiments_file(tmp_path: Path, data_root: Path, cache: Path) -> Path:
    entry = {
        "run": {"root": str(tmp_path / "runs")},
        "data": {"root": str(data_root), "image_size": 32, "batch_size": 8, "samples_per_class": 2,
                 "num_workers": 0},
        "model": {"backbone": TINY, "pretrained": True, "weights_dir": str(cache), "embed_dim": 8},
        "extract": {"num_workers": 0},
        "resources": {"local_ranks": 1},
    }
    path = tmp_path / "experiments.yaml"
    path.write_text(yaml.safe_dump({"tiny_pretrained": entry}))
    return path


def test_a_missing_weight_fails_at_submit_naming_the_fetch_command(tiny_data, tmp_path, capsys):
    from launch.submit import main as submit

    cache = tmp_path / "cache"
    exps = experiments_file(tmp_path, tiny_data, cache)
    code = submit(["--experiments", str(exps), "--exp", "tiny_pretrained", "--cluster", "local"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("submit: error:")
    assert f"python -m tools.fetch_weights --model {TINY} --weights-dir {cache}" in err
    assert "--exp tiny_pretrained" in err
    assert not (tmp_path / "runs").exists()  # nothing written, nothing queued
    # --print-config and --dry-run do not need the weights
    assert submit(["--experiments", str(exps), "--exp", "tiny_pretrained", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["backbone"] == TINY and printed["model"]["pretrained"] is True
    assert not (tmp_path / "runs").exists()


def test_the_submit_check_passes_once_fetched(tiny_data, tmp_path):
    from imret import checks
    from imret.config import Experiments
    from imret.models.weights import write_weights

    cache = tmp_path / "cache"
    exps = Experiments.load(experiments_file(tmp_path, tiny_data, cache))
    cfg = checks.resolve(exps, "tiny_pretrained")
    with pytest.raises(ValueError, match="not in the cache"):
        checks.check_weights(cfg)
    write_weights({"x": torch.zeros(1)}, TINY, cache, "test")
    checks.check_weights(cfg)  # present: accepted (its contents are checked when a job loads it)


def test_a_damaged_or_foreign_cache_entry_is_an_error(tmp_path):
    from imret.config import ModelConfig
    from imret.models import build_model
    from imret.models.weights import write_weights

    cache = tmp_path / "cache"
    _, state = saved_tiny_resnet(tmp_path)
    path = write_weights(state, TINY, cache, "test")
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="does not match the sha256"):
        build_model(ModelConfig(backbone=TINY, pretrained=True, weights_dir=str(cache)))
    write_weights({k: v for k, v in state.items() if not k.startswith("layer4")}, TINY, cache, "test")
    with pytest.raises(ValueError, match="do not fit the backbone: .* missing"):
        build_model(ModelConfig(backbone=TINY, pretrained=True, weights_dir=str(cache)))


def test_a_vit_loads_its_weights_at_another_image_size(tmp_path):
    """timm's own adapter resamples the position embedding, as timm would when downloading."""
    import timm

    from imret.config import ModelConfig
    from imret.models import build_model
    from imret.models.weights import write_weights

    name = "test_vit.r160_in1k"
    state = timm.create_model("test_vit", pretrained=False).state_dict()
    write_weights(state, name, tmp_path, "test")
    model = build_model(ModelConfig(backbone=name, pretrained=True, weights_dir=str(tmp_path), embed_dim=0,
                                    pool="token", backbone_kwargs={"img_size": 64}))
    loaded = model.backbone.state_dict()
    assert loaded["pos_embed"].shape != state["pos_embed"].shape
    assert torch.equal(loaded["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, loaded["cls_token"].shape[-1])


def test_weights_names_are_checked_when_the_config_is(tmp_path):
    from imret import checks
    from imret.config import ConfigError, from_dict

    base = {"data": {"root": str(tmp_path)}, "model": {"backbone": "resnet18.no_such_tag"}}
    with pytest.raises(ConfigError, match="Invalid pretrained tag .*tv_in1k"):
        checks.check(from_dict(base, "x"))
    both = {"model": {"backbone": "resnet18.tv_in1k", "pretrained": True, "pretrained_path": __file__}}
    with pytest.raises(ConfigError, match="keep one"):
        from_dict(both, "x")


def test_fetch_by_experiment_covers_its_sweep_and_the_runs_it_builds_on(tmp_path):
    from tools.fetch_weights import ROOT, experiment_weights

    assert experiment_weights(ROOT / "experiments.yaml", "inat_vit_iter1", []) == {"vit_base_patch16_224.dino": "weights"}
    assert experiment_weights(ROOT / "experiments.yaml", "inat_smoothap_iter2", ["model.weights_dir=/w"]) == {
        "resnet50.tv_in1k": "/w"}
    base = {"data": {"root": str(tmp_path)}, "model": {"pretrained": True}}
    entries = {
        "first": {**base, "model": {"backbone": "resnet18.tv_in1k", "pretrained": True}},
        "second": {**base, "model": {"backbone": "test_vit", "pretrained": True}, "data": {"root": str(tmp_path),
                   "pseudo_labels": "first"},
                   "sweep": {"grid": {"model.backbone": ["test_vit", "test_resnet.r160_in1k"]}}},
        "plain": {"data": {"root": str(tmp_path)}},
    }
    path = tmp_path / "experiments.yaml"
    path.write_text(yaml.safe_dump(entries))
    assert set(experiment_weights(path, "second", [])) == {"resnet18.tv_in1k", "test_vit.r160_in1k",
                                                           "test_resnet.r160_in1k"}
    assert experiment_weights(path, "plain", []) == {}


def test_where_the_cache_lives_is_not_part_of_the_digest(tmp_path):
    from imret.config import from_dict

    a = from_dict({"model": {"backbone": "resnet18.tv_in1k", "pretrained": True, "weights_dir": "/a"}}, "x")
    b = from_dict({"model": {"backbone": "resnet18.tv_in1k", "pretrained": True, "weights_dir": "/b"}}, "x")
    c = from_dict({"model": {"backbone": "resnet18.tv_in1k", "pretrained": False, "weights_dir": "/a"}}, "x")
    assert a.digest() == b.digest() != c.digest()
