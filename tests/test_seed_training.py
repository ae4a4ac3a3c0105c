"""The training settings the seeds need: frozen BatchNorm statistics with a trained affine, frozen blocks,
weight decay on every parameter, the loss in float32 under autocast, the PSS AMS head, MultiStep milestones
by epoch, the PSS transforms, classifiers sized by the recipe, and iteration k from the pretrained weights."""

from __future__ import annotations


import pytest
import torch

from imret.config import ConfigError, DataConfig, ModelConfig, OptimConfig, ScheduleConfig
from imret.distributed import DistInfo
from imret.rundir import RunDir
from tests.test_train import tiny_config


def one_sgd_step(model: torch.nn.Module, images: torch.Tensor) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(images).sum().backward()
    opt.step()


def test_frozen_stats_keeps_running_statistics_and_trains_the_affine():
    from imret.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="test_resnet", embed_dim=8, batchnorm="frozen_stats"))
    bn = model.backbone.bn1
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    one_sgd_step(model, torch.rand(4, 3, 32, 32))
    assert not bn.training and bn.weight.requires_grad
    assert torch.equal(bn.running_mean, before["running_mean"]) and torch.equal(bn.running_var, before["running_var"])
    assert not torch.equal(bn.weight, before["weight"]) and not torch.equal(bn.bias, before["bias"])
    frozen = build_model(ModelConfig(backbone="test_resnet", embed_dim=8, batchnorm="frozen"))
    assert not frozen.backbone.bn1.weight.requires_grad  # "frozen" also freezes the affine


def test_freeze_by_name_and_range():
    from imret.models import build_model
    from imret.train import param_groups

    model = build_model(ModelConfig(backbone="test_vit", embed_dim=0, pool="token", freeze=["patch_embed", "blocks.0-4"]))
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert all(n.startswith(("blocks.5.", "norm.", "cls_token", "pos_embed", "reg_token")) for n in trainable)
    assert {"cls_token", "pos_embed", "blocks.5.attn.qkv.weight", "norm.weight"} <= trainable
    before = model.backbone.blocks[0].attn.qkv.weight.clone()
    one_sgd_step(model, torch.rand(2, 3, 32, 32))
    assert torch.equal(model.backbone.blocks[0].attn.qkv.weight, before)
    grouped = {id(p) for g in param_groups(model, torch.nn.Module(), OptimConfig()) for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}


def test_a_frozen_name_that_matches_nothing_is_refused_before_submitting(tmp_path):
    from imret import checks

    cfg = tiny_config(tmp_path, tmp_path, "x", model__backbone="test_vit", model__pool="token",
                      model__freeze=["blocks.0-9"])
    with pytest.raises(ConfigError, match="no module or parameter 'blocks.6'"):
        checks.check(cfg)
    with pytest.raises(ConfigError, match="model.freeze: 'blocks.0-' is not a module name"):
        tiny_config(tmp_path, tmp_path, "x", model__freeze=["blocks.0-"])


def test_decay_1d_puts_every_parameter_under_weight_decay():
    from imret.models import build_model
    from imret.train import param_groups

    model = build_model(ModelConfig(backbone="test_resnet", embed_dim=8))
    default = param_groups(model, torch.nn.Module(), OptimConfig(weight_decay=1e-3))
    assert {g["name"]: g["weight_decay"] for g in default}["backbone_no_decay"] == 0.0
    every = param_groups(model, torch.nn.Module(), OptimConfig(weight_decay=1e-3, decay_1d=True))
    assert all(g["weight_decay"] == 1e-3 for g in every) and not any("no_decay" in g["name"] for g in every)
    assert sum(len(g["params"]) for g in every) == sum(len(g["params"]) for g in default)


def test_the_loss_runs_in_float32_under_autocast():
    from imret.losses import build_criterion
    from imret.config import LossTerm
    from imret.train import Trainee

    class Fixed(torch.nn.Module):  # a "network" whose embeddings are given
        embed_dim = 16

        def __init__(self, emb: torch.Tensor) -> None:
            super().__init__()
            self.emb = emb

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.emb

    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(12, 16), dim=1)
    labels = torch.arange(12) // 3
    criterion = build_criterion([LossTerm(name="smooth_ap", params={"temperature": 0.01})], 16, 4)
    exact = criterion(emb, labels)[0]
    results = {}
    for fp32 in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[fp32] = Trainee(Fixed(emb), criterion, DistInfo(), loss_fp32=fp32)(emb, labels)[0]
    assert results[True].dtype == torch.float32 and results[True].item() == pytest.approx(exact.item(), abs=1e-7)
    assert abs(results[False].item() - exact.item()) > 1e-4  # bfloat16 similarities: visibly another loss


def test_ams_on_a_linear_head_is_the_seeds_formula():
    from imret.losses.classifier import AMSoftmaxLoss

    torch.manual_seed(0)
    loss = AMSoftmaxLoss(embed_dim=8, num_classes=5, margin=0.3, scale=30.0, cosine=False)
    head = loss.heads[0]
    assert isinstance(head, torch.nn.Linear) and head.bias is not None
    emb = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    logits = emb @ head.weight.T + head.bias
    expected = torch.nn.functional.cross_entropy(30.0 * (logits - 0.3 * torch.nn.functional.one_hot(labels, 5)), labels)
    assert loss(emb, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_multistep_decays_from_the_milestone_epoch_as_torch_multisteplr():
    """PSS steps MultiStepLR([40, 70], 0.3) after each epoch: 0-based epoch 40 is the first at lr x 0.3."""
    from imret.train import lr_factor

    sched = ScheduleConfig(name="multistep", milestones=[40, 70], gamma=0.3)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=1.0)
    reference = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[40, 70], gamma=0.3)
    steps = 55  # a PSS epoch on L_in; the factor is read at every step's fractional epoch
    for epoch in range(100):
        torch_lr = opt.param_groups[0]["lr"]
        ours = {lr_factor(sched, (epoch * steps + s) / steps, 400, 1.0) for s in range(steps)}
        assert len(ours) == 1 and ours.pop() == pytest.approx(torch_lr, rel=1e-12), epoch
        opt.step()
        reference.step()


def test_the_pss_transforms():
    from imret.data.transforms import eval_transform, train_transform

    pss = DataConfig(image_size=224, crop_scale=[0.08, 1.0], interpolation="bilinear", eval_resize=256)
    ev = eval_transform(pss, "resnet50.tv_in1k").transforms
    assert (ev[0].size, ev[0].interpolation.value, ev[1].size) == (256, "bilinear", (224, 224))
    crop = train_transform(pss, "resnet50.tv_in1k").transforms[0]
    assert crop.scale == (0.08, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    vit = eval_transform(DataConfig(image_size=227, eval_resize=256, interpolation="bilinear"),
                         "vit_base_patch16_224.dino").transforms
    assert (vit[0].size, vit[0].interpolation.value, vit[1].size) == (256, "bilinear", (227, 227))
    # without overrides the weights' tag decides: tv_in1k is bilinear with crop 0.875 (256 -> 224)
    tagged = eval_transform(DataConfig(image_size=224), "resnet50.tv_in1k").transforms
    assert (tagged[0].size, tagged[0].interpolation.value) == (256, "bilinear")
    whole = eval_transform(DataConfig(image_size=224, eval_crop_pct=1.0), "resnet50").transforms
    assert whole[0].size == 224 and whole[1].size == (224, 224)


def test_a_classifier_too_small_for_the_pseudo_classes_names_the_fix(tiny_data, tmp_path):
    from imret import train

    cfg = tiny_config(tiny_data, tmp_path, "small", loss__terms=[{"name": "ams", "params": {"num_classes": 3,
                                                                                           "cosine": False}}])
    with pytest.raises(ValueError, match=r"num_classes=3, but the training labels need 4.*"
                                         r"--set loss.terms.0.params.num_classes=4"):
        train.Training(cfg, RunDir(cfg.run_dir), DistInfo())


def test_iteration_k_can_start_from_the_pretrained_weights(tiny_data, tmp_path):
    from imret import train
    from imret.models.weights import write_weights

    import timm

    torch.manual_seed(5)
    state = timm.create_model("test_resnet", pretrained=False).state_dict()
    write_weights(state, "test_resnet.r160_in1k", tmp_path / "cache", "test")
    shared = dict(model__backbone="test_resnet.r160_in1k", model__pretrained=True,
                  model__weights_dir=str(tmp_path / "cache"), model__pool="avg")
    first = tiny_config(tiny_data, tmp_path, "iter0", train__epochs=1, **shared)
    train.train_stage(first, RunDir(first.run_dir), DistInfo())
    again = train.Training(tiny_config(tiny_data, tmp_path, "iter1", train__init_from="pretrained", **shared),
                           RunDir(tmp_path / "iter1"), DistInfo())
    assert torch.equal(again.model.backbone.state_dict()["conv1.0.weight"], state["conv1.0.weight"])
    from imret.extract import load_model

    init = tiny_config(tiny_data, tmp_path, "iter1", train__init_from="pretrained", extract__checkpoint="init", **shared)
    extracted, _ = load_model(init, RunDir(tmp_path / "iter1"), torch.device("cpu"))
    assert torch.equal(extracted.backbone.state_dict()["conv1.0.weight"], state["conv1.0.weight"])
    previous = train.Training(tiny_config(tiny_data, tmp_path, "iter1b", train__init_from="iter0", **shared),
                              RunDir(tmp_path / "iter1b"), DistInfo())
    assert not torch.equal(previous.model.backbone.state_dict()["conv1.0.weight"], state["conv1.0.weight"])
    with pytest.raises(ConfigError, match="train.init_from=pretrained .* none are set"):
        tiny_config(tiny_data, tmp_path, "x", train__init_from="pretrained")


def test_print_config_shows_the_pss_settings(tmp_path, capsys):
    import yaml

    from launch.submit import main as submit

    assert submit(["--exp", "inat_smoothap_iter0", "--print-config", "--set", f"run.root={tmp_path}/runs"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["backbone"] == "resnet50.tv_in1k" and cfg["model"]["pretrained"] is True
    assert cfg["schedule"] == {**cfg["schedule"], "name": "multistep", "milestones": [40, 70], "gamma": 0.3}
    assert cfg["model"]["pool"] == "avg" and cfg["model"]["batchnorm"] == "frozen_stats"
    assert cfg["train"]["validation"]["metric"] == "recall@1" and cfg["extract"]["checkpoint"] == "best"
    assert cfg["data"]["crop_scale"] == [0.08, 1.0] and cfg["optim"]["decay_1d"] is True
    assert not (tmp_path / "runs").exists()


def test_the_projection_head_is_gem_then_linear_then_l2():
    """CIFAR's seed: GeM features -> Linear(C, C) with bias -> divided by their norm (embed_dim = C)."""
    from imret.models import build_model

    torch.manual_seed(0)
    probe = build_model(ModelConfig(backbone="test_resnet", embed_dim=0, pool="gem"))
    dim = probe.feature_dim
    model = build_model(ModelConfig(backbone="test_resnet", embed_dim=dim, pool="gem")).eval()
    assert isinstance(model.head, torch.nn.Linear) and model.head.bias is not None and model.head.in_features == dim
    images = torch.rand(3, 3, 32, 32)
    projected = model.head(model.pooled(images))
    expected = projected / (projected.norm(dim=1, keepdim=True) + 1e-7)  # the seed's normalisation
    assert torch.allclose(model(images), expected, atol=1e-6)


def test_the_resize_first_pipelines_of_reir_and_cbir():
    from PIL import Image

    from imret.data.loader import seeded
    from imret.data.transforms import eval_transform, train_transform

    reir = DataConfig(image_size=256, augment="resize_random_crop_flip", eval_crop_pct=1.0, interpolation="bilinear")
    steps = [type(t).__name__ for t in train_transform(reir, "resnet18.tv_in1k").transforms]
    assert steps == ["Resize", "RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    cbir = DataConfig(image_size=224, augment="resize_random_crop", resize="squash", eval_resize=256)
    first, crop = train_transform(cbir, "resnet50.tv_in1k").transforms[:2]
    assert first.size == (256, 256) and crop.size == (224, 224)
    assert [type(t).__name__ for t in train_transform(cbir, "resnet50.tv_in1k").transforms][2] == "ToTensor"
    # squash: a 40 x 20 image becomes square, its left half (dark) still the left half
    pixels = torch.zeros(20, 40, 3, dtype=torch.uint8)
    pixels[:, 20:] = 255
    image = Image.fromarray(pixels.numpy())
    squashed = eval_transform(DataConfig(image_size=32, resize="squash", eval_crop_pct=1.0, mean=[0, 0, 0],
                                         std=[1, 1, 1]), "resnet18")(image)
    assert squashed.shape == (3, 32, 32) and squashed[:, :, :14].max() < 0.1 and squashed[:, :, 18:].min() > 0.9
    with seeded(3):
        a = train_transform(cbir, "resnet50.tv_in1k")(image)
    with seeded(3):
        b = train_transform(cbir, "resnet50.tv_in1k")(image)
    assert torch.equal(a, b)  # the random crop draws from the per-sample seeded RNGs


def test_keras_style_head_batchnorm_and_adam_settings():
    from imret.models import build_model
    from imret.train import build_optimizer, param_groups

    model = build_model(ModelConfig(backbone="test_resnet", embed_dim=8, head_init="orthogonal", bn_momentum=0.01))
    weight = model.head.weight
    assert torch.allclose(weight @ weight.T, torch.eye(8), atol=1e-5) and not model.head.bias.any()
    momenta = {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert momenta == {0.01}
    optim = OptimConfig(name="adam", eps=1e-7)
    opt = build_optimizer(param_groups(model, torch.nn.Module(), optim), optim)
    assert {g["eps"] for g in opt.param_groups} == {1e-7}
    with pytest.raises(ConfigError, match="head_init=orthogonal .* model.embed_dim is 0"):
        tiny_config("/x", "/x", "x", model__embed_dim=0, model__head_init="orthogonal")


def test_the_loss_scaler_is_checkpointed_and_a_no_op_without_fp16(tiny_data, tmp_path):
    """fp16 needs loss scaling (the sketch seed's AMP has it); elsewhere the scaler must change nothing."""
    from imret import checkpoint, train

    runs = tmp_path / "runs"
    cfg = tiny_config(tiny_data, runs, "scaler", train__amp="fp16", train__epochs=1)
    assert not train.Training(cfg, RunDir(cfg.run_dir), DistInfo()).scaler.is_enabled()  # a GPU-only scaler
    train.train_stage(cfg, RunDir(cfg.run_dir), DistInfo())
    plain = tiny_config(tiny_data, runs, "plain", train__amp="off", train__epochs=1)
    train.train_stage(plain, RunDir(plain.run_dir), DistInfo())
    states = [checkpoint.load_state(checkpoint.Checkpointer(RunDir(c.run_dir).ckpt).latest()) for c in (cfg, plain)]
    assert states[0]["scaler"] == {} == states[1]["scaler"]
    for key, value in states[0]["model"].items():
        assert torch.equal(value, states[1]["model"][key]), key
