"""Stage 01 - train the YOLO fluke detector."""
import sys

from common.config import parse_stage_args

if __name__ == "__main__":
    cfg, paths, args = parse_stage_args(__doc__)
    sys.exit("error: 01_train_detector is not built yet (issue 3)")
