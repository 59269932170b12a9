"""The learning-rate schedule and progressive-resizing phases of the training loop (common/training.py).

``lr_factor`` is the multiplier of every group's learning rate at a (fractional) epoch: linear
warmup, then cosine to a floor, or SGDR warm restarts. ``resolve_phases`` turns ``train.epochs`` /
``train.progressive`` into ``[(img_size, epochs), ...]``; ``size_at`` reads it per epoch;
``trim_phases`` fits the phases to another number of epochs (stage 03's and 05's shorter runs).
"""
from __future__ import annotations

import math

from .config import ConfigError


def lr_factor(t: float, total: float, warmup: float = 0.0, schedule: str = "cosine", floor: float = 0.01,
              cycle: float = 5.0, mult: float = 2.0) -> float:
    """Learning-rate multiplier at time ``t`` (epochs, fractional): linear warmup from ``floor``
    to 1, then cosine down to ``floor`` over the rest (``sgdr``: restarts after ``cycle`` epochs,
    each cycle ``mult`` times longer).

    >>> [round(lr_factor(t, 10, warmup=1), 3) for t in (0, 0.5, 1, 5.5, 10)]
    [0.01, 0.505, 1.0, 0.505, 0.01]
    >>> [round(lr_factor(t, 15, schedule="sgdr", cycle=5, floor=0), 3) for t in (0, 2.5, 4.99, 5, 10)]
    [1.0, 0.5, 0.0, 1.0, 0.5]
    """
    if warmup > 0 and t < warmup:
        return floor + (1.0 - floor) * t / warmup
    t -= warmup
    if schedule == "cosine":
        u = t / max(total - warmup, 1e-9)
    elif schedule == "sgdr":
        length = float(cycle)
        while t >= length:
            t, length = t - length, length * mult
        u = t / length
    else:
        raise ConfigError(f"train.schedule must be 'cosine' or 'sgdr', not {schedule!r}")
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(max(u, 0.0), 1.0)))


def resolve_phases(train_cfg: dict, img_size) -> list[tuple[int, int]]:
    """Progressive resizing phases ``[(img_size, epochs), ...]`` (a size is an int or [height, width]);
    one phase without ``progressive``.

    >>> resolve_phases({"epochs": 3, "progressive": None}, 128), resolve_phases({"progressive": [[96, 2], [128, 1]]}, 128)
    ([(128, 3)], [(96, 2), (128, 1)])
    """
    prog = train_cfg["progressive"]
    if not prog:
        return [(img_size, int(train_cfg["epochs"]))]
    try:
        phases = [([int(v) for v in s] if isinstance(s, (list, tuple)) else int(s), int(e)) for s, e in prog]
    except (TypeError, ValueError):
        raise ConfigError(f"train.progressive must be a list of [img_size, epochs] pairs, not {prog!r}") from None
    if any(e < 1 for _, e in phases):
        raise ConfigError(f"train.progressive phases need >= 1 epoch each: {prog!r}")
    return phases


def size_at(phases, epoch: int):
    """Image size of 0-based ``epoch`` (the last phase's size past the end)."""
    for size, n in phases:
        if epoch < n:
            return size
        epoch -= n
    return phases[-1][0]


def trim_phases(progressive, epochs: int) -> list:
    """Phases cut (or the last one stretched) to ``epochs`` in total.

    >>> trim_phases([[96, 2], [128, 2]], 3), trim_phases([[96, 2], [128, 2]], 6)
    ([[96, 2], [128, 1]], [[96, 2], [128, 4]])
    """
    out, left = [], epochs
    for size, n in progressive:
        if left <= 0:
            break
        out.append([size, min(int(n), left)])
        left -= out[-1][1]
    out[-1][1] += left
    return out
