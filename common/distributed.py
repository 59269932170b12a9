"""Several processes, one training: torchrun's environment, the process group, rank-0 helpers.

``torchrun --standalone --nproc_per_node N 04_train_embed.py ...`` (``make 04 NPROC=N``) starts
N copies of a stage with ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` set. :func:`init` then joins
them into a process group (nccl on CUDA, each process on GPU ``LOCAL_RANK``; gloo on CPU),
destroyed at exit. Training wraps its model in PyTorch's DistributedDataParallel
(common/training.py), the PK sampler splits each batch's identities across the ranks
(common/samplers.DistributedPKSampler) and extraction splits its images (common/inference.py).
Rank 0 writes every artifact; the others wait at a :func:`barrier`.

Without torchrun (no ``WORLD_SIZE``, or 1) there is one process of rank 0, every collective
here is a no-op and :func:`wrap` returns the module itself: a plain ``python 04_train_embed.py``
runs exactly as it always did.

>>> world_size(), rank(), is_main(), broadcast({"stop": True}), shard(["a", "b", "c"])
(1, 0, True, {'stop': True}, ['a', 'b', 'c'])
"""
from __future__ import annotations

import atexit
import gc
import os
import sys
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_distributed() -> bool:
    """True in a process started by torchrun with more than one process."""
    return world_size() > 1


def is_main() -> bool:
    """True on rank 0, the process that writes artifacts and prints (always true without torchrun)."""
    return rank() == 0


def init(device) -> None:
    """Join the process group once (nccl when ``device`` is CUDA, else gloo); no-op without torchrun."""
    if not is_distributed() or dist.is_initialized():
        return
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if cuda else "gloo")
    atexit.register(destroy)


def destroy() -> None:
    """Leave the process group while the interpreter is still whole (registered at exit by :func:`init`).

    On a normal exit every rank first waits for the others (at most 2 minutes), so no rank closes
    its connections under a peer still in a collective; then unreachable DDP wrappers (which hold
    the group) are collected and the group destroyed, so gloo's worker threads release the tensors
    of the last collective now. Left to interpreter shutdown, a worker thread releasing them needs
    the GIL of a dying interpreter: SIGABRT (seen once in CI, rank 1 of a two-process run).
    After an uncaught exception (``sys.last_value``) there is no waiting: torchrun stops the others."""
    if not dist.is_initialized():
        return
    if getattr(sys, "last_value", None) is None:
        try:
            dist.barrier(async_op=True).wait(timeout=timedelta(minutes=2))
        except Exception as e:  # a peer that died or never came: leave anyway
            print(f"rank {rank()}: the other ranks did not reach the end ({type(e).__name__}); leaving the group",
                  file=sys.stderr)
    gc.collect()
    dist.destroy_process_group()


def _active() -> bool:
    return is_distributed() and dist.is_initialized()


def barrier() -> None:
    """Wait until every rank gets here (e.g. until rank 0 has written a checkpoint)."""
    if _active():
        dist.barrier()


def broadcast(obj):
    """Rank 0's ``obj`` on every rank (a decision all ranks must share, so that none waits forever)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sync_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank: DDP broadcasts them before each
    training forward, so after the last one every rank holds statistics of its own batches."""
    if _active():
        for b in module.buffers():
            dist.broadcast(b, src=0)


def mean(values: dict) -> dict:
    """``{name: float}`` averaged over the ranks (same names on every rank), e.g. epoch losses."""
    if not _active() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return {**values, **{k: float(v) / world_size() for k, v in zip(keys, t.tolist())}}


def shard(items: list) -> list:
    """This rank's contiguous share of ``items``; :func:`gather` joins the shares in order."""
    n, w, r = len(items), world_size(), rank()
    return items[r * n // w:(r + 1) * n // w] if _active() else items


def gather(rows: np.ndarray) -> np.ndarray:
    """Every rank's ``rows`` (e.g. the embeddings of its :func:`shard`), concatenated in rank order, on every rank."""
    if not _active():
        return rows
    parts = [None] * world_size()
    dist.all_gather_object(parts, rows)
    return np.concatenate(parts)


def print0(*args, **kwargs) -> None:
    """``print`` on rank 0 only: N ranks print each line once, not N times."""
    if is_main():
        print(*args, **kwargs)


def wrap(module: torch.nn.Module, device) -> torch.nn.Module:
    """``module`` in DistributedDataParallel (gradients all-reduced, parameters broadcast from rank
    0 now), or ``module`` itself without torchrun."""
    if not _active():
        return module
    from torch.nn.parallel import DistributedDataParallel

    device = torch.device(device)
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)
