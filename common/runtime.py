"""Run-time setup shared by the stages: device choice and seeding."""
from __future__ import annotations

import os
import random

from .config import ConfigError


def resolve_device(name=None):
    """A ``torch.device`` from a config value: ``auto`` (or None) → CUDA when available, else CPU;
    ``cuda`` without a GPU is a clear error; a ``torch.device`` is returned as it is. Under
    torchrun, ``auto`` and ``cuda`` are this process's GPU, ``cuda:LOCAL_RANK`` (common/distributed.py)."""
    import torch

    from . import distributed

    if isinstance(name, torch.device):
        return name
    name = str(name or "auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but no CUDA GPU is available (set device: auto or cpu)")
    if dev.type == "cuda" and dev.index is None and distributed.is_distributed():
        dev = torch.device("cuda", distributed.local_rank())
    return dev


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; optionally force deterministic kernels."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
