"""Fluke box annotations: read them, check them against the images, write an ultralytics dataset.

Accepted sources (one fluke class):

* ``boxes.csv`` as exported by makesense.ai (``label_name,bbox_x,bbox_y,bbox_width,bbox_height,
  image_name,image_width,image_height``, with or without that header line);
* ``boxes.csv`` with columns ``Image,x0,y0,x1,y1`` (pixels, corners);
* a folder of YOLO ``<image stem>.txt`` files (``class xc yc w h``, normalised to 0..1).

Boxes are in pixels of the image as displayed (EXIF orientation applied), like ``read_image``.
Bad rows are skipped and counted by reason: ``unparseable``, ``unknown_image`` (not found in
any split folder), ``not_accepted`` (stage 00 dropped the image, or it is not listed: only images
of stage 00's clean tables are used), ``unreadable_image``, ``zero_area``, ``outside_image`` (less
than half of the box lies inside the image); each skipped line is listed with its reason
(``skipped_rows``). Repaired rows are counted: corners given in the wrong order (x0 > x1 or
y0 > y1) are swapped (``swapped``), boxes slightly past the border are clipped (``clipped``).

>>> to_yolo((10, 20, 110, 70), 200, 100)
(0.3, 0.45, 0.5, 0.5)
>>> [round(v, 6) for v in from_yolo((0.3, 0.45, 0.5, 0.5), 200, 100)]
[10.0, 20.0, 110.0, 70.0]
"""
from __future__ import annotations

import csv
import random
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import PipelineError

CLASS_NAME = "fluke"
MAKESENSE_COLUMNS = ["label_name", "bbox_x", "bbox_y", "bbox_width", "bbox_height",
                     "image_name", "image_width", "image_height"]
XYXY_COLUMNS = ["Image", "x0", "y0", "x1", "y1"]
BOX_FRAME = ["Image", "x0", "y0", "x1", "y1", "ref_w", "ref_h", "normalized", "row"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SKIP_REASONS = ("unparseable", "unknown_image", "not_accepted", "unreadable_image", "zero_area", "outside_image")


class AnnotationError(PipelineError, ValueError):
    """Annotations that cannot be used at all; the message names the file."""


# ---- box conversions ---------------------------------------------------------------------
def to_yolo(box, width: float, height: float) -> tuple[float, float, float, float]:
    """Pixel corners (x0, y0, x1, y1) -> normalised YOLO (xc, yc, w, h)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return ((x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height)


def from_yolo(yolo, width: float, height: float) -> tuple[float, float, float, float]:
    """Normalised YOLO (xc, yc, w, h) -> pixel corners (x0, y0, x1, y1)."""
    xc, yc, w, h = (float(v) for v in yolo)
    return ((xc - w / 2) * width, (yc - h / 2) * height, (xc + w / 2) * width, (yc + h / 2) * height)


# ---- reading -------------------------------------------------------------------------------
def read_boxes(source) -> tuple[pd.DataFrame, dict]:
    """Parse a boxes CSV (makesense.ai or Image,x0,y0,x1,y1) or a folder of YOLO txt labels.

    Returns ``(boxes, report)``: boxes has columns ``BOX_FRAME`` (``normalized`` rows come from
    YOLO txt and are in 0..1; ``ref_w/ref_h`` are the image size the annotator saw, when known;
    ``row`` names the file and line), report counts ``rows`` and ``unparseable``.
    """
    source = Path(source)
    if source.is_dir():
        records, bad = _read_yolo_folder(source)
    elif source.is_file():
        records, bad = _read_csv(source)
    else:
        raise AnnotationError(f"annotations not found: {source}")
    boxes = pd.DataFrame(records, columns=BOX_FRAME)
    return boxes, {"source": str(source), "rows": len(records) + len(bad), "unparseable": len(bad),
                   "unparseable_rows": bad}


def _read_csv(path: Path) -> tuple[list, list]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    if not rows:
        raise AnnotationError(f"{path} is empty")
    head = [c.strip() for c in rows[0]]
    if head[:5] == XYXY_COLUMNS or set(XYXY_COLUMNS) <= set(head):
        layout, body, first = "xyxy", rows[1:], 2
    elif head[:8] == MAKESENSE_COLUMNS:
        layout, body, first = "makesense", rows[1:], 2
    elif len(head) == 8 and _is_number(head[1]):  # makesense.ai exports carry no header line
        layout, body, first, head = "makesense", rows, 1, MAKESENSE_COLUMNS
    else:
        raise AnnotationError(
            f"{path}: unrecognised header {rows[0]!r}; expected makesense.ai columns "
            f"{','.join(MAKESENSE_COLUMNS)} or {','.join(XYXY_COLUMNS)}")
    col = {name: i for i, name in enumerate(head)}
    records, bad = [], []
    for line, r in enumerate(body, start=first):
        where = f"{path.name}:{line}"
        try:
            if layout == "xyxy":
                name = r[col["Image"]].strip()
                x0, y0, x1, y1 = (float(r[col[c]]) for c in XYXY_COLUMNS[1:])
                ref = (np.nan, np.nan)
            else:
                name = r[col["image_name"]].strip()
                x, y, w, h = (float(r[col[c]]) for c in MAKESENSE_COLUMNS[1:5])
                x0, y0, x1, y1 = x, y, x + w, y + h
                ref = tuple(_float_or_nan(r, col[c]) for c in ("image_width", "image_height"))
            if not name or not np.all(np.isfinite([x0, y0, x1, y1])):
                raise ValueError
        except (ValueError, IndexError, KeyError):
            bad.append(where)
            continue
        records.append((name, x0, y0, x1, y1, ref[0], ref[1], False, where))
    return records, bad


def _read_yolo_folder(folder: Path) -> tuple[list, list]:
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise AnnotationError(f"{folder} holds no YOLO label files (*.txt)")
    records, bad = [], []
    for f in files:
        for line, text in enumerate(f.read_text().splitlines(), start=1):
            if not text.strip():
                continue
            where = f"{f.name}:{line}"
            try:
                xc, yc, w, h = (float(v) for v in text.split()[1:5])
                if len(text.split()) < 5 or not np.all(np.isfinite([xc, yc, w, h])):
                    raise ValueError
            except ValueError:
                bad.append(where)
                continue
            # the image is named by the label's stem; its suffix is found when resolving
            records.append((f.stem, xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2, np.nan, np.nan, True, where))
    return records, bad


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _float_or_nan(row, i) -> float:
    try:
        return float(row[i])
    except (ValueError, IndexError):
        return np.nan


# ---- resolving and checking --------------------------------------------------------------------
def image_index(folders: dict) -> dict[str, tuple[str, Path]]:
    """``{split: folder}`` -> ``{file name and stem: (split, path)}``; the first split listed wins."""
    index: dict[str, tuple[str, Path]] = {}
    for split, folder in folders.items():
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                index.setdefault(p.name, (split, p))
                index.setdefault(p.stem, (split, p))
    return index


def oriented_size(path) -> tuple[int, int]:
    """(width, height) as displayed (EXIF rotation applied, like OpenCV), from the header only."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
            w, h = h, w
    return w, h


def check_boxes(boxes: pd.DataFrame, sizes: dict[str, tuple[int, int]]) -> tuple[pd.DataFrame, dict]:
    """Pixel boxes inside their image, given ``sizes[path] = (w, h)`` for every ``path`` column value.

    YOLO rows are scaled by the image size; makesense rows whose ``ref_w/ref_h`` differ from the
    real size (the annotator worked on a resized copy) are rescaled. Returns the valid boxes
    (corners put in order and clipped, ``width``/``height`` added) and counts per skip reason plus
    ``swapped`` and ``clipped``, with examples and the skipped rows (``{"row", "reason", "detail"}``).
    """
    df = boxes.copy()
    wh = np.array([sizes[p] for p in df["path"]], dtype=float).reshape(-1, 2)
    df["width"], df["height"] = wh[:, 0].astype(int), wh[:, 1].astype(int)
    sx = np.where(df["normalized"], df["width"], np.where(df["ref_w"] > 0, df["width"] / df["ref_w"], 1.0))
    sy = np.where(df["normalized"], df["height"], np.where(df["ref_h"] > 0, df["height"] / df["ref_h"], 1.0))
    swapped = (df["x0"] > df["x1"]) | (df["y0"] > df["y1"])
    x0, x1 = np.minimum(df["x0"], df["x1"]) * sx, np.maximum(df["x0"], df["x1"]) * sx
    y0, y1 = np.minimum(df["y0"], df["y1"]) * sy, np.maximum(df["y0"], df["y1"]) * sy
    area = (x1 - x0) * (y1 - y0)
    cx0, cy0 = np.clip(x0, 0, df["width"]), np.clip(y0, 0, df["height"])
    cx1, cy1 = np.clip(x1, 0, df["width"]), np.clip(y1, 0, df["height"])
    inside = (cx1 - cx0) * (cy1 - cy0)
    zero = ~(area >= 1.0)  # also NaN
    outside = ~zero & (inside < 0.5 * area)
    clipped = ~zero & ~outside & (inside < area)
    df["x0"], df["y0"], df["x1"], df["y1"] = cx0, cy0, cx1, cy1
    counts = {"zero_area": int(zero.sum()), "outside_image": int(outside.sum()), "swapped": int((swapped & ~zero).sum()),
              "clipped": int(clipped.sum())}
    examples = {"zero_area": list(df["row"][zero][:10]), "outside_image": list(df["row"][outside][:10]),
                "swapped": list(df["row"][swapped & ~zero][:10])}
    size = lambda r: f"{r.width}x{r.height} image"  # noqa: E731
    skipped = ([{"row": r.row, "reason": "zero_area", "detail": f"box has no area in its {size(r)}"}
                for r in df[zero].itertuples()]
               + [{"row": r.row, "reason": "outside_image", "detail": f"box lies mostly outside its {size(r)}"}
                  for r in df[outside].itertuples()])
    return df[~zero & ~outside].reset_index(drop=True), {**counts, "examples": examples, "skipped_rows": skipped}


def resolve_boxes(boxes: pd.DataFrame, folders: dict, accepted: dict | None = None,
                  rejected: dict | None = None) -> tuple[pd.DataFrame, dict]:
    """Find every box's image in the split folders, check its geometry; drop and count bad rows.

    ``accepted`` (``{split: image names}``, stage 00's clean tables) limits the images used; a
    box on another image is skipped as ``not_accepted``, with stage 00's reason from ``rejected``
    (``{(split, image): reason}``) when known. Returns boxes with ``Image`` (file name),
    ``split``, ``path``, ``width``, ``height`` and pixel corners, and a report
    ``{"skipped": {reason: n}, "swapped": n, "clipped": n, "examples": ..., "skipped_rows": [...]}``.
    """
    index = image_index(folders)
    hit = boxes["Image"].map(lambda n: index.get(n))
    unknown = hit.isna()
    skipped_rows = [{"row": r.row, "reason": "unknown_image",
                     "detail": f"{r.Image!r} is in none of {', '.join(str(f) for f in folders.values())}"}
                    for r in boxes[unknown].itertuples()]
    df = boxes[~unknown].copy()
    df["split"] = [hit[i][0] for i in df.index]
    df["path"] = [str(hit[i][1]) for i in df.index]
    df["Image"] = [Path(p).name for p in df["path"]]
    if accepted is not None:
        ok = {(split, name) for split, names in accepted.items() for name in names}
        refused = pd.Series([(s, n) not in ok for s, n in zip(df["split"], df["Image"])], index=df.index, dtype=bool)
    else:
        refused = pd.Series(False, index=df.index, dtype=bool)
    why = rejected or {}
    skipped_rows += [{"row": r.row, "reason": "not_accepted",
                      "detail": f"{r.split}/{r.Image}: stage 00: {why.get((r.split, r.Image), 'not in its clean table')}"}
                     for r in df[refused].itertuples()]
    sizes, unreadable = {}, {}
    for p in df.loc[~refused, "path"].unique():
        try:
            sizes[p] = oriented_size(p)
        except Exception as e:  # noqa: BLE001 - any decoder failure means the same: unusable image
            unreadable[p] = str(e) or type(e).__name__
    bad_img = ~refused & df["path"].isin(unreadable)
    skipped_rows += [{"row": r.row, "reason": "unreadable_image", "detail": unreadable[r.path]}
                     for r in df[bad_img].itertuples()]
    examples = {"unknown_image": list(boxes["row"][unknown][:10]), "not_accepted": list(df["row"][refused][:10]),
                "unreadable_image": list(df["row"][bad_img][:10])}
    df, geo = check_boxes(df[~refused & ~bad_img], sizes)
    skipped = {"unknown_image": int(unknown.sum()), "not_accepted": int(refused.sum()),
               "unreadable_image": int(bad_img.sum()), "zero_area": geo["zero_area"],
               "outside_image": geo["outside_image"]}
    return df, {"skipped": skipped, "swapped": geo["swapped"], "clipped": geo["clipped"],
                "examples": {**examples, **geo["examples"]}, "skipped_rows": skipped_rows + geo["skipped_rows"]}


def load_annotations(source, folders: dict, accepted: dict | None = None,
                     rejected: dict | None = None) -> tuple[pd.DataFrame, dict]:
    """read_boxes + resolve_boxes; raise AnnotationError when no valid box is left."""
    boxes, report = read_boxes(source)
    valid, checked = resolve_boxes(boxes, folders, accepted, rejected)
    skipped = {"unparseable": report["unparseable"], **checked["skipped"]}
    examples = {"unparseable": report["unparseable_rows"][:10], **checked["examples"]}
    rows = [{"row": r, "reason": "unparseable", "detail": "not a box (missing field or not a number)"}
            for r in report["unparseable_rows"]] + checked["skipped_rows"]
    line = lambda r: int(r["row"].rsplit(":", 1)[-1])  # noqa: E731
    out = {"source": report["source"], "rows": report["rows"], "valid": len(valid),
           "images": int(valid["path"].nunique()), "skipped": skipped, "swapped": checked["swapped"],
           "clipped": checked["clipped"], "examples": {k: v for k, v in examples.items() if v},
           "skipped_rows": sorted(rows, key=lambda r: (r["row"].rsplit(":", 1)[0], line(r)))}
    if valid.empty:
        reasons = ", ".join(f"{k}: {v}" for k, v in skipped.items() if v) or "no rows"
        raise AnnotationError(f"{source}: no valid box among {report['rows']} rows ({reasons}); "
                              f"examples: {out['examples']}")
    return valid, out


# ---- ultralytics dataset ---------------------------------------------------------------------
def split_images(images, val_frac: float, seed: int) -> set:
    """Image-level hold-out: a seeded ``val_frac`` share of the images (>= 1 when there are 2+)."""
    images = sorted(set(images))
    n_val = int(round(len(images) * val_frac))
    n_val = min(max(n_val, 1 if val_frac > 0 else 0), len(images) - 1) if len(images) > 1 else 0
    return set(random.Random(seed).sample(images, n_val))


def write_yolo_dataset(boxes: pd.DataFrame, out_dir, *, val_frac: float = 0.15, seed: int = 0,
                       max_side: int | None = None, progress: bool = True) -> dict:
    """Write ``out_dir/{images,labels}/{train,val}`` from resolved boxes (see resolve_boxes).

    Images are decoded once and stored as JPEG with their longest side <= ``max_side`` (YOLO
    resizes to its input size anyway; labels are normalised so they do not change). The folder
    is rebuilt in a staging folder and swapped in at the end (common.io.atomic_dir): an error or
    a kill never leaves a half-written dataset. Returns counts per part.
    """
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir.with_name(out_dir.name + ".tmp"), ignore_errors=True)  # staging folder of older versions
    from .io import atomic_dir

    with atomic_dir(out_dir) as tmp:
        return _write_dataset(boxes, tmp, val_frac, seed, max_side, progress)


def _write_dataset(boxes: pd.DataFrame, tmp: Path, val_frac: float, seed: int, max_side: int | None,
                   progress: bool) -> dict:
    import cv2
    from tqdm import tqdm

    from .io import read_image

    val = split_images(boxes["path"], val_frac, seed)
    counts = {"train": {"images": 0, "boxes": 0}, "val": {"images": 0, "boxes": 0}}
    groups = boxes.groupby("path", sort=True)
    for path, rows in tqdm(groups, total=groups.ngroups, desc="detector dataset", disable=not progress):
        part = "val" if path in val else "train"
        img = read_image(path)
        h, w = img.shape[:2]
        if max_side and max(h, w) > max_side:
            s = max_side / max(h, w)
            img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
        r0 = rows.iloc[0]
        name = f"{r0['split']}__{Path(r0['Image']).stem}"
        (tmp / "images" / part).mkdir(parents=True, exist_ok=True)
        (tmp / "labels" / part).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp / "images" / part / f"{name}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 95])
        lines = ["0 " + " ".join(f"{v:.6f}" for v in to_yolo((b.x0, b.y0, b.x1, b.y1), w, h))
                 for b in rows.itertuples()]
        (tmp / "labels" / part / f"{name}.txt").write_text("\n".join(lines) + "\n")
        counts[part]["images"] += 1
        counts[part]["boxes"] += len(rows)
    for part in ("train", "val"):
        (tmp / "images" / part).mkdir(parents=True, exist_ok=True)
        (tmp / "labels" / part).mkdir(parents=True, exist_ok=True)
    return counts


def write_data_yaml(dest, dataset_dir, val: str = "images/val") -> Path:
    """ultralytics data YAML with an absolute ``path`` (so it never looks in its datasets_dir)."""
    import yaml

    from .io import write_text

    data = {"path": str(Path(dataset_dir).resolve()), "train": "images/train", "val": val,
            "names": {0: CLASS_NAME}}
    return write_text(dest, yaml.safe_dump(data, sort_keys=False))
