"""Which profile `make all` runs when none is named: ``python3 -m common.profile RAW``.

* ``demo``: RAW has no competition yet (`make all` builds the embedded demo there) or holds the
  demo that common/demo_data.py wrote (its ``.demo.json`` marker);
* ``full``: a real competition and a CUDA GPU visible (``nvidia-smi -L`` lists one);
* ``cpu``: a real competition on a machine without one.

Prints the profile name on stdout and one line saying why on stderr. Standard library only: the
Makefile runs it before the virtual environment exists.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> choose(d)[0], choose(d, cuda=True)[0]
('demo', 'demo')
>>> (d / "train.csv").write_text("Image,Id\\n") and None
>>> choose(d, cuda=False)[0], choose(d, cuda=True)[0]
('cpu', 'full')
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

DEMO_MARKER = ".demo.json"


def has_cuda() -> bool:
    """A CUDA GPU is visible (without importing torch, which may not be installed yet)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def choose(raw, cuda: bool | None = None) -> tuple[str, str]:
    """``(profile, reason)`` for the competition folder ``raw``."""
    raw = Path(raw)
    if not (raw / "train.csv").exists():
        return "demo", f"{raw} holds no competition yet: the synthetic demo is built there"
    if (raw / DEMO_MARKER).exists():
        return "demo", f"{raw} holds the synthetic demo"
    cuda = has_cuda() if cuda is None else cuda
    if cuda:
        return "full", f"{raw} is a real competition and a CUDA GPU is visible"
    return "cpu", f"{raw} is a real competition and this machine has no CUDA GPU"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quiet = "--quiet" in argv  # make re-reads the Makefile after writing .make/deps.mk: say it once
    args = [a for a in argv if a != "--quiet"]
    profile, why = choose(args[0] if args else "data/raw")
    print(profile)
    if not quiet:
        print(f"profile: {profile} ({why}; name another with PROFILE=demo|cpu|full)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
