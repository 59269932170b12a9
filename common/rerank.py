"""Re-ranking embedding shortlists with local-feature matching, WildFusion-style.

For every query, the top ``rerank.shortlist`` database images of the (meta-)embedding are
matched with SIFT/RootSIFT + geometric verification (:mod:`common.local_features`); the score
of a pair is its inlier count. Both the cosine similarity and the inlier count are mapped to
P(same individual) by isotonic regressions fitted on local-validation pairs taken from the
*whole* ranking: every shortlist pair plus ``rerank.calib_random`` random pairs per query from
beyond the shortlist, weighted so the sample stands for all of them. (Fitted on shortlist pairs
only, the cosine looks uninformative: every shortlist candidate is already similar.) The fused
score is ``(1 - w) * P_embedding + w * P_local`` (``rerank.fusion: mean``) or the same weighted mean of
their log-odds (``logodds``, :func:`fuse_probabilities`); ``w`` is set or chosen on validation from
0 (embedding only) .. 1 (local only). Each shortlist is re-ordered by the fused score, ties kept
in embedding order, so ``w = 0`` gives exactly the embedding ranking.

With ``rerank.lnbnn`` the query's descriptors are also searched among those of every database
image (:mod:`common.lnbnn`, HotSpotter's LNBNN): its best ``rerank.lnbnn_candidates`` images join
the shortlist (after it, :func:`widen`) and the LNBNN score, calibrated the same way, is fused with
the inlier count's probability into the local evidence (share ``s``, :meth:`Calibration.fuse`).
With ``rerank.xfeat`` a second matcher, XFeat's learned features (:mod:`common.local_features`),
matches the same pairs; its inlier count, calibrated the same way, joins the local evidence
(share ``x``), all three shares chosen together on validation (0 where it does not help).

Encounters (photos of one sighting): local validation never lets a candidate from the query's
own encounter count as a hit or take a place in its shortlist (:func:`common.retrieval.search`
``groups``); they would match through the shared background, not the animal.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .config import ConfigError
from .lnbnn import inlier_weights, verified_score
from .local_features import GEOMETRIES, MATCHERS, METHODS, PairCache, compute_features, match_many, match_pair, resolve_threads
from .evaluation import id_validation, seen_unseen
from .metrics import (NEW_WHALE, calibration_error, image_scores, kaggle_map5, paired_bootstrap, query_scores, ranked_map5,
                      relevance, subset_scores)
from .retrieval import l2_normalize, rank_identities, relevant_counts, search
from .submission import id_truth, insert_new_whale, pad_ids, tune_new_whale_threshold

ID_N = 5
MATCH_KEYS = ("ratio", "ransac_threshold", "method", "min_matches", "geometry")  # what a pair's inlier count depends on
GRID = tuple(round(float(w), 2) for w in np.linspace(0.0, 1.0, 11))


# ---- calibration and fusion ---------------------------------------------------------------------
CURVES = ("centered", "isotonic")


def fit_isotonic(x, y, weight=None, curve: str = "centered") -> dict:
    """Non-decreasing map score -> P(same) as breakpoints ``{"x": [...], "y": [...]}``, linear in
    between and clipped outside (:func:`apply_isotonic`), fitted by isotonic regression (scikit-learn).

    ``isotonic``: its step function (:meth:`sklearn.isotonic.IsotonicRegression.predict`), flat over
    each block of scores the fit pools, so two candidates of one block tie and the other score of
    the fusion alone orders them. ``centered`` (centered isotonic regression, Oron & Flournoy 2017):
    one breakpoint per pooled block, at its pairs' weighted mean score, so the map rises strictly
    between the first and the last block and keeps the score's order; the same levels (README:
    measured against the step function).

    >>> fit_isotonic([0, 1, 2, 3], [0, 1, 0, 1], curve="isotonic")
    {'x': [0.0, 1.0, 2.0, 3.0], 'y': [0.0, 0.5, 0.5, 1.0]}
    >>> fit_isotonic([0, 1, 2, 3], [0, 1, 0, 1])
    {'x': [0.0, 1.5, 3.0], 'y': [0.0, 0.5, 1.0]}
    """
    from sklearn.isotonic import IsotonicRegression

    _choice("calibration", curve, CURVES)
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) == 0:
        return {"x": [0.0], "y": [0.0]}
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
    iso.fit(x, y, sample_weight=weight)
    if curve == "isotonic":
        return {"x": iso.X_thresholds_.tolist(), "y": iso.y_thresholds_.tolist()}
    level = iso.predict(x)
    wt = np.ones_like(x) if weight is None else np.asarray(weight, np.float64)
    levels, block = np.unique(level, return_inverse=True)
    centre = np.bincount(block, wt * x) / np.bincount(block, wt)
    return {"x": centre.tolist(), "y": levels.tolist()}


def apply_isotonic(curve: dict, x) -> np.ndarray:
    return np.interp(np.asarray(x, np.float64), curve["x"], curve["y"])


FUSIONS = ("mean", "logodds")
EPS = 1e-4  # probabilities are clipped to [EPS, 1 - EPS] before log-odds


def _logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), EPS, 1.0 - EPS)
    return np.log(p / (1.0 - p))


def fuse_probabilities(p_emb, p_local, weight: float, fusion: str = "mean") -> np.ndarray:
    """The fused P(same individual) of two calibrated probabilities, ``weight`` = the local share.

    ``mean``: ``(1 - w) p_emb + w p_local`` (WildFusion). ``logodds``: the weighted mean of the
    log-odds, back to a probability (at w = 0.5 the geometric mean of the odds, naive Bayes'
    product halved): a near-certain geometric match outweighs a middling cosine instead of being
    capped at ``w``, and a certain non-match pulls a pair down as hard. Both are non-decreasing
    in each probability, and w = 0 / 1 rank exactly as the embedding / local probability alone.

    >>> fuse_probabilities([0.2, 0.6], [0.99, 0.1], 0.5).round(3).tolist()
    [0.595, 0.35]
    >>> fuse_probabilities([0.2, 0.6], [0.99, 0.1], 0.5, "logodds").round(3).tolist()
    [0.833, 0.29]
    """
    w = float(weight)
    if fusion == "mean":
        return (1.0 - w) * np.asarray(p_emb, np.float64) + w * np.asarray(p_local, np.float64)
    if fusion == "logodds":
        return 1.0 / (1.0 + np.exp(-((1.0 - w) * _logit(p_emb) + w * _logit(p_local))))
    raise ConfigError(f"rerank.fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")


def fuse_evidence(p: dict, weight: float, share: float = 0.0, learned_share: float = 0.0,
                  fusion: str = "mean") -> np.ndarray:
    """:meth:`Calibration.fuse` of the probabilities ``p`` (:meth:`Calibration.evidence`): SIFT's
    local probability fused with LNBNN's (``share``), then with XFeat's (``learned_share``), then with
    the embedding's (``weight`` = the local evidence's share). A missing probability or a share of 0
    leaves its step out."""
    p_local = p["local"]
    if p.get("lnbnn") is not None and share > 0:
        p_local = fuse_probabilities(p_local, p["lnbnn"], share, fusion)
    if p.get("learned") is not None and learned_share > 0:
        p_local = fuse_probabilities(p_local, p["learned"], learned_share, fusion)
    return fuse_probabilities(p["emb"], p_local, weight, fusion)


def fit_platt(score, y, weight=None) -> tuple[float, float]:
    """``(a, b)`` of ``P(same) = sigmoid(a logit(score) + b)`` fitted by weighted logistic regression
    (Platt scaling) on labelled pairs; ``(1.0, 0.0)`` (the score as it is) without both classes or
    when the fit would not be increasing.

    >>> rng = np.random.default_rng(0)
    >>> z = rng.normal(size=4000); y = rng.random(4000) < 1 / (1 + np.exp(-(3 * z + 1)))
    >>> a, b = fit_platt(1 / (1 + np.exp(-z)), y)   # the score's log-odds are a third of the truth's
    >>> round(a), round(b)
    (3, 1)
    >>> fit_platt([0.2, 0.8], [True, True])
    (1.0, 0.0)
    """
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(y, bool)
    if len(y) == 0 or y.all() or not y.any():
        return 1.0, 0.0
    x = _logit(score)[:, None]
    w = None if weight is None else np.asarray(weight, np.float64) / np.mean(weight)
    lr = LogisticRegression(C=1e6, max_iter=1000).fit(x, y, sample_weight=w)
    a, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
    return (a, b) if a > 0 else (1.0, 0.0)


@dataclass
class Calibration:
    emb: dict                      # isotonic breakpoints of the cosine
    local: dict                    # ... of the inlier score (inlier_score)
    weight: float = 0.5            # share of the local probability in the fused score
    new_whale_threshold: float = 0.5
    info: dict = field(default_factory=dict)
    fusion: str = "mean"           # how the two probabilities combine (fuse_probabilities)
    lnbnn: dict | None = None      # isotonic breakpoints of the LNBNN score (None: not used)
    share: float = 0.0             # LNBNN's share of the local evidence (the rest: the inlier score)
    platt: tuple = (1.0, 0.0)      # fused score -> P(same individual): sigmoid(a logit(score) + b)
    inlier_score: str = "count"    # what `local` calibrates: count = inliers, lnbnn = their verified LNBNN score
    learned: dict | None = None    # isotonic breakpoints of the XFeat inlier count (None: not used)
    learned_share: float = 0.0     # XFeat's share of the local evidence (the rest: SIFT's, with LNBNN)

    def p_emb(self, cos) -> np.ndarray:
        return apply_isotonic(self.emb, cos)

    def p_local(self, inliers) -> np.ndarray:
        return apply_isotonic(self.local, inliers)

    def p_lnbnn(self, score) -> np.ndarray:
        return apply_isotonic(self.lnbnn, score)

    def p_learned(self, inliers) -> np.ndarray:
        return apply_isotonic(self.learned, inliers)

    def fuse(self, cos, inliers, weight: float | None = None, lnbnn=None, share: float | None = None,
             learned=None, learned_share: float | None = None) -> np.ndarray:
        """Fused P(same): the embedding against the local evidence (weight ``w``). The local evidence
        is SIFT's inlier probability fused with the LNBNN score's (share ``s``), then with the XFeat
        inlier count's (share ``x``), so the four log-odds weigh ``1 - w``, ``w (1 - x)(1 - s)``,
        ``w (1 - x) s`` and ``w x``. Without LNBNN or XFeat scores (or s = 0, x = 0) exactly the
        fusion without them."""
        w = self.weight if weight is None else float(weight)
        sh = self.share if share is None else float(share)
        x = self.learned_share if learned_share is None else float(learned_share)
        return fuse_evidence(self.evidence(cos, inliers, lnbnn, learned), w, sh, x, self.fusion)

    def evidence(self, cos, inliers, lnbnn=None, learned=None) -> dict:
        """The calibrated probabilities :func:`fuse_evidence` fuses (computed once for a grid of shares)."""
        return {"emb": self.p_emb(cos), "local": self.p_local(inliers),
                "lnbnn": None if self.lnbnn is None or lnbnn is None else self.p_lnbnn(lnbnn),
                "learned": None if self.learned is None or learned is None else self.p_learned(learned)}

    def probability(self, score) -> np.ndarray:
        """P(same individual) of a fused score (:meth:`fuse`). The fused score ranks, but a weighted
        mean of agreeing probabilities is under-confident (three sources saying 0.9 are surer than
        one), so validation refits it (:func:`fit_platt`). Strictly increasing: every ranking and
        every cut keeps its order; what changes is that a probability of 0.9 means 9 in 10. The new_whale
        threshold and --predict's probability are on this scale (stage 05 keeps the score)."""
        a, b = self.platt
        if (a, b) == (1.0, 0.0):  # (files from before the recalibration: the score as it was)
            return np.asarray(score, np.float64)
        return 1.0 / (1.0 + np.exp(-(a * _logit(score) + b)))

    def to_dict(self) -> dict:
        return {"emb": self.emb, "local": self.local, "lnbnn": self.lnbnn, "weight": self.weight, "share": self.share,
                "fusion": self.fusion, "platt": list(self.platt), "inlier_score": self.inlier_score,
                "learned": self.learned, "learned_share": self.learned_share,
                "new_whale_threshold": self.new_whale_threshold, "info": self.info}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":  # files from before rerank.fusion fused by the mean
        return cls(d["emb"], d["local"], float(d["weight"]), float(d["new_whale_threshold"]), d.get("info", {}),
                   d.get("fusion", "mean"), d.get("lnbnn"), float(d.get("share", 0.0)),
                   tuple(float(v) for v in d.get("platt", (1.0, 0.0))), d.get("inlier_score", "count"),
                   d.get("learned"), float(d.get("learned_share", 0.0)))

    def norms(self, lrows: "LnbnnRows | None"):
        """What :meth:`LocalScorer.scores` needs to make the inlier score this calibration maps."""
        return inlier_norms(self.inlier_score, lrows)


def inlier_norms(inlier_score: str, lrows: "LnbnnRows | None"):
    """The ``norms`` argument of :meth:`LocalScorer.scores` for ``inlier_score``: the queries' LNBNN
    normalisers (verified LNBNN score), or None (inlier count; also without LNBNN rows)."""
    return lrows.norms if (inlier_score == "lnbnn" and lrows is not None) else None


def fit_calibration(cos, inliers, same, weight=None, local_rows=None, lnbnn=None, learned=None,
                    curve: str = "centered") -> Calibration:
    """Isotonic calibrations (:func:`fit_isotonic`, ``curve``) of cosine, inlier count (and LNBNN score,
    XFeat inlier count) on labelled pairs (``same``: bool); ``local_rows`` (bool mask or indices)
    restricts the inlier-count fits to those pairs."""
    same = np.asarray(same, dtype=np.float64)
    sel = slice(None) if local_rows is None else np.asarray(local_rows)
    w_local = None if weight is None else np.asarray(weight, np.float64)[sel]
    cal = Calibration(fit_isotonic(cos, same, weight, curve),
                      fit_isotonic(np.asarray(inliers)[sel], same[sel], w_local, curve))
    cal.lnbnn = None if lnbnn is None else fit_isotonic(lnbnn, same, weight, curve)
    cal.learned = None if learned is None else fit_isotonic(np.asarray(learned)[sel], same[sel], w_local, curve)
    return cal


LOCAL_CALIBRATION = ("shortlist", "ranking")
INLIER_SCORES = ("auto", "count", "lnbnn")


def reorder(scores, idx, order_key=None):
    """Each row sorted by ``scores`` descending, ties (and ``-inf`` padding) in the original order.
    Returns ``(scores, idx)`` re-ordered."""
    scores, idx = np.asarray(scores, np.float64), np.asarray(idx, np.int64)
    s = np.where(idx >= 0, scores, -np.inf)
    order = np.argsort(-s, axis=1, kind="stable")
    return np.take_along_axis(s, order, 1), np.take_along_axis(idx, order, 1)


# ---- shortlists and local scores ------------------------------------------------------------------
def shortlist(emb, q_rows, db_rows, depth: int, exclude_self: bool = True, groups=None, **search_kw):
    """Top-``depth`` database rows (table row numbers, -1 padding) and cosines per query row."""
    e = l2_normalize(emb)
    q_rows, db_rows = np.asarray(q_rows, np.int64), np.asarray(db_rows, np.int64)
    pos = {int(r): i for i, r in enumerate(db_rows)}
    excl = np.array([pos.get(int(r), -1) for r in q_rows], np.int64) if exclude_self else None
    gr = None if groups is None else (groups[q_rows], groups[db_rows])
    s, i = search(e[db_rows], e[q_rows], int(depth), exclude=excl, groups=gr, **search_kw)
    return s, np.where(i >= 0, db_rows[np.clip(i, 0, None)], -1)


class LocalScorer:
    """Inlier counts between rows of a database table (``split, Image, path``), features from
    the per-image cache, each pair matched once (its inlier count kept in ``cache_dir/pairs.npz``
    for later stages and reruns). ``kind``: sift, or xfeat (:mod:`common.local_features`). A SIFT
    scorer with ``rerank.xfeat`` on holds the XFeat one as :attr:`learned` (cached under
    ``cache_dir/xfeat``), which :meth:`add` feeds the same extra images; table rows it computes
    as its own pairs need them."""

    def __init__(self, table: pd.DataFrame, rcfg: dict, cache_dir, progress: bool = True, kind: str = "sift"):
        _choice("geometry", rcfg["geometry"], GEOMETRIES)
        _choice("method", rcfg["method"], METHODS)
        rcfg = {**rcfg, "threads": resolve_threads(rcfg["threads"])}
        self.table, self.r, self.cache_dir, self.progress, self.kind = table, rcfg, cache_dir, progress, kind
        self.feats: dict = {}
        self.pairs: dict = {}
        self.pair_cache = PairCache(Path(cache_dir) / "pairs.npz",
                                    {**{k: rcfg[k] for k in MATCH_KEYS}, **({} if kind == "sift" else {"kind": kind})})
        self.learned = (LocalScorer(table, rcfg, Path(cache_dir) / "xfeat", progress, "xfeat")
                        if kind == "sift" and rcfg.get("xfeat", False) and rcfg.get("xfeat_share", "auto") != 0
                        else None)  # (a share set to 0: XFeat would only cost time)
        self.seconds = {"features": 0.0, "matching": 0.0, "lnbnn": 0.0}
        self._indexes: dict = {}
        self.counts = {"cached": 0, "computed": 0, "pairs": 0, "pairs_cached": 0}

    def add(self, keys, items, cache_dir=None) -> None:
        """Features of ``items`` ``(split, name, path)`` under ``keys`` (extra images, e.g. --predict),
        XFeat's too when :attr:`learned` is there."""
        self._compute(keys, items, cache_dir)
        if self.learned is not None:
            self.learned.add(keys, items, None if cache_dir is None else Path(cache_dir) / "xfeat")

    def _compute(self, keys, items, cache_dir=None) -> None:
        t = time.perf_counter()
        kp = self.r["max_keypoints"] if self.kind == "sift" else self.r.get("xfeat_keypoints", self.r["max_keypoints"])
        feats, counts = compute_features(items, cache_dir or self.cache_dir, self.r["size"], kp,
                                         self.r["threads"], self.progress, self.kind)
        self.feats.update(zip(keys, feats))
        for k, v in counts.items():
            self.counts[k] += v
        self.seconds["features"] += time.perf_counter() - t

    def ensure(self, rows) -> None:
        """Features of table ``rows`` (-1 padding ignored). Not XFeat's: :attr:`learned` computes
        its own when its pairs are matched, so a share validated to 0 costs no test image's."""
        need = sorted({int(r) for r in np.asarray(rows).ravel() if r >= 0} - set(self.feats))
        if need:
            t = self.table
            self._compute(need, [(t["split"].iat[r], t["Image"].iat[r], t["path"].iat[r]) for r in need])

    def learned_scores(self, q_keys, idx, desc: str = "XFeat matching"):
        """XFeat inlier counts of the same pairs as :meth:`scores`, or None without ``rerank.xfeat``."""
        return None if self.learned is None else self.learned.scores(q_keys, idx, desc)

    def scores(self, q_keys, idx, desc: str = "local matching", norms=None) -> np.ndarray:
        """Inlier counts ``(nq, S)`` of query key q_keys[i] vs table rows idx[i] (0 for padding); with
        ``norms`` (query i's LNBNN normaliser per descriptor, :attr:`LnbnnRows.norms`) the verified
        LNBNN scores of those inliers instead (:func:`common.lnbnn.verified_score`, float)."""
        idx = np.asarray(idx, np.int64)
        self.ensure(idx)
        self.ensure([k for k in q_keys if isinstance(k, (int, np.integer))])
        todo = sorted({(q, int(c)) for q, row in zip(q_keys, idx) for c in row if c >= 0} - set(self.pairs))
        t = time.perf_counter()
        r = self.r
        keys = list(self.feats)
        where = {k: i for i, k in enumerate(keys)}
        flist = [self.feats[k] for k in keys]
        known = self.pair_cache.get([(self.feats[a], self.feats[b]) for a, b in todo])
        self.pairs.update((p, n) for p, n in zip(todo, known) if n is not None)
        todo = [p for p, n in zip(todo, known) if n is None]
        got = match_many(flist, [(where[a], where[b]) for a, b in todo], r["ratio"], r["ransac_threshold"],
                         r["method"], r["min_matches"], r["threads"], self.progress, desc, r["geometry"],
                         MATCHERS[self.kind])
        self.pairs.update(zip(todo, got))
        self.pair_cache.put([(self.feats[a], self.feats[b]) for a, b in todo], got)
        self.pair_cache.save()
        self.counts["pairs"] += len(todo)
        self.counts["pairs_cached"] += len(known) - len(todo)
        self.seconds["matching"] += time.perf_counter() - t
        if norms is None:
            return np.array([[len(self.pairs[(q, int(c))]) if c >= 0 else 0 for c in row]
                             for q, row in zip(q_keys, idx)], dtype=np.int32).reshape(idx.shape)

        def verified(q, nm, c):
            return verified_score(self.feats[q].desc, self.feats[c].desc, self.pairs[(q, c)], nm)

        return np.array([[verified(q, nm, int(c)) if c >= 0 else 0.0 for c in row]
                         for q, nm, row in zip(q_keys, norms, idx)], dtype=np.float32).reshape(idx.shape)

    def lnbnn_index(self, rows, k: int):
        """The descriptor index of database ``rows`` (built once per database and ``k``)."""
        import hashlib

        from .lnbnn import DescriptorIndex

        rows = np.asarray(rows, np.int64)
        key = (int(k), hashlib.blake2b(rows.tobytes(), digest_size=8).hexdigest())
        if key not in self._indexes:
            self.ensure(rows)
            t = time.perf_counter()
            # the trained IVF lists are kept under a name made of what they were trained on (each image's
            # feature key: path, mtime, size, settings), so stage 06 reuses stage 05's and a rerun its own
            fkeys = [self.feats[int(r)].key for r in rows]
            trained = None if not all(fkeys) else Path(self.cache_dir) / "lnbnn" / (hashlib.blake2b(
                "\0".join([*fkeys, f"seed={self.r['seed']}"]).encode(), digest_size=12).hexdigest() + ".faiss")
            self._indexes[key] = DescriptorIndex(self.feats, rows, len(self.table), int(k), int(self.r["seed"]), trained)
            self.seconds["lnbnn"] += time.perf_counter() - t
        return self._indexes[key]

    def matches(self, a, b):
        """``(inlier count, (n, 2) inlier keypoint pairs)`` of one pair (table rows or keys)."""
        r = self.r
        self.ensure([k for k in (a, b) if isinstance(k, (int, np.integer))])
        return match_pair(self.feats[a], self.feats[b], r["ratio"], r["ransac_threshold"], r["method"],
                          r["min_matches"], return_matches=True, geometry=r["geometry"], matcher=MATCHERS[self.kind])


# ---- one-vs-many descriptor scores (LNBNN) and the candidates they add -----------------------------------
class LnbnnRows:
    """Each query's non-zero LNBNN scores (:mod:`common.lnbnn`) against the database ``db_rows``,
    kept sparse. ``q_keys``: table rows or keys of extra features in ``scorer``; a query's own row
    is never scored; with ``groups`` (encounters) neither are images of the query's encounter."""

    def __init__(self, scorer: LocalScorer, db_rows, q_keys, k: int, groups=None, desc: str = "LNBNN scores"):
        from tqdm import tqdm

        index = scorer.lnbnn_index(db_rows, k)
        scorer.ensure([q for q in q_keys if isinstance(q, (int, np.integer))])
        t = time.perf_counter()
        self.rows, self.vals, self.norms = [], [], []
        for q in tqdm(q_keys, desc=desc, disable=not scorer.progress or not len(q_keys), mininterval=1.0):
            own = int(q) if isinstance(q, (int, np.integer)) else None
            sc, nm = index.scores(scorer.feats[q].desc, own, return_norms=True)
            self.norms.append(nm)
            if groups is not None and own is not None and groups[own]:
                sc[groups == groups[own]] = 0.0
            nz = np.flatnonzero(sc > 0)
            self.rows.append(nz)
            self.vals.append(sc[nz])
        scorer.seconds["lnbnn"] += time.perf_counter() - t

    def get(self, i: int, cands) -> np.ndarray:
        """LNBNN scores of query ``i`` against table rows ``cands`` (0 for -1 padding / unmatched)."""
        cands = np.asarray(cands, np.int64)
        r, v = self.rows[i], self.vals[i]
        if not len(r):
            return np.zeros(cands.shape, np.float32)
        pos = np.clip(np.searchsorted(r, cands), 0, len(r) - 1)
        return np.where((cands >= 0) & (r[pos] == cands), v[pos], 0.0).astype(np.float32)

    def pairs(self, q_index, cands) -> np.ndarray:
        """Scores of pairs (query index into q_keys, table row)."""
        return np.array([self.get(int(i), [c])[0] for i, c in zip(q_index, cands)], np.float32)

    def top(self, i: int, n: int) -> np.ndarray:
        return self.rows[i][np.argsort(-self.vals[i], kind="stable")[: int(n)]]


def widen(lrows: LnbnnRows, emb, q_vec, cos, idx, n_extra: int):
    """Shortlists ``(cos, idx)`` with each query's best ``n_extra`` LNBNN images not already in
    them appended (their cosine to the query; -1 padding), and the LNBNN score of every
    candidate: ``(cos, idx, lnbnn)``. Appended images rank after the shortlist in embedding order,
    so w = 0 still gives the embedding ranking."""
    e, qv = l2_normalize(emb), l2_normalize(np.asarray(q_vec, np.float32))
    nq, depth = idx.shape
    out = np.full((nq, depth + int(n_extra)), -1, np.int64)
    out[:, :depth] = idx
    c = np.full(out.shape, -1.0, np.float32)
    c[:, :depth] = cos
    for i in range(nq):
        have = set(idx[i][idx[i] >= 0].tolist())
        extra = [int(r) for r in lrows.top(i, int(n_extra) + depth) if int(r) not in have][: int(n_extra)]
        if extra:
            out[i, depth:depth + len(extra)] = extra
            c[i, depth:depth + len(extra)] = e[extra] @ qv[i]
    lnb = np.stack([lrows.get(i, out[i]) for i in range(nq)]) if nq else np.zeros(out.shape, np.float32)
    return c, out, lnb


# ---- evaluation of re-ranked lists -------------------------------------------------------------------
def list_scores(idx, q_ids, ids, n_rel, k: int = 20) -> dict:
    """Image-mode map20/top1/hit20 of re-ranked lists ``idx`` (best first) and ID-mode map5 (no new_whale)."""
    hits = relevance(q_ids, ids, np.asarray(idx)[:, :k])
    out = image_scores(hits, n_rel, k)
    out["map5"] = ranked_map5(idx, q_ids, ids, ID_N)
    return out


def _nw_scores(fused, idx, ids, truth, hide=None, threshold=None):
    pred, sims = rank_identities(fused, idx, ids, n=ID_N, hide=hide)
    tuned, _, _ = tune_new_whale_threshold(pred, sims, truth, n=ID_N)
    thr = tuned if threshold is None else float(threshold)
    return kaggle_map5([insert_new_whale(p, s, thr, ID_N) for p, s in zip(pred, sims)], truth), thr


def variants(weight: float) -> dict:
    """Named fusion weights reported side by side."""
    return {"embedding": 0.0, "local": 1.0, "fused": float(weight)}


def calibration_pairs(emb, table, q_rows, db_rows, idx, n_random: int, groups, seed: int = 0):
    """Random pairs from beyond each query's shortlist: ``(q_keys, cand rows, cosines, weights)``;
    each stands for ``n_beyond / n_drawn`` pairs of the whole ranking."""
    rng = np.random.default_rng(seed)
    e = l2_normalize(emb)
    qs, cs, ws = [], [], []
    for q, row in zip(q_rows, idx):
        taken = set(row[row >= 0].tolist()) | {int(q)}
        pool = np.array([r for r in db_rows if r not in taken and not (groups is not None and groups[q]
                                                                         and groups[r] == groups[q])], np.int64)
        if not len(pool) or n_random <= 0:
            continue
        pick = rng.choice(pool, size=min(n_random, len(pool)), replace=False)
        qs += [int(q)] * len(pick)
        cs += pick.tolist()
        ws += [len(pool) / len(pick)] * len(pick)
    qs, cs = np.array(qs, np.int64), np.array(cs, np.int64)
    cos = (e[qs] * e[cs]).sum(1) if len(qs) else np.zeros(0)
    return qs, cs, cos, np.array(ws, np.float64)


VAL_QUERIES = ("queries", "held_out")


def _shares(key: str, value) -> tuple:
    """The values ``auto`` tries (:data:`GRID`), or the one set; a ConfigError naming ``rerank.<key>`` else.

    >>> _shares("fusion_weight", "auto")[:3], _shares("fusion_weight", 0.25)
    ((0.0, 0.1, 0.2), (0.25,))
    """
    if value == "auto":
        return GRID
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = None
    if v is None or not 0.0 <= v <= 1.0:
        raise ConfigError(f"rerank.{key} must be auto or a number from 0 to 1, got {value!r}")
    return (v,)


def _choice(key: str, value, options) -> str:
    """``value`` when it is one of ``options``, else a ConfigError naming ``rerank.<key>``."""
    if value not in options:
        raise ConfigError(f"rerank.{key} must be one of {', '.join(options)}, got {value!r}")
    return value


def validation_queries(table: pd.DataFrame, which: str) -> np.ndarray:
    """Table rows the fusion is calibrated and its weight chosen on: ``queries`` = the local-validation
    queries (one per identity); ``held_out`` = those plus every other image of the identities local
    training never saw (each searched against the rest), the only other photos the embedding has not
    been fitted to. Those stand for new individuals, which is what a test set is mostly made of, and
    turn a few dozen validation queries into hundreds.

    >>> t = pd.DataFrame({"split": ["train"] * 4 + ["test"], "is_query": [1, 0, 1, 0, 0], "held_out": [0, 0, 1, 1, 0]})
    >>> validation_queries(t, "queries").tolist(), validation_queries(t, "held_out").tolist()
    ([0, 2], [0, 2, 3])
    """
    _choice("val_queries", which, VAL_QUERIES)
    train = (table["split"] == "train").to_numpy()
    pick = table["is_query"].to_numpy().astype(bool)
    if which == "held_out" and "held_out" in table:
        pick |= table["held_out"].to_numpy().astype(bool)
    return np.flatnonzero(train & pick)


def validate(emb, table: pd.DataFrame, scorer: LocalScorer, rcfg: dict, k: int = 20, groups=None,
             search_kw: dict | None = None, log=print, threshold: float | None = None) -> tuple[Calibration, dict, dict]:
    """Fit the calibration on local validation, pick the fusion weight, score the variants.
    ``threshold``: the ID-mode new_whale threshold on the fused probability (search.new_whale_threshold);
    None = tuned here. Returns ``(calibration, {variant: val scores}, report)``."""
    search_kw = search_kw or {}
    local_fit = _choice("local_calibration", rcfg["local_calibration"], LOCAL_CALIBRATION)
    curve = _choice("calibration", rcfg.get("calibration", "centered"), CURVES)
    tr = np.flatnonzero((table["split"] == "train").to_numpy())
    q = validation_queries(table, rcfg["val_queries"])
    n_held_out = int(len(q) - table["is_query"].to_numpy()[q].astype(bool).sum())
    ids = table["Id"].to_numpy(object)
    depth = max(int(rcfg["shortlist"]), k)
    cos, idx = shortlist(emb, q, tr, depth, True, groups, **{**search_kw, "gpu": False})
    lnb = lrows = None
    if rcfg.get("lnbnn", False):  # (a bare rcfg of a unit test may leave the LNBNN keys out)
        lrows = LnbnnRows(scorer, tr, q.tolist(), int(rcfg["lnbnn_k"]), groups, "LNBNN (validation)")
        cos, idx, lnb = widen(lrows, emb, emb[q], cos, idx, int(rcfg["lnbnn_candidates"]))
    score = _choice("inlier_score", rcfg.get("inlier_score", "count"), INLIER_SCORES)
    # the verified score needs the LNBNN normalisers; auto tries both (the pairs are matched once)
    options = ("count",) if lrows is None else ("count", "lnbnn") if score == "auto" else (score,)
    rq, rc, rcos, rw = calibration_pairs(emb, table, q, tr, idx, int(rcfg["calib_random"]), groups, int(rcfg["seed"]))
    pos = {int(r): i for i, r in enumerate(q)}
    valid = idx >= 0
    same_sl = (ids[np.clip(idx, 0, None)] == ids[q][:, None]) & (ids[q][:, None] != NEW_WHALE) & valid
    x_cos = np.concatenate([cos[valid], rcos])
    y = np.concatenate([same_sl[valid], (ids[rc] == ids[rq]) & (ids[rq] != NEW_WHALE)])
    w = np.concatenate([np.ones(int(valid.sum())), rw])
    # inliers are only ever counted for shortlist candidates: P_local is fitted there (shortlist) or,
    # like the cosine, on the whole ranking (ranking), where the many random pairs make a few inliers mean nothing
    local_rows = np.arange(int(valid.sum())) if local_fit == "shortlist" else None
    x_lnb = None
    if lrows is not None:
        x_lnb = np.concatenate([lnb[valid], lrows.pairs([pos[int(a)] for a in rq], rc)])
    learned = getattr(scorer, "learned", None)  # XFeat, a second matcher (rerank.xfeat)
    l_inl = x_lrn = None
    if learned is not None:
        l_inl = learned.scores(q.tolist(), idx, "XFeat matching (validation)")
        x_lrn = np.concatenate([l_inl[valid], learned.scores(rq.tolist(), rc[:, None], "XFeat matching (calibration)")[:, 0]
                                if len(rq) else np.zeros(0)])
    gr = None if groups is None else (groups[q], groups[tr])
    n_rel = relevant_counts(ids[q], ids[tr], True, gr)
    # ID mode: photos of held-out identities stand for new individuals (common.evaluation.id_validation)
    truth, hide = id_validation(table, q, n_rel)
    fw, fs = rcfg["fusion_weight"], rcfg.get("lnbnn_share", "auto")
    weights = _shares("fusion_weight", fw)
    shares = _shares("lnbnn_share", fs) if lrows is not None else (0.0,)
    fx = rcfg.get("xfeat_share", "auto")
    xshares = _shares("xfeat_share", fx) if learned is not None else (0.0,)
    fusion = _choice("fusion", rcfg["fusion"], FUSIONS)

    def rank_key(m: dict, g: tuple) -> tuple:  # a tie: weights nearer the middle, the least XFeat
        return round(m[rcfg["select_metric"]], 12), m["top1"], -abs(g[0] - 0.5), -abs(g[1] - 0.5), -g[2]

    fits = {}
    for opt in options:
        norms = inlier_norms(opt, lrows)
        o_inl = scorer.scores(q.tolist(), idx, "local matching (validation)", norms)
        o_rinl = (scorer.scores(rq.tolist(), rc[:, None], "local matching (calibration)",
                                None if norms is None else [norms[pos[int(a)]] for a in rq])[:, 0]
                  if len(rq) else np.zeros(0))
        o_x = np.concatenate([o_inl[valid], o_rinl])
        o_cal = fit_calibration(x_cos, o_x, y, w, local_rows, x_lnb, x_lrn, curve)
        o_cal.fusion, o_cal.inlier_score = fusion, opt
        o_grid, ev = {}, o_cal.evidence(cos, o_inl, lnb, l_inl)
        for wt in weights:
            for sh in shares:
                for xs in xshares:
                    i = reorder(fuse_evidence(ev, wt, sh, xs, fusion), idx)[1]
                    o_grid[(wt, sh, xs)] = list_scores(i, ids[q], ids, n_rel, k)
        o_cal.weight, o_cal.share, o_cal.learned_share = max(o_grid, key=lambda g: rank_key(o_grid[g], g))
        fits[opt] = (o_cal, o_inl, o_x, o_grid)
    best = lambda c: (c.weight, c.share, c.learned_share)  # noqa: E731
    # the inlier score whose best (w, s, x) validates best; on a tie the count (listed first)
    score = max(options, key=lambda o: rank_key(fits[o][3][best(fits[o][0])], (0.0, 0.0, 0.0)))
    cal, inl, x_inl, grid = fits[score]
    xfeat_gain = None
    if learned is not None and cal.learned_share > 0 and len(xshares) > 1 and rcfg["select_metric"] in METRICS:
        # one-standard-error rule: XFeat's best grid point must beat the best without it by more than the
        # luck of the queries (a 11 x larger grid has more chances to win by noise alone)
        g0 = max((g for g in grid if g[2] == 0.0), key=lambda g: rank_key(grid[g], g))
        per = [query_scores(relevance(ids[q], ids, reorder(cal.fuse(cos, inl, g[0], lnb, g[1], l_inl, g[2]), idx)[1][:, :k]),
                            n_rel, k)[rcfg["select_metric"]] for g in (best(cal), g0)]
        d = per[0] - per[1]
        d = d[~np.isnan(d)]
        se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
        xfeat_gain = {"diff": round(float(d.mean()), 5), "se": round(se, 5), "kept": bool(d.mean() > se)}
        if not xfeat_gain["kept"]:
            cal.weight, cal.share, cal.learned_share = g0
    fz = cal.fuse(x_cos, x_inl, lnbnn=x_lnb, learned=x_lrn)  # the chosen fusion on every calibration pair
    cal.platt = fit_platt(fz, y, w)
    out, per_query = {}, {}
    for name, wt in variants(cal.weight).items():
        f, i = reorder(cal.fuse(cos, inl, wt, lnb, learned=l_inl), idx)
        out[name] = list_scores(i, ids[q], ids, n_rel, k)
        per_query[name] = query_scores(relevance(ids[q], ids, i[:, :k]), n_rel, k)
        nw = _nw_scores(cal.probability(f), i, ids, truth, hide, threshold)
        out[name]["map5_nw"], out[name]["new_whale_threshold"] = nw
        if name == "fused":
            ece = {"pairs": recalibration_errors(cal, fz, y, w),
                   "best": recalibration_errors(cal, f[:, 0], per_query[name]["top1"])}
    cal.new_whale_threshold = out["fused"]["new_whale_threshold"]
    positive = y.astype(bool)
    report = {"n_queries": int(len(q)), "val_queries": rcfg["val_queries"], "n_held_out_queries": n_held_out,
              "n_new_queries": sum(t == NEW_WHALE for t in truth), "shortlist": depth, "pairs_shortlist": int(valid.sum()),
              "pairs_random": int(len(rq)), "positives": int(positive.sum()), "calibration": curve,
              "weight_mode": fw, "weight": cal.weight,
              "lnbnn": lrows is not None, "share_mode": fs, "share": cal.share, "inlier_score": score,
              "xfeat": learned is not None, "xfeat_share_mode": fx, "xfeat_share": cal.learned_share,
              "xfeat_gain": xfeat_gain,
              "inlier_scores": {o: {"weight": c.weight, "share": c.share, "xfeat_share": c.learned_share,
                                    **{m: round(v, 5) for m, v in g[best(c)].items() if m != "n_queries"}}
                                for o, (c, _, _, g) in fits.items()},
              "platt": list(cal.platt), "calibration_error": {"val": ece},
              # w / s (with LNBNN) / x (with XFeat)
              "grid": {"/".join(str(v) for v, on in zip(g, (True, lrows is not None, learned is not None)) if on):
                       {m: round(v, 5) for m, v in s.items() if m != "n_queries"} for g, s in grid.items()},
              "pairs": {"p_emb": cal.p_emb(x_cos).tolist(), "p_local": cal.p_local(x_inl).tolist(),
                        **({"p_lnbnn": cal.p_lnbnn(x_lnb).tolist()} if x_lnb is not None else {}),
                        **({"p_xfeat": cal.p_learned(x_lrn).tolist()} if x_lrn is not None else {}),
                        "fused_score": fz.tolist(),
                        "same": positive.tolist(), "weight": w.tolist()}}
    log(f"fusion weight {cal.weight:.2f} ({'chosen on validation' if fw == 'auto' else 'set'})"
        + (f", LNBNN share {cal.share:.2f} ({'chosen on validation' if fs == 'auto' else 'set'})" if lrows else "")
        + (f", inlier score {score} ({'chosen on validation' if len(options) > 1 else 'set'})" if lrows else "")
        + (f", XFeat share {cal.learned_share:.2f} ({'chosen on validation' if fx == 'auto' else 'set'}"
           + (f"; its best share gained {xfeat_gain['diff']:+.4f} {rcfg['select_metric']} per query, standard error "
              f"{xfeat_gain['se']:.4f}: {'kept' if xfeat_gain['kept'] else 'not more than noise, so 0'}" if xfeat_gain else "")
           + ")" if learned is not None else "")
        + f" on {len(q)} queries ({n_held_out} of them photos of held-out identities; the ID-mode new_whale "
        f"threshold takes the {report['n_new_queries']} of identities never trained on for new animals); "
        f"calibrated on {valid.sum()} "
        f"shortlist + {len(rq)} random validation pairs ({positive.sum()} same individual); fused probability "
        f"= sigmoid({cal.platt[0]:.2f} logit(fused score) {cal.platt[1]:+.2f}): {format_recalibration(ece['best'])} "
        f"on each query's best candidate")
    sample = _sample_pairs(q, idx, inl, None if lrows is None else lrows.norms)
    return cal, out, {**report, "sample": sample, "per_query": per_query}


def _sample_pairs(q, idx, inl, norms=None, n: int = 6):
    """Validation queries whose best-scoring candidate is drawn in matches.png: ``(query row,
    candidate row, the query's LNBNN normalisers or None)``."""
    rng = np.random.default_rng(0)
    pick = rng.choice(len(q), size=min(n, len(q)), replace=False) if len(q) else []
    out = []
    for p in sorted(pick):
        c = int(idx[p, np.argmax(inl[p])]) if (idx[p] >= 0).any() else -1
        if c >= 0:
            out.append((int(q[p]), c, None if norms is None else norms[p]))
    return out


def candidate_lists(emb, table: pd.DataFrame, scorer: LocalScorer, rcfg: dict, k: int, depth: int,
                    search_kw: dict | None = None, inlier_score: str = "count", learned: bool = False) -> dict:
    """Candidates of every test query, image mode (database train + test, self excluded) and ID
    mode (database train): ``{"image" | "id": (cosines, table rows, inlier scores (``inlier_score``),
    LNBNN scores or None, XFeat inlier counts (with ``learned``) or None)}``."""
    search_kw = search_kw or {}
    tr = np.flatnonzero((table["split"] == "train").to_numpy())
    te = np.flatnonzero((table["split"] == "test").to_numpy())
    every = np.arange(len(table))
    out = {}
    for mode, db, self_excluded in (("image", every, True), ("id", tr, False)):
        c, i = shortlist(emb, te, db, max(depth, k), self_excluded, None, **search_kw)
        lnb = norms = None
        if rcfg["lnbnn"]:
            lrows = LnbnnRows(scorer, db, te.tolist(), int(rcfg["lnbnn_k"]), None, f"LNBNN (test, {mode} mode)")
            c, i, lnb = widen(lrows, emb, emb[te], c, i, int(rcfg["lnbnn_candidates"]))
            norms = inlier_norms(inlier_score, lrows)
        xf = scorer.learned_scores(te.tolist(), i, f"XFeat matching (test, {mode} mode)") if learned else None
        out[mode] = (c, i, scorer.scores(te.tolist(), i, f"local matching (test, {mode} mode)", norms), lnb, xf)
    return out


def fused_lists(cal: "Calibration", cands: dict, weight: float | None = None):
    """Re-ranked test lists of :func:`candidate_lists`: ``(img_fused, img_idx, id_fused, id_idx)``."""
    c1, i1, n1, l1, x1 = cands["image"]
    c2, i2, n2, l2, x2 = cands["id"]
    return (*reorder(cal.fuse(c1, n1, weight, l1, learned=x1), i1), *reorder(cal.fuse(c2, n2, weight, l2, learned=x2), i2))


def id_predictions(fused, idx, table, threshold: float, fallback, n: int = ID_N) -> list[list[str]]:
    """n Ids per query from its re-ranked list, new_whale inserted at ``threshold`` (fused probability)."""
    ids = table["Id"].to_numpy(object)
    pred, sims = rank_identities(fused, idx, ids, n=n)
    return [pad_ids(insert_new_whale(p, s, threshold, n), fallback, n) for p, s in zip(pred, sims)]


def truth_relevance(img_idx, table, truth: pd.DataFrame, k: int, groups=None):
    """Hits of the image-mode test lists against the withheld truth, same-encounter candidates
    (test-side mapping) dropped first: ``(hits, n_relevant, test_ids, all_ids)``."""
    te = np.flatnonzero((table["split"] == "test").to_numpy())
    t = dict(zip(truth["Image"], truth["Id"]))
    all_ids = table["Id"].to_numpy(object).copy()
    test_ids = np.array([t.get(n, NEW_WHALE) for n in table["Image"].to_numpy(object)[te]], dtype=object)
    all_ids[te] = test_ids
    idx = np.asarray(img_idx)
    gr = None
    if groups is not None:
        keep = (groups[te][:, None] == "") | (groups[np.clip(idx, 0, None)] != groups[te][:, None])
        idx = np.array([np.concatenate([r[m], np.full((~m).sum(), -1)]) for r, m in zip(idx, keep)], np.int64)
        gr = (groups[te], groups)
    return relevance(test_ids, all_ids, idx[:, :k]), relevant_counts(test_ids, all_ids, True, gr), test_ids, all_ids


def recalibration_errors(cal: "Calibration", score, same, weight=None) -> dict:
    """Calibration error (:func:`common.metrics.calibration_error`) of fused scores as they are and
    as :meth:`Calibration.probability`, with the mean prediction and the observed share (weighted)."""
    score, same = np.asarray(score, np.float64), np.asarray(same, np.float64)
    p, wt = cal.probability(score), (np.ones(len(score)) if weight is None else np.asarray(weight, np.float64))
    avg = (lambda v: float(np.average(v, weights=wt))) if len(score) else (lambda v: 0.0)
    return {"before": calibration_error(score, same, wt), "after": calibration_error(p, same, wt),
            "mean_score": round(avg(score), 4), "mean_probability": round(avg(p), 4),
            "observed": round(avg(same), 4), "n": int(len(score))}


def format_recalibration(e: dict) -> str:
    return (f"mean fused score {e['mean_score']:.3f} / probability {e['mean_probability']:.3f} against "
            f"{e['observed']:.3f} observed, calibration error {e['before']:.3f} -> {e['after']:.3f}")


def truth_recalibration(cal: "Calibration", fused, idx, rel) -> dict:
    """:func:`recalibration_errors` on the image-mode test lists against the withheld truth (``rel`` =
    :func:`truth_relevance`), pairs validation never saw: every (query, candidate) pair, and each
    query's best candidate."""
    _, _, test_ids, all_ids = rel
    idx, fused = np.asarray(idx), np.asarray(fused)
    same = relevance(test_ids, all_ids, idx)
    ok = idx >= 0
    return {"pairs": recalibration_errors(cal, fused[ok], same[ok]),
            "best": recalibration_errors(cal, fused[ok[:, 0], 0], same[ok[:, 0], 0])}


def score_test(rel, id_preds, table, k: int) -> dict:
    """How the re-ranked submissions score against the withheld truth; ``rel`` = :func:`truth_relevance`
    of the image-mode lists."""
    hits, n_rel, test_ids, all_ids = rel
    tr = np.flatnonzero((table["split"] == "train").to_numpy())
    out = image_scores(hits, n_rel, k)
    out.update(subset_scores(hits, n_rel, seen_unseen(test_ids, all_ids[tr]), k))
    out["map5_nw"] = kaggle_map5(id_preds, id_truth(test_ids, set(all_ids[tr])))
    return out


# ---- the whole step as stage 06 runs it ---------------------------------------------------------------
def run(cfg: dict, paths, table: pd.DataFrame, emb, truth, fallback_ids, groups=None, search_kw=None,
        embedding: str = "ensemble", log=print) -> dict:
    """Calibrate on validation, re-rank the test lists, score every variant; writes the
    calibration, report, reliability and matches PNGs. Returns the lists and scores."""
    from .io import write_json

    r, k = cfg["rerank"], cfg["search"]["k"]
    scorer = LocalScorer(table, r, paths.features_dir)
    t0 = time.perf_counter()
    scorer.ensure(np.arange(len(table)))
    cal, val, report = validate(emb, table, scorer, r, k, groups, search_kw, log, cfg["search"]["new_whale_threshold"])
    depth = max(int(r["shortlist"]), k)
    thr = {}
    scores = {}
    lists = None
    per_query = {"val": report.pop("per_query"), "test": {}}
    cands = candidate_lists(emb, table, scorer, r, k, depth, search_kw, cal.inlier_score, uses_learned(cal))
    for name, wt in variants(cal.weight).items():
        f1, i1, f2, i2 = fused_lists(cal, cands, wt)
        thr[name] = val[name]["new_whale_threshold"]
        preds = id_predictions(cal.probability(f2), i2, table, thr[name], fallback_ids, cfg["search"]["id_k"])
        scores[name] = {"val": val[name]}
        if truth is not None:
            rel = truth_relevance(i1, table, truth, k, groups)
            scores[name]["test"] = score_test(rel, preds, table, k)
            per_query["test"][name] = query_scores(rel[0], rel[1], k)
            if name == "fused":
                report["calibration_error"]["test"] = truth_recalibration(cal, f1, i1, rel)
        if name == "fused":
            lists = {"image_idx": i1[:, :k], "id_preds": preds, "threshold": thr[name]}
    report["seconds"] = {**{k_: round(v, 3) for k_, v in scorer.seconds.items()},
                         **({f"xfeat_{k_}": round(v, 3) for k_, v in scorer.learned.seconds.items() if k_ != "lnbnn"}
                            if scorer.learned is not None else {}),
                         "total": round(time.perf_counter() - t0, 3)}
    report["features"] = {k_: v for k_, v in scorer.counts.items()}
    if scorer.learned is not None:
        report["features"]["xfeat"] = dict(scorer.learned.counts)
    cal.info = {"embedding": embedding,
                **{k_: r[k_] for k_ in ("size", "max_keypoints", *MATCH_KEYS, "lnbnn", "lnbnn_k", "lnbnn_candidates")},
                "xfeat": cal.learned is not None, "xfeat_keypoints": r.get("xfeat_keypoints"),
                "shortlist": depth}
    write_json(paths.rerank_calibration, cal.to_dict())
    reliability_plot(report.pop("pairs"), cal, paths.reliability_png)
    matches_plot(scorer, table, report.pop("sample"), paths.matches_png)
    report["differences"] = {where: differences(pq) for where, pq in per_query.items() if pq}
    write_json(paths.rerank_report, {**report, "scores": scores})
    log(f"local features: {scorer.counts['computed']} computed, {scorer.counts['cached']} from the cache "
        f"({report['seconds']['features']} s); {scorer.counts['pairs']} pairs matched ({report['seconds']['matching']} s), "
        f"{scorer.counts['pairs_cached']} from the pair cache" + (f"; LNBNN {report['seconds']['lnbnn']} s" if r["lnbnn"] else "")
        + (f"; XFeat: {scorer.learned.counts['computed']} features computed, {scorer.learned.counts['cached']} cached "
           f"({report['seconds']['xfeat_features']} s), {scorer.learned.counts['pairs']} pairs matched "
           f"({report['seconds']['xfeat_matching']} s)" if scorer.learned is not None else ""))
    e = val["embedding"]
    note = (f"val.* of the +local/+fused rows: {report['n_queries']} queries ({report['n_held_out_queries']} of them "
            f"photos of identities held out of training, rerank.val_queries: {r['val_queries']}); the embedding "
            f"alone on those: map20 {e['map20']:.4f}, top1 {e['top1']:.4f}, hit20 {e['hit20']:.4f}")
    note += "".join(f"\n{format_differences(d, where)}" for where, d in report["differences"].items())
    if "test" in report["calibration_error"]:
        note += (f"\nfused probability of each test query's best candidate (withheld truth): "
                 f"{format_recalibration(report['calibration_error']['test']['best'])}")
    return {"calibration": cal, "scores": scores, "note": note, "seconds": report["seconds"],
            "differences": report["differences"], **lists}


METRICS = ("map20", "top1", "hit20")


def differences(per_query: dict, n_boot: int = 2000) -> dict:
    """Fused minus each single variant, per metric, with a paired bootstrap 95 % interval over
    the queries (:func:`common.metrics.paired_bootstrap`): whether fusion beats the embedding and
    the local score alone by more than the luck of a few queries.
    ``{"fused-local": {metric: {diff, lo, hi, n}}, "fused-embedding": ...}``

    >>> one = {"map20": np.array([1.0, 0.5]), "top1": np.array([1.0, 0.0]), "hit20": np.array([1.0, 1.0])}
    >>> d = differences({"fused": one, "local": one, "embedding": one}, n_boot=10)
    >>> sorted(d), d["fused-local"]["top1"]
    (['fused-embedding', 'fused-local'], {'diff': 0.0, 'lo': 0.0, 'hi': 0.0, 'n': 2})
    """
    return {f"fused-{other}": {m: paired_bootstrap(per_query["fused"][m], per_query[other][m], n_boot)
                               for m in METRICS}
            for other in ("local", "embedding") if other in per_query and "fused" in per_query}


def format_differences(diffs: dict, where: str) -> str:
    """One line per comparison: the difference and its interval, per metric."""
    names = {"val": "local validation", "test": "withheld truth"}
    return "\n".join(f"{pair.replace('-', ' - ')} on {names.get(where, where)} (95 % bootstrap interval over "
                     f"{max(v['n'] for v in d.values())} queries): "
                     + ", ".join(f"{m} {v['diff']:+.4f} [{v['lo']:+.4f}, {v['hi']:+.4f}]" for m, v in d.items())
                     for pair, d in diffs.items())


# ---- figures -------------------------------------------------------------------------------------------
def reliability_plot(pairs: dict, cal: Calibration, dest, bins: int = 10):
    """Reliability diagram (predicted P(same) vs observed share, weighted pairs) of the embedding,
    local and fused probabilities on the validation calibration pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import save_figure

    pe, pl = np.asarray(pairs["p_emb"]), np.asarray(pairs["p_local"])
    y, w = np.asarray(pairs["same"], np.float64), np.asarray(pairs["weight"])
    pn = np.asarray(pairs["p_lnbnn"]) if "p_lnbnn" in pairs else None
    px = np.asarray(pairs["p_xfeat"]) if "p_xfeat" in pairs else None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    edges = np.linspace(0, 1, bins + 1)
    fz = np.asarray(pairs["fused_score"])  # the chosen fusion of each pair, as validate computed it
    fused = (f"fused (w={cal.weight:.2f}" + (f", s={cal.share:.2f}" if pn is not None else "")
             + (f", x={cal.learned_share:.2f}" if px is not None else ""))
    score = "verified LNBNN inlier score" if cal.inlier_score == "lnbnn" else "inlier count"
    curves = [("embedding", pe), (f"local: {score}", pl)] + ([("local: LNBNN", pn)] if pn is not None else []) + (
        [("local: XFeat inliers", px)] if px is not None else []) + [(fused + ")", cal.probability(fz))]
    if tuple(cal.platt) != (1.0, 0.0):
        curves.append((fused + ", score before recalibration)", fz))
    for name, p in curves:
        which = np.clip(np.digitize(p, edges) - 1, 0, bins - 1)
        xs, ys = [], []
        for bi in range(bins):
            m = which == bi
            if w[m].sum() > 0:
                xs.append(np.average(p[m], weights=w[m]))
                ys.append(np.average(y[m], weights=w[m]))
        a.plot(xs, ys, "o:" if "before" in name else "o-", label=name)
    a.plot([0, 1], [0, 1], "k--", lw=1)
    a.set_xlabel("predicted P(same individual)")
    a.set_ylabel("observed share (validation pairs, weighted)")
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    xs = np.linspace(0, max(cal.local["x"][-1], 1.0), 200)
    b.plot(xs, cal.p_local(xs), label=f"local: P(same) vs {score}")
    if cal.learned is not None:
        xl = np.linspace(0, max(cal.learned["x"][-1], 1.0), 200)
        b.plot(xl, cal.p_learned(xl), color="C3", label="XFeat: P(same) vs its inlier count")
    b.set_xlabel(score)
    b2 = b.twiny()
    xc = np.linspace(min(cal.emb["x"][0], 0.0), 1.0, 200)
    b2.plot(xc, cal.p_emb(xc), color="C1", label="embedding: P(same) vs cosine")
    b2.set_xlabel("cosine similarity")
    b.set_ylabel("P(same individual)")
    b.legend(loc="upper left", fontsize=8)
    b2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, dest)


def matches_plot(scorer: LocalScorer, table: pd.DataFrame, pairs, dest):
    """Sample validation queries beside their best-matching shortlist candidate, inliers drawn
    (green: same individual, red: not), so a user sees what matched (animal or background). With
    the query's LNBNN normalisers, inliers that count nothing in the verified LNBNN score (no closer
    than the query descriptor's 5th database neighbour: a label, a pattern many images share) are
    drawn grey, and the title gives that score. With XFeat (``rerank.xfeat``) its inliers of the same
    pair are drawn too, in blue."""
    import cv2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import read_image, save_figure
    from .local_features import resize_longest

    def keypoints(f):
        return [cv2.KeyPoint(float(x), float(y), 1) for x, y in f.xy]

    size = int(scorer.r["size"])
    fig, axes = plt.subplots(max(1, len(pairs)), 1, figsize=(8, 3.2 * max(1, len(pairs))), squeeze=False)
    for ax, (q, c, norms) in zip(axes[:, 0], pairs):
        n, m = scorer.matches(q, c)
        ims = [resize_longest(read_image(table["path"].iat[r]), size)[0] for r in (q, c)]
        kq, kc = keypoints(scorer.feats[q]), keypoints(scorer.feats[c])
        counts, note = np.ones(len(m), bool), ""
        if norms is not None and len(m):
            wt = inlier_weights(scorer.feats[q].desc, scorer.feats[c].desc, m, norms)
            counts = wt > 0
            note = f", verified LNBNN {wt.sum():.2f} ({int((~counts).sum())} grey count 0)"
        same = table["Id"].iat[q] == table["Id"].iat[c] and table["Id"].iat[q] != NEW_WHALE
        layers = [(kq, kc, m[~counts], (150, 150, 150)), (kq, kc, m[counts], (0, 200, 0) if same else (220, 0, 0))]
        if scorer.learned is not None:  # XFeat's inliers of the same pair
            nx, mx = scorer.learned.matches(q, c)
            layers.insert(0, (keypoints(scorer.learned.feats[q]), keypoints(scorer.learned.feats[c]), mx, (40, 110, 255)))
            note += f"; XFeat {nx} inliers (blue)"
        canvas = None
        for k1, k2, pairs_, col in layers:
            dm = [cv2.DMatch(int(a), int(b), 0.0) for a, b in pairs_]
            flags = cv2.DrawMatchesFlags_NOT_DRAW_SINGLE_POINTS | (cv2.DrawMatchesFlags_DRAW_OVER_OUTIMG
                                                                  if canvas is not None else 0)
            canvas = cv2.drawMatches(ims[0], k1, ims[1], k2, dm, canvas, matchColor=col, flags=flags)
        ax.imshow(canvas)
        ax.set_title(f"{table['Image'].iat[q]} ({table['Id'].iat[q]})  vs  {table['Image'].iat[c]} "
                     f"({table['Id'].iat[c]}): {n} inliers{note}", fontsize=8, color="green" if same else "red")
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, dest)


# ---- 05 and --predict -------------------------------------------------------------------------------
def fused_nearest_identities(emb, table, scorer: LocalScorer, cal: Calibration, q_rows, db_rows, depth: int,
                             n: int = 2, q_keys=None, q_emb=None):
    """Best ``n`` known identities per query scored by the fused score of their best image in the
    re-ranked shortlist: ``(ids (nq, n) object, scores (nq, n); '' / -inf where fewer)``."""
    db_rows = np.asarray(db_rows, np.int64)
    e = l2_normalize(emb)
    qe = e[np.asarray(q_rows, np.int64)] if q_emb is None else l2_normalize(q_emb)
    s, i = search(e[db_rows], qe, min(int(depth), len(db_rows)), gpu=False)
    idx = np.where(i >= 0, db_rows[np.clip(i, 0, None)], -1)
    keys = list(q_rows) if q_keys is None else q_keys
    s, idx, lnb, norms = lnbnn_candidates(scorer, cal, db_rows, keys, emb, qe, s, idx)
    inl = scorer.scores(keys, idx, "local matching (pseudo-labels)", norms)
    xf = scorer.learned_scores(keys, idx, "XFeat matching (pseudo-labels)") if uses_learned(cal) else None
    f, idx = reorder(cal.fuse(s, inl, lnbnn=lnb, learned=xf), idx)
    from .pseudo import padded

    # the score, not cal.probability: pseudo.margin was measured there (README "recalibrated")
    return padded(*rank_identities(f, idx, table["Id"].to_numpy(object), n=n), n)


def uses_learned(cal: Calibration) -> bool:
    """Whether the fusion weighs XFeat's inliers at all (validation may give them no share: then they
    are never matched outside validation)."""
    return cal.learned is not None and cal.learned_share > 0


def lnbnn_candidates(scorer: LocalScorer, cal: Calibration, db_rows, q_keys, emb, q_vec, cos, idx):
    """Shortlists widened by LNBNN, every candidate's LNBNN score and what :meth:`LocalScorer.scores`
    needs for the calibration's inlier score (:meth:`Calibration.norms`), as the calibration was made
    (``cal.info``): ``(cos, idx, lnbnn, norms)``; unchanged (None, None) when it fused no LNBNN score."""
    if cal.lnbnn is None or not cal.info.get("lnbnn", True):
        return cos, idx, None, None
    r = {**scorer.r, **{k: cal.info[k] for k in ("lnbnn_k", "lnbnn_candidates") if k in cal.info}}
    lrows = LnbnnRows(scorer, db_rows, q_keys, int(r["lnbnn_k"]), None, "LNBNN")
    return (*widen(lrows, emb, q_vec, cos, idx, int(r["lnbnn_candidates"])), cal.norms(lrows))


def fused_ranker(cfg: dict, paths, table: pd.DataFrame, emb, groups=None, log=print):
    """Calibration fitted on local validation for ``emb`` and a ``nearest(q_rows, db_rows)`` that
    ranks identities by fused probability (stage 05's pseudo-label confidence)."""
    r, k = cfg["rerank"], cfg["search"]["k"]
    scorer = LocalScorer(table, r, paths.features_dir)
    cal, val, _ = validate(emb, table, scorer, r, k, groups, None, log, cfg["search"]["new_whale_threshold"])
    depth = max(int(r["shortlist"]), k)

    def nearest(q_rows, db_rows):
        return fused_nearest_identities(emb, table, scorer, cal, q_rows, db_rows, depth)

    return nearest, cal, val
