"""imret.tb: what the board writes on rank 0 (read back from the event files with TensorBoard's
EventAccumulator), that other ranks write nothing, and the retrieval image grids."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imret import tb
from imret.distributed import DistInfo


def read_back(logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


def written(board: tb.Board, logdir: Path):
    board.flush()
    board.close()
    return read_back(logdir)


def test_the_main_rank_gets_a_real_board_and_the_others_a_null_one(tmp_path):
    main = tb.make_board(DistInfo(rank=0, world_size=2), tmp_path / "main")
    other = tb.make_board(DistInfo(rank=1, world_size=2), tmp_path / "other")
    assert isinstance(main, tb.TensorBoard) and isinstance(other, tb.NullBoard)
    main.close()


def test_a_null_board_accepts_everything_and_writes_nothing(tmp_path):
    board = tb.make_board(DistInfo(rank=3, world_size=4), tmp_path / "tb")
    board.scalar("loss", 1.0, 1)
    board.scalars({"a": 1.0}, 1, prefix="x/")
    board.image("img", np.zeros((4, 4, 3), np.uint8), 1)
    board.text("note", "hello", 1)
    board.hparams({"lr": 0.1}, {"map": 0.5})
    board.embedding(np.zeros((2, 3), np.float32), [0, 1], None, "emb", 1)
    board.flush()
    board.close()
    assert not (tmp_path / "tb").exists()


def test_scalars_come_back_with_their_steps(tmp_path):
    board = tb.make_board(DistInfo(), tmp_path)
    for step, value in [(3, 0.5), (7, 0.25), (12, 0.125)]:
        board.scalar("train/loss", value, step)
    board.scalars({"recall@1": 0.75, "map": 0.5}, 12, prefix="eval/")
    acc = written(board, tmp_path)
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(3, 0.5), (7, 0.25), (12, 0.125)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/recall@1")] == [(12, 0.75)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/map")] == [(12, 0.5)]


def test_a_numpy_or_tensor_value_is_written_as_a_float(tmp_path):
    import torch

    board = tb.make_board(DistInfo(), tmp_path)
    board.scalar("a", np.float32(1.5), 1)
    board.scalar("b", torch.tensor(2.5), 1)
    acc = written(board, tmp_path)
    assert acc.Scalars("a")[0].value == 1.5 and acc.Scalars("b")[0].value == 2.5


def test_text_comes_back(tmp_path):
    board = tb.make_board(DistInfo(), tmp_path)
    board.text("config", "lr: 0.1\nbatch: 32", 4)
    acc = written(board, tmp_path)
    [event] = acc.Tensors("config/text_summary")
    assert event.step == 4
    assert event.tensor_proto.string_val[0].decode() == "lr: 0.1\nbatch: 32"


def test_an_image_comes_back_pixel_for_pixel(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(6, 10, 3), dtype=np.uint8)  # H x W x 3, not square: the layout shows
    board = tb.make_board(DistInfo(), tmp_path)
    board.image("retrieval", image, 9)
    acc = written(board, tmp_path)
    [event] = acc.Images("retrieval")
    assert (event.step, event.height, event.width) == (9, 6, 10)
    decoded = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    assert np.array_equal(decoded, image)


def test_hparams_write_their_metrics_beside_the_run(tmp_path):
    board = tb.make_board(DistInfo(), tmp_path)
    board.hparams({"lr": 0.1, "loss": ["a", "b"]}, {"map": 0.625})
    acc = written(board, tmp_path)
    assert [e.value for e in acc.Scalars("hparam/map")] == [0.625]


def test_an_embedding_writes_the_projector_files(tmp_path):
    features = np.arange(12, dtype=np.float32).reshape(4, 3)
    board = tb.make_board(DistInfo(), tmp_path)
    board.embedding(features, [7, 7, 8, 9], None, "query", 5)
    board.close()
    assert "query" in (tmp_path / "projector_config.pbtxt").read_text()
    [tensors] = list(tmp_path.glob("**/tensors.tsv"))
    rows = [[float(x) for x in line.split("\t")] for line in tensors.read_text().splitlines()]
    assert np.array_equal(np.array(rows, np.float32), features)
    assert (tensors.parent / "metadata.tsv").read_text().split() == ["7", "7", "8", "9"]


def test_thumbnail_size_and_border():
    image = np.full((20, 30, 3), 128, np.uint8)
    tile = tb.thumbnail(image, 16, tb.CORRECT, width=2)
    assert tile.shape == (16, 16, 3) and tile.dtype == np.uint8
    for edge in (tile[0], tile[-1], tile[:, 0], tile[:, -1], tile[1], tile[:, 1]):
        assert (edge == tb.CORRECT).all()
    assert (tile[2:-2, 2:-2] == 128).all()  # the inside is the image
    assert (tb.thumbnail(np.zeros((5, 5), np.uint8), 8) == 0).all()  # grey H x W is made RGB


def test_grid_places_every_tile_on_the_background():
    a, b, c = (np.full((4, 4, 3), v, np.uint8) for v in (10, 20, 30))
    out = tb.grid([[a, b], [c]], gap=2, background=255)
    assert out.shape == (2 * (4 + 2) + 2, 2 * (4 + 2) + 2, 3)
    assert (out[2:6, 2:6] == 10).all() and (out[2:6, 8:12] == 20).all() and (out[8:12, 2:6] == 30).all()
    assert (out[8:12, 8:12] == 255).all()  # the short row's missing tile is background
    assert (out[:2] == 255).all() and (out[:, 6:8] == 255).all()


def test_an_empty_grid_is_an_error():
    with pytest.raises(ValueError, match="at least one tile"):
        tb.grid([])
    with pytest.raises(ValueError, match="at least one tile"):
        tb.grid([[], []])


def test_retrieval_rows_colour_results_by_their_label():
    query = np.zeros((8, 8, 3), np.uint8)
    results = [np.zeros((8, 8, 3), np.uint8)] * 3
    [row] = tb.retrieval_rows([query], [results], [[True, False, True]], size=12)
    assert len(row) == 4
    corners = [tuple(tile[0, 0]) for tile in row]
    assert corners == [tb.QUERY, tb.CORRECT, tb.WRONG, tb.CORRECT]
