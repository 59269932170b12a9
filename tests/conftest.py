"""Shared fixtures. Tests never touch the network, the user's home or the project's data/."""
import hashlib
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")

# ultralytics writes a settings file at import time: keep it out of the user's ~/.config.
if "YOLO_CONFIG_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["YOLO_CONFIG_DIR"] = tempfile.mkdtemp(prefix="yolo-cfg-")
    atexit.register(shutil.rmtree, os.environ["YOLO_CONFIG_DIR"], ignore_errors=True)  # not one per run left in /tmp


import pytest  # noqa: E402


@pytest.fixture
def tree_hash():
    """Hash of a folder's names and bytes, to assert that a stage left it untouched."""
    def _hash(folder):
        h = hashlib.sha1()
        for p in sorted(Path(folder).rglob("*")):
            h.update(str(p.relative_to(folder)).encode())
            if p.is_file():
                h.update(p.read_bytes())
        return h.hexdigest()
    return _hash
