"""Training images as tensors: label encoding, mirrored identities, seeded augmentation.

``FlukeDataset[key]`` takes an index or an ``(index, flip[, aug_seed])`` key (common/samplers.py).
A flipped image is mirrored left-right before augmentation and, with ``mirror_offset = n``,
labelled ``label + n``: with ``augment.hflip: new_identity`` a mirrored fluke is trained as
another whale (the trailing-edge pattern is not mirror-symmetric), so the head has 2n classes.

albumentations draws from its own generator, not torch's: an ``aug_seed`` in the key reseeds it
for that item, so augmentation is reproducible and resumable whatever the DataLoader workers.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .config import ConfigError
from .io import read_image


def encode_labels(ids) -> tuple[np.ndarray, list[str]]:
    """Identity strings -> ``(int64 labels, sorted class names)``.

    >>> encode_labels(["b", "a", "b"])
    (array([1, 0, 1]), ['a', 'b'])
    """
    classes, labels = np.unique(np.asarray(ids, dtype=str), return_inverse=True)
    return labels.astype(np.int64), [str(c) for c in classes]


def hflip_mode(augment_cfg: dict) -> bool:
    """True when ``augment.hflip`` asks for mirrored flukes as new identities; False for no flips."""
    mode = augment_cfg["hflip"]
    if mode in (False, None, "false", "none"):
        return False
    if mode == "new_identity":
        return True
    raise ConfigError(f"augment.hflip must be 'new_identity' or false, not {mode!r}")


class FlukeDataset(Dataset):
    """Images at ``paths`` with integer ``labels`` (or none), transformed by an albumentations
    Compose that returns ``{"image": tensor}``; items are ``(image, label)`` (label -1 if none)."""

    def __init__(self, paths, labels=None, transform=None, mirror_offset: int = 0):
        self.paths = [str(p) for p in paths]
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        if self.labels is not None and len(self.labels) != len(self.paths):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")
        self.transform = transform
        self.mirror_offset = int(mirror_offset)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key):
        idx, flip, seed = (tuple(key) + (None,))[:3] if isinstance(key, tuple) else (key, False, None)
        if seed is not None:
            self.reseed(seed)
        img = read_image(self.paths[idx])
        if flip:
            img = np.ascontiguousarray(img[:, ::-1])
        x = self.transform(image=img)["image"] if self.transform is not None else torch.from_numpy(img)
        label = -1 if self.labels is None else int(self.labels[idx]) + (self.mirror_offset if flip else 0)
        return x, label

    def reseed(self, seed: int) -> None:
        if self.transform is not None and hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(int(seed) % 2**32)


def make_loader(dataset: FlukeDataset, batch_sampler, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over sampler batches; with workers they persist across epochs (create a new
    loader after changing ``dataset.transform``)."""
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(0))
