"""Local scores of one embedding of the search database (a member's or the meta-embedding).

``table`` is :func:`common.embedding_store.database_table` (train rows then test rows) and
``emb`` its embeddings, row for row.

* ``val``: the local-validation protocol (queries = val rows, database = train rows, query
  excluded): image-mode map20/top1/hit20, ID-mode map5 without new_whale, and ``map5_nw``
  with new_whale inserted at the threshold tuned here. For ``map5_nw`` and the threshold, a
  query of an identity held out of training (``held_out``, clean.unseen_frac) stands for a new
  individual: its identity is left out of its ID ranking and its truth is new_whale, as a test
  photo of an animal train.csv lacks (:func:`id_validation`). Without such queries every
  validation query would find its own identity, and the threshold would be tuned never to say
  new_whale.
* ``test`` (when the withheld truth is known, i.e. the demo): image mode with database
  train + test, and ID mode (database = train) with the tuned threshold, as the two submissions
  would score; ``*_seen`` / ``*_unseen``: the test photos of identities train.csv has / lacks
  (only the unseen ones say whether the embedding generalises to new individuals).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .metrics import NEW_WHALE, image_scores, kaggle_map5, relevance, subset_scores
from .retrieval import evaluate_search, id_search_depth, l2_normalize, rank_identities, relevant_counts, search
from .submission import id_truth, insert_new_whale, pad_ids, tune_new_whale_threshold

ID_N = 5


def _split(table: pd.DataFrame):
    tr = (table["split"] == "train").to_numpy()
    return np.flatnonzero(tr), np.flatnonzero(~tr)


def table_groups(table: pd.DataFrame) -> np.ndarray | None:
    """Encounter label per table row ('' = none), or None when the table has no encounters
    (then every search and score is exactly the ungrouped one)."""
    if "encounter" not in table.columns:
        return None
    g = table["encounter"].fillna("").astype(str).to_numpy(object)
    return g if (g != "").any() else None


def seen_unseen(query_ids, train_ids) -> dict:
    """``{"seen": mask, "unseen": mask}`` of the queries whose identity train.csv has / lacks."""
    unseen = ~np.isin(np.asarray(query_ids, dtype=object).astype(str), np.asarray(train_ids, dtype=object).astype(str))
    return {"seen": ~unseen, "unseen": unseen}


def frequent_ids(table: pd.DataFrame) -> list[str]:
    """Known train identities, most images first (fills short ID predictions)."""
    ids = table.loc[(table["split"] == "train") & (table["Id"] != NEW_WHALE), "Id"]
    return ids.value_counts(sort=True).index.tolist()


def id_validation(table: pd.DataFrame, rows, n_relevant) -> tuple[list[str], list[str]]:
    """ID-mode validation truth of the queries ``rows`` of ``table`` and the identity each ranking
    must not show (:func:`common.retrieval.rank_identities` ``hide``): a photo of an identity held
    out of training (``held_out``) stands for a new individual, so its own identity is hidden and
    its truth is new_whale; any other query whose identity has no other database photo
    (``n_relevant`` 0) is new_whale too.

    >>> t = pd.DataFrame({"Id": ["a", "b", "c"], "held_out": [0, 0, 1]})
    >>> id_validation(t, [0, 1, 2], [2, 0, 3])
    (['a', 'new_whale', 'new_whale'], ['', '', 'c'])
    """
    rows = np.asarray(rows, np.int64)
    query_ids = table["Id"].to_numpy(object)[rows]
    new = table["held_out"].to_numpy()[rows].astype(bool) if "held_out" in table else np.zeros(len(rows), bool)
    truth = [NEW_WHALE if (c == 0 or h) else str(t) for t, c, h in zip(query_ids, n_relevant, new)]
    hide = [str(t) if h else "" for t, h in zip(query_ids, new)]
    return truth, hide


def val_scores(emb, table: pd.DataFrame, k: int = 20, threshold: float | None = None, untuned: float = 0.5) -> dict:
    """Local-validation figures and the new_whale threshold: ``threshold`` when configured, else
    tuned on the queries, else (no queries to tune on) ``untuned``; ``threshold_source`` says which."""
    tr, _ = _split(table)
    e, ids = l2_normalize(emb[tr]), table["Id"].to_numpy(object)[tr]
    q = np.flatnonzero(table["is_query"].to_numpy()[tr].astype(bool))
    if not len(q):
        source = "config" if threshold is not None else "untuned"
        return {"n_queries": 0, "new_whale_threshold": float(untuned if threshold is None else threshold),
                "threshold_source": source}
    g = table_groups(table)
    groups = None if g is None else (g[tr][q], g[tr])  # same-encounter photos never count nor fill a list
    scores, idx = search(e, e[q], max(k, id_search_depth(k, len(e))), exclude=q, gpu=False, groups=groups)
    n_rel = relevant_counts(ids[q], ids, True, groups)
    out = evaluate_search(scores, idx, ids[q], ids, k=k, n_relevant=n_rel)
    truth, hide = id_validation(table, tr[q], n_rel)
    pred_ids, sims = rank_identities(scores, idx, ids, n=ID_N, hide=hide)
    tuned, _, _ = tune_new_whale_threshold(pred_ids, sims, truth, n=ID_N)
    thr = tuned if threshold is None else float(threshold)
    out["map5_nw"] = kaggle_map5([insert_new_whale(i, s, thr, ID_N) for i, s in zip(pred_ids, sims)], truth)
    out["new_whale_threshold"] = thr
    out["n_new_queries"] = sum(t == NEW_WHALE for t in truth)
    out["threshold_source"] = "tuned" if threshold is None else "config"
    return out


def search_test_images(emb, table: pd.DataFrame, k: int = 20, grouped: bool = False, **search_kw):
    """Top-k of every test image over the whole database (train + test), itself excluded; with
    ``grouped`` (scoring against the withheld truth) its own encounter's images excluded too."""
    _, te = _split(table)
    emb, g = l2_normalize(emb), table_groups(table) if grouped else None
    return search(emb, emb[te], k, exclude=te, groups=None if g is None else (g[te], g), **search_kw)


def predict_test_ids(emb, table: pd.DataFrame, threshold: float, n: int = ID_N, **search_kw) -> list[list[str]]:
    """n Ids per test image (database = labelled train images), new_whale inserted at
    ``threshold``, padded with the most frequent Ids."""
    tr, te = _split(table)
    ids, emb = table["Id"].to_numpy(object)[tr], l2_normalize(emb)
    scores, idx = search(emb[tr], emb[te], max(n, id_search_depth(20, len(tr) + 1)), **search_kw)
    pred, sims = rank_identities(scores, idx, ids, n=n)
    fallback = frequent_ids(table)
    return [pad_ids(insert_new_whale(p, s, threshold, n), fallback, n) for p, s in zip(pred, sims)]


def score_test(emb, table: pd.DataFrame, truth: pd.DataFrame, threshold: float, k: int = 20, **search_kw) -> dict:
    """How the two submissions score against the withheld test truth."""
    tr, te = _split(table)
    t = dict(zip(truth["Image"], truth["Id"]))
    test_ids = np.array([t.get(n, NEW_WHALE) for n in table["Image"].to_numpy(object)[te]], dtype=object)
    all_ids = table["Id"].to_numpy(object).copy()
    all_ids[te] = test_ids
    scores, idx = search_test_images(emb, table, k, grouped=True, **search_kw)
    hits = relevance(test_ids, all_ids, idx)
    g = table_groups(table)
    n_rel = relevant_counts(test_ids, all_ids, True, None if g is None else (g[te], g))
    out = image_scores(hits, n_rel, k)
    out.update(subset_scores(hits, n_rel, seen_unseen(test_ids, table["Id"].to_numpy(object)[tr]), k))
    preds = predict_test_ids(emb, table, threshold, ID_N, **search_kw)
    out["map5_nw"] = kaggle_map5(preds, id_truth(test_ids, set(all_ids[tr])))
    return out


def local_scores(emb, table: pd.DataFrame, truth: pd.DataFrame | None = None, k: int = 20,
                 threshold: float | None = None, untuned: float = 0.5, **search_kw) -> dict:
    """``{"val": {...}, "test": {...}}`` (test only with truth); see the module docstring.
    ``val.new_whale_threshold`` is the one the ID submission uses (see :func:`val_scores`)."""
    out = {"val": val_scores(emb, table, k, threshold, untuned)}
    thr = out["val"]["new_whale_threshold"]
    if truth is not None and (table["split"] == "test").any():
        out["test"] = score_test(emb, table, truth, thr, k, **search_kw)
    return out


def format_scores(scores: dict[str, dict]) -> str:
    """A fixed-width table: one line per embedding (members, then the ensemble)."""
    cols = [("val", "map20"), ("val", "top1"), ("val", "hit20"), ("val", "map5"), ("val", "map5_nw"),
            ("test", "map20"), ("test", "top1"), ("test", "hit20"), ("test", "map5_nw"), ("test", "top1_unseen")]
    cols = [c for c in cols if any(c[1] in s.get(c[0], {}) for s in scores.values())]
    width = max([len(n) for n in scores] + [8])
    head = f"{'':{width}}  " + "  ".join(f"{a + '.' + b:>11}" for a, b in cols)
    lines = [head]
    for name, s in scores.items():
        vals = [s.get(a, {}).get(b) for a, b in cols]
        lines.append(f"{name:{width}}  " + "  ".join(f"{v:11.4f}" if v is not None else f"{'-':>11}" for v in vals))
    return "\n".join(lines)
