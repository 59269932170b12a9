"""Retrieval gallery PNG: one row per query, its top-k matches beside it, each match bordered
green when it shows the query's whale, red when not, grey when the truth is unknown."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .metrics import NEW_WHALE

COLORS = {True: "#1a9850", False: "#d73027", None: "#9e9e9e"}


def thumbnail(path, size: int = 128) -> np.ndarray:
    """RGB thumbnail with the longest side ``size`` (a grey tile when the file cannot be read)."""
    import cv2

    from .io import ImageReadError, read_image

    try:
        img = read_image(path)
    except ImageReadError:
        return np.full((size // 2, size, 3), 128, np.uint8)
    h, w = img.shape[:2]
    s = size / max(h, w)
    return cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def plot_gallery(queries: Sequence[dict], results: Sequence[Sequence[dict]], dest, thumb: int = 128):
    """``queries[i] = {"path", "title"}``; ``results[i][j] = {"path", "title", "match": bool|None}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import save_figure

    n_rows = max(1, len(queries))
    n_cols = 1 + max([len(r) for r in results] + [1])
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.9 * n_cols, 1.5 * n_rows), squeeze=False)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_axis_off()
    for i, (q, row) in enumerate(zip(queries, results)):
        _tile(axes[i, 0], q["path"], q.get("title", ""), "#1f4e79", thumb, bold=True)
        for j, r in enumerate(row, start=1):
            _tile(axes[i, j], r["path"], r.get("title", ""), COLORS[r.get("match")], thumb)
    axes[0, 0].set_title("query\n" + axes[0, 0].get_title(), fontsize=7)
    fig.tight_layout()
    return save_figure(fig, dest)


def _tile(ax, path, title: str, color: str, thumb: int, bold: bool = False):
    ax.set_axis_on()
    ax.imshow(thumbnail(path, thumb))
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(4)
    ax.set_title(title, fontsize=6, fontweight="bold" if bold else "normal")


def retrieval_gallery(emb, table, dest, truth=None, n_queries: int = 8, k: int = 6, **search_kw):
    """Gallery of evenly spaced queries: the test images against train + test when the test truth
    is known (the demo), else the local-validation queries against the train images."""
    import pandas as pd

    from .retrieval import search

    ids = table["Id"].to_numpy(object).copy()
    if truth is not None:
        t = dict(zip(truth["Image"], truth["Id"]))
        test = (table["split"] == "test").to_numpy()
        ids[test] = [t.get(n, "") for n in table["Image"][test]]
        q, db = np.flatnonzero(test), np.arange(len(table))
    else:
        db = np.flatnonzero((table["split"] == "train").to_numpy())
        q = db[table["is_query"].to_numpy()[db].astype(bool)]
    if not len(q) or not len(db):
        return None
    q = q[np.unique(np.linspace(0, len(q) - 1, min(n_queries, len(q))).round().astype(int))]
    pos = pd.Series(np.arange(len(db)), index=db)
    scores, idx = search(emb[db], emb[q], k, exclude=pos.reindex(q).fillna(-1).astype(int).to_numpy(), **search_kw)
    names, paths = table["Image"].to_numpy(object), table["path"].to_numpy(object)
    queries, results = [], []
    for qi, s_row, i_row in zip(q, scores, idx):
        queries.append({"path": paths[qi], "title": f"{names[qi]}\n{ids[qi] or '?'}"})
        row = []
        for s, i in zip(s_row, i_row):
            if i < 0:
                continue
            j = db[i]
            known = bool(ids[qi]) and bool(ids[j]) and ids[qi] != NEW_WHALE
            row.append({"path": paths[j], "title": f"{ids[j] or '?'}  {s:.3f}", "match": (ids[j] == ids[qi]) if known else None})
        results.append(row)
    return plot_gallery(queries, results, dest)
