"""Stage 04 - train the metric-learning embedding of every ensemble member.

Each member (`members:` in the profile; `--model NAME` trains one) starts from its stage-03
checkpoint (model.from_pretrain_stage, when stage 03 made one) or else from model.pretrained, and
trains on clean/train.csv (train.rows: local = train_local rows validated on the local split,
full = every train_full row without validation), on fluke crops when stage 02 made them. The
untrained model.pretrained backbone (ImageNet) is scored first: the baseline to beat (train.baseline).
Writes models/<member>/ (best.pt, last.pt, history.csv, curves.png, augment.png, config.json, tb/) and
updates models/summary.json (best checkpoint, scores and baseline per member). A member that ends
below its untrained backbone is flagged loudly; with train.below_baseline: frozen (the default) its
checkpoint in the summary is then models/<member>/frozen.pt, the backbone's pooled features.
`--lr-find` only sweeps the learning rate (models/<member>/lr_find.png) and prints a suggestion.
"""

from common.config import member_names, parse_stage_args
from common.errors import run_stage


def extra(ap):
    ap.add_argument("--model", metavar="NAME", help="train this member only")
    ap.add_argument("--resume", action="store_true", help="continue each run from its last.pt")
    ap.add_argument("--lr-find", action="store_true", help="run the learning-rate finder instead of training")


def main() -> int:
    cfg, paths, args = parse_stage_args(__doc__, extra=extra)
    from common import distributed, lr_finder, members, tables, training
    from common.augment import preview
    from common.io import read_json, write_json

    names = [args.model] if args.model else member_names(cfg)
    old = read_json(paths.members_summary).get("members", {}) if paths.members_summary.exists() else {}
    summary = {"members": dict(old) if args.model else {}}
    main_rank = distributed.is_main()  # under torchrun every rank trains, rank 0 writes
    for name in names:
        member, init = members.member_and_start(cfg, paths, name)
        crops = member["model"]["use_crops"]
        rows = member["train"]["rows"]
        train_df = tables.train_frame(paths, "train", rows=rows, use_crops=crops)
        if main_rank:  # what the augmentation does, by eye
            preview(train_df["path"][:4], paths.member_dir(name) / "augment.png", member["model"]["img_size"],
                    (0.5,) * 3, (0.5,) * 3, member["augment"]["strength"])
        start = dict(init=init, device=cfg["device"], num_workers=cfg["num_workers"])
        if args.lr_find:
            lr_finder.lr_find(member, train_df, paths.member_dir(name) / "lr_find.png",
                             num_iter=int(member["train"]["lr_find_iters"]), **start)
            continue
        val_df = tables.val_frame(paths, "train", use_crops=crops) if rows == "local" else None
        baseline = old.get(name, {}).get("baseline") if args.resume else None  # measured by the first run
        result = training.fit(member, train_df, val_df, paths.member_dir(name), resume=args.resume,
                              deterministic=cfg["deterministic"], cache_dir=paths.trunk_cache_dir,
                              baseline=baseline is None and member["train"]["baseline"], **start)
        baseline = baseline or result["baseline"]
        entry = dict(members.summary_entry(result, result["best"], len(train_df), init=init), baseline=baseline)
        policy = member["train"]["below_baseline"]
        if training.warn_below_baseline(name, entry["metrics"], baseline, member["train"]["metric"], policy) \
                and policy == "frozen":  # 05 and 06 then embed with the untrained backbone's pooled features
            frozen = paths.member_dir(name) / "frozen.pt"
            if main_rank:
                training.save_frozen(member, frozen)
            entry.update(ckpt=str(frozen), fallback="frozen")
        summary["members"][name] = entry
    if not args.lr_find and main_rank:
        write_json(paths.members_summary, summary)
        print(f"wrote {paths.members_summary}")
    return 0


if __name__ == "__main__":
    run_stage(main)
