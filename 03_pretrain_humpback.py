"""Stage 03 - pretrain every member's network on the related whale dataset (RAW/pretrain/).

For each member: the metric-learning loop of stage 04 (`train`, with `pretrain.train` overriding
it) on clean/pretrain.csv - fluke crops when stage 02 made them - starting from the member's
model.pretrained weights (ImageNet), validated on the pretrain set's local split. Writes
models/pretrain/<member>.pt (the best checkpoint; stage 04 starts from it), the run folder
models/pretrain/<member>/ (history.csv, curves.png, tb/, last.pt) and models/pretrain/summary.json.
Without a pretrain set, or with pretrain.enabled=false, it says so and writes the summary with a
"skipped" reason: stage 04 then starts from ImageNet weights.
"""
import shutil

from common.config import member_names, parse_stage_args
from common.errors import run_stage


def extra(ap):
    ap.add_argument("--model", metavar="NAME", help="pretrain this member only")
    ap.add_argument("--resume", action="store_true", help="continue each run from its last.pt")


def main() -> int:
    cfg, paths, args = parse_stage_args(__doc__, extra=extra)
    from common import distributed, members, tables, training
    from common.io import atomic_path, read_json, write_json

    reason = members.pretrain_skip_reason(cfg, paths)
    main_rank = distributed.is_main()  # under torchrun every rank trains, rank 0 writes
    if reason:
        if main_rank:
            print(f"stage 03 skipped: {reason}; stage 04 starts from model.pretrained weights")
            write_json(paths.pretrain_summary, {"skipped": reason})
        return 0
    names = [args.model] if args.model else member_names(cfg)
    old = read_json(paths.pretrain_summary) if args.model and paths.pretrain_summary.exists() else {}
    summary = {"members": dict(old.get("members", {}))}
    for name in names:
        member = members.pretrain_member(cfg, name)
        crops = member["model"]["use_crops"]
        rows = member["train"]["rows"]
        train_df = tables.train_frame(paths, "pretrain", rows=rows, use_crops=crops)
        val_df = tables.val_frame(paths, "pretrain", use_crops=crops) if rows == "local" else None
        result = training.fit(member, train_df, val_df, paths.pretrain_dir(name), device=cfg["device"],
                              resume=args.resume, num_workers=cfg["num_workers"], deterministic=cfg["deterministic"])
        if main_rank:
            with atomic_path(paths.pretrain_ckpt(name)) as tmp:
                shutil.copyfile(result["best"], tmp)
        summary["members"][name] = members.summary_entry(result, paths.pretrain_ckpt(name), len(train_df))
    if main_rank:
        write_json(paths.pretrain_summary, summary)
        print(f"wrote {paths.pretrain_summary}")
    return 0


if __name__ == "__main__":
    run_stage(main)
