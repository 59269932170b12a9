"""How every stage script ends: expected problems print one line, real bugs keep their traceback.

An *expected* problem is one the user fixes (bad input, a bad config key, a missing upstream
artifact): its exception class derives from :class:`PipelineError` and names the file, row or
key. Anything else is a bug and is re-raised with its traceback.
"""
from __future__ import annotations

import sys


class PipelineError(Exception):
    """A problem the user can fix; the message names the file, row or config key."""


def run_stage(main) -> None:
    """``sys.exit(main())``, turning a :class:`PipelineError` (or a diverged training's
    FloatingPointError) into ``error: <message>`` on stderr and exit code 1."""
    try:
        code = main()
    except (PipelineError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code or 0)
