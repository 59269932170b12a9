"""Fluke crops: box geometry, the crop loop over every image later stages read, a sample grid.

Each image gets the detector's most confident box grown by ``margin`` (a share of the box's
width/height on each side) and clipped to the image; when there is no detector or the best
box scores below ``conf``, the whole image is used and the row says ``fallback=1``. Every crop
(fallbacks too) is written with its longest side <= ``max_side`` (never upscaled), so train,
test and pretrain images get exactly the same treatment and later stages read small files.

>>> expand_box((100, 50, 200, 90), 0.1, 1000, 1000)
(90, 46, 210, 94)
>>> expand_box((5, 5, 50, 20), 0.5, 60, 30)
(0, 0, 60, 28)
>>> crop_region((10, 10, 50, 40, 0.2), 100, 80, conf=0.25, margin=0.0)
(0, 0, 100, 80, 0.2, 1)
"""
from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

CROP_COLUMNS = ["Image", "split", "x0", "y0", "x1", "y1", "conf", "fallback", "width", "height"]


# ---- geometry --------------------------------------------------------------------------------
def expand_box(box, margin: float, width: int, height: int) -> tuple[int, int, int, int]:
    """Grow (x0, y0, x1, y1) by ``margin`` of its size on every side, round outwards, clip to the image."""
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    mx, my = margin * (x1 - x0), margin * (y1 - y0)
    x0, y0 = max(0, math.floor(x0 - mx)), max(0, math.floor(y0 - my))
    x1, y1 = min(width, math.ceil(x1 + mx)), min(height, math.ceil(y1 + my))
    x0, y0 = min(x0, width - 1), min(y0, height - 1)
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def crop_region(detection, width: int, height: int, *, conf: float, margin: float):
    """``(x0, y0, x1, y1, conf, fallback)`` for one image from its best detection (or None)."""
    score = float(detection[4]) if detection is not None else 0.0
    if detection is None or score < conf:
        return 0, 0, int(width), int(height), round(score, 4), 1
    return (*expand_box(detection, margin, width, height), round(score, 4), 0)


def fit_max_side(img: np.ndarray, max_side: int | None) -> np.ndarray:
    """Downscale so the longest side is <= max_side (area interpolation); never upscale."""
    import cv2

    h, w = img.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return img
    s = max_side / max(h, w)
    return cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


# ---- the crop loop -------------------------------------------------------------------------------
def crop_jobs(paths) -> pd.DataFrame:
    """Every image later stages read: clean train, test and (when present) pretrain rows.

    Columns ``split, Image, src, dst`` (raw image, crop file).
    """
    from .tables import clean_frame, test_frame

    parts = [("train", clean_frame(paths, "train")["Image"]), ("test", test_frame(paths, use_crops=False)["Image"])]
    if paths.clean_pretrain_csv.exists():
        parts.append(("pretrain", clean_frame(paths, "pretrain")["Image"]))
    rows = [(split, name, str(paths.raw_image(split, name)), str(paths.crop_image(split, name)))
            for split, names in parts for name in names]
    return pd.DataFrame(rows, columns=["split", "Image", "src", "dst"])


def signature(weights, crop_cfg: dict, imgsz: int) -> str:
    """What a crop depends on besides its source image: detector weights and crop settings."""
    h = hashlib.sha1()
    if weights is not None and Path(weights).is_file():
        h.update(Path(weights).read_bytes())
    else:
        h.update(b"no-detector")
    keys = ("conf", "margin", "max_side", "quality")
    h.update(repr([crop_cfg[k] for k in keys] + [imgsz]).encode())
    return h.hexdigest()[:16]


def reusable_rows(previous: pd.DataFrame | None, jobs: pd.DataFrame) -> pd.DataFrame:
    """Rows of the previous crops.csv whose crop file exists and is newer than its source image."""
    if previous is None or previous.empty:
        return pd.DataFrame(columns=CROP_COLUMNS)
    merged = jobs.merge(previous, on=["split", "Image"], how="inner")
    ok = [os.path.exists(d) and os.path.getmtime(d) >= os.path.getmtime(s) for s, d in zip(merged["src"], merged["dst"])]
    return merged[ok][CROP_COLUMNS].reset_index(drop=True)


def write_crop(img: np.ndarray, dest, quality: int = 95) -> None:
    """Write an RGB crop atomically, in the format of its suffix; JPEG quality for .jpg files only
    (OpenCV warns about a JPEG option given for a PNG)."""
    import cv2

    from .io import atomic_path

    jpeg = Path(dest).suffix.lower() in (".jpg", ".jpeg")
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if jpeg else []
    with atomic_path(dest) as tmp:
        if not cv2.imwrite(str(tmp), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), params):
            raise OSError(f"could not write crop {dest}")


def run_crops(jobs: pd.DataFrame, detect, *, conf: float, margin: float, max_side: int | None,
              batch: int = 16, quality: int = 95, previous: pd.DataFrame | None = None,
              progress: bool = True, threads: int = 2) -> tuple[pd.DataFrame, int]:
    """Crop every job (see crop_jobs) with ``detect(list of RGB arrays) -> [(x0,y0,x1,y1,conf) | None]``.

    ``detect=None`` means no detector: every image falls back to the whole frame. Rows of
    ``previous`` that are still up to date (see reusable_rows) are kept without rerunning the
    detector. Returns ``(rows with CROP_COLUMNS in job order, number of images processed)``.
    """
    from tqdm import tqdm

    from .io import read_image

    kept = reusable_rows(previous, jobs)
    done = set(zip(kept["split"], kept["Image"]))
    todo = jobs[[(s, n) not in done for s, n in zip(jobs["split"], jobs["Image"])]].reset_index(drop=True)
    rows = []
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool, \
            tqdm(total=len(todo), desc="crop", unit="img", disable=not progress) as bar:
        for start in range(0, len(todo), batch):
            chunk = todo.iloc[start:start + batch]
            images = list(pool.map(read_image, chunk["src"]))
            dets = detect(images) if detect is not None else [None] * len(images)
            regions = [crop_region(d, im.shape[1], im.shape[0], conf=conf, margin=margin) for d, im in zip(dets, images)]
            crops = [fit_max_side(im[r[1]:r[3], r[0]:r[2]], max_side) for im, r in zip(images, regions)]
            list(pool.map(lambda a: write_crop(a[0], a[1], quality), zip(crops, chunk["dst"])))
            for job, im, r in zip(chunk.itertuples(), images, regions):
                rows.append((job.Image, job.split, *r, im.shape[1], im.shape[0]))
            bar.update(len(chunk))
    new = pd.DataFrame(rows, columns=CROP_COLUMNS)
    out = jobs[["split", "Image"]].merge(pd.concat([kept, new], ignore_index=True), on=["split", "Image"], how="left")
    return out[CROP_COLUMNS], len(todo)


def summarize(rows: pd.DataFrame) -> dict:
    """Per split: images, fallbacks, fallback rate, median detection confidence."""
    out = {}
    for split, g in rows.groupby("split", sort=False):
        out[split] = {"images": len(g), "fallback": int(g["fallback"].sum()),
                      "fallback_rate": round(float(g["fallback"].mean()), 4),
                      "median_conf": round(float(g["conf"].median()), 4)}
    return out


def plot_samples(rows: pd.DataFrame, jobs: pd.DataFrame, dest, n: int = 16, seed: int = 0):
    """A grid of ``n`` photos with their crop box drawn (red title = fallback) saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from .io import read_image, save_figure

    df = rows.merge(jobs, on=["split", "Image"])
    if df.empty or n <= 0:
        return None
    rng = np.random.default_rng(seed)
    fb = df[df["fallback"] == 1]
    pick = list(rng.permutation(fb.index)[: max(1, n // 4)]) if len(fb) else []
    rest = [i for i in rng.permutation(df.index) if i not in set(pick)]
    pick = sorted(pick + rest[: n - len(pick)], key=lambda i: (df.at[i, "split"], i))
    cols = min(4, len(pick))
    nrows = math.ceil(len(pick) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 2.6 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), pick):
        r = df.loc[i]
        ax.imshow(read_image(r["src"]))
        ax.add_patch(Rectangle((r["x0"], r["y0"]), r["x1"] - r["x0"], r["y1"] - r["y0"], fill=False,
                               lw=2, ec="red" if r["fallback"] else "lime"))
        ax.set_title(f"{r['split']} {str(r['Image'])[:18]}  conf {r['conf']:.2f}", fontsize=8,
                     color="red" if r["fallback"] else "black")
    fig.suptitle("fluke crops (green: detector box + margin; red: fallback to the whole image)", fontsize=10)
    return save_figure(fig, dest)
