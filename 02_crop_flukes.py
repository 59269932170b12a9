"""Stage 02 - crop flukes with the detector."""
import sys

from common.config import parse_stage_args

if __name__ == "__main__":
    cfg, paths, args = parse_stage_args(__doc__)
    sys.exit("error: 02_crop_flukes is not built yet (issue 3)")
