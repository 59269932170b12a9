"""Atomic artifact writing and small I/O helpers.

Every artifact is written to a temporary file next to its destination and renamed into place,
so a stage killed half-way never leaves a half-written file that a later stage would trust.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import PipelineError


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in dest's folder; on success rename it onto dest.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_path(d / "a.txt") as tmp:
    ...     _ = tmp.write_text("hi")
    >>> (d / "a.txt").read_text(), sorted(p.name for p in d.iterdir())
    ('hi', ['a.txt'])
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=dest.suffix or ".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts get normal permissions
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(dest, text: str) -> Path:
    with atomic_path(dest) as tmp:
        tmp.write_text(text)
    return Path(dest)


def write_json(dest, obj: Any) -> Path:
    return write_text(dest, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path) -> Any:
    return json.loads(Path(path).read_text())


def write_csv(dest, df, **kwargs) -> Path:
    """Write a pandas DataFrame atomically (index off unless asked)."""
    kwargs.setdefault("index", False)
    with atomic_path(dest) as tmp:
        df.to_csv(tmp, **kwargs)
    return Path(dest)


def save_torch(dest, obj) -> Path:
    import torch

    with atomic_path(dest) as tmp:
        torch.save(obj, tmp)
    return Path(dest)


def save_figure(fig, dest, dpi: int = 100) -> Path:
    """Save a matplotlib figure atomically as PNG and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(dest) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)
    return Path(dest)


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class ImageReadError(PipelineError, OSError):
    """An image file that cannot be decoded; the message names the file."""


def read_image(path, rgb: bool = True):
    """Read an image as a uint8 HxWx3 array (RGB by default); raise ImageReadError naming the file.

    Truncated JPEG/PNG files that OpenCV half-decodes are rejected too (decoder warnings are
    not enough), by checking the file's end marker.
    """
    import cv2
    import numpy as np

    path = Path(path)
    try:
        buf = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise ImageReadError(f"cannot read image {path}: {e}") from None
    if buf.size == 0:
        raise ImageReadError(f"cannot read image {path}: empty file")
    if not _complete(buf):
        raise ImageReadError(f"cannot read image {path}: file is truncated")
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if img is None:
        raise ImageReadError(f"cannot read image {path}: not a decodable image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if rgb else img


def _complete(buf) -> bool:
    """JPEG must end with FFD9 (allowing trailing padding), PNG with an IEND chunk."""
    head = bytes(buf[:8])
    tail = bytes(buf[-64:])
    if head[:2] == b"\xff\xd8":
        return b"\xff\xd9" in tail
    if head == b"\x89PNG\r\n\x1a\n":
        return b"IEND" in tail
    return True


def image_size(path) -> tuple[int, int]:
    """(width, height) of an image without decoding pixels when PIL can read the header."""
    from PIL import Image

    with Image.open(path) as im:
        return im.size
