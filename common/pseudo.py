"""Pseudo-labels: give a test image the identity of its nearest known whale when the match is
confident (similarity above a threshold, clear margin to the second identity).

The threshold may be calibrated on local validation: the same rule applied to the validation
queries (whose identities are known, some of them absent from the database like unseen test
whales) estimates the precision of the labels; ``auto`` picks the lowest threshold that reaches
a target precision.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from . import distributed
from .metrics import NEW_WHALE
from .retrieval import id_search_depth, l2_normalize, rank_identities, search


def nearest_identities(q_emb, db_emb, db_ids: Sequence[str], n: int = 2):
    """Best and second-best known identity per query, each scored by its most similar image:
    ``(ids (nq, n) object, sims (nq, n) float; '' / -inf where fewer exist)``. new_whale skipped."""
    db_emb, q_emb = l2_normalize(db_emb), l2_normalize(q_emb)
    scores, idx = search(db_emb, q_emb, max(1, id_search_depth(20, len(db_emb) + 1)), gpu="auto")
    return padded(*rank_identities(scores, idx, db_ids, n=n), n)


def padded(ids, sims, n: int):
    """Ragged per-query identity lists as ``(nq, n)`` arrays, '' / -inf where a query has fewer.

    >>> padded([["a"], ["b", "c"]], [[0.9], [0.8, 0.5]], 2)[1].tolist()
    [[0.9, -inf], [0.8, 0.5]]
    """
    out_ids = np.full((len(ids), n), "", dtype=object)
    out_sims = np.full((len(ids), n), -np.inf)
    for r, (i, s) in enumerate(zip(ids, sims)):
        out_ids[r, : len(i)] = i
        out_sims[r, : len(s)] = s
    return out_ids, out_sims


def confident(sims: np.ndarray, threshold: float, margin: float) -> np.ndarray:
    """Mask of queries whose best identity clears ``threshold`` and leads the second by ``margin``.

    >>> confident(np.array([[0.9, 0.5], [0.9, 0.88], [0.5, 0.1], [0.7, -np.inf]]), 0.6, 0.05).tolist()
    [True, False, False, True]
    """
    return (sims[:, 0] >= threshold) & (sims[:, 0] - sims[:, 1] >= margin)


def assign(names: Sequence[str], ids: np.ndarray, sims: np.ndarray, threshold: float, margin: float,
           max_count: int | None = None) -> pd.DataFrame:
    """Pseudo-label table ``Image, Id, score, margin`` of the confident queries, most confident
    first, at most ``max_count`` rows."""
    keep = confident(sims, threshold, margin)
    second = np.where(np.isfinite(sims[:, 1]), sims[:, 1], 0.0) if sims.shape[1] > 1 else np.zeros(len(sims))
    df = pd.DataFrame({"Image": np.asarray(names, dtype=object)[keep], "Id": ids[keep, 0],
                       "score": sims[keep, 0].round(5), "margin": (sims[keep, 0] - second[keep]).round(5)})
    df = df.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    return df if max_count is None else df.head(max(0, int(max_count)))


def precision_curve(ids: np.ndarray, sims: np.ndarray, truth: Sequence[str], margin: float) -> pd.DataFrame:
    """For each candidate threshold (the best similarities of margin-passing queries): how many
    queries would be labelled and the share labelled correctly. ``truth`` of a query whose
    whale is not in the database can be anything not in it (every label is then wrong)."""
    truth = np.asarray(truth, dtype=object)
    ok = (sims[:, 0] - sims[:, 1] >= margin) & np.isfinite(sims[:, 0])
    order = np.argsort(-sims[ok, 0], kind="stable")
    best = sims[ok, 0][order]
    correct = (ids[ok, 0] == truth[ok])[order]
    n = np.arange(1, len(best) + 1)
    return pd.DataFrame({"threshold": best, "n_labelled": n, "precision": np.cumsum(correct) / n})


def calibrate_threshold(curve: pd.DataFrame, target_precision: float, fallback: float = 1.01) -> float:
    """Lowest threshold whose labels reach ``target_precision`` (``fallback``, i.e. label nothing,
    when none does).

    >>> c = pd.DataFrame({"threshold": [0.9, 0.8, 0.7, 0.6], "n_labelled": [1, 2, 3, 4],
    ...                   "precision": [1.0, 1.0, 2 / 3, 0.75]})
    >>> calibrate_threshold(c, 0.75), calibrate_threshold(c, 0.9), calibrate_threshold(c.head(0), 0.9)
    (0.6, 0.8, 1.01)
    """
    good = curve[curve["precision"] >= target_precision]
    return float(good["threshold"].min()) if len(good) else float(fallback)


def label_precision(labels: pd.DataFrame, truth: pd.DataFrame | None) -> float | None:
    """Share of pseudo-labels that match the withheld truth (None without truth or labels).

    >>> label_precision(pd.DataFrame({"Image": ["a", "b"], "Id": ["w1", "w2"]}),
    ...                 pd.DataFrame({"Image": ["a", "b", "c"], "Id": ["w1", "w9", "w3"]}))
    0.5
    """
    if truth is None or not len(labels):
        return None
    t = dict(zip(truth["Image"], truth["Id"]))
    return float(np.mean([t.get(i) == l for i, l in zip(labels["Image"], labels["Id"])]))


def candidate_rows(clean: pd.DataFrame, rows: str) -> pd.Series:
    """Known-identity rows of clean/train.csv a test image may be matched to.

    ``rows=full``: every labelled row (singletons too: one pseudo image makes them trainable).
    ``rows=local``: the non-validation rows, without the identities held out entirely for
    validation, so that no validation image leaks into training through a label.
    """
    known = clean["Id"] != NEW_WHALE
    if rows == "full":
        return known
    val = clean["val"].astype(int) == 1
    trained = clean.groupby("Id")["train_local"].transform(lambda s: (s.astype(int) == 1).any())
    has_query = clean.groupby("Id")["val"].transform(lambda s: (s.astype(int) == 1).any())
    return known & ~val & ~(has_query & ~trained)


def training_rows(train_df: pd.DataFrame, labels: pd.DataFrame, clean: pd.DataFrame, candidates: pd.Series,
                  test_path, train_path) -> pd.DataFrame:
    """``train_df`` (Image, Id, path) plus the pseudo-labelled test images, plus the known images of
    pseudo-labelled identities the member did not train on (a singleton and its new test match
    become a trainable pair)."""
    pseudo = pd.DataFrame({"Image": labels["Image"], "Id": labels["Id"],
                           "path": [str(test_path(n)) for n in labels["Image"]]})
    new_ids = set(labels["Id"]) - set(train_df["Id"])
    extra = clean[candidates & clean["Id"].isin(new_ids)]
    extra = pd.DataFrame({"Image": extra["Image"], "Id": extra["Id"], "path": [str(train_path(n)) for n in extra["Image"]]})
    return pd.concat([train_df[["Image", "Id", "path"]], extra, pseudo], ignore_index=True)


def label_test_images(emb, table: pd.DataFrame, candidates: pd.Series, pcfg: dict, max_count: int | None = None,
                      nearest=None):
    """One labelling pass over the database embedding ``emb`` (rows of ``table``, train rows in
    clean/train.csv order). Returns ``(labels, info, curve, test_best_sims)``; ``info`` holds the
    threshold used and the precision/count it gives on the validation queries. ``nearest(q_rows,
    db_rows)`` -> ``(ids, scores)`` replaces the cosine ranking (e.g. the fused score of
    :func:`common.rerank.fused_ranker`); threshold and margin then apply to its scores."""
    train = np.flatnonzero((table["split"] == "train").to_numpy())
    test = np.flatnonzero((table["split"] == "test").to_numpy())
    ids = table["Id"].to_numpy(object)
    db = train[np.asarray(candidates, dtype=bool)]
    val = train[table["is_query"].to_numpy()[train].astype(bool)]
    margin = float(pcfg["margin"])
    near = nearest or (lambda q, d: nearest_identities(emb[q], emb[d], ids[d]))
    vids, vsims = near(val, db) if len(val) else (np.zeros((0, 2), object), np.zeros((0, 2)))
    curve = precision_curve(vids, vsims, ids[val], margin)
    thr = pcfg["threshold"]
    thr = calibrate_threshold(curve, float(pcfg["target_precision"])) if thr == "auto" else float(thr)
    at = curve[curve["threshold"] >= thr]
    tids, tsims = near(test, db)
    labels = assign(table["Image"].to_numpy(object)[test], tids, tsims, thr, margin, max_count)
    info = {"threshold": round(thr, 5), "margin": margin, "n_val_queries": int(len(val)),
            "val_labelled": int(len(at)), "val_precision": float(at["precision"].iloc[-1]) if len(at) else None,
            "n_test": int(len(test)), "labelled": int(len(labels)), "identities": int(labels["Id"].nunique())}
    return labels, info, curve, tsims[:, 0]


def plot_report(curve: pd.DataFrame, test_best, threshold: float, dest, title: str = "", n_queries: int | None = None):
    """Left: precision and share labelled of the validation queries vs threshold; right: the
    test images' best similarities, the threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import save_figure

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    if len(curve):
        a.plot(curve["threshold"], curve["precision"], label="precision (val queries)")
        n = n_queries or max(1, int(curve["n_labelled"].max()))
        a.plot(curve["threshold"], curve["n_labelled"] / n, label="share of val queries labelled")
    a.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:.3f}")
    a.set_xlabel("similarity to nearest known identity")
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    finite = np.asarray(test_best)[np.isfinite(test_best)]
    b.hist(finite, bins=30, color="#4477aa")
    b.axvline(threshold, color="k", ls="--", lw=1)
    b.set_xlabel("test image: best similarity")
    b.set_ylabel("images")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, dest)


# ---------------------------------------------------------------------------------------------
# Stage 05: label -> retrain rounds
# ---------------------------------------------------------------------------------------------
def judge(result: dict, member: dict, run_dir, keep_worse: bool) -> dict:
    """Compare a retrain's best validation score with its starting model's (the epoch-0 row of
    its history); set the retrain aside (``best.pt`` -> ``best_rejected.pt``) when it is lower.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "best.pt").write_text("x")
    >>> res = {"history": [{"epoch": 0, "map20": 0.5}, {"epoch": 1, "map20": 0.4}], "metrics": {"map20": 0.4}}
    >>> judge(res, {"name": "m", "train": {"metric": "map20"}}, d, False)["kept"], (d / "best_rejected.pt").exists()
    m: map20 0.5 -> 0.4: set aside, keeping the start model
    (False, True)
    """
    metric = member["train"]["metric"]
    before = next((h.get(metric) for h in result["history"] if h.get("epoch") == 0), None)
    after = result["metrics"].get(metric)
    kept = keep_worse or before is None or after is None or after >= before
    if not kept and distributed.is_main():
        (Path(run_dir) / "best.pt").replace(Path(run_dir) / "best_rejected.pt")
    distributed.print0(f"{member['name']}: {metric} {before} -> {after}: {'kept' if kept else 'set aside, keeping the start model'}")
    return {"metric": metric, "before": before, "after": after, "kept": kept}


def run_rounds(cfg: dict, paths, names: list[str], chosen: list[str], start: dict, fit_fn=None,
               embed_fn=None) -> dict:
    """``pseudo.rounds`` rounds of: embed train + test with every member's current checkpoint,
    label confident test images, fine-tune each member of ``chosen`` from its current checkpoint
    into its own folder ``pseudo/models/<member>/round<r>/``. A retrain that scores below its start
    is set aside and the member keeps its current checkpoint, so a worse round 2 never costs the
    model round 1 accepted. ``start``: member -> stage 04 checkpoint. Returns the report, whose
    ``checkpoints`` (member -> checkpoint) is what stage 06 uses. Under torchrun every rank runs the
    rounds (extraction and training split across them, the labelling repeated) and rank 0 writes."""
    from .config import member_config
    from .embedding_store import embed_members
    from .io import write_csv, write_json
    from .retrieval import meta_embedding
    from .tables import clean_frame, image_paths, train_frame, truth_frame, val_frame

    if fit_fn is None:
        from .training import fit as fit_fn
    embed_fn = embed_fn or embed_members
    p, clean, truth = cfg["pseudo"], clean_frame(paths), truth_frame(paths)
    members = {n: member_config(cfg, n) for n in names}
    current = {n: Path(start[n]) for n in names}
    row_modes = {members[n]["train"]["rows"] for n in chosen}
    cand = candidate_rows(clean, "local" if "local" in row_modes else "full")
    max_count = int(float(p["max_share"]) * int((clean["Id"] != NEW_WHALE).sum()))
    rounds = []
    for r in range(1, int(p["rounds"]) + 1):
        table, embs = embed_fn(cfg, paths, names, lambda n: current[n])
        emb = meta_embedding([embs[n] for n in names])  # equal weights: `ensemble:` is stage 06's alone
        nearest = None
        if cfg["rerank"]["enabled"]:  # confidence = fused score of embedding + local matching
            from .rerank import fused_ranker

            nearest, cal, _ = fused_ranker(cfg, paths, table, emb)
            if distributed.is_main():
                write_json(paths.pseudo_calibration, cal.to_dict())
        labels, info, curve, best = label_test_images(emb, table, cand, p, max_count, nearest)
        info["truth_precision"] = label_precision(labels, truth)
        if distributed.is_main():
            write_csv(paths.pseudo_csv, labels)
            plot_report(curve, best, info["threshold"], paths.pseudo_png,
                        f"round {r}: {len(labels)} of {info['n_test']} test images labelled", info["n_val_queries"])
        distributed.print0(f"round {r}: labelled {info['labelled']}/{info['n_test']} test images ({info['identities']} Ids) at "
              f"threshold {info['threshold']:.3f}; precision on validation {info['val_precision']}, "
              f"on the withheld truth {info['truth_precision']}")
        info["members"] = {}
        rounds.append(info)
        if labels.empty:
            distributed.print0("no confident test image: nothing to retrain on")
            break
        for n in chosen:
            member = members[n]
            crops, rows_of = member["model"]["use_crops"], member["train"]["rows"]
            rows = training_rows(train_frame(paths, "train", rows_of, crops), labels, clean,
                                 candidate_rows(clean, rows_of), image_paths(paths, "test", crops),
                                 image_paths(paths, "train", crops))
            run_dir = paths.pseudo_round_dir(n, r)
            result = fit_fn(member, rows, val_frame(paths, "train", crops) if rows_of == "local" else None, run_dir,
                            init=current[n], device=cfg["device"], epochs=int(p["epochs"]),
                            num_workers=int(cfg["num_workers"]), deterministic=bool(cfg["deterministic"]))
            verdict = judge(result, member, run_dir, bool(p["keep_worse"]))
            verdict.update(init=str(current[n]), n_images=len(rows), n_pseudo=len(labels))
            if verdict["kept"]:
                current[n] = run_dir / "best.pt"
            info["members"][n] = verdict
    return {"rounds": rounds, "labelled": rounds[-1]["labelled"], "precision_val": rounds[-1]["val_precision"],
            "precision_truth": rounds[-1]["truth_precision"], "members": chosen,
            "checkpoints": {n: str(current[n]) for n in names}}
