"""Fluke crops: box geometry, the crop rule (one Cropper for stage 02 and --predict), the crop loop
over every image later stages read, a sample grid.

Each image gets one box -- the detector's most confident box (source ``yolo``) or, without a
trained detector, the box of the ImageNet backbone's activation map (source ``cam``, see
common/attention.py; ``crop.attention``) -- grown by ``margin`` (a share of the box's width/height
on each side) and clipped to the image. When there is no box, the detector's best box scores
below ``conf``, or the grown box covers more than ``max_area`` of the image, the whole image is
used: ``fallback=1``, source ``full``. Every crop (fallbacks too) is written with its longest
side <= ``max_side`` (never upscaled), so train, test and pretrain images and new photos get
exactly the same treatment and later stages read small files.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from .errors import PipelineError

CROP_COLUMNS = ["Image", "split", "x0", "y0", "x1", "y1", "conf", "fallback", "width", "height", "source"]
SOURCES = ("yolo", "cam", "full")  # detector box, attention-map box, whole image
ATTENTION_KEYS = ("attention_map", "attention_size", "attention_threshold", "attention_merge",
                  "attention_min_area", "attention_max_area", "attention_min_side")


class CropConfigError(PipelineError, ValueError):
    """A crop setting that cannot be used; the message names the key."""


# ---- geometry --------------------------------------------------------------------------------
def expand_box(box, margin: float, width: int, height: int) -> tuple[int, int, int, int]:
    """Grow (x0, y0, x1, y1) by ``margin`` of its size on every side, round outwards, clip to the image."""
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    mx, my = margin * (x1 - x0), margin * (y1 - y0)
    x0, y0 = max(0, math.floor(x0 - mx)), max(0, math.floor(y0 - my))
    x1, y1 = min(width, math.ceil(x1 + mx)), min(height, math.ceil(y1 + my))
    x0, y0 = min(x0, width - 1), min(y0, height - 1)
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def crop_region(detection, width: int, height: int, *, conf: float, margin: float, max_area: float = 1.0):
    """``(x0, y0, x1, y1, conf, fallback)`` for one image from its best box (detector or attention; or None).

    The whole image (fallback=1) when there is no box, its score is below ``conf``, or the grown
    box covers more than ``max_area`` of the image (the photo is the crop already)."""
    score = float(detection[4]) if detection is not None else 0.0
    if detection is None or score < conf:
        return 0, 0, int(width), int(height), round(score, 4), 1
    x0, y0, x1, y1 = expand_box(detection, margin, width, height)
    if (x1 - x0) * (y1 - y0) > max_area * width * height:
        return 0, 0, int(width), int(height), round(score, 4), 1
    return x0, y0, x1, y1, round(score, 4), 0


def fit_max_side(img: np.ndarray, max_side: int | None) -> np.ndarray:
    """Downscale so the longest side is <= max_side (area interpolation); never upscale."""
    import cv2

    h, w = img.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return img
    s = max_side / max(h, w)
    return cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


# ---- the crop rule: one for stage 02 and --predict -------------------------------------------------
def crop_source(crop_cfg: dict, trained: bool) -> str:
    """Where boxes come from: ``yolo`` (trained detector), ``cam`` (attention map) or ``full`` (none).

    ``crop.attention``: auto = attention without a trained detector, true = always, false = never.

    >>> [crop_source({"attention": a}, t) for a, t in (("auto", True), ("auto", False), (True, True), (False, False))]
    ['yolo', 'cam', 'cam', 'full']
    """
    mode = crop_cfg.get("attention", "auto")
    if isinstance(mode, str) and mode.strip().lower() == "auto":
        return "yolo" if trained else "cam"
    if not isinstance(mode, bool):
        raise CropConfigError(f"crop.attention={mode!r}; expected auto, true or false")
    return "cam" if mode else ("yolo" if trained else "full")


@dataclass
class Cropper:
    """The crop rule: ``find(list of RGB arrays) -> [(x0, y0, x1, y1, score) | None]`` (a detector, an
    attention map, or None for whole images), then crop_region with these settings."""

    source: str                      # yolo | cam | full (see SOURCES)
    find: Callable | None = None
    conf: float = 0.25               # detector boxes below this: whole image (attention boxes: 0)
    margin: float = 0.1
    max_area: float = 1.0            # grown boxes above this share of the image: whole image
    max_side: int | None = None

    def regions(self, images: list[np.ndarray]) -> list[tuple]:
        """``(x0, y0, x1, y1, conf, fallback, source)`` per image."""
        boxes = self.find(images) if self.find is not None else [None] * len(images)
        out = []
        for b, im in zip(boxes, images):
            r = crop_region(b, im.shape[1], im.shape[0], conf=self.conf, margin=self.margin, max_area=self.max_area)
            out.append((*r, "full" if r[5] else self.source))
        return out

    def crops(self, images: list[np.ndarray]) -> tuple[list[np.ndarray], list[tuple]]:
        """(crops with longest side <= max_side, regions) of ``images``."""
        regions = self.regions(images)
        return [fit_max_side(im[r[1]:r[3], r[0]:r[2]], self.max_side) for im, r in zip(images, regions)], regions

    def maps(self, images: list[np.ndarray]):
        """The attention maps of ``images`` (for plots), or None for another source."""
        return self.find.maps(images) if self.source == "cam" else None


def detector_trained(paths) -> bool:
    """Whether stage 01 trained a detector (its metrics say so and its weights exist)."""
    from .io import read_json

    if paths.detector_metrics.exists() and not read_json(paths.detector_metrics).get("trained"):
        return False
    return paths.detector_weights.is_file()


def make_cropper(cfg: dict, paths, *, trained: bool | None = None) -> Cropper:
    """The Cropper stage 02 and ``--predict`` both use: source from crop_source, settings from cfg["crop"]."""
    from .runtime import resolve_device

    crop = cfg["crop"]
    trained = detector_trained(paths) if trained is None else bool(trained)
    source = crop_source(crop, trained)
    device = resolve_device(cfg["device"])
    find, conf, max_area = None, float(crop["conf"]), 1.0
    if source == "yolo":
        from .detector import FlukeDetector, setup_ultralytics

        setup_ultralytics(paths.yolo_config_dir)
        find = FlukeDetector(paths.detector_weights, imgsz=detector_imgsz(cfg), device=device)
    elif source == "cam":
        from .attention import AttentionCropper

        find = AttentionCropper(size=crop["attention_size"], threshold=crop["attention_threshold"],
                                min_area=crop["attention_min_area"], merge=crop["attention_merge"],
                                kind=crop["attention_map"], device=device, min_side=crop["attention_min_side"])
        conf, max_area = 0.0, float(crop["attention_max_area"])
    return Cropper(source, find, conf=conf, margin=float(crop["margin"]), max_area=max_area,
                   max_side=crop["max_side"])


def detector_imgsz(cfg: dict) -> int:
    """Detector inference size: crop.imgsz, else detector.imgsz."""
    return int(cfg["crop"]["imgsz"] or cfg["detector"]["imgsz"])


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


def signature(weights, crop_cfg: dict, imgsz: int, source: str = "yolo") -> str:
    """What a crop depends on besides its source image: where boxes come from, detector weights,
    crop settings, and the attention settings when boxes come from the attention map."""
    h = hashlib.sha1()
    if weights is not None and Path(weights).is_file():
        h.update(Path(weights).read_bytes())
    else:
        h.update(b"no-detector")
    keys = ("conf", "margin", "max_side", "quality") + (ATTENTION_KEYS if source == "cam" else ())
    h.update(repr([source] + [crop_cfg[k] for k in keys] + [imgsz]).encode())
    return h.hexdigest()[:16]


def read_crops(path) -> pd.DataFrame:
    """crops.csv; one written before the ``source`` column gets it from ``fallback`` (yolo or full)."""
    df = pd.read_csv(path, dtype={"Image": str, "split": str}, keep_default_na=False)
    if "source" not in df.columns:
        df["source"] = np.where(df["fallback"].astype(int) == 1, "full", "yolo")
    return df


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


def run_crops(jobs: pd.DataFrame, cropper: Cropper, *, batch: int = 16, quality: int = 95,
              previous: pd.DataFrame | None = None, progress: bool = True,
              threads: int = 2) -> tuple[pd.DataFrame, int]:
    """Crop every job (see crop_jobs) with ``cropper`` (see make_cropper).

    Rows of ``previous`` that are still up to date (see reusable_rows) are kept without rerunning
    the detector or attention map. Returns ``(rows with CROP_COLUMNS in job order, number of
    images processed)``.
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
            crops, regions = cropper.crops(images)
            list(pool.map(lambda a: write_crop(a[0], a[1], quality), zip(crops, chunk["dst"])))
            for job, im, r in zip(chunk.itertuples(), images, regions):
                rows.append((job.Image, job.split, *r[:6], im.shape[1], im.shape[0], r[6]))
            bar.update(len(chunk))
    new = pd.DataFrame(rows, columns=CROP_COLUMNS)
    out = jobs[["split", "Image"]].merge(pd.concat([kept, new], ignore_index=True), on=["split", "Image"], how="left")
    return out[CROP_COLUMNS], len(todo)


def summarize(rows: pd.DataFrame) -> dict:
    """Per split: images, fallbacks, fallback rate, median box score, images per source (yolo/cam/full)."""
    rows = _with_source(rows)
    out = {}
    for split, g in rows.groupby("split", sort=False):
        out[split] = {"images": len(g), "fallback": int(g["fallback"].sum()),
                      "fallback_rate": round(float(g["fallback"].mean()), 4),
                      "median_conf": round(float(g["conf"].median()), 4),
                      **{s: int((g["source"] == s).sum()) for s in SOURCES}}
    return out


def summarize_sources(rows: pd.DataFrame) -> dict:
    """Per source (all splits): images, median box score, median share of the photo the crop keeps."""
    rows = _with_source(rows)
    area = (rows["x1"] - rows["x0"]) * (rows["y1"] - rows["y0"]) / (rows["width"] * rows["height"])
    return {s: {"images": int(m.sum()), "median_conf": round(float(rows["conf"][m].median()), 4),
                "median_area": round(float(area[m].median()), 4)}
            for s in SOURCES if (m := rows["source"] == s).any()}


def _with_source(rows: pd.DataFrame) -> pd.DataFrame:
    if "source" in rows.columns:
        return rows
    return rows.assign(source=np.where(rows["fallback"].astype(int) == 1, "full", "yolo"))


SOURCE_COLOURS = {"yolo": "lime", "cam": "cyan", "full": "red"}


def plot_samples(rows: pd.DataFrame, jobs: pd.DataFrame, dest, n: int = 16, seed: int = 0, maps=None):
    """A grid of ``n`` photos with their crop box drawn, coloured by source (lime: detector, cyan:
    attention, red: whole image) saved as a PNG. ``maps(list of RGB arrays) -> [0, 1] maps`` (the
    attention cropper's) blends each photo's heat map under its box."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from .io import read_image, save_figure

    df = _with_source(rows).merge(jobs, on=["split", "Image"])
    if df.empty or n <= 0:
        return None
    rng = np.random.default_rng(seed)
    fb = df[df["fallback"] == 1]
    pick = list(rng.permutation(fb.index)[: max(1, n // 4)]) if len(fb) else []
    rest = [i for i in rng.permutation(df.index) if i not in set(pick)]
    pick = sorted(pick + rest[: n - len(pick)], key=lambda i: (df.at[i, "split"], i))
    images = [read_image(df.at[i, "src"]) for i in pick]
    heat = maps(images) if maps is not None else [None] * len(images)
    cols = min(4, len(pick))
    nrows = math.ceil(len(pick) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 2.6 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i, im, m in zip(axes.ravel(), pick, images, heat):
        r = df.loc[i]
        if m is not None:
            from .attention import overlay

            im = overlay(im, m)
        ax.imshow(im)
        colour = SOURCE_COLOURS.get(r["source"], "red")
        ax.add_patch(Rectangle((r["x0"], r["y0"]), r["x1"] - r["x0"], r["y1"] - r["y0"], fill=False, lw=2, ec=colour))
        ax.set_title(f"{r['split']} {str(r['Image'])[:18]}  {r['source']} {r['conf']:.2f}", fontsize=8,
                     color="red" if r["fallback"] else "black")
    what = "attention heat map, " if maps is not None else ""
    fig.suptitle(f"crops ({what}lime: detector box + margin; cyan: attention box + margin; "
                 "red: whole image)", fontsize=10)
    return save_figure(fig, dest)
