"""Stage 06 - meta-embedding ensemble, faiss search, submission."""
import sys

from common.config import parse_stage_args

if __name__ == "__main__":
    cfg, paths, args = parse_stage_args(__doc__)
    sys.exit("error: 06_ensemble_submit is not built yet (issue 5)")
