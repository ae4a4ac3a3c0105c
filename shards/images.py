"""Reading source images once, fully, and encoding them for a shard.

Every image is decoded completely once (``PIL.Image.load``) before it is written, so a
missing, unreadable or truncated file is found at conversion time, named, and handled
by the ``--on-bad-image`` policy (``shards.writer``) instead of failing a training job
weeks later. When nothing has to change, the original bytes are stored (no re-encoding:
exact fidelity and speed); a crop or a downscale is re-encoded as JPEG quality 95.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from shards.writer import BadImage, Sample

JPEG_QUALITY = 95
# formats stored as they are; PIL calls multi-picture JPEGs from cameras "MPO"
KEPT_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass(frozen=True)
class ImageItem:
    """One image file to store as a sample (picklable: sent to worker processes)."""

    path: str  # the file on disk
    key: str  # sample key (see shards.common.key_from_path)
    label: int
    meta: dict[str, Any] = field(default_factory=dict)  # the sample's json: "path", class facts, "bbox", ...
    crop: tuple[float, float, float, float] | None = None  # [x, y, w, h] in original pixels
    max_side: int | None = None  # downscale when the longer side exceeds this


def load_image(path: str | Path) -> tuple[bytes, Image.Image]:
    """The file's bytes and its fully decoded image; BadImage (naming the file) if either fails."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise BadImage(path, "file not found") from None
    except OSError as err:
        raise BadImage(path, f"cannot read the file ({err.strerror or err})") from None
    if not data:
        raise BadImage(path, "empty file")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decodes every pixel: finds truncated and corrupt data
    except UnidentifiedImageError:
        raise BadImage(path, "not an image file PIL can read (unknown format or corrupt header)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadImage(path, f"corrupt or truncated image ({err})") from None
    return data, image


def crop_box(bbox: tuple[float, float, float, float], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """[x, y, w, h] -> PIL box (left, top, right, bottom): rounded half up, clipped to the image."""
    x, y, w, h = bbox
    width, height = size
    left, top = max(0, math.floor(x + 0.5)), max(0, math.floor(y + 0.5))
    right, bottom = min(width, math.floor(x + w + 0.5)), min(height, math.floor(y + h + 0.5))
    return left, top, right, bottom


def scaled_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    scale = max_side / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def plain(image: Image.Image) -> Image.Image:
    """RGB or greyscale (palette, alpha, CMYK and 16-bit images become RGB), as JPEG can store."""
    return image if image.mode in ("RGB", "L") else image.convert("RGB")


def encode_bytes(image: Image.Image, fmt: str) -> bytes:
    image = plain(image)
    buf = io.BytesIO()
    if fmt == "jpg":
        image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


def encode_image(item: ImageItem) -> Sample:
    """Read, check and (when asked) crop or downscale one image file."""
    data, image = load_image(item.path)
    meta = dict(item.meta, image_size=list(image.size))
    changed = False
    if item.crop is not None:
        box = crop_box(item.crop, image.size)
        if box[2] <= box[0] or box[3] <= box[1]:
            raise BadImage(item.path, f"bounding box {list(item.crop)} lies outside the "
                                      f"{image.size[0]}x{image.size[1]} image")
        image, changed = plain(image).crop(box), True
        meta["crop_box"] = list(box)
    if item.max_side and max(image.size) > item.max_side:
        image, changed = plain(image).resize(scaled_size(image.size, item.max_side), Image.Resampling.LANCZOS), True
        meta["resized_to"] = list(image.size)
    if changed:
        return Sample(item.key, item.label, encode_bytes(image, "jpg"), "jpg", meta)
    if image.format in KEPT_FORMATS:
        return Sample(item.key, item.label, data, KEPT_FORMATS[image.format], meta)
    return Sample(item.key, item.label, encode_bytes(image, "png"), "png", meta)  # GIF, BMP, TIFF: lossless
