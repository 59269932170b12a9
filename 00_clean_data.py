"""Stage 00 - clean the raw competition into DATA/clean/.

Drops unreadable, truncated, too small (clean.min_side) and duplicate train/pretrain images
(byte-identical copies with disagreeing Ids are all dropped and reported), drops unreadable test
images, and builds the local-validation split: one query per identity with >= 2 images and a
share of identities (clean.unseen_frac) held out of training entirely.

Writes clean/train.csv (Image,Id,val,train_local,train_full), clean/test.csv (Image),
clean/pretrain.csv (when RAW/pretrain exists), clean/summary.png and clean/report.json, all at once.
RAW is only read. Bad input (missing train.csv or columns, a listed image that does not exist,
an empty folder, a file name in both train/ and test/, fewer than 2 identities with >= 2 usable
images) stops with an error naming the file or row, and writes nothing. Fewer local-validation
queries than clean.min_val_queries is a warning (stderr and report.json "warnings").
"""
import sys

from common.config import parse_stage_args
from common.errors import run_stage


def main() -> int:
    cfg, paths, args = parse_stage_args(__doc__)
    from common.cleaning import clean_competition, format_summary, summary_figure, write_clean_dir

    tables, report = clean_competition(paths, cfg["clean"])
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    figure = summary_figure(tables[paths.clean_train_csv], report)
    write_clean_dir(paths, tables, report, figure)
    print(format_summary(report))
    print(f"wrote {paths.clean_dir}")
    return 0


if __name__ == "__main__":
    run_stage(main)
