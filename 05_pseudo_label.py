"""Stage 05 - pseudo-label confident test images and retrain."""
import sys

from common.config import parse_stage_args

if __name__ == "__main__":
    cfg, paths, args = parse_stage_args(__doc__)
    sys.exit("error: 05_pseudo_label is not built yet (issue 5)")
