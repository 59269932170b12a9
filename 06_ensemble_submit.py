"""Stage 06 - meta-embedding ensemble, faiss search, submission.

Embeds the database (usable train + test images) with every member - with the checkpoint that
stage 05's report names (its accepted pseudo-label retrain, else stage 04's) - with flip TTA (tta.hflip), cached in
DATA/embeddings/ so that changing only ensemble weights re-embeds nothing. Joins them into the
meta-embedding L2n(concat(w_i * L2n(e_i))) (weights: `ensemble:`), searches it with faiss
(search.index auto | flat | ivf, GPU when present; an IVF index's recall@k against exact search
is measured on search.recall_sample queries and reported) and writes:
  submission/submission.csv      no header; test image, then its 20 most similar database images
  submission/submission_ids.csv  Image,Id: 5 Ids, new_whale inserted at a similarity threshold
                                 tuned on local validation (or search.new_whale_threshold;
                                 search.new_whale_untuned when validation has no queries)
  submission/scores.json         local scores of each member and the ensemble (+ demo test truth)
  submission/gallery.png         queries and their top matches, green = same whale
With rerank.enabled, every test and validation shortlist (top rerank.shortlist) is re-ranked by
local-feature matching fused with the embedding (common/rerank.py): the scores table adds
<final>+local (local only) and <final>+fused rows; the ID-mode threshold is tuned on the fused
probability; rerank/ holds the calibration, reliability.png and matches.png.
Predict after the pipeline ran (crops with the detector when there is one):
  python 06_ensemble_submit.py --predict a.jpg b.jpg [--top-k 20] [--out matches.csv]
"""

import time

from common.config import parse_stage_args
from common.errors import run_stage


def add_args(ap):
    ap.add_argument("--predict", nargs="+", metavar="IMAGE", help="print/write the top-k database matches of these photos")
    ap.add_argument("--top-k", type=int, default=None, help="matches per photo with --predict (default search.k)")
    ap.add_argument("--out", default=None, help="CSV for --predict (default DATA/submission/predictions.csv)")


def main() -> int:
    t0 = time.perf_counter()
    cfg, paths, args = parse_stage_args(__doc__, extra=add_args)
    from common.config import ConfigError, member_config, member_names
    from common.embedding_store import embed_members
    from common.evaluation import format_scores, local_scores
    from common.gallery import retrieval_gallery
    from common.io import write_json
    from common.retrieval import index_recall, meta_embedding, search_options
    from common.submission import write_submissions
    from common.tables import encounters, truth_frame

    if args.predict:
        from common.predict import predict

        return predict(cfg, paths, args.predict, args.top_k or cfg["search"]["k"], args.out)
    names = member_names(cfg)
    if not names:
        raise ConfigError("no ensemble members configured (members: in the config)")
    table, embs = embed_members(cfg, paths, names)
    weights = {name: member_config(cfg, name)["weight"] for name in names}
    if len(names) > 1:
        embs["ensemble"] = meta_embedding([embs[name] for name in names], [weights[name] for name in names])
    final = "ensemble" if len(names) > 1 else names[0]
    search, truth = cfg["search"], truth_frame(paths)
    table["encounter"] = encounters(paths, table)
    index = search_options(search)
    recall = index_recall(embs[final], embs[final][table["split"].to_numpy() == "test"], search["k"],
                          search["recall_sample"], **index)
    if recall["index"] != "flat":
        print(f"search: {recall['index']} index over {recall['n_db']} images, recall@{search['k']} "
              f"{recall['recall']:.3f} against exact search on {recall['n_sample']} test queries")
    scores = {name: local_scores(emb, table, truth, search["k"], search["new_whale_threshold"],
                                 search["new_whale_untuned"], **index) for name, emb in embs.items()}
    reranked = rerank(cfg, paths, table, embs[final], truth, final, index) if cfg["rerank"]["enabled"] else None
    scores.update(reranked["scores"] if reranked else {})
    print(format_scores(scores) + (f"\n{reranked['note']}" if reranked else ""))

    threshold = reranked["threshold"] if reranked else scores[final]["val"]["new_whale_threshold"]
    report = write_submissions(paths, table, embs[final], threshold, search, index, reranked)
    retrieval_gallery(embs[final], table, paths.gallery_png, truth, search["gallery_queries"], search["gallery_k"],
                      **index)
    extra = {"rerank": {"weight": reranked["calibration"].weight, "new_whale_threshold": threshold}} if reranked else {}
    seconds = {"stage": round(time.perf_counter() - t0, 3), **({f"rerank_{k}": v for k, v in reranked["seconds"].items()}
                                                              if reranked else {})}
    write_json(paths.scores_json, {"final": final, "weights": weights, "scores": scores, "search": recall, **report,
                                   **extra, "seconds": seconds})
    if reranked:
        print(f"stage 06: {seconds['stage']:.1f} s, of which local features {seconds['rerank_features']:.1f} s and "
              f"local matching {seconds['rerank_matching']:.1f} s ({seconds['rerank_matching'] / max(seconds['stage'], 1e-9):.0%})")
    print(f"wrote {paths.submission_csv}, {paths.submission_ids_csv}, {paths.scores_json}, {paths.gallery_png}"
          + (f", {paths.rerank_dir}/" if reranked else ""))
    return 0


def rerank(cfg, paths, table, emb, truth, final, index) -> dict:
    """Local-feature re-ranking of the final embedding's shortlists (common/rerank.py)."""
    from common.evaluation import frequent_ids, table_groups
    from common.rerank import run

    out = run(cfg, paths, table, emb, truth, frequent_ids(table), table_groups(table), index, final)
    out["scores"] = {f"{final}+{variant}": out["scores"][variant] for variant in ("local", "fused")}
    return out


if __name__ == "__main__":
    run_stage(main)
