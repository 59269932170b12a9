"""Frozen trunk + trainable top: train only the last stages of the backbone, on cached features.

On a CPU, fine-tuning a whole backbone at 224-320 px takes minutes per epoch and, on a few
hundred real photos, mostly overfits the identities it sees. Freezing the early stages (generic
edges and textures) and training only the last ``train.trainable_blocks`` stages, the pooling and
the neck keeps ImageNet's features where they generalise and costs a fraction of the compute.
With ``train.cache_trunk`` the frozen trunk runs once per image and view, not once per step:

* ``split_backbone(backbone, n)`` -> ``(trunk, top)``: two ``nn.Sequential`` views over the
  backbone's own modules (no copies) with ``top(trunk(x)) == backbone.forward_features(x)``
  (checked numerically, so an architecture this does not know is a clear error, not a silent
  mismatch). Stages are timm's ``blocks`` (EfficientNet, MobileNet), ``layer1..4`` (ResNet),
  ``stages`` (ConvNeXt, RegNet, ...) or the children of ``features`` (DenseNet, VGG).
* :class:`TrunkCache` holds the trunk's output for every image: one plain view (validation,
  and view 0 of training) and ``views - 1`` augmented views per training image and orientation
  (mirrored flukes are other identities, so mirrored views are cached too), float16 in memory.
  A PK batch of ``(index, flip, aug_seed)`` keys picks view ``aug_seed % views`` of each image.

>>> import timm, torch
>>> net = timm.create_model("resnet18", pretrained=False, num_classes=0, global_pool="").eval()
>>> trunk, top = split_backbone(net, 1)
>>> x = torch.randn(1, 3, 64, 64)
>>> bool(torch.allclose(top(trunk(x)), net.forward_features(x), atol=1e-5)), len(top)
(True, 1)
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .augment import build_transforms
from .config import ConfigError
from .io import read_image


def _stages(backbone: nn.Module) -> tuple[list, list, list]:
    """``(stem modules, stages, tail modules)`` in forward_features order."""
    b = backbone
    if hasattr(b, "blocks") and hasattr(b, "conv_stem"):  # EfficientNet, MobileNetV2/V3, ...
        tail = [m for m in (getattr(b, "conv_head", None), getattr(b, "bn2", None)) if m is not None]
        return [b.conv_stem, b.bn1], list(b.blocks), tail
    if all(hasattr(b, f"layer{i}") for i in range(1, 5)):  # ResNet and friends
        return [b.conv1, b.bn1, b.act1, b.maxpool], [getattr(b, f"layer{i}") for i in range(1, 5)], []
    if hasattr(b, "stages") and hasattr(b, "stem"):  # ConvNeXt, RegNet, ...
        tail = [m for m in (getattr(b, "norm_pre", None), getattr(b, "final_conv", None)) if m is not None]
        return [b.stem], list(b.stages), tail
    if isinstance(getattr(b, "features", None), nn.Sequential):  # DenseNet, VGG
        return [], list(b.features), []
    raise ConfigError(f"train.trainable_blocks: cannot split a {type(b).__name__} backbone into stages "
                      f"(known: blocks, layer1-4, stages, features); set train.trainable_blocks: null")


def split_backbone(backbone: nn.Module, n_top: int, check_size: int = 64) -> tuple[nn.Sequential, nn.Sequential]:
    """``(trunk, top)`` with the last ``n_top`` stages (+ the tail) in ``top``; see the module doc."""
    stem, stages, tail = _stages(backbone)
    n_top = int(n_top)
    if not 0 <= n_top <= len(stages):
        raise ConfigError(f"train.trainable_blocks={n_top}: this backbone has {len(stages)} stages")
    trunk = nn.Sequential(*stem, *stages[:len(stages) - n_top])
    top = nn.Sequential(*stages[len(stages) - n_top:], *tail)
    was = backbone.training
    backbone.eval()
    with torch.no_grad():
        x = torch.randn(1, 3, check_size, check_size, generator=torch.Generator().manual_seed(0))
        ok = torch.allclose(top(trunk(x)), backbone.forward_features(x), atol=1e-4, rtol=1e-3)
    backbone.train(was)
    if not ok:
        raise ConfigError(f"train.trainable_blocks: splitting {type(backbone).__name__} into stages does not "
                          f"reproduce its forward_features; set train.trainable_blocks: null")
    return trunk, top


def freeze(module: nn.Module) -> None:
    """No gradients and eval mode (BatchNorm statistics kept) for every parameter of ``module``."""
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()


def cache_key(trunk: nn.Module, paths, train_idx, size, views: int, strength: float, flip: bool, seed: int) -> str:
    """What decides a cache's content: the trunk's weights, the images (path, size, mtime), which
    of them get augmented views, and the view settings."""
    import hashlib
    import os

    h = hashlib.sha1()
    for k, v in trunk.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    h.update(np.asarray(train_idx, np.int64).tobytes())
    h.update(repr((size, int(views), float(strength), bool(flip), int(seed), 1)).encode())
    return h.hexdigest()[:16]


def cached_trunk(cache_dir, trunk: nn.Module, paths, train_idx, size, mean, std, **kw) -> tuple["TrunkCache", bool]:
    """A :class:`TrunkCache` read from ``cache_dir`` when one with the same :func:`cache_key`
    is there (a rerun of 04 with another learning rate, 05's retrain), else built and saved
    (atomically). ``cache_dir=None``: built, not saved. Returns ``(cache, reused)``."""
    from pathlib import Path

    from .io import save_torch

    if cache_dir is None:
        return TrunkCache(trunk, paths, train_idx, size, mean, std, **kw), False
    key = cache_key(trunk, paths, train_idx, size, kw.get("views", 4), kw.get("strength", 1.0),
                    kw.get("flip", False), kw.get("seed", 0))
    file = Path(cache_dir) / f"{key}.pt"
    if file.exists():
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
            return TrunkCache.from_state(state, paths, train_idx, kw.get("device", "cpu")), True
        except Exception as e:  # noqa: BLE001 - a damaged cache file is rebuilt, never trusted
            print(f"trunk cache {file} unreadable ({type(e).__name__}): rebuilding it")
    cache = TrunkCache(trunk, paths, train_idx, size, mean, std, **kw)
    save_torch(file, cache.state())
    return cache, False


class _Views(torch.utils.data.Dataset):
    """Image ``i`` (mirrored when ``flip``), plain (view 0) or augmented with a seed of its own."""

    def __init__(self, paths, jobs, plain, aug, seed: int):
        self.paths, self.jobs, self.plain, self.aug, self.seed = paths, jobs, plain, aug, seed

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, j):
        i, flip, view = self.jobs[j]
        img = read_image(self.paths[i])
        if flip:
            img = np.ascontiguousarray(img[:, ::-1])
        if not view:
            return self.plain(image=img)["image"]
        self.aug.set_random_seed(hash((self.seed, i, flip, view)) % 2**31)
        return self.aug(image=img)["image"]


class TrunkCache:
    """Trunk outputs of ``paths`` (see the module doc); ``train_idx`` are the rows that get
    augmented (and, with ``flip``, mirrored) views, in the order of the training labels."""

    def __init__(self, trunk: nn.Module, paths, train_idx, size, mean, std, *, views: int = 4,
                 strength: float = 1.0, flip: bool = False, seed: int = 0, device="cpu", batch_size: int = 64,
                 progress: bool = True, num_workers: int = 0):
        self.views, self.flip, self.device, self.seed = max(1, int(views)), bool(flip), device, int(seed)
        self.paths = [str(p) for p in paths]
        self.train_idx = np.asarray(train_idx, dtype=np.int64)
        plain = build_transforms(size, mean, std, train=False)
        aug = build_transforms(size, mean, std, train=True, strength=strength, seed=seed)
        jobs = [(i, False, None) for i in range(len(self.paths))]  # plain view of every image
        orients = (False, True) if self.flip else (False,)
        for i in self.train_idx:  # view 0 of orientation 0 is the plain view computed above
            for o in orients:
                jobs += [(int(i), o, v) for v in range(self.views) if o or v]
        trunk.eval()
        feats = self._run(trunk, jobs, plain, aug, batch_size, progress, num_workers)
        self.plain = feats[: len(self.paths)]
        shape = (len(self.train_idx), len(orients), self.views) + tuple(self.plain.shape[1:])
        self.train = torch.empty(shape, dtype=self.plain.dtype)
        k = len(self.paths)
        for j, i in enumerate(self.train_idx):
            self.train[j, 0, 0] = self.plain[i]
            for o in range(len(orients)):
                first = 1 if o == 0 else 0
                self.train[j, o, first:] = feats[k:k + self.views - first]
                k += self.views - first

    @torch.no_grad()
    def _run(self, trunk, jobs, plain, aug, batch_size, progress, num_workers: int = 0) -> torch.Tensor:
        from torch.utils.data import DataLoader

        trunk.to(memory_format=torch.channels_last)  # oneDNN is ~1.6x faster channels-last on CPU
        loader = DataLoader(_Views(self.paths, jobs, plain, aug, self.seed), batch_size=batch_size,
                            num_workers=num_workers)
        out, start = None, 0
        for x in tqdm(loader, desc=f"trunk cache ({len(jobs)} views)", disable=not progress, leave=False):
            f = trunk(x.to(self.device).contiguous(memory_format=torch.channels_last)).to("cpu", torch.float16)
            if out is None:
                out = torch.empty((len(jobs),) + tuple(f.shape[1:]), dtype=torch.float16)
            out[start:start + len(f)] = f
            start += len(f)
        return out

    def state(self) -> dict:
        """What :meth:`from_state` needs (saved by :func:`cached_trunk`): views, flip, seed, features."""
        return {"views": self.views, "flip": self.flip, "seed": self.seed, "plain": self.plain, "train": self.train}

    @classmethod
    def from_state(cls, state: dict, paths, train_idx, device="cpu") -> "TrunkCache":
        """The cache of :meth:`state`, without a trunk pass (``paths``/``train_idx`` as it was built on)."""
        cache = cls.__new__(cls)
        cache.views, cache.flip, cache.seed = int(state["views"]), bool(state["flip"]), int(state["seed"])
        cache.device, cache.paths = device, [str(p) for p in paths]
        cache.train_idx = np.asarray(train_idx, dtype=np.int64)
        cache.plain, cache.train = state["plain"], state["train"]
        return cache

    def nbytes(self) -> int:
        return self.plain.numel() * 2 + self.train.numel() * 2

    def batch(self, keys) -> torch.Tensor:
        """Cached trunk features of PK-sampler keys ``(train index, flip, aug_seed)`` (float32)."""
        rows = [self.train[i, int(bool(f)) if self.flip else 0, int(s) % self.views] for i, f, s in keys]
        return torch.stack(rows).float()

    def plain_features(self, rows=None) -> torch.Tensor:
        return (self.plain if rows is None else self.plain[rows]).float()
