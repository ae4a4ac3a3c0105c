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

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def make_board(info: DistInfo, logdir: str | Path) -> Board:
    """A real board on rank 0, a null one on every other rank."""
    return TensorBoard(logdir) if info.is_main else NullBoard()
