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


KILLED_WRITER = """
import os, signal, sys
sys.path.insert(0, {root!r})
from common import io
with io.atomic_path({dest!r}) as tmp:
    tmp.write_bytes(b"half a checkpoint")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_temporaries_of_a_killed_writer_are_removed_at_the_next_start(tmp_path):
    import subprocess
    import sys

    from common.config import ROOT

    data, raw = tmp_path / "data", tmp_path / "data" / "raw"
    dest = data / "models" / "m" / "last.pt"
    out = subprocess.run([sys.executable, "-c", KILLED_WRITER.format(root=str(ROOT), dest=str(dest))])
    assert out.returncode == -9
    (left,) = list(dest.parent.iterdir())
    assert left.name.startswith(".last.pt.part-") and left.suffix == ".pt"
    assert io.temp_writer_pid(left.name) is not None and not dest.exists()
    (raw / "train").mkdir(parents=True)
    planted = raw / "train" / left.name  # RAW is never touched, whatever its files are called
    planted.write_bytes(b"x")
    with io.atomic_path(data / "live.csv") as tmp:  # a live writer's temporary stays
        assert io.prepare_data_dir(data, raw) == [left]
        assert tmp.exists()
    assert list(dest.parent.iterdir()) == [] and planted.exists()


def test_atomic_dir_swaps_a_whole_folder_or_keeps_the_old_one(tmp_path):
    dest = tmp_path / "dataset"
    with io.atomic_dir(dest) as d:
        (d / "a.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with io.atomic_dir(dest) as d:
            (d / "b.txt").write_text("2")
            raise RuntimeError("killed")
    assert [p.name for p in tmp_path.iterdir()] == ["dataset"] and [p.name for p in dest.iterdir()] == ["a.txt"]
    with io.atomic_dir(dest) as d:
        (d / "c.txt").write_text("3")
    assert [p.name for p in dest.iterdir()] == ["c.txt"] and [p.name for p in tmp_path.iterdir()] == ["dataset"]


def test_unusable_data_folder_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(io.DataDirError, match="is not a folder"):
        io.prepare_data_dir(tmp_path / "file" / "data")
    with pytest.raises(io.DataDirError, match="inside the raw folder"):
        io.prepare_data_dir(tmp_path / "raw" / "data", tmp_path / "raw")
    assert io.prepare_data_dir(tmp_path / "new" / "data") == [] and not (tmp_path / "new").exists()
