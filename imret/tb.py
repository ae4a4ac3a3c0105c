"""TensorBoard writing, on rank 0 only, through a null object elsewhere.

The training and evaluation code calls ``board.scalar(...)`` unconditionally; on
ranks other than 0 the board is a ``NullBoard`` whose methods do nothing, so no
``if rank == 0`` branches are scattered through the loops.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from imret.distributed import DistInfo


class Board(Protocol):
    def scalar(self, tag: str, value: float, step: int) -> None: ...
    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None: ...
    def image(self, tag: str, image: np.ndarray, step: int) -> None: ...
    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None: ...
    def embedding(self, features: np.ndarray, labels: list[Any], images: np.ndarray | None, tag: str, step: int) -> None: ...
    def text(self, tag: str, text: str, step: int) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class NullBoard:
    """Accepts everything, writes nothing."""

    def scalar(self, tag: str, value: float, step: int) -> None:
        pass

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        pass

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        pass

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        pass

    def embedding(self, features: np.ndarray, labels: list[Any], images: np.ndarray | None, tag: str, step: int) -> None:
        pass

    def text(self, tag: str, text: str, step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoard:
    """A thin wrapper over torch's SummaryWriter, writing event files under ``logdir``."""

    def __init__(self, logdir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # late: pulls in tensorboard

        Path(logdir).mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(logdir))

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._writer.add_scalar(tag, float(value), global_step=step)

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        for tag, value in values.items():
            self.scalar(f"{prefix}{tag}", value, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """``image``: H x W x 3 uint8."""
        self._writer.add_image(tag, image, global_step=step, dataformats="HWC")

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        self._writer.add_hparams(clean, {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".")

    def embedding(self, features: np.ndarray, labels: list[Any], images: np.ndarray | None, tag: str, step: int) -> None:
        import torch

        label_img = None if images is None else torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        self._writer.add_embedding(features, metadata=labels, label_img=label_img, tag=tag, global_step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        self._writer.add_text(tag, text, global_step=step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def make_board(info: DistInfo, logdir: str | Path) -> Board:
    """A real board on rank 0, a null one on every other rank."""
    return TensorBoard(logdir) if info.is_main else NullBoard()


# ----------------------------------------------------------------------------- image grids (retrieval results)

CORRECT = (40, 170, 60)  # border of a result with the query's label
WRONG = (210, 40, 40)  # border of a result with another label
QUERY = (90, 90, 90)  # border of the query itself


def thumbnail(image: Any, size: int, border: tuple[int, int, int] | None = None, width: int = 3) -> np.ndarray:
    """A size x size x 3 uint8 tile of a PIL image or an H x W (x 3) array, with an optional border."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8))
    tile = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8).copy()
    if border is not None:
        tile[:width, :], tile[-width:, :], tile[:, :width], tile[:, -width:] = border, border, border, border
    return tile


def grid(rows: list[list[np.ndarray]], gap: int = 4, background: int = 255) -> np.ndarray:
    """Tiles (all the same size) laid out row by row on a background, H x W x 3 uint8."""
    if not rows or not any(rows):
        raise ValueError("an image grid needs at least one tile")
    h, w = next(t for r in rows for t in r).shape[:2]
    cols = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + gap) + gap, cols * (w + gap) + gap, 3), background, np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            y, x = gap + i * (h + gap), gap + j * (w + gap)
            out[y:y + h, x:x + w] = tile
    return out


def retrieval_rows(query_images: list[Any], result_images: list[list[Any]], correct: list[list[bool]],
                   size: int = 64) -> list[list[np.ndarray]]:
    """One row per query: the query (grey border), then its results (green: same label, red: not)."""
    rows = []
    for query, results, hits in zip(query_images, result_images, correct):
        row = [thumbnail(query, size, QUERY)]
        row += [thumbnail(img, size, CORRECT if hit else WRONG) for img, hit in zip(results, hits)]
        rows.append(row)
    return rows
