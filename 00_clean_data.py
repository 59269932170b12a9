"""Stage 00 - clean the raw competition."""
import sys

from common.config import parse_stage_args

if __name__ == "__main__":
    cfg, paths, args = parse_stage_args(__doc__)
    sys.exit("error: 00_clean_data is not built yet (issue 2)")
