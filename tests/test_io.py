"""Atomic writes and image reading."""
import cv2
import numpy as np
import pandas as pd
import pytest

from common import io


def test_atomic_path_leaves_nothing_when_the_writer_fails(tmp_path):
    dest = tmp_path / "sub" / "out.csv"
    with pytest.raises(RuntimeError):
        with io.atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def test_atomic_write_replaces_old_content(tmp_path):
    dest = tmp_path / "a.json"
    io.write_json(dest, {"a": np.int64(1), "b": np.float32(0.5), "c": np.arange(2)})
    io.write_json(dest, {"a": 2})
    assert io.read_json(dest) == {"a": 2}
    io.write_csv(tmp_path / "t.csv", pd.DataFrame({"x": [1, 2]}))
    assert pd.read_csv(tmp_path / "t.csv")["x"].tolist() == [1, 2]


def test_read_image_rgb_and_clear_errors(tmp_path):
    img = np.zeros((20, 30, 3), np.uint8)
    img[..., 2] = 255  # red in BGR
    good = tmp_path / "good.jpg"
    cv2.imwrite(str(good), img)
    out = io.read_image(good)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    assert out[..., 0].mean() > 200 and out[..., 2].mean() < 50  # RGB order
    assert io.image_size(good) == (30, 20)

    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(io.ImageReadError, match="trunc.jpg.*truncated"):
        io.read_image(trunc)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(io.ImageReadError, match="junk.png"):
        io.read_image(junk)
    with pytest.raises(io.ImageReadError, match="missing.jpg"):
        io.read_image(tmp_path / "missing.jpg")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(io.ImageReadError, match="empty"):
        io.read_image(empty)
