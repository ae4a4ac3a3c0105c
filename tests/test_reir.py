"""REIR randomized ensembles: meta-class codes, packed branches, the meta_ce loss, DDP, the recipes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from imret.config import EnsembleConfig, ModelConfig
from imret.models import build_model
from imret.models.ensemble import EnsembleNet, pack_branches, random_copy, split_at, unpack_branch
from imret.reir import draw_codes, meta_labels

ROOT = Path(__file__).resolve().parents[1]


def ensemble_cfg(**ensemble) -> ModelConfig:
    ens = {"branches": 4, "share_type": "layer2", "meta_class_size": 3, **ensemble}
    return ModelConfig(backbone="test_resnet", embed_dim=0, pool="avg", ensemble=EnsembleConfig(**ens))


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- meta-class codes


@pytest.mark.parametrize("classes, branches, size", [(100, 48, 12), (98, 8, 4), (16, 4, 2), (30, 3, 4)])
def test_fixed_codes_are_unique_per_class_and_balanced(classes, branches, size):
    # (16, 4, 2) needs all 2^4 codes: only the swap repair reaches it
    codes = draw_codes(classes, branches, size, "fixed", seed=5)
    assert codes.shape == (branches, classes) and codes.dtype == np.int64
    assert len({tuple(col) for col in codes.T}) == classes
    for row in codes:
        counts = np.bincount(row, minlength=size)
        assert counts.min() >= classes // size and counts.max() <= -(-classes // size)


def test_the_same_seed_gives_the_same_codes_and_another_seed_others():
    a = draw_codes(200, 48, 12, "fixed", seed=3)
    assert np.array_equal(a, draw_codes(200, 48, 12, "fixed", seed=3))
    assert not np.array_equal(a, draw_codes(200, 48, 12, "fixed", seed=4))
    assert np.array_equal(draw_codes(20, 2, 4, "random", seed=1), draw_codes(20, 2, 4, "random", seed=1))


def test_random_codes_accept_collisions_and_impossible_settings_are_clear_errors():
    codes = draw_codes(40, 2, 4, "random", seed=0)  # 16 codes for 40 classes: collisions are certain
    assert len({tuple(col) for col in codes.T}) < 40
    with pytest.raises(ValueError, match="only 4\\^2 = 16 codes for 40 classes"):
        draw_codes(40, 2, 4, "fixed")
    with pytest.raises(ValueError, match="larger than the number of training classes"):
        draw_codes(5, 4, 12, "fixed")
    with pytest.raises(ValueError, match="not a mode"):
        draw_codes(50, 4, 12, "balanced")


def test_meta_labels_read_each_class_column():
    codes = np.array([[0, 1, 2], [2, 0, 1]])
    assert meta_labels(codes, np.array([2, 0, 2])).tolist() == [[2, 1], [0, 2], [2, 1]]


# ----------------------------------------------------------------------------- packed branches = a loop of copies


def perturbed_copy(template: nn.Module, seed: int) -> nn.Module:
    """An independently initialised copy with non-trivial BatchNorm statistics and affine weights."""
    torch.manual_seed(seed)
    module = random_copy(template).double()
    for bn in (m for m in module.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    return module


def grouped_bottleneck() -> nn.Module:
    """A ResNeXt-style stage (grouped 3x3 conv, strided downsample) small enough for float64."""
    from timm.models.resnet import Bottleneck

    down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
    return nn.Sequential(Bottleneck(16, 8, stride=2, downsample=down, cardinality=4, base_width=32),
                         Bottleneck(32, 8, cardinality=4, base_width=32))


def stage_templates() -> list[tuple[str, nn.Module, int]]:
    import timm

    backbone = timm.create_model("test_resnet", num_classes=0, global_pool="")
    _, whole = split_at(backbone, "none")  # deep stem, max pooling, avg-pool downsamples, Bottleneck in layer3
    return [("test_resnet", whole, 3), ("resnext_stage", grouped_bottleneck(), 16)]


@pytest.mark.parametrize("which", [0, 1])
def test_packed_branches_equal_a_loop_over_independent_copies(which):
    name, template, channels = stage_templates()[which]
    template, branches = template.double(), 3
    copies = [perturbed_copy(template, seed) for seed in range(branches)]
    packed = pack_branches(template, branches, lambda e: copies[e]).double()
    x = torch.randn(2, channels, 32, 32, dtype=torch.float64, requires_grad=True)
    for training in (False, True):  # running statistics, then batch statistics (and their update)
        packed.train(training)
        for c in copies:
            c.train(training)
        ref = torch.cat([c(x) for c in copies], dim=1)
        out = packed(x.repeat(1, branches, 1, 1))
        assert torch.allclose(out, ref, rtol=1e-10, atol=1e-10), name
    weights = torch.randn_like(ref)
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    for e, c in enumerate(copies):
        grads = unpack_branch_grads(packed, c, e, branches)
        for key, grad in grads.items():
            assert torch.allclose(grad, dict(c.named_parameters())[key].grad, rtol=1e-9, atol=1e-10), (name, key)
        assert_same_state(unpack_branch(packed, template, e, branches).double(), c)  # running stats updated alike


def unpack_branch_grads(packed: nn.Module, copy_: nn.Module, e: int, branches: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, p in packed.named_parameters():
        out[key] = p.grad.view(branches, p.shape[0] // branches, *p.shape[1:])[e]
    assert out.keys() == dict(copy_.named_parameters()).keys()
    return out


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.allclose(sa[key].double(), sb[key].double(), rtol=1e-10, atol=1e-12), key


def test_layers_that_mix_channels_cannot_be_packed():
    with pytest.raises(ValueError, match="cannot batch the ensemble branches: layer '1' \\(Conv1d\\)"):
        pack_branches(nn.Sequential(nn.Conv2d(4, 4, 1), nn.Conv1d(4, 4, 1)), 2)


# ----------------------------------------------------------------------------- the ensemble model


def test_share_type_layer2_keeps_one_copy_of_the_shared_layers():
    import timm

    torch.manual_seed(0)
    model = build_model(ensemble_cfg(branches=5, meta_class_size=3))
    backbone = timm.create_model("test_resnet", num_classes=0, global_pool="")
    shared = sum(n_params(getattr(backbone, s)) for s in ("conv1", "bn1", "layer1", "layer2"))
    replicated = n_params(backbone.layer3) + n_params(backbone.layer4)
    heads = 5 * (backbone.num_features * 3 + 3)
    assert n_params(model) == shared + 5 * replicated + heads
    assert n_params(model.shared) == shared and n_params(model.branches) == 5 * replicated
    keys = model.state_dict().keys()
    assert "shared.layer2.0.conv1.weight" in keys and not any(k.startswith("branches.layer2") for k in keys)
    assert model.state_dict()["branches.layer3.0.conv1.weight"].shape[0] == 5 * backbone.layer3[0].conv1.out_channels


@pytest.mark.parametrize("share, shared_stages", [
    ("none", []), ("maxpool", ["conv1", "bn1", "act1", "maxpool"]),
    ("layer4", ["conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4"]),
])


def test_share_types_cut_the_resnet_where_they_say(share, shared_stages):
    model = build_model(ensemble_cfg(share_type=share))
    assert [name for name, _ in model.shared.named_children()] == shared_stages
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 4, 3)
    if share == "layer4":  # only the heads are replicated
        assert n_params(model.branches) == 0


@pytest.mark.parametrize("backbone, meta_classes, seed_count", [
    ("resnet18", 12, 529_365_376), ("resnet18", 512, 541_677_376), ("resnet18", 192, 533_797_696),
    ("resnet50", 12, 1_118_974_592), ("resnext50_32x4d", 12, 1_094_093_696),
])


def test_parameter_counts_match_the_seeds_published_ones(backbone, meta_classes, seed_count):
    # the seed's README lists these for E = 48 branches shared up to layer1
    cfg = ModelConfig(backbone=backbone, embed_dim=0, pool="avg",
                      ensemble=EnsembleConfig(branches=48, share_type="layer1", meta_class_size=meta_classes))
    with torch.device("meta"):  # no memory: the shapes are all we count
        model = build_model(cfg)
    assert n_params(model) == seed_count


def test_train_mode_gives_logits_and_eval_mode_the_mean_cosine_embedding():
    torch.manual_seed(1)
    model = build_model(ensemble_cfg(branches=4, meta_class_size=3, with_random=True))
    x = torch.randn(5, 3, 32, 32)
    assert model.train()(x).shape == (5, 4, 3)
    model.eval()
    with torch.no_grad():
        emb, logits = model(x), model.logits(x)
    assert emb.shape == (5, model.embed_dim) == (5, 12)
    assert torch.allclose(emb.norm(dim=1), torch.ones(5), atol=1e-6)
    per_branch = F.cosine_similarity(logits[:, None], logits[None, :], dim=-1)  # 5 x 5 x E
    assert torch.allclose(emb @ emb.T, per_branch.mean(dim=-1), atol=1e-6)


def test_with_random_initialises_each_branch_afresh():
    import timm

    torch.manual_seed(2)
    plain = build_model(ensemble_cfg(branches=3))
    torch.manual_seed(2)
    rand = build_model(ensemble_cfg(branches=3, with_random=True))
    template = split_at(timm.create_model("test_resnet", num_classes=0, global_pool=""), "layer2")[1]

    def branch(model: EnsembleNet, e: int) -> torch.Tensor:
        return unpack_branch(model.branches, template, e, 3).state_dict()["layer3.0.conv1.weight"]

    assert torch.equal(branch(plain, 0), branch(plain, 1)) and torch.equal(branch(plain, 1), branch(plain, 2))
    assert not torch.equal(branch(rand, 0), branch(rand, 1))
    assert torch.equal(plain.shared.state_dict()["conv1.0.weight"], rand.shared.state_dict()["conv1.0.weight"])


def test_pretrained_weights_fill_the_trunk_and_every_branch(tmp_path):
    import timm

    torch.manual_seed(3)
    source = timm.create_model("test_resnet", num_classes=0, global_pool="")
    torch.save(source.state_dict(), tmp_path / "w.pth")
    torch.manual_seed(4)
    model = build_model(dataclass_replace(ensemble_cfg(branches=3), pretrained_path=str(tmp_path / "w.pth")))
    state = source.state_dict()
    for key, value in model.shared.state_dict().items():
        assert torch.equal(value, state[key]), key
    _, template = split_at(source, "layer2")
    for e in range(3):
        for key, value in unpack_branch(model.branches, template, e, 3).state_dict().items():
            assert torch.equal(value, state[key]), (e, key)


def dataclass_replace(cfg: ModelConfig, **changes) -> ModelConfig:
    out = copy.deepcopy(cfg)
    for key, value in changes.items():
        setattr(out, key, value)
    return out


def test_frozen_batchnorm_stays_in_eval_mode_in_the_ensemble():
    model = build_model(dataclass_replace(ensemble_cfg(), batchnorm="frozen")).train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training and not m.weight.requires_grad for m in bns)


@pytest.mark.parametrize("changes, message", [
    ({"embed_dim": 128}, "model.embed_dim \\(128\\) must be 0 or branches x meta_class_size = 12"),
    ({"backbone": "test_vit"}, "ResNet-family backbone"),
    ({"pool": "token"}, "pools feature maps"),
])


def test_bad_ensemble_configs_are_clear_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        build_model(dataclass_replace(ensemble_cfg(), **changes))


# ----------------------------------------------------------------------------- the meta_ce loss


def test_meta_ce_sums_the_per_branch_cross_entropies_over_meta_labels():
    from imret.losses import build_loss

    torch.manual_seed(5)
    loss = build_loss("meta_ce", {"branches": 3, "meta_class_size": 4, "seed": 7}, embed_dim=12, num_classes=10)
    codes = draw_codes(10, 3, 4, "fixed", seed=7)
    assert np.array_equal(loss.codes.numpy(), codes) and "codes" in loss.state_dict()
    logits, labels = torch.randn(6, 3, 4), torch.tensor([0, 3, 9, 3, 5, 1])
    expected = sum(F.cross_entropy(logits[:, e], torch.from_numpy(codes[e])[labels]) for e in range(3))
    assert loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    mean = build_loss("meta_ce", {"branches": 3, "meta_class_size": 4, "seed": 7, "reduction": "mean"}, 12, 10)
    assert mean(logits, labels).item() == pytest.approx(expected.item() / 3, rel=1e-6)
    flat = logits.flatten(1)  # B x E*M, as the loss registry's other callers pass embeddings
    assert loss(flat, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_model_and_loss_cannot_disagree_on_branches_or_meta_classes():
    from imret.losses import build_loss

    with pytest.raises(ValueError, match="= 24, but the model's embedding has 12 dimensions"):
        build_loss("meta_ce", {"branches": 4, "meta_class_size": 6}, embed_dim=12, num_classes=10)
    with pytest.raises(ValueError, match="holds no branch of 12 meta-classes"):
        build_loss("meta_ce", {}, embed_dim=8, num_classes=100)
    default = build_loss("meta_ce", {}, embed_dim=576, num_classes=100)  # the seed's M = 12, so E = 48
    assert (default.branches, default.meta_class_size) == (48, 12)
    with pytest.raises(ValueError, match="= 12, but the model's embedding has 16 dimensions"):
        build_loss("meta_ce", {}, embed_dim=16, num_classes=100)  # 16 is no whole number of 12-way branches
    swapped = build_loss("meta_ce", {"branches": 3, "meta_class_size": 4}, embed_dim=12, num_classes=10)
    model = build_model(ensemble_cfg(branches=4, meta_class_size=3)).train()  # 4 x 3: same embed_dim 12
    with pytest.raises(ValueError, match="expects the ensemble's training output B x 3 x 4.*got \\(2, 4, 3\\)"):
        swapped(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels must lie in \\[0, 10\\)"):
        swapped(torch.randn(2, 3, 4), torch.tensor([0, 10]))


# ----------------------------------------------------------------------------- training under DDP


def ensemble_train_config(data_root: Path, runs: Path, name: str):
    from tests.test_train import tiny_config

    return tiny_config(
        data_root, runs, name, model__backbone="test_resnet", model__embed_dim=8, model__pool="avg",
        model__batchnorm="frozen", model__ensemble={"branches": 4, "share_type": "layer2", "meta_class_size": 2,
                                                     "with_random": True},
        loss__terms=[{"name": "meta_ce", "params": {"branches": 4, "meta_class_size": 2, "seed": 1}}],
        optim__name="sgd",
    )


def test_two_gloo_ranks_train_the_ensemble_like_one_process(tiny_data, tmp_path):
    from imret import checkpoint, train
    from imret.distributed import DistInfo
    from imret.reir import export_codes
    from imret.rundir import RunDir
    from tests.helpers import run_ranks
    from tests.test_train import assert_same_weights, final_weights, initial, train_rank

    single = ensemble_train_config(tiny_data, tmp_path, "single")
    train.train_stage(single, RunDir(single.run_dir), DistInfo())
    multi = ensemble_train_config(tiny_data, tmp_path, "multi")
    weights = run_ranks(train_rank, 2, multi)[0]
    reference = final_weights(single)
    assert_same_weights(weights, reference, atol=1e-6)
    start = initial(single)
    assert (reference["head_weight"] - start["head_weight"]).abs().max() > 1e-3  # it did train
    assert max((reference[k] - start[k]).abs().max() for k in start if k.startswith("branches.")) > 1e-4
    state = checkpoint.load_state(checkpoint.Checkpointer(RunDir(multi.run_dir).ckpt).latest())
    codes = draw_codes(4, 4, 2, "fixed", seed=1)
    assert np.array_equal(state["criterion"]["losses.0.codes"].numpy(), codes)  # the codes travel with the weights
    assert np.array_equal(np.load(export_codes(multi.run_dir)), codes)


# ----------------------------------------------------------------------------- the recipes


FULL = {"reir_car": 12, "reir_car_cropped": 12, "reir_cub_uncropped": 12, "reir_cub_cropped": 12,
        "reir_sop": 512, "reir_isc": 192}


def test_every_ensemble_experiment_agrees_with_its_loss():
    from imret.config import Experiments
    from imret.models.ensemble import check_ensemble_config

    exps = Experiments.load(ROOT / "experiments.yaml")
    ensembles = [n for n in exps.runnable() if exps.resolve(n).model.ensemble.branches]
    assert set(FULL) | {"reir_tiny"} <= set(ensembles)
    for name in ensembles:
        cfg = exps.resolve(name)
        ens = cfg.model.ensemble
        check_ensemble_config(cfg.model)
        (term,) = [t for t in cfg.loss.terms if t.name == "meta_ce"]
        assert (term.params["branches"], term.params["meta_class_size"], term.params.get("codes", "fixed")) == \
            (ens.branches, ens.meta_class_size, ens.codes), name


@pytest.mark.parametrize("name", sorted(FULL))
def test_dry_run_shows_the_seeds_settings_and_the_gpu_shape(name, capsys, tmp_path):
    from launch.submit import main

    assert main(["--exp", name, "--dry-run", "--cluster", "slurm", "--set", f"run.root={tmp_path}"]) == 0
    out = capsys.readouterr().out
    meta_classes = FULL[name]
    for text in ("model resnet18.tv_in1k pool=avg", f"embed_dim={48 * meta_classes}", "'branches': 48",
                 f"'meta_class_size': {meta_classes}", "'codes': 'fixed'", "optim adam lr=0.0001",
                 f"epochs {20 if meta_classes == 12 else 40}", "batch 16 (random",
                 "stage train [to run]: 1 node(s) x 8 task(s), 8 GPU(s) per node = 8 rank(s)",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8"):
        assert text in out, (name, text)
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_the_tiny_twin_runs_end_to_end(tiny_data, tmp_path):
    from launch.submit import main

    argv = ["--exp", "reir_tiny", "--cluster", "local", "--set", f"data.root={tiny_data}",
            "--set", f"run.root={tmp_path / 'runs'}"]
    assert main(argv) == 0
    run = tmp_path / "runs" / "reir_tiny"
    results = json.loads((run / "eval" / "results.json").read_text())
    for k in (1, 2, 4, 8):
        assert 0.0 <= results[f"recall@{k}"] <= 1.0
    assert results["recall@8"] >= results["recall@1"]
    parts = sorted((run / "features" / "query").glob("part-*.npy"))
    emb = np.concatenate([np.load(p) for p in parts])
    assert emb.shape[1] == 8 and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
