"""Top-k database matches for new photos: how the trained system is used after the competition.

Each photo is cropped by stage 02's rule (the fluke detector when stage 01 trained one, else the
backbone's attention map per crop.attention, else the whole image),
embedded by every member with the same flip TTA as the database, joined into the
meta-embedding and searched against the train + test database. With rerank.enabled the shortlist
is re-ranked by the fused probability (stage 06's calibration, local features of the photo vs
the cached database features), and a photo whose best known Id falls below the tuned new_whale
threshold is reported as probably a new individual. Matches carry the train Id, or
for test images their pseudo-label when stage 05 gave one.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from .io import ImageReadError, read_image, write_csv
from .metrics import NEW_WHALE


def crop_photos(cfg: dict, paths, photos: list[Path], out_dir: Path) -> list[Path]:
    """Crops of ``photos`` written to ``out_dir`` by the same rule as stage 02 (cropping.make_cropper:
    the detector when stage 01 trained one, else the attention map per crop.attention, else whole)."""
    from .cropping import make_cropper, write_crop

    cropper = make_cropper(cfg, paths)
    out = []
    for i, p in enumerate(photos):
        (crop,), _ = cropper.crops([read_image(p)])
        dest = out_dir / f"{i:05d}_{Path(p).stem}.jpg"
        write_crop(crop, dest, cfg["crop"]["quality"])
        out.append(dest)
    return out


def db_labels(paths, table: pd.DataFrame) -> np.ndarray:
    """Train Ids, and the pseudo-labels of test images where stage 05 wrote some ('' otherwise)."""
    ids = table["Id"].to_numpy(object).copy()
    if paths.pseudo_csv.exists():
        pl = pd.read_csv(paths.pseudo_csv, dtype=str, keep_default_na=False)
        lab = dict(zip(pl["Image"], pl["Id"]))
        test = (table["split"] == "test").to_numpy()
        ids[test] = [lab.get(n, "") for n in table["Image"][test]]
    return ids


def predict(cfg: dict, paths, photos, top_k: int = 20, out=None) -> int:
    """Print and write (``out`` or DATA/submission/predictions.csv) the top-k matches of ``photos``.

    Unreadable photos are skipped with a message and the others matched; the return code is then
    1 (0 when every photo was matched)."""
    from .config import member_config, member_names
    from .embedding_store import embed_members
    from .inference import embed_images
    from .models import load_checkpoint
    from .handoff import final_checkpoints
    from .retrieval import meta_embedding, search, search_options
    from .runtime import resolve_device

    photos, bad = readable_photos(photos)
    if not photos:
        print("error: no readable photo to match", file=sys.stderr)
        return 1
    names = member_names(cfg)
    if cfg["rerank"]["enabled"] and not paths.rerank_calibration.exists():
        print(f"error: rerank.enabled but {paths.rerank_calibration} is missing: run stage 06 first "
              f"(or --set rerank.enabled=false)", file=sys.stderr)
        return 1
    table, db = embed_members(cfg, paths, names, log=lambda m: None)
    device = resolve_device(cfg["device"])
    tta = bool(cfg["tta"]["hflip"])
    weights = [member_config(cfg, n)["weight"] for n in names]
    db_emb = meta_embedding([db[n] for n in names], weights)
    with tempfile.TemporaryDirectory(prefix="predict_") as tmp:
        inputs = crop_photos(cfg, paths, photos, Path(tmp))
        q = {}
        for n in names:
            model, _ = load_checkpoint(final_checkpoints(paths, [n])[n])
            q[n] = embed_images(model, inputs, model.img_size, device=device, tta_hflip=tta, progress=False)
        q_emb = meta_embedding([q[n] for n in names], weights)
        if cfg["rerank"]["enabled"]:
            scores, idx, extra, thr = _reranked(cfg, paths, table, db_emb, q_emb, inputs, Path(tmp), top_k)
        else:
            scores, idx = search(db_emb, q_emb, min(top_k, len(db_emb)), **search_options(cfg["search"]))
            extra, thr = {}, None
    ids = db_labels(paths, table)
    rows = [{"query": str(p), "rank": r + 1, "match": table["Image"].iat[i], "split": table["split"].iat[i],
             "Id": ids[i], "similarity": round(float(s), 4), **{c: v[qi][r] for c, v in extra.items()}}
            for qi, (p, s_row, i_row) in enumerate(zip(photos, scores, idx))
            for r, (s, i) in enumerate(zip(s_row, i_row)) if i >= 0]
    df = pd.DataFrame(rows, columns=["query", "rank", "match", "split", "Id", "similarity", *extra])
    dest = Path(out) if out else paths.predictions_csv
    write_csv(dest, df)
    with pd.option_context("display.max_rows", None, "display.width", 160):
        for p, g in df.groupby("query", sort=False):
            known = g[(g["Id"] != "") & (g["Id"] != NEW_WHALE)]
            if thr is not None and (not len(known) or known["probability"].iloc[0] < thr):
                best = (f"(best known Id {known['Id'].iloc[0]}, probability {known['probability'].iloc[0]:.3f}"
                        if len(known) else "(no known Id in the top-k") + f" < threshold {thr:.3f})"
                print(f"\n{p}  probably a new individual {best}")
            else:
                sim = "probability" if thr is not None else "similarity"
                best = f"{known['Id'].iloc[0]} ({sim} {known[sim].iloc[0]:.3f})" if len(known) else "none in the top-k"
                print(f"\n{p}  nearest known Id: {best}")
            print(g.drop(columns="query").to_string(index=False))
    print(f"\nwrote {dest}")
    if bad:
        print(f"error: {len(bad)} of {len(bad) + len(photos)} photos skipped (unreadable): "
              f"{', '.join(map(str, bad))}", file=sys.stderr)
    return 1 if bad else 0


def readable_photos(photos) -> tuple[list[Path], list[Path]]:
    """(readable photos, unreadable ones); each unreadable one is named on stderr as it is skipped."""
    good, bad = [], []
    for p in map(Path, photos):
        try:
            read_image(p)
            good.append(p)
        except ImageReadError as e:
            print(f"skipped: {e}", file=sys.stderr)
            bad.append(p)
    return good, bad


def _reranked(cfg, paths, table, db_emb, q_emb, inputs, tmp: Path, top_k: int):
    """Shortlists of the photos re-ranked by the fused probability with stage 06's calibration:
    ``(cosines, rows, {"inliers", "probability"} per rank, new_whale threshold)``."""
    from .io import read_json
    from .rerank import Calibration, LocalScorer, lnbnn_candidates, reorder, uses_learned
    from .retrieval import search, search_options

    r = cfg["rerank"]
    cal = Calibration.from_dict(read_json(paths.rerank_calibration))
    depth = min(max(int(r["shortlist"]), top_k), len(db_emb))
    cos, idx = search(db_emb, q_emb, depth, **search_options(cfg["search"]))
    scorer = LocalScorer(table, {**r, "xfeat": uses_learned(cal), "xfeat_share": cal.learned_share}, paths.features_dir,
                         progress=False)  # XFeat as the calibration weighs it, whatever the config says now
    keys = [("photo", i) for i in range(len(inputs))]
    scorer.add(keys, [("predict", f"{i:05d}_{Path(p).name}", str(p)) for i, p in enumerate(inputs)], tmp / "features")
    cos, idx, lnb, norms = lnbnn_candidates(scorer, cal, np.arange(len(table)), keys, db_emb, q_emb, cos, idx)
    score, order = reorder(cal.fuse(cos, scorer.scores(keys, idx, norms=norms), lnbnn=lnb,
                                    learned=scorer.learned_scores(keys, idx)), idx)
    inl = scorer.scores(keys, idx)  # the inlier counts people read (the pairs are matched: no work)
    prob = cal.probability(score)
    pos = [[list(row).index(c) for c in o] for row, o in zip(idx, order)]
    cos = np.take_along_axis(cos, np.array(pos, np.int64).reshape(idx.shape), 1)
    inl = np.take_along_axis(inl, np.array(pos, np.int64).reshape(idx.shape), 1)
    k = min(top_k, depth)
    extra = {"inliers": inl[:, :k].tolist(), "probability": np.round(prob[:, :k], 4).tolist()}
    return cos[:, :k], order[:, :k], extra, cal.new_whale_threshold
