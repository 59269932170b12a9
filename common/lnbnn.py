"""One-vs-many descriptor matching: LNBNN scores of a query against every database image (HotSpotter).

Pairwise matching (:mod:`common.local_features`) only sees the embedding's shortlist. HotSpotter
(Crall et al. 2013; Wildbook's matcher for humpback flukes) instead searches each query
descriptor among the descriptors of *all* database images at once and scores the images its
nearest neighbours belong to by local naive-Bayes nearest neighbour (LNBNN, McCann & Lowe 2012):
a neighbour among the first ``k`` counts ``d_norm - d``, where ``d_norm`` is the distance to the
``k+1``-th neighbour, so a descriptor that resembles many images (water, barn wall, skin texture
everywhere) counts little and a distinctive one a lot; each image counts once per query
descriptor (its closest). The score of an image is the sum over the query's descriptors.

It finds candidates the embedding ranks far away (``rerank.lnbnn_candidates`` are added to
each shortlist) and gives every pair a third score that :mod:`common.rerank` calibrates and fuses.
Each query descriptor's normaliser also weighs the pair's geometric inliers (:func:`verified_score`,
HotSpotter's spatially verified score, ``rerank.inlier_score: lnbnn``): an inlier on a label or
pattern many database images share counts ~0 where an inlier count counts it 1.
Descriptors of the query's own image (``exclude``) are skipped. The index is a faiss IVF over
the database's RootSIFT descriptors (exact search below ``FLAT_BELOW`` descriptors); above
``SQ8_ABOVE`` (1 GB of float32) its lists hold 8-bit codes, 128 bytes a descriptor (500 keypoints x
50 000 images = 3.2 GB; on lion's 288 000 descriptors the codes cost 2 of 159 top-1 queries).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

KEEP_TRAINED = 8       # trained IVF lists kept per feature folder: the most recently used (a changed crop trains anew)
FLAT_BELOW = 50_000   # descriptors: exact search below, IVF (4 sqrt(n) lists, nprobe 16) from there
SQ8_ABOVE = 2_000_000  # descriptors: IVF lists hold 8-bit codes instead of float32 from there (1 GB of float32)
NPROBE = 16


def lnbnn_scores(dist2, nbr, owner, n_images: int, k: int = 4, exclude: int | None = None, return_norms: bool = False):
    """LNBNN score of each image from one query's neighbour lists (and, with ``return_norms``, each
    query descriptor's normaliser distance ``d_norm``, 0 where it has fewer than ``k + 1`` neighbours).

    ``dist2`` / ``nbr``: ``(n_descriptors, m)`` squared distances and database descriptor ids
    (-1 = none), nearest first, ``m > k``; ``owner[id]`` = the image a database descriptor belongs
    to; descriptors of image ``exclude`` are skipped. A query descriptor with fewer than ``k + 1``
    usable neighbours counts nothing.

    >>> owner = np.array([0, 0, 1, 2, 3])
    >>> d2 = np.array([[1.0, 4.0, 9.0, 16.0]])            # distances 1, 2, 3, 4
    >>> lnbnn_scores(d2, np.array([[2, 0, 1, 3]]), owner, 4, k=2).tolist()   # norm = 3rd = 3
    [1.0, 2.0, 0.0, 0.0]
    >>> lnbnn_scores(d2, np.array([[2, 0, 1, 3]]), owner, 4, k=2, exclude=1).tolist()  # 1 skipped: norm 4
    [2.0, 0.0, 0.0, 0.0]
    >>> lnbnn_scores(d2, np.array([[2, 0, 1, 3]]), owner, 4, k=2, return_norms=True)[1].tolist()
    [3.0]
    """
    nbr = np.asarray(nbr, np.int64)
    o = np.where(nbr >= 0, np.asarray(owner)[np.clip(nbr, 0, None)], -1)
    keep = (nbr >= 0) & ((o != exclude) if exclude is not None else True)
    cum = np.cumsum(keep, axis=1)
    ok = cum[:, -1] >= k + 1 if cum.size else np.zeros(len(nbr), bool)
    norms = np.zeros(len(nbr), np.float32)
    if not ok.any():
        z = np.zeros(n_images, np.float32)
        return (z, norms) if return_norms else z
    d = np.sqrt(np.maximum(np.asarray(dist2, np.float64)[ok], 0.0))
    o, keep, cum = o[ok], keep[ok], cum[ok]
    norm = d[np.arange(len(d)), np.argmax(keep & (cum == k + 1), axis=1)]
    norms[ok] = norm
    r, c = np.nonzero(keep & (cum <= k))
    own, w = o[r, c], np.maximum(norm[r] - d[r, c], 0.0)
    _, first = np.unique(r * np.int64(n_images) + own, return_index=True)  # closest neighbour per image
    out = np.bincount(own[first], weights=w[first], minlength=n_images).astype(np.float32)
    return (out, norms) if return_norms else out


def verified_score(q_desc, c_desc, pairs, norms) -> float:
    """HotSpotter's spatially verified LNBNN score of one (query, candidate) pair: each geometric
    inlier ``(query keypoint, candidate keypoint)`` of ``pairs`` counts ``max(d_norm - d, 0)``, ``d``
    its descriptor distance and ``d_norm`` the query descriptor's LNBNN normaliser against the whole
    database (``norms``, from :func:`lnbnn_scores`). An inlier on something many images share (a
    text label, a timestamp, a padding corner, water) counts ~0, one on a mark only this candidate
    has counts a lot; an inlier count weighs them alike.

    >>> q = np.eye(3, 128, dtype=np.float32); c = q.copy(); c[1, 1] = 0.6   # keypoint 1 matches less well
    >>> round(verified_score(q, c, np.array([[0, 0], [1, 1], [2, 2]]), np.array([0.5, 0.5, 0.0])), 3)
    0.6
    """
    return float(inlier_weights(q_desc, c_desc, pairs, norms).sum())


def inlier_weights(q_desc, c_desc, pairs, norms) -> np.ndarray:
    """What each inlier of ``pairs`` adds to :func:`verified_score`: ``max(d_norm - d, 0)`` (0 = it
    is no closer than the query descriptor's normaliser: something many images share)."""
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    q_desc, c_desc = np.asarray(q_desc, np.float32), np.asarray(c_desc, np.float32)
    d = np.linalg.norm(q_desc[pairs[:, 0]] - c_desc[pairs[:, 1]], axis=1) if len(pairs) else np.zeros(0, np.float32)
    return np.maximum(np.asarray(norms, np.float32)[pairs[:, 0]] - d, 0.0)


def prune_trained(folder, keep: int | None = None) -> list[Path]:
    """Delete all but the ``keep`` (default ``KEEP_TRAINED``) most recently used trained lists
    (``*.faiss``, by mtime: a reuse touches its file) in ``folder``; returns the deleted paths. Each
    changed crop or setting trains lists under a new name, so without this a folder that is
    experimented in only grows.

    >>> import os, tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> for i in range(4):
    ...     _ = (d / f"{i}.faiss").write_bytes(b"x"); os.utime(d / f"{i}.faiss", (i, i))
    >>> [p.name for p in prune_trained(d, keep=2)], sorted(p.name for p in d.iterdir())
    (['1.faiss', '0.faiss'], ['2.faiss', '3.faiss'])
    """
    files = sorted(Path(folder).glob("*.faiss"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    gone = files[int(KEEP_TRAINED if keep is None else keep):]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def _read_trained(path, nlist: int):
    """The trained empty IVF index saved at ``path`` (None: no path, no file, unreadable, or not
    ``nlist`` lists of 128-d descriptors)."""
    import faiss

    if path is None or not Path(path).exists():
        return None
    try:
        index = faiss.read_index(str(path))
    except RuntimeError:  # (faiss raises RuntimeError on a truncated or foreign file)
        return None
    ok = isinstance(index, faiss.IndexIVF) and index.is_trained and index.ntotal == 0 and index.nlist == nlist
    return index if ok and index.d == 128 else None


class DescriptorIndex:
    """The descriptors of ``feats[i]`` for the database ``rows`` (table row numbers), searchable.

    >>> from common.local_features import Features
    >>> rng = np.random.default_rng(0)
    >>> f = [Features(np.zeros((30, 2), np.float32), rng.random((30, 128)).astype(np.float32), 1.0) for _ in range(4)]
    >>> idx = DescriptorIndex({r: f[r] for r in range(4)}, [0, 1, 2], n_images=4)
    >>> s = idx.scores(f[1].desc, exclude=None)    # image 1's own descriptors find image 1 first
    >>> int(np.argmax(s)), float(s[3])             # row 3 is not in the database
    (1, 0.0)
    """

    def __init__(self, feats: dict, rows: Sequence[int], n_images: int, k: int = 4, seed: int = 0, trained=None):
        """``trained``: a file for the trained, still empty IVF index (its k-means lists, the 8-bit
        codes' ranges), read when there and written when not: the caller names it by what it was
        trained on (:meth:`common.rerank.LocalScorer.lnbnn_index`), so a rerun skips the training."""
        import faiss

        rows = [int(r) for r in rows if len(feats[int(r)])]
        self.k, self.n_images = int(k), int(n_images)
        self.owner = np.concatenate([np.full(len(feats[r]), r, np.int64) for r in rows]) if rows else np.zeros(0, np.int64)
        x = np.ascontiguousarray(np.concatenate([feats[r].desc for r in rows]).astype(np.float32)) if rows \
            else np.zeros((0, 128), np.float32)
        self.n, self.trained_from_cache = len(x), False
        if self.n < FLAT_BELOW:
            self.index = faiss.IndexFlatL2(128)
        else:
            nlist = int(4 * np.sqrt(self.n))
            self.index = _read_trained(trained, nlist)
            self.trained_from_cache = self.index is not None
            if self.trained_from_cache:  # its mtime says when it was last used: prune_trained keeps the newest
                try:
                    Path(trained).touch()
                except OSError:  # (a read-only cache still serves)
                    pass
            if self.index is None:
                if self.n < SQ8_ABOVE:
                    self.index = faiss.IndexIVFFlat(faiss.IndexFlatL2(128), 128, nlist)
                else:  # 8-bit codes: a quarter of float32's memory (SIFT is 8-bit data to begin with)
                    self.index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatL2(128), 128, nlist,
                                                               faiss.ScalarQuantizer.QT_8bit)
                pick = np.random.default_rng(seed).choice(self.n, size=min(self.n, 64 * nlist), replace=False)
                self.index.train(x[np.sort(pick)])
                if trained is not None:
                    from .io import atomic_path

                    with atomic_path(trained) as tmp:
                        faiss.write_index(self.index, str(tmp))
                    prune_trained(Path(trained).parent)
            self.index.nprobe = NPROBE
        self.index.add(x)

    def scores(self, desc, exclude: int | None, return_norms: bool = False):
        """LNBNN score ``(n_images,)`` of every image for one query's descriptors (0 off the database);
        with ``return_norms`` also each descriptor's normaliser distance (:func:`lnbnn_scores`)."""
        desc = np.ascontiguousarray(np.asarray(desc, np.float32))
        if not len(desc) or not self.n:
            z = np.zeros(self.n_images, np.float32)
            return (z, np.zeros(len(desc), np.float32)) if return_norms else z
        # neighbours enough for k + 1 after skipping the query's own descriptors (one image's worth at most)
        m = min(self.n, self.k + 1 + (16 if exclude is not None else 0))
        d2, nbr = self.index.search(desc, m)
        return lnbnn_scores(d2, nbr, self.owner, self.n_images, self.k, exclude, return_norms)
