"""Stage 03 - pretrain on the related whale dataset."""
import sys

from common.config import parse_stage_args

if __name__ == "__main__":
    cfg, paths, args = parse_stage_args(__doc__)
    sys.exit("error: 03_pretrain_humpback is not built yet (issue 4)")
