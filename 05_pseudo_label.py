"""Stage 05 - pseudo-label confident test images and retrain the members marked `pseudo: true`.

Embeds train + test with every member (flip TTA; the embedding cache is shared with stage 06),
joins them into the equally weighted meta-embedding and gives a test image the Id of its
nearest known whale when the similarity clears pseudo.threshold (a number, or `auto`: the lowest
threshold whose labels on the local-validation queries reach pseudo.target_precision) and leads
the second identity by pseudo.margin; at most pseudo.max_share x the training images are added.
Under train.rows=local only non-validation identities can be labelled (no validation leak).
Each member with `pseudo: true` is then fine-tuned from its current checkpoint on its training
images plus the pseudo-labelled ones for pseudo.epochs, pseudo.rounds times (relabelling in
between), each round in its own folder pseudo/models/<member>/round<r>/. A retrain that lowers
the validation score of its starting model is set aside (best_rejected.pt) unless
pseudo.keep_worse, and the member keeps the checkpoint it had.
Writes pseudo/pseudo_labels.csv (Image,Id,score,margin), pseudo/report.json (counts, precision
on validation and against the withheld truth when RAW has one, and `checkpoints`: the
checkpoint per member that stage 06 uses) and report.png. --model NAME retrains only that member.
With rerank.enabled the confidence is the fused score (embedding + local-feature matching,
calibrated on local validation, pseudo/rerank_calibration.json) instead of the cosine.
"""
import shutil

from common.config import parse_stage_args
from common.errors import run_stage


def main() -> int:
    cfg, paths, args = parse_stage_args(__doc__, extra=lambda ap: ap.add_argument("--model", help="retrain only this member"))
    from common import distributed
    from common.config import ConfigError, member_config, member_names
    from common.handoff import trained_checkpoints
    from common.io import read_json, write_json
    from common.pseudo import run_rounds

    names, enabled = member_names(cfg), bool(cfg["pseudo"]["enabled"])
    frozen = {name for name, entry in read_json(paths.members_summary).get("members", {}).items() if entry.get("fallback")} \
        if paths.members_summary.exists() else set()
    for name in sorted(frozen & set(names)):
        print(f"05: {name} fell back to its frozen backbone in stage 04 (train.below_baseline): not retrained")
    eligible = [name for name in names if member_config(cfg, name)["pseudo"] and name not in frozen]
    chosen = [args.model] if args.model else eligible
    if args.model and args.model not in eligible:
        raise ConfigError(f"--model {args.model}: not a member with pseudo: true ({', '.join(eligible) or 'none'})")
    checkpoints = {name: str(ckpt) for name, ckpt in trained_checkpoints(paths, names).items()}
    old = read_json(paths.pseudo_report).get("checkpoints", {}) if paths.pseudo_report.exists() else {}
    main_rank = distributed.is_main()  # under torchrun every rank embeds and trains, rank 0 writes
    for name in names:  # a member not retrained now keeps an earlier accepted retrain (--model), if any
        if name in chosen or name not in eligible or not enabled:
            if main_rank:
                shutil.rmtree(paths.pseudo_member_dir(name), ignore_errors=True)
        elif str(old.get(name, "")).startswith(str(paths.pseudo_member_dir(name))) and paths.pseudo_member_dir(name).exists():
            checkpoints[name] = old[name]
    reason = "pseudo.enabled is false" if not enabled else None if chosen else "no member has pseudo: true"
    if reason:
        if main_rank:
            paths.pseudo_csv.unlink(missing_ok=True)
            write_json(paths.pseudo_report, {"skipped": reason, "checkpoints": checkpoints})
            print(f"stage 05 skipped: {reason}; stage 06 uses the stage 04 checkpoints")
        return 0
    report = run_rounds(cfg, paths, names, chosen, start=checkpoints)
    if not main_rank:
        return 0
    write_json(paths.pseudo_report, report)
    print("stage 06 will use: " + ", ".join(f"{name} <- {c}" for name, c in report["checkpoints"].items()))
    print(f"wrote {paths.pseudo_csv}, {paths.pseudo_report}, {paths.pseudo_png}")
    return 0


if __name__ == "__main__":
    run_stage(main)
