"""Atomic artifact writing and small I/O helpers.

Every artifact is written to a temporary file (or folder) next to its destination and renamed
into place, so a stage killed half-way never leaves a half-written file that a later stage would
trust. Temporary names are recognisable: ``.<dest name>.part-<writer pid>-<random>[<suffix>]``;
a SIGKILLed writer leaves one behind, and :func:`prepare_data_dir` (run at every stage's start)
removes those whose writer process is gone.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import PipelineError


_UMASK = os.umask(0)
os.umask(_UMASK)
_TEMP_RE = re.compile(r"^\..+\.part-(?P<pid>\d+)-[a-z0-9_]+")


class DataDirError(OSError):
    """DATA cannot hold artifacts (not writable, not a folder, inside RAW); the message names it."""


def _temp_prefix(dest: Path) -> str:
    return f".{dest.name}.part-{os.getpid()}-"


def temp_writer_pid(name: str) -> int | None:
    """PID of the process that made an atomic-write temporary file or folder ``name`` (else None).

    >>> temp_writer_pid(".last.pt.part-4242-k3j_9x.pt"), temp_writer_pid(".clean.part-7-ab12"), temp_writer_pid("last.pt")
    (4242, 7, None)
    """
    m = _TEMP_RE.match(name)
    return int(m["pid"]) if m else None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(root, skip=()) -> list[Path]:
    """Delete the atomic-write temporaries under ``root`` whose writer process no longer runs
    (left by a SIGKILL or power loss); folders in ``skip`` are not searched. Returns what went."""
    root, skip = Path(root), {Path(s).resolve() for s in skip}
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for folder, dirs, files in os.walk(root):
        if Path(folder).resolve() in skip:
            dirs[:] = []
            continue
        for name in list(dirs) + files:
            pid = temp_writer_pid(name)
            if pid is None or _alive(pid):
                continue
            p = Path(folder) / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
                dirs.remove(name)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def prepare_data_dir(data, raw=None) -> list[Path]:
    """Check that artifacts can be written under ``data`` (before any work), then remove stale
    atomic-write temporaries there (never inside ``raw``). DataDirError with a one-line message."""
    data = Path(data).resolve()
    if raw is not None and data.is_relative_to(Path(raw).resolve()):
        raise DataDirError(f"DATA {data} lies inside the raw folder {Path(raw).resolve()}, which is never written")
    existing = data
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise DataDirError(f"DATA {data} cannot be created: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "DATA" if existing == data else f"DATA {data} cannot be created: its parent"
        raise DataDirError(f"{what} {existing} is not writable (choose another DATA=...)")
    return remove_stale_temps(data, skip=[raw] if raw is not None else [])


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
    # the suffix is kept last: OpenCV and numpy pick the format from it
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(dest), suffix=dest.suffix, dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts get normal permissions
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder next to ``dest``; on success it replaces ``dest`` as a whole.

    A failure (or a kill) leaves the previous ``dest`` (or none) untouched; the staging folder is
    removed on failure, or by :func:`remove_stale_temps` after a kill.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_temp_prefix(dest), dir=dest.parent))
    os.chmod(staging, 0o777 & ~_UMASK)  # mkdtemp makes it private; dest should look like any folder
    old = None
    try:
        yield staging
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(dest), dir=dest.parent))
            os.replace(dest, old / dest.name)
        try:
            os.replace(staging, dest)
        except OSError:
            if old is not None:
                os.replace(old / dest.name, dest)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


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
