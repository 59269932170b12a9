"""Retrieval gallery: match flags and the PNG."""
import cv2
import numpy as np
import pandas as pd

import common.gallery as gallery


def test_gallery_flags_matches_and_writes_png(tmp_path, monkeypatch):
    names = ["a1", "a2", "b1", "t1"]
    paths = []
    for i, n in enumerate(names):
        p = tmp_path / f"{n}.png"
        cv2.imwrite(str(p), np.full((20, 30, 3), 60 * i, np.uint8))
        paths.append(str(p))
    table = pd.DataFrame({"split": ["train"] * 3 + ["test"], "Image": names, "Id": ["a", "a", "b", ""],
                          "path": paths, "is_query": [1, 0, 0, 0]})
    emb = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.95, 0.05]], np.float32)
    seen = {}
    real = gallery.plot_gallery
    monkeypatch.setattr(gallery, "plot_gallery", lambda q, r, dest: seen.update(q=q, r=r) or real(q, r, dest))
    out = gallery.retrieval_gallery(emb, table, tmp_path / "g.png", None, n_queries=4, k=2)
    assert [q["path"] for q in seen["q"]] == [paths[0]]                 # validation query a1
    assert [(r["path"], r["match"]) for r in seen["r"][0]] == [(paths[1], True), (paths[2], False)]
    assert out.stat().st_size > 1000
    truth = pd.DataFrame({"Image": ["t1"], "Id": ["a"]})
    gallery.retrieval_gallery(emb, table, tmp_path / "g2.png", truth, n_queries=4, k=3)
    assert [r["match"] for r in seen["r"][0]] == [True, True, False]    # test query t1 vs train + test
