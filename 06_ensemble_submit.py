"""Stage 06 - meta-embedding ensemble, faiss search, submission.

Embeds the database (usable train + test images) with every member - the stage 05 checkpoint
when pseudo-labels retrained it, else stage 04's - with flip TTA (tta.hflip), cached in
DATA/embeddings/ so that changing only ensemble weights re-embeds nothing. Joins them into the
meta-embedding L2n(concat(w_i * L2n(e_i))) (weights: `ensemble:`), searches it with faiss
(search.index flat | ivf, GPU when present) and writes:
  submission/submission.csv      no header; test image, then its 20 most similar database images
  submission/submission_ids.csv  Image,Id: 5 Ids, new_whale inserted at a similarity threshold
                                 tuned on local validation (or search.new_whale_threshold)
  submission/scores.json         local scores of each member and the ensemble (+ demo test truth)
  submission/gallery.png         queries and their top matches, green = same whale
With rerank.enabled, every test and validation shortlist (top rerank.shortlist) is re-ranked by
local-feature matching fused with the embedding (common/rerank.py): the scores table adds
<final>+local (local only) and <final>+fused rows; the ID-mode threshold is tuned on the fused
probability; rerank/ holds the calibration, reliability.png and matches.png.
Predict after the pipeline ran (crops with the detector when there is one):
  python 06_ensemble_submit.py --predict a.jpg b.jpg [--top-k 20] [--out matches.csv]
"""
import sys

from common.config import parse_stage_args


def add_args(ap):
    ap.add_argument("--predict", nargs="+", metavar="IMAGE", help="print/write the top-k database matches of these photos")
    ap.add_argument("--top-k", type=int, default=None, help="matches per photo with --predict (default search.k)")
    ap.add_argument("--out", default=None, help="CSV for --predict (default DATA/submission/predictions.csv)")


def main() -> int:
    cfg, paths, args = parse_stage_args(__doc__, extra=add_args)
    from common.config import member_config, member_names
    from common.embedding_store import embed_members
    from common.evaluation import format_scores, local_scores
    from common.gallery import retrieval_gallery
    from common.io import write_json
    from common.retrieval import meta_embedding
    from common.submission import SubmissionError
    from common.tables import encounters, truth_frame

    if args.predict:
        from common.predict import predict

        return predict(cfg, paths, args.predict, args.top_k or cfg["search"]["k"], args.out)
    names = member_names(cfg)
    if not names:
        return _fail("no ensemble members configured (members: in the config)")
    try:
        table, embs = embed_members(cfg, paths, names)
    except (FileNotFoundError, ValueError) as e:
        return _fail(e)
    weights = {n: member_config(cfg, n)["weight"] for n in names}
    if len(names) > 1:
        embs["ensemble"] = meta_embedding([embs[n] for n in names], [weights[n] for n in names])
    final = "ensemble" if len(names) > 1 else names[0]
    s, truth = cfg["search"], truth_frame(paths)
    table["encounter"] = encounters(paths, table)
    kw = dict(index=s["index"], nlist=s["ivf_nlist"], nprobe=s["ivf_nprobe"], gpu=s["gpu"])
    scores = {n: local_scores(e, table, truth, s["k"], s["new_whale_threshold"], **kw) for n, e in embs.items()}
    rr = rerank(cfg, paths, table, embs[final], truth, final, kw) if cfg["rerank"]["enabled"] else None
    scores.update(rr["scores"] if rr else {})
    print(format_scores(scores))

    thr = rr["threshold"] if rr else scores[final]["val"].get("new_whale_threshold", 0.5)
    try:
        report = write_submissions(paths, table, embs[final], thr, s, kw, rr)
    except SubmissionError as e:
        return _fail(e)
    retrieval_gallery(embs[final], table, paths.gallery_png, truth, s["gallery_queries"], s["gallery_k"], **kw)
    extra = {"rerank": {"weight": rr["calibration"].weight, "new_whale_threshold": thr}} if rr else {}
    write_json(paths.scores_json, {"final": final, "weights": weights, "scores": scores, **report, **extra})
    print(f"wrote {paths.submission_csv}, {paths.submission_ids_csv}, {paths.scores_json}, {paths.gallery_png}"
          + (f", {paths.rerank_dir}/" if rr else ""))
    return 0


def rerank(cfg, paths, table, emb, truth, final, kw) -> dict:
    """Local-feature re-ranking of the final embedding's shortlists (common/rerank.py)."""
    from common.evaluation import frequent_ids, table_groups
    from common.rerank import run

    out = run(cfg, paths, table, emb, truth, frequent_ids(table), table_groups(table), kw, final)
    out["scores"] = {f"{final}+{v}": out["scores"][v] for v in ("local", "fused")}
    return out


def write_submissions(paths, table, emb, threshold: float, s: dict, kw: dict, rr: dict | None = None) -> dict:
    """Both submission files (validated before writing). Raw test images that stage 00 could not
    read get filler rows: the most often returned database images, new_whale first. ``rr``:
    re-ranked lists (image mode: table rows; ID mode: predictions) that replace the embedding's."""
    from common.cleaning import IMAGE_EXTS
    from common.evaluation import frequent_ids, predict_test_ids, search_test_images
    from common.submission import (fill_rows, id_frame, image_rows, pad_ids, write_id_submission,
                                   write_image_submission)

    tests = table.loc[table["split"] == "test", "Image"].tolist()
    every = sorted(p.name for p in paths.raw_dir("test").iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(IMAGE_EXTS))
    missing = sorted(set(every) - set(tests))
    idx = rr["image_idx"] if rr else search_test_images(emb, table, s["k"], **kw)[1]
    rows = image_rows(tests, idx, table["Image"])
    rows += fill_rows(missing, rows, table["Image"], s["k"])
    write_image_submission(paths.submission_csv, rows, every, table["Image"], s["k"])
    preds = [p[: s["id_k"]] for p in rr["id_preds"]] if rr else predict_test_ids(emb, table, threshold, s["id_k"], **kw)
    preds += [pad_ids([], ["new_whale", *frequent_ids(table)], s["id_k"]) for _ in missing]
    write_id_submission(paths.submission_ids_csv, id_frame(tests + missing, preds), every, s["id_k"])
    n_nw = sum(p[0] == "new_whale" for p in preds)
    print(f"{len(rows)} test rows ({len(missing)} unreadable test images got filler rows{': ' if missing else ''}"
          f"{', '.join(missing[:5])}); new_whale first in {n_nw} ID rows (threshold {threshold:.3f})")
    return {"new_whale_threshold": threshold, "filled_rows": missing, "new_whale_first": n_nw}


def _fail(msg) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
