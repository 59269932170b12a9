"""fast.ai's learning-rate finder for a member: ``04_train_embed.py --lr-find``.

``lr_find`` sweeps ``train.lr`` exponentially over PK batches from the member's starting weights
(head imprinted as training would), plots the smoothed loss against it and suggests the LR at
the "valley" (``suggest_lr``).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from tqdm import tqdm

from . import distributed
from .config import ConfigError
from .datasets import make_loader
from .io import save_figure
from .runtime import resolve_device, seed_everything
from .training import imprint_head, setup_run, train_mode, train_step, train_transform


def lr_find(member: dict, train_df: pd.DataFrame, out_png, *, init=None, device=None, start_lr: float = 1e-6,
            end_lr: float = 1.0, num_iter: int = 100, num_workers: int = 0, progress: bool = True) -> float:
    """Exponential LR sweep (``train.lr`` from start_lr to end_lr, group multipliers kept) on PK
    batches from the starting weights (head imprinted as in :func:`fit`); saves the smoothed
    loss-vs-LR plot to ``out_png`` and returns (and prints) the suggested LR (:func:`suggest_lr`)."""
    if distributed.is_distributed():
        raise ConfigError("--lr-find runs in one process: run it without torchrun (NPROC=1)")
    device = resolve_device(device)
    seed_everything(int(member["seed"]))
    run = setup_run(member, train_df, init, device)
    size = member["model"]["img_size"]
    if member["train"]["imprint"]:
        imprint_head(run, size, int(member["train"]["batch_embed"]), num_workers, progress=progress)
    run.dataset.transform = train_transform(run, member, size)
    train_mode(run.model, run.freeze_bn, run.trunk)
    lrs, losses, avg = [], [], 0.0
    for i, (x, y) in enumerate(tqdm(_cycle(run, num_workers), total=num_iter, desc=f"lr_find {member['name']}",
                                    disable=not progress)):
        lr = start_lr * (end_lr / start_lr) ** (i / max(num_iter - 1, 1))
        loss, _ = train_step(run, x, y, [lr * g["lr_mult"] for g in run.opt.param_groups], member["train"]["grad_clip"])
        avg = 0.98 * avg + 0.02 * loss
        lrs.append(lr)
        losses.append(avg / (1 - 0.98 ** (i + 1)))  # bias-corrected moving average, as fast.ai
        if i + 1 >= num_iter or (i > 5 and losses[-1] > 4 * min(losses)):  # done, or diverging
            break
    suggestion = suggest_lr(lrs, losses)
    _plot_lr_find(lrs, losses, suggestion, out_png, member["name"])
    print(f"lr_find {member['name']}: suggested train.lr = {suggestion:.2e} (plot: {out_png})")
    return suggestion


def _cycle(run, num_workers: int):
    """PK batches epoch after epoch, without end."""
    loader, epoch = make_loader(run.dataset, run.sampler, num_workers), 0
    while True:
        run.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def suggest_lr(lrs, losses) -> float:
    """fast.ai's "valley": the longest stretch over which the smoothed loss keeps falling (a longest
    decreasing subsequence, robust to the noise of small batches); the LR halfway into its
    middle third.

    >>> lrs = [10 ** (-6 + i * 0.25) for i in range(25)]
    >>> losses = [5 - 4 / (1 + math.exp(-3 * (math.log10(lr) + 3))) + max(0, math.log10(lr) + 1) * 5 for lr in lrs]
    >>> -4 < math.log10(suggest_lr(lrs, losses)) < -2
    True
    """
    losses = np.asarray(losses, float)
    n = len(losses)
    if n < 3:
        return float(lrs[0] if n else 1e-3)
    run = np.ones(n, int)  # length of the longest decreasing run ending at i
    for i in range(1, n):
        earlier = run[:i][losses[:i] > losses[i]]
        run[i] = 1 + (earlier.max() if len(earlier) else 0)
    end = int(np.argmax(run))
    begin = end - int(run[end]) + 1
    third = (end - begin) / 3
    return float(lrs[min(n - 1, begin + int(third) + int(third / 2))])


def _plot_lr_find(lrs, losses, suggestion, dest, name) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses)
    ax.axvline(suggestion, color="red", linestyle="--", label=f"suggested lr {suggestion:.1e} (valley)")
    ax.set(xscale="log", xlabel="learning rate (train.lr)", ylabel="smoothed training loss", title=f"lr_find: {name}")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return save_figure(fig, dest)
