"""Which member config and starting weights stages 03 and 04 train, and what they record of it.

* ``pretrain_skip_reason`` / ``pretrain_member``: whether stage 03 trains, and the member config
  it trains (``pretrain.train`` over the member's ``train``);
* ``member_and_start``: stage 04's member config and the checkpoint it starts from (stage 03's
  when ``model.from_pretrain_stage`` and stage 03 trained the member);
* ``summary_entry``: one member's record in ``models/summary.json`` / ``models/pretrain/summary.json``.
"""
from __future__ import annotations

from pathlib import Path

from .handoff import HandoffError
from .schedule import trim_phases


def pretrain_skip_reason(cfg: dict, paths) -> str | None:
    """Why stage 03 has nothing to do (None when it should train)."""
    if not cfg["pretrain"]["enabled"]:
        return "pretrain.enabled is false"
    if not paths.clean_pretrain_csv.exists():
        if paths.raw_pretrain_csv.exists():
            raise HandoffError(f"{paths.clean_pretrain_csv} is missing although {paths.raw_pretrain_csv} "
                                    f"exists: run stage 00 first (make 00)")
        return f"no pretrain set ({paths.raw_pretrain_csv} does not exist)"
    from .tables import clean_frame

    if not clean_frame(paths, "pretrain")["train_full"].astype(int).any():
        return f"{paths.clean_pretrain_csv} has no identity with 2 or more usable images"
    return None


def pretrain_member(cfg: dict, name: str) -> dict:
    """The member config stage 03 trains: ``pretrain.train`` merged over the member's ``train``
    (its ``epochs`` also trims progressive-resizing phases)."""
    from .config import member_config, merge

    member = member_config(cfg, name)
    over = cfg["pretrain"]["train"] or {}
    member["train"] = merge(member["train"], over)
    if "epochs" in over and member["train"]["progressive"] and "progressive" not in over:
        member["train"]["progressive"] = trim_phases(member["train"]["progressive"], int(over["epochs"]))
    return member


def member_and_start(cfg: dict, paths, name: str) -> tuple[dict, Path | None]:
    """``(member config, checkpoint to start from)``: stage 03's checkpoint when
    ``model.from_pretrain_stage`` and stage 03 trained this member, else None (model.pretrained)."""
    from .config import member_config
    from .io import read_json

    member = member_config(cfg, name)
    if not member["model"]["from_pretrain_stage"]:
        return member, None
    ckpt = paths.pretrain_ckpt(name)
    done = paths.pretrain_summary.exists() and name in read_json(paths.pretrain_summary).get("members", {})
    if done and ckpt.exists():
        print(f"{name}: starting from stage 03 checkpoint {ckpt}")
        return member, ckpt
    print(f"{name}: no stage 03 checkpoint, starting from model.pretrained={member['model']['pretrained']}")
    return member, None


def summary_entry(result: dict, ckpt, n_images: int, init=None) -> dict:
    """One member's record in a stage summary JSON."""
    return {"ckpt": str(ckpt), "last": result["last"], "best_epoch": result["best_epoch"],
            "metrics": result["metrics"], "n_images": int(n_images), "init": None if init is None else str(init),
            "history": [{k: v for k, v in row.items()} for row in result["history"]]}
