"""PK batch sampler: P identities x K images per batch, every identity every epoch.

Each epoch every identity's images are shuffled and cut into groups of K, so every image is
seen once; a last group short of K (and an identity with fewer than K images) is topped up by
drawing the identity's images again (upsampling). Groups are shuffled and packed P to a batch
with P distinct identities; a short last batch is filled with extra random groups.

With ``flip=True`` each group is mirrored as a whole with probability 0.5 (the dataset then gives
it the mirrored identity's label), so the K positives of a batch share one orientation.

The sampler yields lists of ``(index, flip, aug_seed)`` keys, for ``DataLoader(batch_sampler=...)``
over a dataset that accepts them (common/datasets.py); ``aug_seed`` seeds that item's
augmentation. Order, flips and augmentation depend only on ``(seed, epoch)``, not on DataLoader
workers: call ``set_epoch`` before each epoch; a resumed run replays it exactly.
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np
from torch.utils.data import Sampler

from .config import ConfigError


class PKSampler(Sampler):
    def __init__(self, labels, P: int, K: int, seed: int = 0, flip: bool = False):
        self.labels = np.asarray(labels)
        if self.labels.ndim != 1 or len(self.labels) == 0:
            raise ValueError("PKSampler needs a non-empty 1-D array of labels")
        if P < 1 or K < 1:
            raise ValueError(f"P and K must be >= 1, got P={P}, K={K}")
        self.K, self.seed, self.flip = int(K), int(seed), bool(flip)
        ids, inverse = np.unique(self.labels, return_inverse=True)
        self.groups = [np.flatnonzero(inverse == i) for i in range(len(ids))]
        self.P = min(int(P), len(self.groups))
        self.epoch = 0
        self._cache: tuple[int, list] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _chunk(self, rng, members: np.ndarray, chunk: np.ndarray) -> np.ndarray:
        need = self.K - len(chunk)
        if need <= 0:
            return chunk
        spare = np.setdiff1d(members, chunk)
        pool = spare if len(spare) >= need else members
        return np.concatenate([chunk, rng.choice(pool, need, replace=len(pool) < need)])

    def _batches(self) -> list:
        if self._cache and self._cache[0] == self.epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, self.epoch])
        items = []  # (identity, K indices)
        for g, members in enumerate(self.groups):
            perm = rng.permutation(members)
            for c in range(max(1, math.ceil(len(perm) / self.K))):
                items.append((g, self._chunk(rng, members, perm[c * self.K:(c + 1) * self.K])))
        queue = deque(items[i] for i in rng.permutation(len(items)))
        batches = []
        while queue:
            batch, seen, skipped = [], set(), []
            while queue and len(batch) < self.P:
                item = queue.popleft()
                (skipped if item[0] in seen else batch).append(item)
                seen.add(item[0])
            queue.extendleft(reversed(skipped))
            others = [g for g in rng.permutation(len(self.groups)) if g not in seen]
            for g in others[: self.P - len(batch)]:  # fill a short batch with extra identities
                members = self.groups[g]
                batch.append((g, self._chunk(rng, members, rng.permutation(members)[: self.K])))
            batches.append(batch)
        out = []
        for batch in batches:
            flips = rng.random(len(batch)) < 0.5 if self.flip else np.zeros(len(batch), bool)
            keys = [(int(i), bool(f)) for (_, chunk), f in zip(batch, flips) for i in chunk]
            out.append([(i, f, int(a)) for (i, f), a in zip(keys, rng.integers(0, 2**31 - 1, len(keys)))])
        self._cache = (self.epoch, out)
        return out

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


class DistributedPKSampler(PKSampler):
    """The single-process PK batches of ``(seed, epoch)``, each split by identity across
    ``world_size`` ranks: rank ``r`` gets the ``r``-th share of every batch's P identities (K images
    each). So every rank takes the same number of steps per epoch as one process with the same
    global batch (P x K), the ranks of one step never share an identity, and together they cover
    every image each epoch, exactly as one process would.

    >>> labels = np.repeat(np.arange(6), 2)
    >>> r0, r1 = (DistributedPKSampler(labels, P=4, K=2, rank=r, world_size=2) for r in (0, 1))
    >>> len(r0) == len(r1) == len(PKSampler(labels, P=4, K=2)), [len(b) for b in r0]
    (True, [4, 4])
    """

    def __init__(self, labels, P: int, K: int, seed: int = 0, flip: bool = False, rank: int = 0, world_size: int = 1):
        super().__init__(labels, P, K, seed=seed, flip=flip)
        if not 0 <= int(rank) < int(world_size):
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if self.P < world_size:
            raise ConfigError(f"P={self.P} identities per batch cannot be shared by {world_size} ranks: "
                              f"raise train.P or lower NPROC")
        self.rank, self.world_size = int(rank), int(world_size)

    def __iter__(self):
        for batch in self._batches():
            groups = [batch[i:i + self.K] for i in range(0, len(batch), self.K)]  # one group per identity
            share = groups[self.rank::self.world_size]
            yield [key for group in share for key in group]
