"""Cleaning the raw competition (stage 00): validate, drop bad images, split for local validation.

Rules, in order, for a labelled split (train, pretrain):

1. ``unreadable``: the file cannot be decoded (corrupt, truncated, not an image);
2. ``too_small``: the shorter side is below ``clean.min_side`` pixels;
3. ``duplicate``: byte-identical to another listed image with the same Id (the first name is kept);
4. ``conflicting_duplicate``: byte-identical copies whose Ids disagree; every copy is dropped
   (its label is unreliable, and a copy left in the database would answer for the wrong whale).

Test images are only dropped when unreadable (every test photo should get a prediction); tiny
ones are kept and duplicates are reported. Bad input (no ``train.csv``, missing columns, a
listed file that does not exist, an empty folder, a file name in both train/ and test/, fewer
than 2 identities with >= 2 usable images) raises :class:`CleaningError` naming the file or row;
nothing is written then. Fewer validation queries than ``clean.min_val_queries`` is a warning
(report ``warnings``).

The local-validation split (:func:`split_flags`) is a pure function of the ``(Image, Id)``
table and a seed.
"""
from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from .config import ConfigError
from .errors import PipelineError
from .io import ImageReadError, atomic_dir, read_image, save_figure, write_csv, write_json
from .metrics import NEW_WHALE
from .paths import Paths

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
REASONS = ("unreadable", "too_small", "duplicate", "conflicting_duplicate")
SPLIT_COLUMNS = ["Image", "Id", "val", "train_local", "train_full"]


class CleaningError(PipelineError, ValueError):
    """Raw input that cannot be used; the message names the file or row."""


# ---------------------------------------------------------------------------------------
# Reading and validating the raw folders
# ---------------------------------------------------------------------------------------
def list_files(folder: Path) -> list[str]:
    """Names of the visible files in ``folder``, sorted; CleaningError when missing or empty."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CleaningError(f"{folder}: image folder is missing")
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not names:
        raise CleaningError(f"{folder}: image folder is empty")
    return names


def read_labels(csv_path: Path, image_dir: Path) -> pd.DataFrame:
    """``Image,Id`` rows of a label CSV, validated against ``image_dir``.

    Errors name the file and the CSV line (header = line 1): missing file or columns, empty
    cells, a name listed twice, a name that is a path, a listed image missing from the folder.
    """
    csv_path, image_dir = Path(csv_path), Path(image_dir)
    if not csv_path.is_file():
        raise CleaningError(f"{csv_path}: label file is missing (expected columns Image,Id)")
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise CleaningError(f"{csv_path}: not a readable CSV ({str(e).strip()})") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in ("Image", "Id") if c not in df.columns]
    if missing:
        raise CleaningError(f"{csv_path}: missing column(s) {', '.join(missing)}; found {', '.join(df.columns) or 'none'}")
    if df.empty:
        raise CleaningError(f"{csv_path}: no rows")
    cells = df["Image"].tolist()  # as written, for messages
    df = df[["Image", "Id"]].apply(lambda s: s.str.strip())
    line = lambda i: f"{csv_path} line {i + 2}"  # noqa: E731  (header is line 1)
    for i, (image, wid) in enumerate(zip(df["Image"], df["Id"])):
        if not image or not wid:
            raise CleaningError(f"{line(i)}: empty {'Image' if not image else 'Id'} ({image!r},{wid!r})")
        if Path(image).name != image:
            raise CleaningError(f"{line(i)}: Image {image!r} must be a file name inside {image_dir}")
    repeated = df["Image"].duplicated(keep=False)
    if repeated.any():
        name = df.loc[repeated, "Image"].iloc[0]
        rows = [i + 2 for i in np.flatnonzero(df["Image"].to_numpy() == name)]
        raise CleaningError(f"{csv_path} lines {', '.join(map(str, rows))}: {name} is listed more than once")
    present = set(list_files(image_dir))
    for i, image in enumerate(df["Image"]):
        if image not in present:
            spaced = sorted(f for f in present if f.strip() == image)
            hint = (f"; the folder has {spaced[0]!r}: remove the spaces around the file name" if spaced else "")
            raise CleaningError(f"{line(i)}: image {show_name(cells[i])} does not exist in {image_dir}{hint}")
    return df.reset_index(drop=True)


def show_name(name: str) -> str:
    """A file name as written, quoted (repr) when spaces or odd characters would hide its real form.

    >>> show_name("a.jpg"), show_name("a.jpg ")
    ('a.jpg', "'a.jpg '")
    """
    return name if name == name.strip() and name.isprintable() else repr(name)


def _some(names, n: int = 10) -> str:
    names = list(names)
    return ", ".join(map(show_name, names[:n])) + (f" and {len(names) - n} more" if len(names) > n else "")


def _inspect_one(path: Path) -> dict:
    try:
        sha1 = hashlib.sha1(path.read_bytes()).hexdigest()
    except OSError as e:
        return {"width": 0, "height": 0, "sha1": "", "error": f"cannot read: {e}"}
    try:
        h, w = read_image(path, rgb=False).shape[:2]
    except ImageReadError as e:
        return {"width": 0, "height": 0, "sha1": sha1, "error": str(e).split(": ", 1)[-1]}
    return {"width": int(w), "height": int(h), "sha1": sha1, "error": ""}


def inspect_images(folder: Path, names, threads: int = 4, desc: str = "inspect", progress: bool = True) -> pd.DataFrame:
    """Decode and hash every image: ``Image, width, height, sha1, error`` (error "" when readable)."""
    from tqdm import tqdm

    names = list(names)
    paths = [Path(folder) / n for n in names]
    bar = dict(total=len(paths), desc=desc, unit="img", disable=not progress)
    if threads and threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            rows = list(tqdm(pool.map(_inspect_one, paths), **bar))
    else:
        rows = [_inspect_one(p) for p in tqdm(paths, **bar)]
    info = pd.DataFrame(rows, columns=["width", "height", "sha1", "error"])
    info.insert(0, "Image", names)
    return info


# ---------------------------------------------------------------------------------------
# Pure rules over tables
# ---------------------------------------------------------------------------------------
def apply_rules(labels: pd.DataFrame, info: pd.DataFrame, min_side: int) -> tuple[pd.DataFrame, list[dict]]:
    """Apply the cleaning rules to ``labels`` (Image, Id) given ``info`` from :func:`inspect_images`.

    Returns the kept rows (Image, Id) and one ``{"Image", "Id", "reason", "detail"}`` per drop.

    >>> labels = pd.DataFrame({"Image": ["a", "b", "c", "d", "e", "f"], "Id": ["w1", "w1", "w2", "w3", "w4", "w5"]})
    >>> info = pd.DataFrame({"Image": list("abcdef"), "width": [99, 99, 99, 10, 99, 99], "height": 99,
    ...                      "sha1": ["h1", "h1", "h2", "h3", "h2", "h4"], "error": ["", "", "", "", "", "bad"]})
    >>> kept, dropped = apply_rules(labels, info, min_side=32)
    >>> list(kept["Image"]), [(d["Image"], d["reason"]) for d in dropped]
    (['a'], [('f', 'unreadable'), ('d', 'too_small'), ('b', 'duplicate'), ('c', 'conflicting_duplicate'), ('e', 'conflicting_duplicate')])
    """
    df = labels[["Image", "Id"]].merge(info, on="Image", how="left", validate="one_to_one")
    dropped: list[dict] = []

    def drop(df, mask, reason, detail):
        for row in df[mask].itertuples(index=False):
            dropped.append({"Image": row.Image, "Id": row.Id, "reason": reason, "detail": detail(row)})
        return df[~mask]

    df = drop(df, df["error"].fillna("not inspected") != "", "unreadable", lambda r: r.error)
    df = drop(df, np.minimum(df["width"], df["height"]) < min_side, "too_small",
              lambda r: f"{r.width}x{r.height} px, shorter side < {min_side}")
    df = df.sort_values("Image", kind="stable")
    copies = df.groupby("sha1")["Image"].agg(list)
    ids = df.groupby("sha1")["Id"].agg(lambda s: sorted(set(s)))
    df = drop(df, df["sha1"].map(ids.map(len)) > 1, "conflicting_duplicate",
              lambda r: f"identical to {', '.join(i for i in copies[r.sha1] if i != r.Image)}; "
                        f"Ids disagree: {', '.join(ids[r.sha1])}")
    df = drop(df, df["Image"] != df["sha1"].map(copies.map(lambda c: c[0])), "duplicate",
              lambda r: f"identical to {copies[r.sha1][0]} (kept)")
    order = {r: i for i, r in enumerate(REASONS)}
    dropped.sort(key=lambda d: order[d["reason"]])
    kept = labels[labels["Image"].isin(set(df["Image"]))][["Image", "Id"]].reset_index(drop=True)
    return kept, dropped


def _rank(seed: int, key: str) -> int:
    """A seeded pseudo-random rank of ``key`` that does not depend on row order."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest(), "big")


def split_flags(df: pd.DataFrame, unseen_frac: float = 0.1, seed: int = 42,
                min_train_images: int = 2) -> tuple[pd.DataFrame, list[str]]:
    """Local-validation split of an ``(Image, Id)`` table; returns (``Image,Id,val,train_local,train_full``, unseen Ids).

    * every identity with >= 2 images gets one query (``val=1``), chosen by seed;
    * a share ``unseen_frac`` of those identities (seeded) is held out of local training entirely;
    * ``train_local``: not a query, not unseen, not new_whale, and the identity keeps >=
      ``min_train_images`` such rows (2: singletons stay out of metric training);
    * ``train_full``: not new_whale and the identity has >= ``min_train_images`` images.

    Choices depend on the seed and the names only (not on row order), so adding images moves few.

    >>> t = pd.DataFrame({"Image": list("abcdefg"), "Id": ["w1"] * 3 + ["w2"] * 2 + ["w3", "new_whale"]})
    >>> flags, unseen = split_flags(t, unseen_frac=0.0, seed=0)
    >>> flags.groupby("Id")[["val", "train_local", "train_full"]].sum().to_dict("index")["w1"]
    {'val': 1, 'train_local': 2, 'train_full': 3}
    >>> int(flags["val"].sum()), int(flags["train_local"].sum()), int(flags["train_full"].sum()), unseen
    (2, 2, 5, [])
    """
    if not 0.0 <= float(unseen_frac) < 1.0:
        raise ConfigError(f"clean.unseen_frac must be in [0, 1), got {unseen_frac}")
    out = df[["Image", "Id"]].reset_index(drop=True).copy()
    known = out["Id"] != NEW_WHALE
    counts = out.loc[known, "Id"].value_counts()
    multi = sorted(counts.index[counts >= 2], key=lambda i: _rank(seed, "id/" + i))
    unseen = sorted(multi[: int(round(float(unseen_frac) * len(multi)))])
    rank = out["Image"].map(lambda n: _rank(seed, "img/" + n))
    is_multi = out["Id"].isin(multi)
    query_rows = rank[is_multi].groupby(out.loc[is_multi, "Id"]).idxmin()
    val = pd.Series(False, index=out.index)
    val[query_rows.to_numpy()] = True
    pool = known & ~val & ~out["Id"].isin(unseen)
    local = pool & (pool.groupby(out["Id"]).transform("sum") >= int(min_train_images))
    out["val"] = val.astype(int)
    out["train_local"] = local.astype(int)
    out["train_full"] = (known & out["Id"].map(counts).fillna(0).ge(int(min_train_images))).astype(int)
    return out[SPLIT_COLUMNS], unseen


def find_duplicates(info: pd.DataFrame) -> list[list[str]]:
    """Groups (>= 2 names) of byte-identical readable images."""
    ok = info[(info["error"] == "") & (info["sha1"] != "")]
    groups = ok.groupby("sha1")["Image"].agg(sorted)
    return [g for g in groups if len(g) > 1]


def cross_duplicates(a: pd.DataFrame, b: pd.DataFrame, a_name: str, b_name: str) -> list[dict]:
    """Pairs of byte-identical images between two inspected splits (``{a_name: .., b_name: ..}``)."""
    a = a[(a["error"] == "") & (a["sha1"] != "")]
    b = b[(b["error"] == "") & (b["sha1"] != "")]
    pairs = a[["Image", "sha1"]].merge(b[["Image", "sha1"]], on="sha1", suffixes=("_a", "_b"))
    return [{a_name: x, b_name: y} for x, y in sorted(zip(pairs["Image_a"], pairs["Image_b"]))]


# ---------------------------------------------------------------------------------------
# The whole competition
# ---------------------------------------------------------------------------------------
def _clean_labelled(labels: pd.DataFrame, csv_path: Path, image_dir: Path, clean_cfg: dict, progress: bool,
                    desc: str):
    unlisted = sorted(set(list_files(image_dir)) - set(labels["Image"]))
    info = inspect_images(image_dir, labels["Image"], clean_cfg["threads"], desc, progress)
    kept, dropped = apply_rules(labels, info, int(clean_cfg["min_side"]))
    if kept.empty:
        counts = ", ".join(f"{r} {sum(d['reason'] == r for d in dropped)}" for r in REASONS)
        raise CleaningError(f"{csv_path}: no usable image left after cleaning ({counts})")
    flags, unseen = split_flags(kept, float(clean_cfg["unseen_frac"]), int(clean_cfg["seed"]),
                                int(clean_cfg["min_train_images"]))
    known = flags[flags["Id"] != NEW_WHALE]
    per_id = known["Id"].value_counts()
    report = {
        "listed": len(labels),
        "kept": len(flags),
        "dropped": {r: sum(d["reason"] == r for d in dropped) for r in REASONS},
        "dropped_files": dropped,
        "unlisted_files": unlisted,
        "identities": {
            "known": int(len(per_id)),
            "singletons": int((per_id == 1).sum()),
            "with_2plus": int((per_id >= 2).sum()),
            "unseen": len(unseen),
            "new_whale_images": int((flags["Id"] == NEW_WHALE).sum()),
            "images_per_identity": {int(k): int(v) for k, v in per_id.value_counts().sort_index().items()},
        },
        "split": {
            "val_queries": int(flags["val"].sum()),
            "train_local": int(flags["train_local"].sum()),
            "train_full": int(flags["train_full"].sum()),
            "unseen_ids": unseen,
        },
        "duplicate_groups": find_duplicates(info),
    }
    return flags, info, report


def _test_images(image_dir: Path) -> tuple[list[str], list[str]]:
    """(image files, other files) of the test folder; CleaningError when it holds no image."""
    files = list_files(image_dir)
    names = [n for n in files if n.lower().endswith(IMAGE_EXTS)]
    if not names:
        raise CleaningError(f"{image_dir}: no image files ({', '.join(IMAGE_EXTS)})")
    return names, sorted(set(files) - set(names))


def _clean_test(image_dir: Path, names: list[str], ignored: list[str], clean_cfg: dict, progress: bool):
    info = inspect_images(image_dir, names, clean_cfg["threads"], "inspect test", progress)
    bad = info[info["error"] != ""]
    report = {
        "found": len(names),
        "kept": int(len(info) - len(bad)),
        "dropped": {"unreadable": int(len(bad))},
        "dropped_files": [{"Image": r.Image, "reason": "unreadable", "detail": r.error} for r in bad.itertuples()],
        "ignored_files": ignored,
        "small_kept": sorted(info.loc[(info["error"] == "") & (np.minimum(info["width"], info["height"])
                                                              < int(clean_cfg["min_side"])), "Image"]),
        "duplicate_groups": find_duplicates(info),
    }
    return info.loc[info["error"] == "", ["Image"]].reset_index(drop=True), info, report


def clean_competition(paths: Paths, clean_cfg: dict, progress: bool = True) -> tuple[dict, dict]:
    """Clean train, test and (when present) pretrain of ``paths.raw``.

    Returns ``(tables, report)``: tables maps each clean CSV path of ``paths`` to its DataFrame.
    Every input is validated before the (slow) image pass; CleaningError on bad input.
    """
    start = time.time()
    if (not int(clean_cfg["min_side"]) >= 1 or not 0.0 <= float(clean_cfg["unseen_frac"]) < 1.0
            or not int(clean_cfg["min_val_queries"]) >= 0):
        raise CleaningError(f"clean.min_side must be >= 1, clean.unseen_frac in [0, 1) and clean.min_val_queries "
                            f">= 0; got {clean_cfg}")
    if not paths.raw.is_dir():
        raise CleaningError(f"{paths.raw}: raw competition folder is missing")
    if paths.clean_dir.resolve().is_relative_to(paths.raw):
        raise CleaningError(f"{paths.clean_dir} lies inside the raw folder {paths.raw}, which is never written")
    train_labels = read_labels(paths.raw_train_csv, paths.raw_dir("train"))
    test_names, test_ignored = _test_images(paths.raw_dir("test"))
    shared = sorted(set(train_labels["Image"]) & set(test_names))
    if shared:  # later stages key every image by its name
        raise CleaningError(f"{paths.raw_dir('train')} and {paths.raw_dir('test')} both hold {len(shared)} "
                            f"file name(s): {_some(shared)}; image names must be unique across train/ and test/")
    has_pretrain = paths.raw_pretrain.exists()
    if has_pretrain:
        pre_labels = read_labels(paths.raw_pretrain_csv, paths.raw_dir("pretrain"))

    train, train_info, train_rep = _clean_labelled(train_labels, paths.raw_train_csv, paths.raw_dir("train"),
                                                   clean_cfg, progress, "inspect train")
    ids, n_val = train_rep["identities"], train_rep["split"]["val_queries"]
    if ids["with_2plus"] < 2:
        raise CleaningError(
            f"{paths.raw_train_csv}: {ids['with_2plus']} identit{'y has' if ids['with_2plus'] == 1 else 'ies have'} "
            f">= 2 usable images, at least 2 are needed to train and validate ({ids['known']} Id(s) in all, "
            f"{ids['singletons']} with one image, {ids['new_whale_images']} new_whale images; "
            f"{train_rep['kept']} of {train_rep['listed']} listed images usable)")
    warnings = []
    if n_val < int(clean_cfg["min_val_queries"]):
        warnings.append(f"local validation has only {n_val} queries (< clean.min_val_queries = "
                        f"{clean_cfg['min_val_queries']}): its scores (MAP@20, thresholds) are noise")
    test, test_info, test_rep = _clean_test(paths.raw_dir("test"), test_names, test_ignored, clean_cfg, progress)
    tables = {paths.clean_train_csv: train, paths.clean_test_csv: test}
    cross = {"test~train": cross_duplicates(test_info, train_info, "test", "train")}
    train_id = dict(zip(train["Image"], train["Id"]))
    for pair in cross["test~train"]:
        pair["Id"] = train_id.get(pair["train"], "(dropped)")
    pretrain_rep = {"skipped": f"no {paths.raw_pretrain}"}
    if has_pretrain:
        pre, pre_info, pretrain_rep = _clean_labelled(pre_labels, paths.raw_pretrain_csv, paths.raw_dir("pretrain"),
                                                      clean_cfg, progress, "inspect pretrain")
        tables[paths.clean_pretrain_csv] = pre
        cross["pretrain~train"] = cross_duplicates(pre_info, train_info, "pretrain", "train")
        cross["pretrain~test"] = cross_duplicates(pre_info, test_info, "pretrain", "test")
    report = {
        "raw": str(paths.raw),
        "clean": dict(clean_cfg),
        "train": train_rep,
        "test": test_rep,
        "pretrain": pretrain_rep,
        "cross_duplicates": cross,
        "warnings": warnings,
        "seconds": round(time.time() - start, 2),
    }
    return tables, report


# ---------------------------------------------------------------------------------------
# Output: summary text, figure, atomic folder
# ---------------------------------------------------------------------------------------
def format_summary(report: dict) -> str:
    """A few readable lines of a cleaning report."""
    lines = [f"clean: {report['raw']} ({report['seconds']} s)"]
    for split in ("train", "pretrain", "test"):
        rep = report[split]
        if "skipped" in rep:
            lines.append(f"  {split:8s} skipped: {rep['skipped']}")
            continue
        drops = ", ".join(f"{k} {v}" for k, v in rep["dropped"].items() if v) or "none"
        total = rep.get("listed", rep.get("found"))
        lines.append(f"  {split:8s} {rep['kept']}/{total} images kept; dropped: {drops}")
        if "identities" in rep:
            ids, sp = rep["identities"], rep["split"]
            lines.append(f"           {ids['known']} identities ({ids['singletons']} singletons, {ids['unseen']} unseen), "
                         f"{ids['new_whale_images']} new_whale; val queries {sp['val_queries']}, "
                         f"train_local {sp['train_local']}, train_full {sp['train_full']}")
        for key in ("unlisted_files", "ignored_files"):
            if rep.get(key):
                lines.append(f"           {len(rep[key])} {key.replace('_', ' ')} not used (e.g. {rep[key][0]})")
        if rep.get("small_kept"):
            lines.append(f"           {len(rep['small_kept'])} small test images kept")
        for d in rep["dropped_files"][:10]:
            lines.append(f"           - {d['Image']}: {d['reason']}: {d['detail']}")
        if len(rep["dropped_files"]) > 10:
            lines.append(f"           ... {len(rep['dropped_files']) - 10} more in report.json")
    for key, pairs in report["cross_duplicates"].items():
        if pairs:
            lines.append(f"  {len(pairs)} identical image(s) across {key.replace('~', ' and ')}")
    return "\n".join(lines)


def summary_figure(train: pd.DataFrame, report: dict):
    """Images per identity, the local-validation split, and drops per reason (a matplotlib Figure)."""
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    per_id = train.loc[train["Id"] != NEW_WHALE, "Id"].value_counts()
    ax[0].hist(per_id.to_numpy(), bins=np.arange(1, per_id.max() + 2) - 0.5 if len(per_id) else 1, color="C0")
    ax[0].set(title=f"train: images per identity ({len(per_id)} identities)", xlabel="images", ylabel="identities")
    roles = {
        "val query": int(train["val"].sum()),
        "train_local": int(train["train_local"].sum()),
        "database only": int(((train["val"] == 0) & (train["train_local"] == 0) & (train["Id"] != NEW_WHALE)).sum()),
        "new_whale": int((train["Id"] == NEW_WHALE).sum()),
    }
    ax[1].bar_label(ax[1].bar(list(roles), list(roles.values()), color=["C3", "C2", "C7", "C1"]))
    ax[1].set(title="train images by local-validation role", ylabel="images")
    splits = [s for s in ("train", "test", "pretrain") if "dropped" in report[s]]
    most = 1
    for j, reason in enumerate(REASONS):
        counts = [report[s]["dropped"].get(reason, 0) for s in splits]
        most = max(most, *counts)
        ax[2].bar_label(ax[2].bar(np.arange(len(splits)) + 0.2 * (j - 1.5), counts, width=0.2, label=reason))
    ax[2].set_xticks(range(len(splits)), splits)
    ax[2].set(title="dropped images by reason", ylabel="images", ylim=(0, most * 1.15))
    ax[2].legend(fontsize=8)
    for a in ax:
        a.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def write_clean_dir(paths: Paths, tables: dict, report: dict, figure=None) -> Path:
    """Write every clean artifact into a staging folder, then swap it in for ``paths.clean_dir``.

    A failure leaves the previous ``clean/`` (or none) untouched; report.json is written last.
    """
    dest = paths.clean_dir
    with atomic_dir(dest) as staging:
        staged = lambda p: staging / Path(p).relative_to(dest)  # noqa: E731
        for path, df in tables.items():
            write_csv(staged(path), df)
        if figure is not None:
            save_figure(figure, staged(paths.clean_summary_png))
        write_json(staged(paths.clean_report), report)
    return dest
