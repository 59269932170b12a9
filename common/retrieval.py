"""Embedding search: L2 normalisation, the weighted meta-embedding, faiss inner-product top-k,
identity ranking and the local-validation evaluation.

Embeddings are L2-normalised, so the inner product faiss ranks by is the cosine similarity.

>>> [round(float(v), 4) for v in meta_embedding([np.array([[3.0, 4.0]]), np.array([[0.0, 2.0]])], [1.0, 1.0])[0]]
[0.4243, 0.5657, 0.0, 0.7071]
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

from .config import ConfigError
from .metrics import NEW_WHALE, count_relevant, image_scores, kaggle_map5, relevance


def l2_normalize(x, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); all-zero rows stay zero.

    >>> l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]])).tolist()
    [[0.6000000238418579, 0.800000011920929], [0.0, 0.0]]
    """
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, eps)


def meta_embedding(embeddings: Sequence[np.ndarray], weights: Sequence[float] | None = None,
                   chunk: int = 65536) -> np.ndarray:
    """``L2n(concat_i(w_i * L2n(e_i)))`` as float32: each member contributes ``w_i**2 / sum(w**2)``
    of the cosine similarity, whatever its embedding size. Members may be float16 memory maps; they
    are read ``chunk`` rows at a time, so the only full-size array is the result."""
    embeddings = list(embeddings)
    if not embeddings:
        raise ValueError("meta_embedding needs at least one embedding array")
    weights = [1.0] * len(embeddings) if weights is None else [float(w) for w in weights]
    if len(weights) != len(embeddings):
        raise ValueError(f"{len(weights)} weights for {len(embeddings)} embedding arrays")
    if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
        raise ConfigError(f"ensemble weights must be >= 0 and not all zero, got {weights}")
    rows = {len(e) for e in embeddings}
    if len(rows) != 1:
        raise ValueError(f"embedding arrays disagree on the number of images: {sorted(rows)}")
    used = [(w, e) for w, e in zip(weights, embeddings) if w > 0]
    out = np.empty((rows.pop(), sum(e.shape[1] for _, e in used)), np.float32)
    for start in range(0, len(out), chunk):  # a block at a time: float16 memory maps stay on disk
        block = out[start:start + chunk]
        block[:] = np.concatenate([w * l2_normalize(e[start:start + chunk]) for w, e in used], axis=1)
        block[:] = l2_normalize(block)
    return out


def _use_gpu(gpu) -> bool:
    import faiss

    n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if gpu == "auto":
        return n_gpus > 0
    if gpu and n_gpus == 0:
        raise ConfigError("search.gpu is true, but this faiss build sees no GPU (install faiss-gpu or set search.gpu: auto)")
    return bool(gpu)


INDEXES = ("auto", "flat", "ivf")


def index_kind(index: str, n_db: int, ivf_above: int = 1_000_000) -> str:
    """The faiss index ``search.index`` means for ``n_db`` database rows: ``auto`` is exact up to
    ``ivf_above`` rows and IVF beyond.

    >>> index_kind("auto", 999, ivf_above=1000), index_kind("auto", 1001, ivf_above=1000), index_kind("ivf", 5)
    ('flat', 'ivf', 'ivf')
    """
    if index not in INDEXES:
        raise ConfigError(f"search.index must be one of {', '.join(INDEXES)}, not {index!r}")
    if index == "auto":
        return "ivf" if n_db > int(ivf_above) else "flat"
    return index


def ivf_lists(nlist, n_db: int) -> int:
    """IVF cluster count: ``nlist``, or for ``auto`` 4 * sqrt(n) (faiss' rule of thumb), capped so
    each cluster has ~39 training points.

    >>> ivf_lists("auto", 1_000_000), ivf_lists(100, 1_000_000), ivf_lists("auto", 100)
    (4000, 100, 2)
    """
    n = int(4 * np.sqrt(n_db)) if nlist == "auto" else int(nlist)
    return max(1, min(n, n_db // 39))


VECTORS = ("float32", "float16")


def search_options(search_cfg: dict) -> dict:
    """The keyword arguments of :func:`search` from the config's ``search:`` section."""
    return dict(index=search_cfg["index"], nlist=search_cfg["ivf_nlist"], nprobe=search_cfg["ivf_nprobe"],
                gpu=search_cfg["gpu"], ivf_above=search_cfg["ivf_above"], vectors=search_cfg["vectors"])


def build_index(db: np.ndarray, index: str = "flat", nlist=100, nprobe=10, gpu="auto",
                ivf_above: int = 1_000_000, vectors: str = "float32", chunk: int = 65536):
    """A faiss inner-product index over ``db``: exact ``IndexFlatIP`` or ``IndexIVFFlat`` (``nlist``
    clusters, see :func:`ivf_lists`; ``nprobe`` searched, ``auto`` = 1/16 of the lists), on GPU when
    asked/present; ``auto`` picks by size (:func:`index_kind`). ``vectors="float16"`` stores them as
    float16 (faiss' scalar quantizer; on GPU the cloner's float16 option): half the memory, the same
    neighbours up to float16 rounding of the similarities. ``db`` (float32 or float16, e.g. a memory
    map) is added ``chunk`` rows at a time and IVF k-means trains on a sample of 64 rows per list, so
    no float32 copy of the whole database is made."""
    import faiss

    if vectors not in VECTORS:
        raise ConfigError(f"search.vectors must be one of {', '.join(VECTORS)}, not {vectors!r}")
    d = db.shape[1]
    kind = index_kind(index, len(db), ivf_above)
    gpu, half = _use_gpu(gpu), vectors == "float16"
    fp16 = half and not gpu  # on GPU the cloner stores float16 instead
    if kind == "flat":
        idx = (faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT) if fp16
               else faiss.IndexFlatIP(d))
    else:
        nlist = ivf_lists(nlist, len(db))
        quantizer = faiss.IndexFlatIP(d)
        idx = (faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16,
                                             faiss.METRIC_INNER_PRODUCT) if fp16
               else faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT))
        sample = np.sort(np.random.default_rng(0).choice(len(db), min(len(db), 64 * nlist), replace=False))
        idx.train(np.ascontiguousarray(db[sample], dtype=np.float32))  # k-means on 64 points per list: minutes, not an hour, at 1M
        idx.nprobe = max(1, nlist // 16) if nprobe == "auto" else min(int(nprobe), nlist)
    if gpu:
        options = faiss.GpuMultipleClonerOptions()
        options.useFloat16 = half
        idx = faiss.index_cpu_to_all_gpus(idx, options)
    for start in range(0, len(db), chunk):
        idx.add(np.ascontiguousarray(db[start:start + chunk], dtype=np.float32))
    return idx


def index_recall(db, queries, k: int, n_sample: int = 500, seed: int = 0, **search_kw) -> dict:
    """Recall@k of the configured index against exact search on a sample of the queries (the
    share of the exact top-k the index returns): ``{"index", "n_db", "n_sample", "recall"}``;
    recall is 1.0 without computing anything when the index is exact.

    >>> rng = np.random.default_rng(0); db = rng.normal(size=(2000, 16)).astype(np.float32)
    >>> index_recall(db, db[:50], 10, index="ivf", nlist=8, nprobe=8, gpu=False)["recall"]
    1.0
    """
    kw = dict(search_kw)
    kind = index_kind(kw.get("index", "flat"), len(db), kw.get("ivf_above", 1_000_000))
    out = {"index": kind, "n_db": int(len(db)), "n_sample": 0, "recall": 1.0}
    if kind == "flat" or len(queries) == 0:
        return out
    rng = np.random.default_rng(seed)
    q = np.asarray(queries)[np.sort(rng.choice(len(queries), min(n_sample, len(queries)), replace=False))]
    _, approx = search(db, q, k, **kw)
    _, exact = search(db, q, k, **{**kw, "index": "flat"})
    hits = [len(set(a[a >= 0]) & set(e[e >= 0])) / max(1, int((e >= 0).sum())) for a, e in zip(approx, exact)]
    return {**out, "n_sample": int(len(q)), "recall": round(float(np.mean(hits)), 4)}


def search(db, queries, k: int, exclude=None, index: str = "flat", nlist=100, nprobe=10,
           gpu="auto", groups=None, ivf_above: int = 1_000_000, vectors: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """Top-k database rows per query by inner product: ``(scores (nq, k) float32, idx (nq, k) int64)``.

    ``exclude[q]`` is a database row dropped from query q's list (-1: none), e.g. the query
    itself. ``groups=(query_groups, db_groups)`` (labels, '' = none) also drops every database
    row of the query's group, e.g. the other photos of the same encounter. Where fewer than k
    rows exist, the tail is padded with idx -1 and score -inf.
    """
    if groups is not None:
        return _search_grouped(db, queries, k, exclude, groups, dict(index=index, nlist=nlist, nprobe=nprobe, gpu=gpu,
                                                                           ivf_above=ivf_above, vectors=vectors))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if db.ndim != 2 or queries.ndim != 2 or db.shape[1] != queries.shape[1]:
        raise ValueError(f"db {db.shape} and queries {queries.shape} must be 2-D with the same width")
    nq = len(queries)
    exclude = np.full(nq, -1, np.int64) if exclude is None else np.asarray(exclude, dtype=np.int64)
    if exclude.shape != (nq,):
        raise ValueError(f"exclude must hold one db row per query ({nq}), got shape {exclude.shape}")
    scores = np.full((nq, k), -np.inf, np.float32)
    out = np.full((nq, k), -1, np.int64)
    if nq == 0 or len(db) == 0 or k <= 0:
        return scores, out
    extra = int((exclude >= 0).any())
    kk = min(k + extra, len(db))
    s, i = build_index(db, index, nlist, nprobe, gpu, ivf_above, vectors).search(queries, kk)
    keep = (i >= 0) & (i != exclude[:, None])
    for q in range(nq):  # stable compaction: drop the excluded row, keep the order
        row = np.flatnonzero(keep[q])[:k]
        out[q, : len(row)] = i[q, row]
        scores[q, : len(row)] = s[q, row]
    return scores, out


def _search_grouped(db, queries, k, exclude, groups, kw):
    qg, dg = (np.asarray(g, dtype=object).astype(str) for g in groups)
    if len(qg) != len(queries) or len(dg) != len(db):
        raise ValueError(f"groups must label every query ({len(queries)}) and database row ({len(db)})")
    labelled = dg[dg != ""]
    extra = int(np.unique(labelled, return_counts=True)[1].max()) if len(labelled) else 0
    scores, idx = search(db, queries, k + extra, exclude, **kw)
    out_s = np.full((len(queries), k), -np.inf, np.float32)
    out_i = np.full((len(queries), k), -1, np.int64)
    for q in range(len(queries)):
        keep = idx[q] >= 0
        if qg[q]:
            keep &= dg[np.clip(idx[q], 0, None)] != qg[q]
        row = np.flatnonzero(keep)[:k]
        out_i[q, : len(row)] = idx[q, row]
        out_s[q, : len(row)] = scores[q, row]
    return out_s, out_i


def relevant_counts(query_ids, db_ids, query_in_db: bool = True, groups=None) -> np.ndarray:
    """:func:`count_relevant`, and with ``groups=(query_groups, db_groups)`` without the images of
    the query's own group (which a grouped search never returns).

    >>> relevant_counts(["a", "b"], ["a", "a", "b", "b"], True, (["e1", ""], ["e1", "e1", "", "e2"])).tolist()
    [0, 1]
    """
    n = count_relevant(query_ids, db_ids, query_in_db)
    if groups is None:
        return n
    qg = np.asarray(groups[0], dtype=object).astype(str)
    raw = count_relevant(query_ids, db_ids, query_in_db=False)
    return np.where(qg != "", np.maximum(raw - same_group_relevant(query_ids, db_ids, *groups), 0), n)


def same_group_relevant(query_ids, db_ids, q_groups, db_groups) -> np.ndarray:
    """Per query, the database images of its identity inside its own group (not new_whale);
    the query's own row counts when it is in the database.

    >>> same_group_relevant(["a", "b"], ["a", "a", "b"], ["e1", ""], ["e1", "e2", ""]).tolist()
    [1, 0]
    """
    db_ids = np.asarray(db_ids, dtype=object)
    dg = np.asarray(db_groups, dtype=object).astype(str)
    out = np.zeros(len(query_ids), np.int64)
    for i, (qid, g) in enumerate(zip(query_ids, np.asarray(q_groups, dtype=object).astype(str))):
        if g and qid != NEW_WHALE:
            out[i] = int(((dg == g) & (db_ids == qid)).sum())
    return out


def rank_identities(scores, idx, db_ids: Sequence[str], n: int = 5, skip: Sequence[str] = (NEW_WHALE,),
                    hide: Sequence[str] | None = None):
    """Per query, the first ``n`` distinct identities of its ranked images (each scored by its best
    image), ``skip`` labels left out: ``(ids: list[list[str]], sims: list[list[float]])``.
    ``hide``: one more label per query ('' = none) left out of that query's ranking, as if the
    database had no photo of it (validation's stand-ins for new individuals).

    >>> rank_identities([[0.9, 0.8, 0.7, 0.6]], [[2, 0, 1, 3]], ["a", "new_whale", "a", "b"], n=2)
    ([['a', 'b']], [[0.8999999761581421, 0.6000000238418579]])
    >>> rank_identities([[0.9, 0.8, 0.7, 0.6]] * 2, [[2, 0, 1, 3]] * 2, ["a", "new_whale", "a", "b"], 2, hide=["a", ""])[0]
    [['b'], ['a', 'b']]
    """
    db_ids = np.asarray(db_ids, dtype=object)
    scores = np.asarray(scores, dtype=np.float32)
    idx = np.asarray(idx, dtype=np.int64)
    skip = set(skip)
    hide = [""] * len(idx) if hide is None else list(hide)
    all_ids, all_sims = [], []
    for s_row, i_row, hidden in zip(scores, idx, hide):
        ids, sims = [], []
        for s, i in zip(s_row, i_row):
            if i < 0:
                break
            label = db_ids[i]
            if label in skip or label in ids or (hidden and label == hidden):
                continue
            ids.append(label)
            sims.append(float(s))
            if len(ids) == n:
                break
        all_ids.append(ids)
        all_sims.append(sims)
    return all_ids, all_sims


def evaluate_search(scores, idx, query_ids, db_ids, k: int = 20, query_in_db: bool = True, n_relevant=None) -> dict:
    """Scores of search results against labels: image-mode map20/top1/hit20 over the first k
    results and ID-mode map5 (identities by best image, no new_whale prediction).
    ``n_relevant`` overrides the relevant-image counts (e.g. without same-encounter images)."""
    query_ids = np.asarray(query_ids, dtype=object)
    hits = relevance(query_ids, db_ids, np.asarray(idx)[:, :k])
    n_rel = count_relevant(query_ids, db_ids, query_in_db) if n_relevant is None else n_relevant
    out = image_scores(hits, n_rel, k)
    ids, _ = rank_identities(scores, idx, db_ids, n=5)
    out["map5"] = kaggle_map5(ids, list(query_ids))
    return {k_: out[k_] for k_ in ("map20", "top1", "hit20", "map5", "n_queries")}


def id_search_depth(k: int, n_db: int) -> int:
    """How many neighbours to fetch so that 5 distinct identities are usually among them."""
    return max(0, min(n_db - 1, max(k, 100)))


def evaluate_embeddings(emb, ids, is_query, k: int = 20, subsets: dict | None = None) -> dict:
    """Local-validation scores ``{"map20", "top1", "hit20", "map5", "n_queries"}``.

    ``emb``/``ids``/``is_query`` describe the whole database; queries are the ``is_query`` rows,
    each excluded from its own list; relevant = same Id, never new_whale. Queries without a
    relevant database image are skipped for map20 and count as misses elsewhere.
    ``subsets = {name: row mask}`` adds ``<metric>_<name>`` scores (and ``n_queries_<name>``) of
    the queries in each mask, e.g. identities seen and unseen in training.

    >>> e = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [0.8, 0, 0.6], [0, 0, 1]])
    >>> seen = np.array([1, 1, 1, 1, 0, 0], bool)  # "c" (its query closer to "a") never trained
    >>> r = evaluate_embeddings(e, ["a", "a", "b", "b", "c", "c"], [1, 0, 1, 0, 1, 0], subsets={"seen": seen, "unseen": ~seen})
    >>> round(r["top1"], 3), r["top1_seen"], r["top1_unseen"], r["n_queries_seen"], r["n_queries_unseen"]
    (0.667, 1.0, 0.0, 2, 1)
    """
    emb = l2_normalize(emb)
    ids = np.asarray(ids, dtype=object)
    q = np.flatnonzero(np.asarray(is_query).astype(bool))
    if len(emb) != len(ids) or len(ids) != len(np.asarray(is_query)):
        raise ValueError(f"emb ({len(emb)}), ids ({len(ids)}) and is_query ({len(is_query)}) must have equal length")
    if not len(q):
        warnings.warn("evaluate_embeddings: no query rows")
        return {"map20": 0.0, "top1": 0.0, "hit20": 0.0, "map5": 0.0, "n_queries": 0}
    kk = max(k, id_search_depth(k, len(emb)))
    scores, idx = search(emb, emb[q], kk, exclude=q, gpu=False)
    out = evaluate_search(scores, idx, ids[q], ids, k=k)
    for name, mask in (subsets or {}).items():
        sel = np.asarray(mask, bool)[q]
        if sel.any():
            part = evaluate_search(scores[sel], idx[sel], ids[q][sel], ids, k=k)
            out.update({f"{m}_{name}": part[m] for m in ("map20", "top1", "hit20")})
        out[f"n_queries_{name}"] = int(sel.sum())
    return out
