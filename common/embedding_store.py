"""Cached per-member embeddings of the search database (train + test images).

Per member, ``paths.embeddings_file(name)`` (``.npz``) holds the image keys, split, image name, a
fingerprint of the model (checkpoint path, mtime and size, image size, flip TTA) and the name of the
float16 ``.npy`` file beside it with the vectors, which is opened as a read-only memory map: a
1M-image gallery of 256-d vectors is 0.5 GB on disk and costs no RAM until rows are read. Rows whose
image file (path, mtime, size) and model are unchanged are reused, so rerunning stage 06 after
changing ensemble weights embeds nothing, and adding images embeds only those. A rewrite puts the
vectors in a new file before the ``.npz`` names it, so a killed stage leaves the old cache whole.
Embeddings always come back as float16, fresh or cached alike (every consumer normalises them into
float32, :func:`common.retrieval.l2_normalize`).
"""
from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from . import distributed
from .handoff import HandoffError
from .config import ConfigError
from .io import atomic_path


def database_table(train: pd.DataFrame, test: pd.DataFrame) -> pd.DataFrame:
    """The search database: train rows (Image, Id, path, is_query[, held_out]) then test rows (Image, path);
    columns ``split, Image, Id, path, is_query, held_out`` (test: Id '', is_query 0, held_out 0)."""
    tr = train.assign(split="train")
    if "held_out" not in tr:
        tr = tr.assign(held_out=0)
    te = test.assign(split="test", Id="", is_query=0, held_out=0)
    cols = ["split", "Image", "Id", "path", "is_query", "held_out"]
    table = pd.concat([tr[cols], te[cols]], ignore_index=True)
    dup = table["Image"][table["Image"].duplicated()]
    if len(dup):
        raise ConfigError(f"image name {dup.iloc[0]!r} occurs twice in train+test; submissions name images by file name")
    return table


def image_key(split: str, path) -> str:
    """Identity of one image file: split, path, modification time and size."""
    st = os.stat(path)
    return f"{split}|{path}|{st.st_mtime_ns}|{st.st_size}"


def model_key(ckpt, img_size, tta_hflip: bool) -> str:
    st = os.stat(ckpt)
    return json.dumps({"ckpt": str(Path(ckpt).resolve()), "mtime": st.st_mtime_ns, "size": st.st_size,
                       "img_size": img_size, "tta_hflip": bool(tta_hflip)}, sort_keys=True)


def _vectors_path(cache_file: Path, name) -> Path:
    return cache_file.with_name(str(name))


def load_vectors(cache_file) -> np.ndarray:
    """The cached float16 vectors of ``cache_file``, as a read-only memory map."""
    cache_file = Path(cache_file)
    with np.load(cache_file, allow_pickle=False) as z:
        name = str(z["vectors"])
    return np.load(_vectors_path(cache_file, name), mmap_mode="r", allow_pickle=False)


def load_cache(cache_file, key: str) -> tuple[list[str], np.ndarray | None]:
    """``(image keys, float16 vectors memory map)`` of a cache written for the same model key, else ``([], None)``."""
    cache_file = Path(cache_file)
    if not cache_file.exists():
        return [], None
    try:
        with np.load(cache_file, allow_pickle=False) as z:
            if str(z["model_key"]) != key:
                return [], None
            keys = z["keys"].tolist()
        vectors = load_vectors(cache_file)
        if len(vectors) != len(keys) or vectors.dtype != np.float16:
            return [], None
        return keys, vectors
    except (OSError, KeyError, ValueError):  # unreadable, partial or old-format cache: rebuild it
        return [], None


def save_cache(cache_file, key: str, table: pd.DataFrame, keys: list[str], emb16: np.ndarray) -> None:
    """Vectors into a new ``<stem>.<token>.npy``, then the ``.npz`` naming it (atomically), then old vector files go."""
    cache_file = Path(cache_file)
    vectors = cache_file.with_name(f"{cache_file.stem}.{uuid.uuid4().hex[:12]}.npy")
    with atomic_path(vectors) as tmp:
        np.save(tmp, np.ascontiguousarray(emb16, dtype=np.float16))
    with atomic_path(cache_file) as tmp:
        np.savez(tmp, model_key=np.array(key), keys=np.array(keys), images=table["Image"].to_numpy(str),
                 splits=table["split"].to_numpy(str), vectors=np.array(vectors.name))
    mine = re.compile(re.escape(cache_file.stem) + r"\.[0-9a-f]{12}\.npy")
    for old in cache_file.parent.iterdir():
        if old != vectors and mine.fullmatch(old.name):
            old.unlink(missing_ok=True)  # an open memory map of it stays valid (POSIX)


def cached_embeddings(table: pd.DataFrame, cache_file, key: str, embed: Callable[[list[str]], np.ndarray]) -> tuple[np.ndarray, int]:
    """Float16 embeddings of ``table`` rows, calling ``embed(paths)`` only for rows the cache lacks;
    rewrites the cache with exactly these rows. When nothing changed the result is the cache's
    read-only memory map itself. Returns ``(emb, n_embedded)``."""
    keys = [image_key(s, p) for s, p in zip(table["split"], table["path"])]
    have, vectors = load_cache(cache_file, key)
    if vectors is not None and have == keys:
        return vectors, 0
    row_of = {k: i for i, k in enumerate(have)}
    todo = [i for i, k in enumerate(keys) if k not in row_of]
    if todo:
        new = np.asarray(embed([table["path"].iloc[i] for i in todo]), dtype=np.float32).astype(np.float16)
    width = new.shape[1] if todo else (vectors.shape[1] if vectors is not None else 0)
    emb16 = np.zeros((len(keys), width), np.float16)
    if todo:
        emb16[todo] = new
    cached = [i for i, k in enumerate(keys) if k in row_of]
    if cached:
        emb16[cached] = vectors[[row_of[keys[i]] for i in cached]]
    if distributed.is_main():  # under torchrun every rank has the same rows; two writers would delete each other's file
        save_cache(cache_file, key, table, keys, emb16)
    return emb16, len(todo)


def member_embeddings(ckpt, table: pd.DataFrame, cache_file, *, img_size: int | None = None, tta_hflip: bool = True,
                      batch_size: int = 64, device="cpu", num_workers: int = 0, desc: str = "embed") -> tuple[np.ndarray, int]:
    """Embeddings of ``table.path`` by the member checkpoint ``ckpt`` (loaded only when some row
    is not cached), at ``img_size`` (None: the size the model was trained at)."""
    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise HandoffError(f"checkpoint {ckpt} is missing: run stage 04 first (make 04)")

    def embed(image_paths):
        from .inference import embed_images
        from .models import load_checkpoint

        model, _ = load_checkpoint(ckpt, map_location="cpu")
        model.to(device).eval()
        return embed_images(model, image_paths, img_size or model.img_size, batch_size=batch_size, device=device,
                            tta_hflip=tta_hflip, num_workers=num_workers, desc=desc)

    return cached_embeddings(table, cache_file, model_key(ckpt, img_size, tta_hflip), embed)


def embed_members(cfg: dict, paths, names, ckpt_of=None, log=print) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Embed the database of every member in ``names`` with ``ckpt_of(name)`` (default: the
    checkpoint stage 05's report names), using each member's crops setting, flip TTA per ``tta.hflip`` and the
    cache. Returns ``(table, {name: (N, emb_dim) float16})``; the table's Image order is shared."""
    from .config import member_config
    from .runtime import resolve_device
    from .tables import test_frame, val_frame

    if ckpt_of is None:
        from .handoff import final_checkpoints

        ckpt_of = final_checkpoints(paths, names).__getitem__
    device = resolve_device(cfg["device"])
    tta = bool(cfg["tta"]["hflip"])
    table, embs = None, {}
    for name in names:
        m = member_config(cfg, name)
        t = database_table(val_frame(paths, "train", m["model"]["use_crops"]),
                           test_frame(paths, m["model"]["use_crops"]))
        if table is not None and not t["Image"].equals(table["Image"]):
            raise RuntimeError("members disagree on the database images")  # cannot happen: same clean CSVs
        table = t if table is None else table
        ckpt = ckpt_of(name)
        embs[name], n_new = member_embeddings(ckpt, t, paths.embeddings_file(name), tta_hflip=tta,
                                              batch_size=int(m["train"]["batch_embed"]), device=device,
                                              num_workers=int(cfg["num_workers"]), desc=f"embed {name}")
        log(f"{name}: {Path(ckpt).relative_to(paths.data) if Path(ckpt).is_relative_to(paths.data) else ckpt} - "
            f"embedded {n_new} images, {len(t) - n_new} from cache")
    return table, embs
