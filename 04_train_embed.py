"""Stage 04 - train the metric-learning embedding members."""
import sys

from common.config import parse_stage_args

if __name__ == "__main__":
    cfg, paths, args = parse_stage_args(__doc__)
    sys.exit("error: 04_train_embed is not built yet (issue 4)")
