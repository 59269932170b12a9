"""The two submission files, their validators, and the ID-mode ``new_whale`` decision.

Image mode (``submission.csv``, the GDSG 2020 fluke format): no header, one row per test image:
the image name, then the k most similar database image names, best first.

ID mode (``submission_ids.csv``, Kaggle Humpback 2019): ``Image,Id`` where Id holds 5
space-separated identities, best first, ``new_whale`` inserted where the similarity of the next
identity falls below a threshold tuned on local validation.

>>> insert_new_whale(["a", "b", "c", "d", "e"], [0.9, 0.7, 0.5, 0.4, 0.3], threshold=0.6)
['a', 'b', 'new_whale', 'c', 'd']
>>> insert_new_whale(["a", "b"], [0.5, 0.4], threshold=0.6, n=3)
['new_whale', 'a', 'b']
"""
from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .errors import PipelineError
from .io import atomic_path, write_csv
from .metrics import NEW_WHALE, kaggle_map5


class SubmissionError(PipelineError, ValueError):
    """A submission that must not be written or sent; the message names the file and row."""


# ---- image mode ------------------------------------------------------------------------------
def image_rows(query_names: Sequence[str], idx, db_names: Sequence[str]) -> list[list[str]]:
    """Rows ``[query, match_1, ..., match_k]`` from search indices (``-1`` padding dropped)."""
    db_names = np.asarray(db_names, dtype=object)
    return [[q, *db_names[row[row >= 0]].tolist()] for q, row in zip(query_names, np.asarray(idx))]


def fill_rows(missing: Sequence[str], rows: list[list[str]], db_names: Sequence[str], k: int) -> list[list[str]]:
    """Rows for test images that could not be searched (unreadable): the k database images
    returned most often for the other queries (then database order), never the image itself."""
    counts = Counter(name for row in rows for name in row[1:])
    popular = [n for n, _ in counts.most_common()] + [n for n in db_names if n not in counts]
    return [[m, *[n for n in popular if n != m][:k]] for m in missing]


def validate_image_submission(rows: Sequence[Sequence[str]], test_names: Sequence[str], db_names: Sequence[str],
                              k: int = 20, source: str = "submission") -> None:
    """Raise SubmissionError unless every test image has exactly one row of k distinct database
    names that never include the query itself."""
    db = set(db_names)
    expected = set(test_names)
    seen: set[str] = set()
    for n, row in enumerate(rows, start=1):
        where = f"{source} row {n}"
        if not row or not row[0]:
            raise SubmissionError(f"{where}: empty query name")
        q, matches = row[0], list(row[1:])
        if q not in expected:
            raise SubmissionError(f"{where}: {q!r} is not a test image")
        if q in seen:
            raise SubmissionError(f"{where}: test image {q!r} appears twice")
        seen.add(q)
        if len(matches) != k:
            raise SubmissionError(f"{where} ({q}): {len(matches)} matches, expected {k}")
        if len(set(matches)) != k:
            dup = [m for m, c in Counter(matches).items() if c > 1]
            raise SubmissionError(f"{where} ({q}): repeated matches {dup[:3]}")
        if q in matches:
            raise SubmissionError(f"{where} ({q}): the query is returned as its own match")
        unknown = [m for m in matches if m not in db]
        if unknown:
            raise SubmissionError(f"{where} ({q}): {len(unknown)} names not in the database, e.g. {unknown[0]!r}")
    missing = expected - seen
    if missing:
        raise SubmissionError(f"{source}: {len(missing)} test images have no row, e.g. {sorted(missing)[0]!r}")


def write_image_submission(dest, rows, test_names, db_names, k: int = 20) -> Path:
    """Validate, then write atomically (no header); nothing is written when validation fails."""
    validate_image_submission(rows, test_names, db_names, k, source=str(dest))
    with atomic_path(dest) as tmp, open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return Path(dest)


def read_image_submission(path) -> list[list[str]]:
    with open(path, newline="") as f:
        return [row for row in csv.reader(f) if row]


# ---- ID mode ---------------------------------------------------------------------------------
def insert_new_whale(ids: Sequence[str], sims: Sequence[float], threshold: float, n: int = 5) -> list[str]:
    """Put ``new_whale`` before the first identity whose similarity is below ``threshold``
    (after all of them when none is), keep the first n labels."""
    out = [i for i in ids if i != NEW_WHALE]
    pos = next((r for r, s in enumerate(sims[: len(out)]) if s < threshold), len(out))
    out.insert(pos, NEW_WHALE)
    return out[:n]


def pad_ids(ids: Sequence[str], fallback: Sequence[str], n: int = 5) -> list[str]:
    """Extend a prediction to n distinct labels from ``fallback`` (e.g. the most frequent Ids)."""
    out = list(dict.fromkeys(ids))
    for f in fallback:
        if len(out) >= n:
            break
        if f not in out:
            out.append(f)
    return out[:n]


def id_truth(query_ids: Sequence[str], known_ids) -> list[str]:
    """What ID mode counts as correct: the Id when it is a known (database) identity, else new_whale.

    >>> id_truth(["a", "z", "new_whale"], {"a", "b"})
    ['a', 'new_whale', 'new_whale']
    """
    known = set(known_ids) - {NEW_WHALE}
    return [q if q in known else NEW_WHALE for q in query_ids]


def tune_new_whale_threshold(ids: Sequence[Sequence[str]], sims: Sequence[Sequence[float]], truth: Sequence[str],
                             n: int = 5) -> tuple[float, float, list[tuple[float, float]]]:
    """Threshold on the identity similarities that maximises MAP@5 against ``truth`` (queries
    whose whale the database lacks have truth ``new_whale``). Candidates: midpoints between the
    sorted top-1 similarities, plus never/always. Returns ``(threshold, map5, [(thr, map5), ...])``.
    """
    top = np.array([s[0] if len(s) else -np.inf for s in sims], dtype=np.float64)
    finite = np.unique(top[np.isfinite(top)])
    mids = (finite[1:] + finite[:-1]) / 2 if len(finite) > 1 else finite
    if len(mids) > 400:  # large validation sets: a quantile grid is plenty
        mids = np.quantile(mids, np.linspace(0, 1, 401))
    lo = float(finite.min()) - 1e-3 if len(finite) else -1.0
    hi = float(finite.max()) + 1e-3 if len(finite) else 1.0
    candidates = [lo, *mids.tolist(), hi]
    curve = []
    for thr in candidates:
        preds = [insert_new_whale(i, s, thr, n) for i, s in zip(ids, sims)]
        curve.append((float(thr), kaggle_map5(preds, truth)))
    best = max(curve, key=lambda c: c[1])[1]
    tied = [t for t, m in curve if m == best]
    return float(tied[len(tied) // 2]), float(best), curve


def id_frame(query_names: Sequence[str], preds: Sequence[Sequence[str]]) -> pd.DataFrame:
    return pd.DataFrame({"Image": list(query_names), "Id": [" ".join(p) for p in preds]})


def validate_id_submission(df: pd.DataFrame, test_names: Sequence[str], n: int = 5, source: str = "submission") -> None:
    """Raise SubmissionError unless columns are Image,Id and every test image has one row of n
    distinct labels."""
    if list(df.columns) != ["Image", "Id"]:
        raise SubmissionError(f"{source}: columns must be Image,Id, got {','.join(map(str, df.columns))}")
    dup = df["Image"][df["Image"].duplicated()]
    if len(dup):
        raise SubmissionError(f"{source} row {dup.index[0] + 1}: test image {dup.iloc[0]!r} appears twice")
    for r, (img, labels) in enumerate(zip(df["Image"], df["Id"]), start=1):
        parts = str(labels).split()
        if len(parts) != n or len(set(parts)) != n:
            raise SubmissionError(f"{source} row {r} ({img}): expected {n} distinct Ids, got {labels!r}")
    unknown = set(df["Image"]) - set(test_names)
    missing = set(test_names) - set(df["Image"])
    if unknown:
        raise SubmissionError(f"{source}: {sorted(unknown)[0]!r} is not a test image")
    if missing:
        raise SubmissionError(f"{source}: {len(missing)} test images have no row, e.g. {sorted(missing)[0]!r}")


def write_id_submission(dest, df: pd.DataFrame, test_names, n: int = 5) -> Path:
    validate_id_submission(df, test_names, n, source=str(dest))
    return write_csv(dest, df)


def write_submissions(paths, table, emb, threshold: float, s: dict, kw: dict, rr: dict | None = None) -> dict:
    """Stage 06's two submission files (validated before writing). Test images that stage 00
    could not read get filler rows: the most often returned database images, new_whale first.
    ``rr``: re-ranked lists (image mode: table rows; ID mode: predictions) that replace the
    embedding's (common/rerank.py)."""
    from .evaluation import frequent_ids, predict_test_ids, search_test_images
    from .tables import submission_images

    tests = table.loc[table["split"] == "test", "Image"].tolist()
    every, missing = submission_images(paths)  # stage 00 names the test images it could not read
    idx = rr["image_idx"] if rr else search_test_images(emb, table, s["k"], **kw)[1]
    rows = image_rows(tests, idx, table["Image"])
    rows += fill_rows(missing, rows, table["Image"], s["k"])
    write_image_submission(paths.submission_csv, rows, every, table["Image"], s["k"])
    preds = [p[: s["id_k"]] for p in rr["id_preds"]] if rr else predict_test_ids(emb, table, threshold, s["id_k"], **kw)
    preds += [pad_ids([], [NEW_WHALE, *frequent_ids(table)], s["id_k"]) for _ in missing]
    write_id_submission(paths.submission_ids_csv, id_frame(tests + missing, preds), every, s["id_k"])
    n_nw = sum(p[0] == NEW_WHALE for p in preds)
    print(f"{len(rows)} test rows ({len(missing)} unreadable test images got filler rows{': ' if missing else ''}"
          f"{', '.join(missing[:5])}); new_whale first in {n_nw} ID rows (threshold {threshold:.3f})")
    return {"new_whale_threshold": threshold, "filled_rows": missing, "new_whale_first": n_nw}
