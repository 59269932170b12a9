"""The image tables later stages train and search on, built from stage 00's clean CSVs.

Local validation protocol (used by 04, 05 and 06 alike): queries are the ``val == 1`` rows of
``clean/train.csv``; the database is every usable train image, each query excluded from its
own result list; an image is relevant when it has the query's Id (``new_whale`` never is).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd

from .config import ConfigError
from .handoff import HandoffError
from .metrics import NEW_WHALE
from .paths import Paths


def _need(path) -> pd.DataFrame:
    if not path.exists():
        raise HandoffError(f"{path} is missing: run stage 00 first (make 00)")
    return pd.read_csv(path, dtype={"Image": str, "Id": str}, keep_default_na=False)


def clean_frame(paths: Paths, split: str = "train") -> pd.DataFrame:
    """clean/train.csv or clean/pretrain.csv (Image,Id,val,train_local,train_full)."""
    return _need(paths.clean_pretrain_csv if split == "pretrain" else paths.clean_train_csv)


def image_paths(paths: Paths, split: str, use_crops: bool = True) -> Callable[[str], Path]:
    """Where later stages read each image of ``split``: its crop when stage 02's crops.csv lists
    it (and ``use_crops``), else the raw photo. The hand-off is crops.csv, not which files exist."""
    cropped: set[str] = set()
    if use_crops and paths.crops_csv.exists():
        crops = pd.read_csv(paths.crops_csv, usecols=["Image", "split"], dtype=str, keep_default_na=False)
        cropped = set(crops.loc[crops["split"] == split, "Image"])
    return lambda name: paths.crop_image(split, name) if name in cropped else paths.raw_image(split, name)


def with_paths(df: pd.DataFrame, paths: Paths, split: str, use_crops: bool = True) -> pd.DataFrame:
    out = df.copy()
    where = image_paths(paths, split, use_crops)
    out["path"] = [str(where(n)) for n in out["Image"]]
    return out


def train_frame(paths: Paths, split: str = "train", rows: str = "local", use_crops: bool = True) -> pd.DataFrame:
    """Metric-learning rows (Image, Id, path): ``rows=local`` → train_local rows, ``full`` → train_full."""
    if rows not in ("local", "full"):
        raise ConfigError(f"train.rows must be 'local' or 'full', not {rows!r}")
    df = clean_frame(paths, split)
    df = df[df[f"train_{rows}"].astype(int) == 1]
    return with_paths(df, paths, split, use_crops)[["Image", "Id", "path"]].reset_index(drop=True)


def val_frame(paths: Paths, split: str = "train", use_crops: bool = True) -> pd.DataFrame:
    """Validation database (Image, Id, path, is_query, held_out): every usable image; queries flagged;
    ``held_out`` marks every image of the identities local training never sees (clean.unseen_frac),
    which are uncontaminated queries too (the local-feature fusion validates on them)."""
    df = clean_frame(paths, split)
    df = with_paths(df, paths, split, use_crops)
    df["is_query"] = df["val"].astype(int)
    df["held_out"] = held_out_rows(df).astype(int)
    return df[["Image", "Id", "path", "is_query", "held_out"]].reset_index(drop=True)


def held_out_rows(flags: pd.DataFrame) -> pd.Series:
    """Rows of identities with >= 2 images none of which local training uses (not new_whale).

    >>> t = pd.DataFrame({"Id": ["a", "a", "b", "b", "c", "new_whale", "new_whale"],
    ...                   "train_local": [1, 0, 0, 0, 0, 0, 0]})
    >>> held_out_rows(t).tolist()
    [False, False, True, True, False, False, False]
    """
    g = flags.groupby("Id")["train_local"]
    used, size = g.transform("sum"), g.transform("size")
    return (used == 0) & (size >= 2) & (flags["Id"] != NEW_WHALE)


def test_frame(paths: Paths, use_crops: bool = True) -> pd.DataFrame:
    """Usable test images (Image, path)."""
    df = _need(paths.clean_test_csv)
    return with_paths(df, paths, "test", use_crops)[["Image", "path"]].reset_index(drop=True)


def truth_frame(paths: Paths) -> pd.DataFrame | None:
    """Withheld test truth (Image, Id) when the competition ships one (the demo does), else None."""
    if not paths.truth_csv.exists():
        return None
    return pd.read_csv(paths.truth_csv, dtype=str, keep_default_na=False)


def accepted_images(paths: Paths) -> dict[str, list[str]]:
    """Stage 00's hand-off: the usable images of each split (train, test, and pretrain when present)."""
    out = {"train": clean_frame(paths, "train")["Image"].tolist(), "test": _need(paths.clean_test_csv)["Image"].tolist()}
    if paths.clean_pretrain_csv.exists():
        out["pretrain"] = clean_frame(paths, "pretrain")["Image"].tolist()
    return out


def rejected_images(paths: Paths) -> dict[tuple[str, str], str]:
    """``{(split, image): why stage 00 did not accept it}`` from clean/report.json (dropped,
    unlisted and ignored files); empty when there is no report."""
    from .io import read_json

    if not paths.clean_report.exists():
        return {}
    report = read_json(paths.clean_report)
    out = {}
    for split in ("train", "test", "pretrain"):
        rep = report.get(split) or {}
        for d in rep.get("dropped_files", []):
            out[(split, d["Image"])] = f"{d['reason']}: {d['detail']}"
        for name in rep.get("unlisted_files", []):
            out[(split, name)] = "not listed in its train.csv"
        for name in rep.get("ignored_files", []):
            out[(split, name)] = "not an image file"
    return out


def submission_images(paths: Paths) -> tuple[list[str], list[str]]:
    """Stage 00's hand-off to stage 06: ``(every test image the submission must list, the ones it
    could not read)``, from clean/test.csv and the dropped test files of clean/report.json."""
    from .io import read_json

    usable = _need(paths.clean_test_csv)["Image"].tolist()
    if not paths.clean_report.exists():
        raise HandoffError(f"{paths.clean_report} is missing: run stage 00 first (make 00)")
    dropped = [d["Image"] for d in (read_json(paths.clean_report).get("test") or {}).get("dropped_files", [])]
    return sorted(set(usable) | set(dropped)), sorted(set(dropped) - set(usable))


def encounters(paths: Paths, table: pd.DataFrame) -> list[str]:
    """Encounter label per row of a database table (split, Image): the optional ``encounter``
    column of RAW/train.csv for train rows, RAW/test_encounters.csv (Image,encounter) for test
    rows; '' where unknown. Photos of one encounter (one sighting, minutes apart) share their
    background, so local validation never lets one count as another's match."""
    def read(path, what):
        if not path.exists():
            return {}
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        df.columns = [str(c).strip() for c in df.columns]
        if "encounter" not in df.columns:
            return {}
        if "Image" not in df.columns:
            raise ValueError(f"{path}: an encounter column needs an Image column ({what})")
        return dict(zip(df["Image"].str.strip(), df["encounter"].str.strip()))

    train, test = read(paths.raw_train_csv, "train"), read(paths.test_encounters_csv, "test")
    return [(train if s == "train" else test).get(n, "") for s, n in zip(table["split"], table["Image"])]
