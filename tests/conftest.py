"""Shared fixtures. Tests never touch the network, the user's home or the project's data/."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")

# ultralytics writes a settings file at import time: keep it out of the user's ~/.config.
if "YOLO_CONFIG_DIR" not in os.environ:
    import tempfile

    os.environ["YOLO_CONFIG_DIR"] = tempfile.mkdtemp(prefix="yolo-cfg-")
