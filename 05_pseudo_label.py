"""Stage 05 - pseudo-label confident test images and retrain the members marked `pseudo: true`.

Embeds train + test with every member (stage 04 checkpoints, flip TTA; the embedding cache is
shared with stage 06), joins them into the equally weighted meta-embedding and gives a test image the Id of its
nearest known whale when the similarity clears pseudo.threshold (a number, or `auto`: the lowest
threshold whose labels on the local-validation queries reach pseudo.target_precision) and leads
the second identity by pseudo.margin; at most pseudo.max_share x the training images are added.
Under train.fit=local only non-validation identities can be labelled (no validation leak).
Each member with `pseudo: true` is then fine-tuned from its checkpoint on its training images
plus the pseudo-labelled ones for pseudo.epochs, pseudo.rounds times (relabelling in between).
A retrain that lowers the validation score of its starting model is set aside
(best_rejected.pt) unless pseudo.keep_worse, so stage 06 keeps the better model.
Writes pseudo/pseudo_labels.csv (Image,Id,score,margin), pseudo/report.json and report.png
(counts, precision estimated on validation and, on the demo, against the withheld truth),
With rerank.enabled the confidence is the fused probability (embedding + local-feature matching,
calibrated on local validation, pseudo/rerank_calibration.json) instead of the cosine.
pseudo/models/<member>/ (read by stage 06). --model NAME retrains only that member.
"""
import shutil
import sys

from common.config import parse_stage_args


def main() -> int:
    cfg, paths, args = parse_stage_args(__doc__, extra=lambda ap: ap.add_argument("--model", help="retrain only this member"))
    from common.config import member_config, member_names
    from common.io import write_json

    p, names = cfg["pseudo"], member_names(cfg)
    chosen = [n for n in names if member_config(cfg, n)["pseudo"]]
    if args.model:
        if args.model not in chosen:
            print(f"error: --model {args.model}: not a member with pseudo: true ({', '.join(chosen) or 'none'})", file=sys.stderr)
            return 2
        chosen = [args.model]
    for n in names:  # stale retrains would otherwise be picked up by stage 06
        if n in chosen or not member_config(cfg, n)["pseudo"] or not p.get("enabled", True):
            shutil.rmtree(paths.pseudo_member_dir(n), ignore_errors=True)
    reason = "pseudo.enabled is false" if not p.get("enabled", True) else None if chosen else "no member has pseudo: true"
    if reason:
        paths.pseudo_csv.unlink(missing_ok=True)
        write_json(paths.pseudo_report, {"skipped": reason})
        print(f"stage 05 skipped: {reason}")
        return 0
    try:
        report = run(cfg, paths, names, chosen)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    write_json(paths.pseudo_report, report)
    print(f"wrote {paths.pseudo_csv}, {paths.pseudo_report}, {paths.pseudo_png}")
    return 0


def run(cfg, paths, names, chosen) -> dict:
    from common.config import member_config
    from common.embedding_store import embed_members
    from common.io import write_csv
    from common.io import write_json
    from common.rerank import fused_ranker
    from common.pseudo import candidate_rows, label_precision, label_test_images, plot_report, training_rows
    from common.retrieval import meta_embedding
    from common.tables import clean_frame, train_frame, truth_frame, val_frame
    from common.training import fit

    p, clean, truth = cfg["pseudo"], clean_frame(paths), truth_frame(paths)
    members = {n: member_config(cfg, n) for n in names}
    fits = {members[n]["train"].get("fit", "local") for n in chosen}
    cand = candidate_rows(clean, "local" if "local" in fits else "full")
    rounds = []
    for r in range(int(p.get("rounds", 1))):
        table, embs = embed_members(cfg, paths, names, paths.member_ckpt if r == 0 else paths.final_ckpt)
        emb = meta_embedding([embs[n] for n in names])  # equal weights: `ensemble:` is stage 06's alone
        max_count = int(float(p.get("max_share", 0.5)) * int((clean["Id"] != "new_whale").sum()))
        nearest = None
        if cfg["rerank"]["enabled"]:  # confidence = fused probability of embedding + local matching
            nearest, cal, _ = fused_ranker(cfg, paths, table, emb)
            write_json(paths.pseudo_calibration, cal.to_dict())
        labels, info, curve, best = label_test_images(emb, table, cand, p, max_count, nearest)
        info["truth_precision"] = label_precision(labels, truth)
        write_csv(paths.pseudo_csv, labels)
        plot_report(curve, best, info["threshold"], paths.pseudo_png,
                    f"round {r + 1}: {len(labels)} of {info['n_test']} test images labelled", info["n_val_queries"])
        print(f"round {r + 1}: labelled {info['labelled']}/{info['n_test']} test images ({info['identities']} Ids) at "
              f"threshold {info['threshold']:.3f}; precision on validation {info['val_precision']}, "
              f"on the withheld truth {info['truth_precision']}")
        info["members"] = {}
        if labels.empty:
            print("no confident test image: nothing to retrain on")
            rounds.append(info)
            break
        for n in chosen:
            m, uc = members[n], members[n]["model"].get("use_crops", True)
            fit_mode = m["train"].get("fit", "local")
            rows = training_rows(train_frame(paths, "train", fit_mode, uc), labels, clean, candidate_rows(clean, fit_mode),
                                 lambda x: paths.image("test", x, uc), lambda x: paths.image("train", x, uc))
            start = paths.member_ckpt(n) if r == 0 else paths.final_ckpt(n)
            res = fit(m, rows, val_frame(paths, "train", uc) if fit_mode == "local" else None, paths.pseudo_member_dir(n),
                      init=start, device=cfg.get("device"), epochs=int(p.get("epochs", 2)),
                      num_workers=int(cfg.get("num_workers", 0)), deterministic=bool(cfg.get("deterministic")))
            info["members"][n] = judge(res, m, paths.pseudo_member_dir(n), bool(p.get("keep_worse", False)))
            info["members"][n].update(init=str(start), n_images=len(rows), n_pseudo=len(labels))
        rounds.append(info)
    return {"rounds": rounds, "labelled": rounds[-1]["labelled"], "precision_val": rounds[-1]["val_precision"],
            "precision_truth": rounds[-1]["truth_precision"], "members": chosen}


def judge(res: dict, member: dict, out_dir, keep_worse: bool) -> dict:
    """Compare the retrain's best validation score with its starting model's (epoch 0 row);
    set the retrain aside (best_rejected.pt) when it is lower."""
    metric = member["train"].get("metric", "map20")
    before = next((h.get(metric) for h in res["history"] if h.get("epoch") == 0), None)
    after = res["metrics"].get(metric)
    kept = keep_worse or before is None or after is None or after >= before
    if not kept:
        (out_dir / "best.pt").replace(out_dir / "best_rejected.pt")
    print(f"{member['name']}: {metric} {before} -> {after}: {'kept' if kept else 'set aside, stage 06 keeps the start model'}")
    return {"metric": metric, "before": before, "after": after, "kept": kept}


if __name__ == "__main__":
    sys.exit(main())
