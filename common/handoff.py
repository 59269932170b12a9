"""Hand-offs between stages: what a stage's report tells the next one, read in one place.

A later stage never guesses from which files exist. Stage 04 names each member's checkpoint in
``models/summary.json``; stage 05 names, in ``pseudo/report.json``, the checkpoint stage 06 and
``--predict`` use for every member (its accepted pseudo-label retrain, or stage 04's).
"""
from __future__ import annotations

from pathlib import Path

from .errors import PipelineError
from .io import read_json


class HandoffError(PipelineError, FileNotFoundError):
    """An upstream report is missing, or does not name what the next stage needs."""


def _checkpoints(report: Path, names, pick, stage: str) -> dict[str, Path]:
    if not Path(report).exists():
        raise HandoffError(f"{report} not found: run stage {stage} first (make all)")
    data = read_json(report)
    out = {}
    for name in names:
        ckpt = pick(data, name)
        if ckpt is None:
            raise HandoffError(f"{report} names no checkpoint for member {name!r}: rerun stage {stage} (make {stage})")
        if not Path(ckpt).exists():
            raise HandoffError(f"checkpoint {ckpt} named by {report} is missing: rerun stage {stage} (make {stage})")
        out[name] = Path(ckpt)
    return out


def trained_checkpoints(paths, names) -> dict[str, Path]:
    """Stage 04's best checkpoint per member, as ``models/summary.json`` names it."""
    return _checkpoints(paths.members_summary, names,
                        lambda d, n: (d.get("members", {}).get(n) or {}).get("ckpt"), "04")


def final_checkpoints(paths, names) -> dict[str, Path]:
    """The checkpoint per member that stage 06 and ``--predict`` embed with, as stage 05's
    ``pseudo/report.json`` names it (stage 05 writes it even when it retrains nothing)."""
    return _checkpoints(paths.pseudo_report, names, lambda d, n: d.get("checkpoints", {}).get(n), "05")
