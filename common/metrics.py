"""Retrieval metrics (pure numpy): image-mode MAP@k, top-1, hit@k, Kaggle's ID-mode MAP@5.

Image mode scores a ranked list of database images. ``hits`` is a boolean matrix
(queries x ranks): ``hits[q, r]`` is True when the r-th returned image of query q has the
query's identity. ``n_relevant[q]`` counts the query's relevant images in the database
(the query itself excluded). ``new_whale`` is never relevant.

>>> hits = relevance(["a", "b", "new_whale"], ["a", "b", "a", "new_whale"], [[0, 1, 2], [0, 2, 1], [3, 0, 1]])
>>> hits.astype(int).tolist()
[[1, 0, 1], [0, 0, 1], [0, 0, 0]]
>>> count_relevant(["a", "b", "new_whale"], ["a", "b", "a", "new_whale"], query_in_db=False).tolist()
[2, 1, 0]
>>> count_relevant(["a", "b"], ["a", "b", "a", "new_whale"]).tolist()   # own row not counted
[1, 0]
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

NEW_WHALE = "new_whale"


def average_precision_at_k(hits: Sequence[bool], n_relevant: int, k: int = 20) -> float:
    """AP of one ranked list, cut at k and normalised by ``min(n_relevant, k)``.

    Sum of precision@i over the ranks i that hold a relevant item, divided by the number of
    relevant items that *could* appear in k ranks. 0.0 when nothing is relevant.

    >>> average_precision_at_k([1, 0, 1], n_relevant=2, k=3)   # (1/1 + 2/3) / 2
    0.8333333333333333
    >>> average_precision_at_k([0, 1, 0], n_relevant=5, k=3)   # (1/2) / min(5, 3)
    0.16666666666666666
    >>> average_precision_at_k([1, 1, 0, 1], n_relevant=3, k=2)  # ranks past k do not count
    1.0
    >>> average_precision_at_k([0, 0], n_relevant=0)
    0.0
    """
    h = np.asarray(hits, dtype=bool)[:k]
    denom = min(int(n_relevant), k)
    if denom <= 0 or not h.any():
        return 0.0
    ranks = np.flatnonzero(h) + 1
    precision = np.arange(1, len(ranks) + 1) / ranks
    return float(precision.sum() / denom)


def map_at_k(hits, n_relevant, k: int = 20) -> float:
    """Image-mode MAP@k: mean AP@k over the queries that have at least one relevant image.

    >>> map_at_k([[1, 0, 1], [0, 1, 0], [0, 0, 0]], [2, 1, 0], k=3)   # 3rd query skipped
    0.6666666666666666
    >>> map_at_k([[0, 0]], [0])
    0.0
    """
    h = np.asarray(hits, dtype=bool)
    n = np.asarray(n_relevant)
    if h.ndim != 2 or len(h) != len(n):
        raise ValueError(f"hits must be (queries, ranks) and n_relevant (queries,), got {h.shape} and {n.shape}")
    keep = n > 0
    if not keep.any():
        return 0.0
    h, denom = h[keep, :k], np.minimum(n[keep], k)  # average_precision_at_k of every row at once
    precision = np.cumsum(h, axis=1) / np.arange(1, h.shape[1] + 1)
    return float(np.mean(np.where(h, precision, 0.0).sum(axis=1) / denom))


def top1(hits) -> float:
    """Share of queries whose first result is relevant.

    >>> top1([[1, 0], [0, 1], [0, 0], [1, 1]])
    0.5
    """
    h = np.asarray(hits, dtype=bool)
    return float(h[:, 0].mean()) if h.size else 0.0


def hit_at_k(hits, k: int = 20) -> float:
    """Share of queries with any relevant image among the first k results.

    >>> hit_at_k([[0, 0, 1], [0, 0, 0]], k=3), hit_at_k([[0, 0, 1], [0, 0, 0]], k=2)
    (0.5, 0.0)
    """
    h = np.asarray(hits, dtype=bool)
    return float(h[:, :k].any(axis=1).mean()) if h.size else 0.0


def kaggle_map5(predictions: Sequence[Sequence[str]], truth: Sequence[str]) -> float:
    """Humpback Whale Identification MAP@5: one correct Id per image, score 1/rank of its first
    occurrence in the (up to 5) predicted Ids, else 0; averaged over images.

    >>> kaggle_map5([["a", "b"], ["x", "y", "c"], ["q"], ["new_whale", "d"]], ["a", "c", "z", "new_whale"])
    0.5833333333333333
    >>> kaggle_map5([["b", "b", "a"]], ["a"])   # repeated labels keep their first rank
    0.3333333333333333
    """
    if len(predictions) != len(truth):
        raise ValueError(f"{len(predictions)} prediction rows for {len(truth)} truth labels")
    if not len(truth):
        return 0.0
    total = 0.0
    for pred, t in zip(predictions, truth):
        for rank, p in enumerate(list(pred)[:5], start=1):
            if p == t:
                total += 1.0 / rank
                break
    return total / len(truth)


def ranked_map5(idx, query_ids: Sequence[str], db_ids: Sequence[str], n: int = 5) -> float:
    """:func:`kaggle_map5` of the identities ranked by image lists ``idx`` (queries x ranks, -1 =
    padding: the list ends there), each identity at the rank of its first image, ``new_whale``
    images skipped: what ``kaggle_map5(rank_identities(.., idx, db_ids, n)[0], query_ids)`` gives
    (common.retrieval), for every query at once.

    >>> ranked_map5([[2, 0, 1, 3], [3, 1, 2, -1], [0, -1, 3, 3]], ["b", "b", "b"], ["a", "new_whale", "a", "b"])
    0.5
    """
    idx = np.asarray(idx, np.int64)
    if not len(idx):
        return 0.0
    db = np.asarray(db_ids, dtype=object).astype(str)
    q = np.asarray(query_ids, dtype=object).astype(str)
    names, codes = np.unique(np.concatenate([db, q]), return_inverse=True)
    db_c, q_c = codes[:len(db)], codes[len(db):]
    nw = int(np.searchsorted(names, NEW_WHALE)) if NEW_WHALE in set(names.tolist()) else -2
    listed = np.cumprod(idx >= 0, axis=1).astype(bool)  # everything after the first padding is off the list
    c = np.where(listed, db_c[np.clip(idx, 0, max(len(db) - 1, 0))] if len(db) else -1, -1)
    c = np.where(c == nw, -1, c)
    order = np.argsort(c, axis=1, kind="stable")  # equal codes keep their rank order: the first comes first
    sc = np.take_along_axis(c, order, 1)
    first_sorted = np.ones_like(sc, bool)
    first_sorted[:, 1:] = sc[:, 1:] != sc[:, :-1]
    first = np.zeros_like(first_sorted)
    np.put_along_axis(first, order, first_sorted, 1)
    first &= c >= 0
    rank = np.cumsum(first, axis=1)  # identity rank of each position's identity at its first image
    r = np.where(first & (c == q_c[:, None]) & (q_c != nw)[:, None], rank, 0).sum(1)
    return float(np.where((r >= 1) & (r <= n), 1.0 / np.maximum(r, 1), 0.0).mean())


def relevance(query_ids: Sequence[str], db_ids: Sequence[str], idx) -> np.ndarray:
    """Boolean hits matrix: ``db_ids[idx[q, r]] == query_ids[q]``; ``new_whale`` and ``idx == -1``
    (padding) are never hits."""
    idx = np.asarray(idx, dtype=np.int64)
    db = np.asarray(db_ids, dtype=object)
    q = np.asarray(query_ids, dtype=object)
    got = np.where(idx >= 0, db[np.clip(idx, 0, max(len(db) - 1, 0))], None) if len(db) else np.full(idx.shape, None)
    return (got == q[:, None]) & (q[:, None] != NEW_WHALE) & (idx >= 0)


def count_relevant(query_ids: Sequence[str], db_ids: Sequence[str], query_in_db: bool = True) -> np.ndarray:
    """Relevant database images per query (same Id, not new_whale); with ``query_in_db`` the
    query's own row is not counted."""
    ids, counts = np.unique(np.asarray(db_ids, dtype=object).astype(str), return_counts=True)
    lookup = dict(zip(ids, counts))
    out = np.array([0 if q == NEW_WHALE else lookup.get(q, 0) for q in query_ids], dtype=np.int64)
    return np.maximum(out - int(query_in_db), 0) if query_in_db else out


def image_scores(hits, n_relevant, k: int = 20) -> dict:
    """The image-mode figures of one result list: ``{"map20", "top1", "hit20", "n_queries"}``
    (keys named for k=20 whatever k is, so tables line up)."""
    h = np.asarray(hits, dtype=bool)
    return {"map20": map_at_k(h, n_relevant, k), "top1": top1(h), "hit20": hit_at_k(h, k), "n_queries": int(len(h))}


def query_scores(hits, n_relevant, k: int = 20) -> dict:
    """Per-query figures behind :func:`image_scores`: AP@k (NaN where nothing is relevant, the
    queries MAP@k skips), first result relevant and any relevant in the first k (0/1).

    >>> {m: v.tolist() for m, v in query_scores([[1, 0, 1], [0, 1, 0], [0, 0, 0]], [2, 1, 0], k=3).items()}
    {'map20': [0.8333333333333333, 0.5, nan], 'top1': [1.0, 0.0, 0.0], 'hit20': [1.0, 1.0, 0.0]}
    """
    h, n = np.asarray(hits, dtype=bool), np.asarray(n_relevant)
    ap = np.array([average_precision_at_k(r, c, k) if c > 0 else np.nan for r, c in zip(h, n)], np.float64)
    return {"map20": ap, "top1": h[:, 0].astype(np.float64) if h.size else np.zeros(len(h)),
            "hit20": h[:, :k].any(axis=1).astype(np.float64) if h.size else np.zeros(len(h))}


def paired_bootstrap(a, b, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Mean of the per-query difference ``a - b`` (queries where both are finite) and its
    percentile bootstrap interval over queries: ``{"diff", "lo", "hi", "n"}``. An interval that
    holds 0 says the two lists are not told apart on these queries.

    >>> r = paired_bootstrap([1, 1, 1, 1, 0, 1, 1, 1], [0, 0, 1, 0, 0, 0, 0, 0])
    >>> r["diff"], r["lo"] > 0, r["n"]
    (0.75, True, 8)
    >>> r = paired_bootstrap([1, 0, 1, 0], [0, 1, 0, 1])
    >>> r["lo"] < 0 < r["hi"]
    True
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = (a - b)[np.isfinite(a) & np.isfinite(b)]
    if not len(d):
        return {"diff": 0.0, "lo": 0.0, "hi": 0.0, "n": 0}
    means = np.random.default_rng(seed).choice(d, size=(int(n_boot), len(d)), replace=True).mean(axis=1)
    tail = (1.0 - float(level)) / 2.0 * 100.0
    lo, hi = np.percentile(means, [tail, 100.0 - tail])
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi), "n": int(len(d))}


def subset_scores(hits, n_relevant, subsets: dict, k: int = 20) -> dict:
    """:func:`image_scores` of each row subset ``{name: mask}``, keys ``<metric>_<name>`` (and
    ``n_queries_<name>``); empty subsets are left out.

    >>> hits = [[True, False], [False, False], [False, True]]
    >>> subset_scores(hits, [1, 1, 1], {"unseen": np.array([False, True, True])}, k=2)
    {'map20_unseen': 0.25, 'top1_unseen': 0.0, 'hit20_unseen': 0.5, 'n_queries_unseen': 2}
    """
    h, n = np.asarray(hits, dtype=bool), np.asarray(n_relevant)
    out = {}
    for name, mask in subsets.items():
        mask = np.asarray(mask, bool)
        if mask.any():
            part = image_scores(h[mask], n[mask], k)
            out.update({f"{m}_{name}": part[m] for m in ("map20", "top1", "hit20")})
            out[f"n_queries_{name}"] = int(mask.sum())
    return out


def calibration_error(p, y, weight=None, bins: int = 10) -> float:
    """Expected calibration error: over equal-width bins of the predicted probability, the
    (weighted) share of pairs times |mean prediction - observed share of positives|. 0 for a
    probability that means what it says.

    >>> calibration_error([0.1, 0.1, 0.9, 0.9], [0, 0, 1, 1])   # |0.1 - 0| and |0.9 - 1|, half each
    0.1
    >>> round(calibration_error([0.3] * 4, [1, 1, 1, 0]), 4)    # says 0.3, is 0.75
    0.45
    >>> calibration_error([], [])
    0.0
    """
    p, y = np.asarray(p, np.float64), np.asarray(y, np.float64)
    w = np.ones(len(p)) if weight is None else np.asarray(weight, np.float64)
    if not len(p) or w.sum() <= 0:
        return 0.0
    which = np.clip((p * bins).astype(np.int64), 0, bins - 1)
    err = 0.0
    for b in np.unique(which):
        m = which == b
        err += w[m].sum() * abs(np.average(p[m], weights=w[m]) - np.average(y[m], weights=w[m]))
    return round(float(err / w.sum()), 12)
