"""Reduced-size JPEG decoding (imret.data.decode): same draws, close pixels, old path where it cannot apply."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image, ImageDraw

from imret.config import DataConfig
from imret.data.decode import DecodeTransform, dct_scale, open_rgb, shorter_side_size
from imret.data.loader import EvalSet, MultiSplit, TrainData, TrainSet, seeded
from imret.data.shards import ShardError, ShardSplit
from imret.data.transforms import eval_transform, train_transform
from imret.distributed import DistInfo
from shards.writer import Sample, SplitSource, write_split
from tests.helpers import run_ranks
from tests.test_loader import batches_of_rank, global_batches
from tests.test_train import tiny_config

CFG = DataConfig(image_size=224, augment="crop_flip")


def photo(width: int, height: int, seed: int, quality: int = 90, mode: str = "RGB") -> bytes:
    """A JPEG with what resampling can get wrong: smooth colour, hard edges, fine texture and noise."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, size=(6, 8, 3), dtype=np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x, y, r = int(rng.integers(0, width)), int(rng.integers(0, height)), int(rng.integers(10, width // 4))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    for _ in range(10):
        ends = [(int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(2)]
        draw.line(ends, fill=tuple(int(c) for c in rng.integers(0, 255, 3)), width=int(rng.integers(1, 6)))
    pixels = np.asarray(img, dtype=np.float64)
    yy, xx = np.mgrid[0:height, 0:width]
    pixels += 10 * np.sin(xx / 3.0 + yy / 5.0)[..., None] + rng.normal(0, 4, size=pixels.shape)
    out = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png(width: int, height: int, seed: int) -> bytes:
    buf = io.BytesIO()
    open_rgb(photo(width, height, seed)).save(buf, format="PNG")
    return buf.getvalue()


def full_decode(transform, data: bytes, seed: int) -> torch.Tensor:
    """Today's path: decode everything, then the timm transform under the sample's seed."""
    with seeded(seed):
        return transform(open_rgb(data))


def reduced(transform, data: bytes, seed: int) -> torch.Tensor:
    with seeded(seed):
        return DecodeTransform(transform)(data)


def to_pixels(tensor: torch.Tensor, transform) -> torch.Tensor:
    """Undo the normalisation: 0..255 grey levels."""
    norm = transform.transforms[-1]
    return (tensor * norm.std.view(3, 1, 1) + norm.mean.view(3, 1, 1)) * 255


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a - b) ** 2).mean().item()
    return 10 * math.log10(255**2 / mse) if mse > 0 else math.inf


def rng_states() -> tuple:
    return random.getstate(), torch.get_rng_state().numpy().tobytes()


def test_crop_box_and_draws_equal_the_full_decode():
    """(a) The box is drawn on the header's size by the same RNG calls, in the same order."""
    transform = train_transform(DataConfig(image_size=224, augment="autoaugment", crop_scale=[0.08, 1.0]), "resnet50")
    rrc = transform.transforms[0]
    decode = DecodeTransform(transform)
    for seed in range(40):
        data = photo(800, [600, 800, 450][seed % 3], seed)
        with seeded(seed), Image.open(io.BytesIO(data)) as header_only:
            box, _, _ = decode.crop_plan(header_only)
            after_plan = rng_states()
        with seeded(seed):
            assert rrc.get_params(open_rgb(data), rrc.scale, rrc.ratio) == box
            assert rng_states() == after_plan
        # every later draw (flip, AutoAugment, colour jitter) happens as well, and in the same order
        with seeded(seed):
            decode(data)
            after_new = rng_states()
        with seeded(seed):
            transform(open_rgb(data))
            assert rng_states() == after_new


@pytest.mark.parametrize("kind", ["train", "eval"])
def test_reduced_decode_is_close_to_the_full_decode(kind):
    """(b) Only the resampling differs: measured against today's output on 800-px JPEGs.

    On these images (hard edges, texture, noise) the last measurement gave, for training
    crops, PSNR min 37.2 / median 41.6 dB and mean absolute difference at most 1.45 grey
    levels; for evaluation, 38.5 / 42.4 dB and 1.29. For scale: resampling the same crops
    bilinear instead of bicubic, both from the full image, differs by 41.0 / 42.9 dB. The
    bounds leave 2-3 dB for other libjpeg builds. A wrong box, a missed flip or a shift by
    a pixel or two gives 10-25 dB.
    """
    make = train_transform if kind == "train" else eval_transform
    transform = make(CFG, "resnet50")
    scores, diffs, scales = [], [], []
    for seed in range(24):
        data = photo(800, 600 if seed % 2 else 800, seed)
        old, new = full_decode(transform, data, seed), reduced(transform, data, seed)
        assert new.shape == old.shape == (3, 224, 224)
        a, b = to_pixels(old, transform), to_pixels(new, transform)
        scores.append(psnr(a, b))
        diffs.append((a - b).abs().mean().item())
        if kind == "train":
            with seeded(seed), Image.open(io.BytesIO(data)) as img:
                scales.append(DecodeTransform(transform).crop_plan(img)[2])
    assert min(scores) > 35.0 and float(np.median(scores)) > 39.5, scores
    assert max(diffs) < 2.0, diffs
    if kind == "train":  # the reduced path really ran (crop_scale 0.5-1: most crops are >= 448 px)
        assert sum(s >= 2 for s in scales) >= 18, scales


def test_grayscale_and_cmyk_jpegs_are_reduced_as_rgb():
    transform = train_transform(CFG, "resnet50")
    for mode in ("L", "CMYK"):
        data = photo(800, 800, 7, mode=mode)
        old, new = full_decode(transform, data, 1), reduced(transform, data, 1)
        assert psnr(to_pixels(old, transform), to_pixels(new, transform)) > 35.0


def test_old_path_is_bit_identical_where_no_reduction_applies():
    """(c) PNGs, small JPEGs, and crops under twice the output size: exactly today's tensors."""
    train, evaluate = train_transform(CFG, "resnet50"), eval_transform(CFG, "resnet50")
    cases = [png(800, 600, 1), photo(300, 200, 2), photo(420, 420, 3), photo(224, 224, 4)]
    for data in cases:
        for seed in range(6):
            assert torch.equal(reduced(train, data, seed), full_decode(train, data, seed))
        assert torch.equal(reduced(evaluate, data, 0), full_decode(evaluate, data, 0))
    # a large JPEG whose drawn crop is too small to reduce (crop_scale 0.1: most boxes are < 448 px)
    small_crops = train_transform(DataConfig(image_size=224, crop_scale=[0.1, 0.15]), "resnet50")
    data = photo(800, 600, 5)
    for seed in range(6):
        with seeded(seed), Image.open(io.BytesIO(data)) as img:
            assert DecodeTransform(small_crops).crop_plan(img)[2] == 1
        assert torch.equal(reduced(small_crops, data, seed), full_decode(small_crops, data, seed))


def test_switched_off_or_unknown_first_step_decodes_in_full():
    data = photo(800, 600, 6)
    train = train_transform(CFG, "resnet50")
    with seeded(3):
        off = DecodeTransform(train, reduced=False)(data)
    assert torch.equal(off, full_decode(train, data, 3))
    squash = T.Compose([T.Resize((100, 50)), T.ToTensor()])  # not a shorter-side resize: left alone
    assert torch.equal(DecodeTransform(squash)(data), squash(open_rgb(data)))


def test_scale_rules_match_torchvision():
    assert dct_scale((900, 1000), (224, 224)) == 4 and dct_scale((447, 900), (224, 224)) == 1
    assert dct_scale((448, 448), (224, 224)) == 2 and dct_scale((4000, 3000), (224, 224)) == 8
    for size in [(800, 600), (600, 800), (333, 1000), (1000, 1000), (801, 599)]:
        assert shorter_side_size(size, 235) == T.Resize(235)(Image.new("L", size)).size


def jpeg_sample(item: tuple[str, int, bytes]) -> Sample:
    key, label, data = item
    return Sample(key=key, label=label, image=data, ext="jpg")


def write_jpegs(root, split: str, items: list[tuple[str, int, bytes]], classes: int, shard_bytes: int) -> None:
    source = SplitSource(split, [str(c) for c in range(classes)], items, jpeg_sample, {"source": "test"})
    write_split(source, root, dataset="tiny-jpeg", converter_version=1, shard_bytes=shard_bytes, progress=False)


def test_datasets_reduce_jpegs_and_keep_pngs_exact(tmp_path):
    """TrainSet and EvalSet go through the reduced decode; a PNG sample is bit-identical to today."""
    items = [(f"k{i:02d}", i % 2, photo(900, 700, i) if i % 3 else png(640, 480, i)) for i in range(6)]
    write_jpegs(tmp_path, "train", items, 2, shard_bytes=1 << 30)
    split = ShardSplit(tmp_path, "train")
    train, evaluate = train_transform(CFG, "resnet50"), eval_transform(CFG, "resnet50")
    trainset = TrainSet(MultiSplit([split]), split.labels, train)
    evalset = EvalSet(split, evaluate)
    for i, (_, _, data) in enumerate(items):
        new = trainset[(i, 100 + i)][0]
        old = full_decode(train, data, 100 + i)
        if i % 3 == 0:  # PNG
            assert torch.equal(new, old) and torch.equal(evalset[i][0], full_decode(evaluate, data, 0))
        else:  # 900 x 700 with crop_scale 0.5-1: every box is >= 448 px, so reduced and not identical
            assert not torch.equal(new, old) and psnr(to_pixels(new, train), to_pixels(old, train)) > 35.0
    plain = TrainSet(MultiSplit([split]), split.labels, train, reduced_decode=False)
    assert torch.equal(plain[(1, 7)][0], full_decode(train, items[1][2], 7))


def test_truncated_jpeg_is_named(tmp_path):
    data = photo(640, 480, 0)
    write_jpegs(tmp_path, "train", [("good", 0, data), ("cut", 0, data[: len(data) // 2])], 1, 1 << 30)
    split = ShardSplit(tmp_path, "train")
    trainset = TrainSet(MultiSplit([split]), split.labels, train_transform(CFG, "resnet50"))
    for seed in range(3):  # whether or not the crop allows a reduced decode
        with pytest.raises(ShardError, match=r"train-000000.tar.*sample cut.*cannot be decoded"):
            trainset[(1, seed)]


def test_reduced_decode_is_deterministic_across_workers_and_ranks(tmp_path):
    """(d) Each sample's augmentation is seeded by its position: workers and ranks do not change a pixel."""
    items = [(f"c{c}_{i}", c, photo(200, 150, 10 * c + i, quality=85)) for c in range(4) for i in range(6)]
    write_jpegs(tmp_path / "d", "train", items, 4, shard_bytes=40_000)
    cfg = tiny_config(tmp_path / "d", tmp_path, "jpeg", data__batch_size=8, data__samples_per_class=2,
                      data__num_workers=2)
    in_process = tiny_config(tmp_path / "d", tmp_path, "jpeg", data__batch_size=8, data__samples_per_class=2)
    single = global_batches([batches_of_rank(DistInfo(), in_process, 1)])
    assert global_batches([batches_of_rank(DistInfo(), cfg, 1)]) == single
    assert global_batches(run_ranks(batches_of_rank, 2, cfg, 1)) == single
    # the 32-px crops of these 200 x 150 JPEGs were really decoded at reduced size
    decode = TrainData(cfg, DistInfo()).loader.dataset.transform
    scales = []
    for seed in range(20):
        with seeded(seed), Image.open(io.BytesIO(items[seed][2])) as img:
            scales.append(decode.crop_plan(img)[2])
    assert min(scales) >= 2, scales
