"""Image decoding for the loaders: JPEGs decoded at reduced size when the transform allows it.

iNaturalist and SOP images are several times larger than the 224-px crops that training
takes, and fully decoding an 800-px JPEG and then resampling it down costs more than the
rest of a sample's work together. libjpeg can decode a JPEG at 1/2, 1/4 or 1/8 of its size
by scaling its 8 x 8 DCT blocks (PIL's ``Image.draft``), which skips most of the inverse
DCT, the colour conversion and the resampling of pixels that would be thrown away.

``DecodeTransform`` wraps the timm transform built by ``imret.data.transforms`` and takes
a sample's encoded bytes:

- **Training** (timm's ``RandomResizedCropAndInterpolation`` first): the crop box is drawn
  by timm's own ``get_params`` on the image as opened, whose size comes from the JPEG
  header without decoding. The draws are the same RNG calls in the same order as the
  full-decode path, so a seed gives the same crop box in the original image's coordinates.
  The JPEG is then decoded at the largest DCT reduction that keeps the crop box at least
  as large as the output in both directions, the box is scaled to the reduced image
  (fractional coordinates, through ``Image.resize(box=...)``) and resampled to the output
  size with the transform's own interpolation.
- **Evaluation** (torchvision's shorter-side ``Resize`` first): the output size is
  computed from the original size exactly as ``Resize`` computes it, and the JPEG is
  decoded at the largest reduction that keeps the image at least that large.

Every later step (flip, AutoAugment, colour jitter, centre crop, ``ToTensor``,
normalisation) runs unchanged and draws from the RNGs as before. A sample is therefore
the same in distribution as with the full decode: the same crop box, the same flip and
the same normalisation. Only the resampling differs: a DCT-domain downscale followed by a
smaller resize, instead of one resize from the full image (tests/test_decode.py measures
the difference). Where no reduction applies (a PNG, a JPEG that is already small, a crop
smaller than twice the output size, a transform that does not start with a recognised
resize), the image is decoded in full and the transform's own first step runs on it, so
the output is bit-identical to the full-decode path.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from typing import Any

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile

# the reductions libjpeg applies by DCT scaling, largest first (PIL's draft also offers no others)
DCT_SCALES = (8, 4, 2)


def open_rgb(data: bytes) -> Image.Image:
    """Decode the whole image as RGB: the full-decode path."""
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def dct_scale(region: tuple[float, float], out: tuple[int, int]) -> int:
    """The largest DCT reduction s with ``region / s >= out`` in both directions (1: none).

    ``region`` and ``out`` are (width, height): the part of the original image that is used,
    and the size it is resampled to.
    """
    for s in DCT_SCALES:
        if region[0] / s >= out[0] and region[1] / s >= out[1]:
            return s
    return 1


def decode_reduced(img: Image.Image, scale: int) -> tuple[Image.Image, int]:
    """Decode an opened, not yet loaded image at 1/scale as RGB; return it and the scale applied.

    Only JPEGs (and MPOs, a JPEG subclass) can be reduced; anything else, or a JPEG whose
    decoder refuses the draft, is decoded in full and reported with scale 1, so the caller
    takes the full-size path.
    """
    if scale > 1 and isinstance(img, JpegImageFile):
        width, height = img.size
        # asking for (W // s, H // s) makes PIL choose exactly s (its rule is min(W // w, H // h))
        if img.draft("RGB", (width // scale, height // scale)) is not None:
            # the box arithmetic relies on exactly this size: pixel x of the reduced image is x / s
            assert img.size == (-(-width // scale), -(-height // scale)), (img.size, width, height, scale)
            img.load()
            return (img if img.mode == "RGB" else img.convert("RGB")), scale
    return img.convert("RGB"), 1


def shorter_side_size(size: tuple[int, int], target: int) -> tuple[int, int]:
    """(width, height) after resizing the shorter side to ``target``, as torchvision's Resize(int) does."""
    width, height = size
    if width <= height:
        return target, int(target * height / width)
    return int(target * width / height), target


class DecodeTransform:
    """Encoded image bytes -> tensor: ``transform``'s result, decoding JPEGs at reduced size where allowed.

    With ``reduced=False`` (or a transform whose first step is neither timm's random
    resized crop nor torchvision's shorter-side resize), every image is decoded in full and
    ``transform`` is applied to it unchanged. A PIL image may be passed instead of bytes;
    it gets ``transform`` unchanged.
    """

    def __init__(self, transform: Callable, reduced: bool = True) -> None:
        self.transform, self.reduced = transform, reduced
        steps = list(transform.transforms) if isinstance(transform, T.Compose) else []
        self.first: Any = steps[0] if steps and reduced and _reducible(steps[0]) else None
        self.rest = T.Compose(steps[1:]) if self.first is not None else transform

    def __call__(self, image: bytes | Image.Image) -> torch.Tensor:
        if isinstance(image, Image.Image):
            return self.transform(image)
        if self.first is None:
            return self.transform(open_rgb(image))
        return self.rest(self.first_step(image))

    def first_step(self, data: bytes) -> Image.Image:
        """The first step of the transform, from encoded bytes (decoding at reduced size where it can)."""
        with Image.open(io.BytesIO(data)) as img:
            if isinstance(self.first, T.Resize):
                return self._resize(img)
            return self._crop(img)

    def crop_plan(self, img: Image.Image) -> tuple[tuple[int, int, int, int], Any, int]:
        """Draw the crop box (top, left, height, width) and interpolation as timm does; pick the DCT scale.

        ``img`` needs only its size (an opened, undecoded image will do). The draws are
        timm's own ``get_params`` followed, for a random interpolation, by the same
        ``random.choice``: the RNG calls and their order are those of the full-decode path.
        """
        rrc = self.first
        top, left, height, width = rrc.get_params(img, rrc.scale, rrc.ratio)
        if isinstance(rrc.interpolation, (tuple, list)):
            interpolation = random.choice(rrc.interpolation)
        else:
            interpolation = rrc.interpolation
        out_h, out_w = rrc.size
        return (top, left, height, width), interpolation, dct_scale((width, height), (out_w, out_h))

    def _crop(self, img: Image.Image) -> Image.Image:
        (top, left, height, width), interpolation, scale = self.crop_plan(img)
        small, scale = decode_reduced(img, scale)
        if scale == 1:  # exactly what timm's RandomResizedCropAndInterpolation does after its draws
            return F.resized_crop(small, top, left, height, width, self.first.size, interpolation)
        box = (left / scale, top / scale, (left + width) / scale, (top + height) / scale)
        out_h, out_w = self.first.size
        return small.resize((out_w, out_h), F.pil_modes_mapping[interpolation], box=box)

    def _resize(self, img: Image.Image) -> Image.Image:
        resize = self.first
        target = resize.size if isinstance(resize.size, int) else resize.size[0]
        width, height = img.size  # the original size: a draft changes img.size
        out = shorter_side_size((width, height), target)
        small, scale = decode_reduced(img, dct_scale((width, height), out))
        if scale == 1:
            return resize(small)
        box = (0.0, 0.0, width / scale, height / scale)
        return small.resize(out, F.pil_modes_mapping[resize.interpolation], box=box)


def _reducible(step: Any) -> bool:
    """Whether the reduced decode knows ``step``: timm's random resized crop, or a plain shorter-side resize."""
    from timm.data.transforms import RandomResizedCropAndInterpolation

    if isinstance(step, RandomResizedCropAndInterpolation):
        return True
    if isinstance(step, T.Resize):
        single = isinstance(step.size, int) or len(step.size) == 1
        return single and step.max_size is None
    return False
