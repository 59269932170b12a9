"""Embedded demo competition: synthetic humpback-fluke photos in the Kaggle Humpback layout.

``python -m common.demo_data --out DIR [--config configs/demo.yaml] [--set demo.seed=3]``
writes a complete competition into DIR (refused when DIR already has a train.csv)::

    DIR/train.csv              Image,Id   long tail of identities, singletons, new_whale rows
    DIR/train/*.jpg            incl. planted dirt: corrupt files, tiny images, exact duplicates
    DIR/test/*.jpg             known individuals and individuals never seen in train
    DIR/boxes.csv              makesense.ai export of tight fluke boxes (see below)
    DIR/pretrain/train.csv     a related dataset: another population, sea and camera
    DIR/pretrain/train/*.jpg
    DIR/.truth/test.csv        Image,Id of every test photo (withheld truth for local scoring)

Every individual has its own fluke: outline (lobe sweep and chord, median notch, ragged
trailing edge, nicks, sometimes a missing tip) and a black/white underside pattern (white
patches from an individual noise field, dark spots, white rake scars, barnacle rings). The
pattern is not mirror-symmetric, so a mirrored fluke looks like another whale. Each photo
draws its own pose (roll, yaw/pitch perspective, lobe bend, scale, position, sometimes partly
out of frame), water line (partly submerged lobes), splashes, dripping water, occluders, sea
(waves, glints, foam), lighting, colour cast, greyscale, blur, noise and JPEG quality.

Identities: ``w_`` + 7 hex digits. In the truth file, test Ids that never occur in train.csv
are new individuals (Kaggle's ``new_whale`` in ID mode); most of them have >= 2 test photos,
so image retrieval over train + test has something to find. ``new_whale`` rows of train.csv
are one-off individuals that appear nowhere else.

Boxes: ``label_name,bbox_x,bbox_y,bbox_width,bbox_height,image_name,image_width,image_height``
with the tight pixel box of the visible fluke (after every warp and the water line; clipped to
the frame). Boxed images are train and pretrain photos only, named by their plain file name,
and every image name is unique across train, test and pretrain: the detector finds a boxed
image at ``RAW/train/<name>`` or else ``RAW/pretrain/train/<name>``. Dirt (corrupt, tiny,
duplicate copies) is never boxed.

Difficulty (``demo.difficulty`` scales every per-photo variation). Measured on ground-truth
crops at 128 px, 29 held-out identities (183 photos, leave-one-out), EfficientNet-Lite0:

    difficulty   frozen ImageNet MAP@20 / top-1   ArcFace, 8 CPU epochs MAP@20 / top-1
    0.6          0.17 / 0.38                      0.57 / 0.75
    0.8          0.16 / 0.37                      0.40 / 0.57   (default)
    1.0          0.12 / 0.30                      0.33 / 0.48

Everything is a pure function of ``demo.seed`` and the ``demo:`` config (same seed → the
same bytes on a given machine); the competition is built in a sibling temp folder and renamed
into place.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from .errors import PipelineError

NEW_WHALE = "new_whale"
BOX_COLUMNS = ["label_name", "bbox_x", "bbox_y", "bbox_width", "bbox_height", "image_name", "image_width",
               "image_height"]
# Top-level entries the generator writes; train.csv is moved into place last (it marks "done").
ENTRIES = ("train", "test", "pretrain", "boxes.csv", ".truth", "train.csv")

# Canonical fluke canvas (pixels): tips at u = ±1, i.e. x = CX ± HALF; notch near (CX, Y0).
CW, CH, CX, HALF, Y0 = 512, 320, 256.0, 236.0, 130.0
_X, _Y = np.meshgrid(np.arange(CW, dtype=np.float32), np.arange(CH, dtype=np.float32))
_U = (_X[0] - CX) / HALF


class DemoError(PipelineError, ValueError):
    """Bad demo config or output folder; the message names it."""


# ---------------------------------------------------------------------------------------------
# Styles: the competition and the related (pretrain) dataset differ in population and camera
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Style:
    seas: tuple            # RGB base colours of the sea (0..1)
    whiteness: tuple       # Beta(a, b) of the white share of the underside
    spots: float           # mean dark spots per fluke
    scars: float           # mean white rake-scar sets
    rings: float           # mean barnacle rings / white dots
    nicks: float           # mean trailing-edge nicks
    sweep: tuple           # tip rise (canonical px)
    chord: tuple           # lobe chord (canonical px)
    aspect: tuple          # photo height / width
    fill: tuple            # fluke span as a share of the photo width
    grey_prob: float       # share of greyscale photos
    cast: tuple            # mean RGB gains of the camera
    vignette: tuple
    jpeg: tuple            # JPEG quality range
    blur: float            # max Gaussian blur sigma at 600 px width


COMPETITION = Style(
    seas=((0.38, 0.44, 0.49), (0.30, 0.35, 0.40), (0.46, 0.47, 0.48), (0.20, 0.26, 0.33), (0.31, 0.38, 0.37),
          (0.52, 0.56, 0.60)),
    whiteness=(1.3, 1.3), spots=6.0, scars=0.8, rings=8.0, nicks=2.5, sweep=(25, 70), chord=(80, 115),
    aspect=(0.42, 0.72), fill=(0.4, 0.9), grey_prob=0.25, cast=(1.0, 1.0, 1.0), vignette=(0.0, 0.25),
    jpeg=(60, 92), blur=1.4)
RELATED = Style(
    seas=((0.08, 0.33, 0.45), (0.05, 0.20, 0.42), (0.12, 0.40, 0.36), (0.10, 0.28, 0.30)),
    whiteness=(3.0, 1.3), spots=12.0, scars=0.4, rings=4.0, nicks=1.5, sweep=(40, 80), chord=(70, 100),
    aspect=(0.60, 0.80), fill=(0.45, 0.90), grey_prob=0.05, cast=(1.08, 1.0, 0.88), vignette=(0.15, 0.45),
    jpeg=(50, 80), blur=0.8)


def _noise(rng, h: int, w: int, gh: float, gw: float) -> np.ndarray:
    """Smooth N(0,~1) field of shape (h, w) from a (gh, gw) random grid, bicubic upsampled."""
    g = rng.standard_normal((max(2, int(gh)), max(2, int(gw)))).astype(np.float32)
    f = cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC)
    return f / (f[:: max(1, h // 32), :: max(1, w // 32)].std() + 1e-6)


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # logistic without exp overflow


# ---------------------------------------------------------------------------------------------
# Individuals: a canonical fluke (grey pattern + alpha) per whale
# ---------------------------------------------------------------------------------------------
@dataclass
class Fluke:
    grey: np.ndarray       # (CH, CW) float32 underside brightness 0..1
    alpha: np.ndarray      # (CH, CW) float32 coverage
    top: np.ndarray        # (CW,) trailing edge y (smooth, without serration)
    bottom: np.ndarray     # (CW,) leading edge y


def make_fluke(rng: np.random.Generator, style: Style) -> Fluke:
    """Draw one individual: outline (lobes, notch, ragged edge, nicks, tail stock) and pigmentation."""
    smooth, top, bottom, body, stock, half_width = _outline(rng, style)
    white = _pigmentation(rng, style, smooth, bottom, body)
    black, bright = rng.uniform(0.05, 0.14), rng.uniform(0.78, 0.93)
    grey = black + (bright - black) * white + 0.04 * _noise(rng, CH, CW, CH / 3, CW / 3)
    grey *= 1 - 0.6 * np.exp(-np.clip(_Y - top, 0, None) / rng.uniform(1.5, 3.5))  # dark trailing rim
    stock_only = np.clip(stock - body, 0, 1)
    stock_grey = (rng.uniform(0.12, 0.3) * (1 - 0.4 * np.abs(_X - CX) / (np.abs(half_width) + 1))
                  + 0.04 * _noise(rng, CH, CW, 6, 6))
    grey = grey * (1 - stock_only) + stock_grey * stock_only
    return Fluke(np.clip(grey, 0, 1).astype(np.float32), np.maximum(body, stock).astype(np.float32),
                 smooth.astype(np.float32), bottom.astype(np.float32))


def _outline(rng, style: Style):
    """Per-column trailing edge (smooth and ragged) and leading edge; body and stock coverage."""
    u, t = _U, np.abs(_U)
    tc = np.minimum(t, 1.0)
    left = u < 0
    side = lambda lo, hi, jit: np.where(left, *(rng.uniform(lo, hi) + rng.normal(0, jit, 2)))  # noqa: E731
    sweep, chord = side(*style.sweep, 5.0), side(*style.chord, 4.0)
    smooth = Y0 - sweep * tc ** rng.uniform(1.3, 2.2) + rng.uniform(-6, 12) * np.sin(np.pi * tc)
    # Trailing edge: median notch, scallops, ragged noise, individual nicks.
    dn, wn = rng.uniform(8, 22), rng.uniform(0.02, 0.06)
    notch = dn * (np.exp(-np.abs(u) / wn) if rng.random() < 0.5 else np.exp(-(u / wn) ** 2))
    ragged = cv2.GaussianBlur(rng.standard_normal((1, CW)).astype(np.float32), (0, 0), rng.uniform(1.5, 4))[0]
    scallop = np.abs(np.sin(np.pi * rng.uniform(10, 30) * u + rng.uniform(0, np.pi)))
    top = smooth + notch + (0.3 + 0.7 * tc) * (rng.uniform(0.5, 3) * scallop + rng.uniform(2, 6) * ragged)
    for _ in range(min(6, rng.poisson(style.nicks))):
        uk = rng.choice([-1, 1]) * rng.uniform(0.08, 0.95)
        d, w = rng.uniform(4, 16), rng.uniform(0.008, 0.035)
        v_shaped = rng.random() < 0.5
        top = top + d * (np.clip(1 - np.abs(u - uk) / w, 0, 1) if v_shaped else np.exp(-((u - uk) / w) ** 2))
    p, q = rng.uniform(1.2, 2.2), rng.uniform(0.6, 1.0)
    bottom = smooth + chord * np.clip(1 - tc ** p, 0, 1) ** q + 22 * np.exp(-(u / 0.13) ** 2)
    bottom = np.where(t >= 1, top, bottom)
    if rng.random() < 0.1:  # a tip bitten off
        cut = rng.uniform(0.8, 0.95) + 0.02 * ragged
        bottom = np.where((t > cut) & (left if rng.random() < 0.5 else ~left), top, bottom)
    body = np.clip(_Y - top + 0.5, 0, 1) * np.clip(bottom - _Y + 0.5, 0, 1)
    ys = Y0 + 0.5 * float(chord[int(CX)])
    half_width = rng.uniform(9, 16) + rng.uniform(0.1, 0.35) * (_Y - ys) + 6 * np.exp(-np.clip(_Y - ys, 0, None) / 8)
    stock = np.clip(half_width - np.abs(_X - CX) + 0.5, 0, 1) * np.clip(_Y - ys + 0.5, 0, 1)
    return smooth, top, bottom, body, stock, half_width


def _pigmentation(rng, style: Style, smooth, bottom, body) -> np.ndarray:
    """(CH, CW) white share: patches of an individual noise field (+ lobe prior), spots, scars, rings."""
    tc = np.minimum(np.abs(_U), 1.0)
    v = np.clip((_Y - smooth) / np.maximum(bottom - smooth, 1e-3), 0, 1)  # 0 trailing .. 1 leading edge
    field = (_noise(rng, CH, CW, 4, 8) + 0.5 * _noise(rng, CH, CW, 8, 16) + 0.3 * _noise(rng, CH, CW, 16, 32)
             + 0.15 * _noise(rng, CH, CW, 48, 96) + 0.25 * _noise(rng, CH, CW, CH / 3, CW / 3))
    m = rng.uniform(0.35, 0.6)
    field += (rng.uniform(0.5, 1.5) * np.exp(-((tc - m) / 0.35) ** 2) * np.exp(-((v - 0.5) / 0.4) ** 2)
              - rng.uniform(0.5, 2.0) * np.exp(-v / rng.uniform(0.05, 0.15))
              - rng.uniform(0, 1.5) * np.exp(-(_U / rng.uniform(0.08, 0.2)) ** 2))
    share = rng.beta(*style.whiteness)
    thr = np.quantile(field[body > 0.5], 1 - share) if share > 0.02 else field.max() + 1
    white = _sigmoid((field - thr) / 0.05)
    layer = np.zeros((CH, CW), np.float32)
    for _ in range(rng.poisson(style.spots)):  # dark spots
        centre = (int(rng.uniform(30, CW - 30)), int(rng.uniform(Y0 - 60, Y0 + 80)))
        axes = (int(rng.uniform(3, 12)), int(rng.uniform(3, 9)))
        cv2.ellipse(layer, centre, axes, rng.uniform(0, 180), 0, 360, 1.0, -1, cv2.LINE_AA)
    white = white * (1 - layer)
    layer[:] = 0
    for _ in range(rng.poisson(style.scars)):  # rake marks: parallel white arcs
        x0, y0, ang = rng.uniform(60, CW - 60), rng.uniform(Y0 - 30, Y0 + 60), rng.uniform(-0.8, 0.8)
        length, gap, curve = rng.uniform(40, 140), rng.uniform(5, 10), rng.uniform(-0.004, 0.004)
        s = np.linspace(-length / 2, length / 2, 20)
        for k in range(rng.integers(2, 5)):
            xs = x0 + s * np.cos(ang) - k * gap * np.sin(ang)
            yv = y0 + s * np.sin(ang) + k * gap * np.cos(ang) + curve * s ** 2
            pts = np.stack([xs, yv], 1).round().astype(np.int32)
            cv2.polylines(layer, [pts], False, rng.uniform(0.8, 1.0), int(rng.integers(2, 4)), cv2.LINE_AA)
    for _ in range(rng.poisson(style.rings)):  # barnacle rings and dots
        centre = (int(rng.uniform(30, CW - 30)), int(rng.uniform(Y0 - 60, Y0 + 80)))
        cv2.circle(layer, centre, int(rng.integers(2, 6)), 1.0, int(rng.choice([-1, 1, 2])), cv2.LINE_AA)
    return np.maximum(white, layer)


# ---------------------------------------------------------------------------------------------
# Photos
# ---------------------------------------------------------------------------------------------
def make_sea(rng, h: int, w: int, style: Style) -> np.ndarray:
    """(h, w, 3) float32 sea: base colour, light gradient, swell, chop, crest lines, glitter, foam.

    Large frames are drawn at half resolution and upsampled (the sea is soft; 4x cheaper).
    """
    if w > 400:
        return cv2.resize(make_sea(rng, (h + 1) // 2, (w + 1) // 2, style), (w, h), interpolation=cv2.INTER_LINEAR)
    base = np.array(style.seas[rng.integers(len(style.seas))], np.float32)
    base = np.clip(base * rng.uniform(0.75, 1.2) + rng.normal(0, 0.01, 3), 0.02, 0.9)
    yy = np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None]
    depth = 0.5 + (yy + 0.5)  # waves look larger and stronger near the camera (bottom of the frame)
    swell = _noise(rng, h, w, h / 30, w / 120) + 0.6 * _noise(rng, h, w, h / 12, w / 50)
    chop = _noise(rng, h, w, h / 4, w / 24)
    ridge = (1 - np.abs(_noise(rng, h, w, h / 6, w / 40)) / 2.5).clip(0, 1)
    ridge = (ridge * ridge * ridge) ** 2
    shade = (1 + rng.uniform(-0.3, 0.3) * yy) * (1 + depth * (rng.uniform(0.05, 0.12) * swell
                                                              + rng.uniform(0.03, 0.1) * chop))
    shade += rng.uniform(0.03, 0.2) * ridge * depth
    glints = np.clip(chop + 1.5 * ridge - rng.uniform(2.6, 3.4), 0, None) * rng.uniform(0.15, 0.5)
    if rng.random() < 0.5:  # sun glitter region
        gx, gy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.2, 0.6) * w
        xx = np.arange(w, dtype=np.float32)[None, :]
        glints = glints * (0.3 + 3 * np.exp(-((xx - gx) ** 2 + (yy * h + h / 2 - gy) ** 2) / (2 * r * r)))
    if rng.random() < 0.3:  # drifting foam
        foam = np.clip(_noise(rng, h, w, h / 10, w / 25) - rng.uniform(1.4, 2.2), 0, 1) * 0.8
        shade, glints = shade * (1 - foam), glints * (1 - foam) + 0.85 * foam
    return cv2.merge([(shade * b + glints).astype(np.float32) for b in base])


def _bend(fluke: Fluke, rng, difficulty: float):
    """Per-photo lobe flex (tips up/down, each side its own) applied to grey and alpha."""
    t = np.minimum(np.abs(_U), 1.0)
    beta = np.where(_U < 0, *(rng.normal(0, 0.35 * difficulty, 2)))
    shift = (beta * 35 * t ** 2).astype(np.float32)
    map_y = _Y + shift[None, :]
    stack = cv2.remap(np.dstack([fluke.grey, fluke.alpha]), _X, map_y, cv2.INTER_LINEAR, borderValue=0)
    return stack[..., 0].copy(), stack[..., 1].copy(), fluke.top - shift, fluke.bottom - shift


def _drips(grey, top, rng):
    """Water running down the underside from the trailing edge."""
    for _ in range(rng.poisson(4)):
        x = int(rng.uniform(20, CW - 20))
        y0 = int(top[x])
        over = grey.copy()
        cv2.line(over, (x, y0), (x + int(rng.normal(0, 4)), y0 + int(rng.uniform(10, 70))),
                 float(rng.uniform(0.7, 0.95)), int(rng.integers(1, 4)), cv2.LINE_AA)
        grey = cv2.addWeighted(grey, 1 - (a := rng.uniform(0.25, 0.6)), over, a, 0)
    return grey


def _homography(rng, box, w: int, h: int, style: Style, difficulty: float):
    """Canonical → photo homography: perspective (yaw/pitch), squash, shear, roll, scale, shift."""
    N = np.array([[1 / HALF, 0, -CX / HALF], [0, 1 / HALF, -Y0 / HALF], [0, 0, 1]])
    P = np.array([[1, 0, 0], [0, 1, 0], [rng.normal(0, 0.12 * difficulty), rng.normal(0, 0.08 * difficulty), 1]])
    P[2, :2] = np.clip(P[2, :2], -0.3, 0.3)
    th = math.radians(np.clip(rng.normal(0, 8 * difficulty), -25, 25))
    R = np.array([[math.cos(th), -math.sin(th), 0], [math.sin(th), math.cos(th), 0], [0, 0, 1]])
    A = np.array([[1, rng.normal(0, 0.06 * difficulty), 0], [0, rng.uniform(0.7, 1.15), 0], [0, 0, 1]])
    M = R @ A @ P @ N
    x0, y0, x1, y1 = box
    corners = np.array([[x0, y0, 1], [x1, y0, 1], [x0, y1, 1], [x1, y1, 1]], float) @ M.T
    corners = corners[:, :2] / corners[:, 2:]
    lo, hi = corners.min(0), corners.max(0)
    span = hi - lo
    s = rng.uniform(*style.fill) * w / span[0]
    s = min(s, 0.95 * h / span[1])
    lo, hi = lo * s, hi * s
    slack = 0.15 * (hi - lo) if rng.random() < 0.08 * difficulty else np.zeros(2)  # partly out of frame
    tx = rng.uniform(-lo[0] - slack[0], max(-lo[0] - slack[0], w - hi[0] + slack[0]))
    ty = rng.uniform(-lo[1] - slack[1], max(-lo[1] - slack[1], h - hi[1] + slack[1]))
    return np.array([[s, 0, tx], [0, s, ty], [0, 0, 1]]) @ M, s


def photograph(fluke: Fluke, rng: np.random.Generator, width: int, style: Style = COMPETITION,
               difficulty: float = 1.0):
    """Render one photo of ``fluke``: (RGB uint8 image, visible-fluke mask bool, box (x0, y0, x1, y1) or None).

    The box is inclusive pixel coordinates of the mask (the fluke after every warp, the water
    line and occluders).
    """
    w = int(width)
    h = max(8, int(round(w * rng.uniform(*style.aspect))))
    grey, alpha, top, bottom = _bend(fluke, rng, difficulty)
    grey = _drips(grey, top, rng)
    # Water line: most photos show some tail stock; some have the lobes partly submerged.
    centre_bottom = float(bottom[int(CX)])
    if rng.random() < 0.3 * difficulty:
        yw = rng.uniform(Y0 + 5, centre_bottom)
    else:
        yw = rng.uniform(centre_bottom - 10, centre_bottom + 60)
    yw = yw + rng.uniform(1, 5) * np.sin(_U * rng.uniform(3, 12) + rng.uniform(0, 6.3)) + np.minimum(
        np.abs(_U), 1) * rng.normal(0, 10)
    alpha = alpha * np.clip(yw[None, :] - _Y + 0.5, 0, 1)
    light = 1 + rng.normal(0, 0.15 * difficulty) * _U[None, :] + rng.normal(0, 0.1 * difficulty) * (_Y - Y0) / 100
    grey = grey * np.clip(light, 0.5, 1.5)
    if rng.random() < 0.4:  # specular sheen of wet skin
        grey = grey + np.clip(_noise(rng, CH, CW, 6, 12) - 1.2, 0, None) * rng.uniform(0.1, 0.3)
    rows, cols = np.any(alpha > 0.5, 1), np.any(alpha > 0.5, 0)
    cbox = (np.argmax(cols), np.argmax(rows), CW - 1 - np.argmax(cols[::-1]), CH - 1 - np.argmax(rows[::-1]))
    Hm, s = _homography(rng, cbox, w, h, style, difficulty)
    # Work inside the region the fluke can cover (+ a margin for splashes): cheaper than full frame.
    corners = cv2.perspectiveTransform(np.array([[[cbox[0], cbox[1]], [cbox[2], cbox[1]], [cbox[0], cbox[3]],
                                                   [cbox[2], cbox[3]]]], np.float64), Hm)[0]
    lo, hi = corners.min(0), corners.max(0)
    margin = 0.35 * (hi - lo).max() + 4
    x0, y0 = (int(np.clip(v - margin, 0, n)) for v, n in zip(lo, (w, h)))
    x1, y1 = (int(np.clip(v + margin + 2, 0, n)) for v, n in zip(hi, (w, h)))
    rw, rh = max(1, x1 - x0), max(1, y1 - y0)
    Hm = np.array([[1, 0, -x0], [0, 1, -y0], [0, 0, 1]]) @ Hm
    # Pre-shrink the canonical fluke for small renders (avoids aliasing of the ragged edges).
    stack = np.dstack([np.clip(grey, 0, 1.2), alpha]).astype(np.float32)
    if s * HALF < 0.66:
        r = float(np.clip(1.5 * s * HALF, 0.05, 1.0))
        stack = cv2.resize(stack, (max(2, round(CW * r)), max(2, round(CH * r))), interpolation=cv2.INTER_AREA)
        Hm = Hm @ np.diag([CW / stack.shape[1], CH / stack.shape[0], 1.0])
    warped = cv2.warpPerspective(stack, Hm, (rw, rh), flags=cv2.INTER_LINEAR, borderValue=0)
    fg, a = cv2.split(warped)

    img = make_sea(rng, h, w, style)
    roi = img[y0:y0 + rh, x0:x0 + rw]
    tint = 0.85 + 0.15 * roi[::3, ::3].reshape(-1, 3).mean(0) / (roi[::3, ::3].mean() + 1e-6)
    roi += (cv2.merge([fg * np.float32(c) for c in tint]) - roi) * cv2.merge([a, a, a])
    visible = a > 0.5
    ys, xs = np.nonzero(visible)
    if xs.size:
        bw, bh = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        if rng.random() < 0.6 * difficulty:  # splash / foam around the water line
            cx = rng.uniform(xs.min() + 0.2 * bw, xs.max() - 0.2 * bw)
            cy = ys.max() - rng.uniform(0, 0.3) * bh
            ell = np.zeros((rh, rw), np.float32)
            cv2.ellipse(ell, (int(cx), int(cy)), (max(2, int(rng.uniform(0.15, 0.45) * bw)),
                                                  max(2, int(rng.uniform(0.05, 0.3) * bh))), 0, 0, 360, 1.0, -1)
            ell = cv2.GaussianBlur(ell, (0, 0), max(1.0, 0.03 * bw))
            texture = _noise(rng, rh, rw, rh / 20, rw / 30) + 0.4 * _noise(rng, rh, rw, rh / 5, rw / 6)
            foam = np.clip(ell * (1.4 + 0.3 * texture) - 0.4, 0, 1) * rng.uniform(0.6, 0.95)
            for _ in range(rng.poisson(25)):  # spray droplets
                p = (int(rng.normal(cx, 0.4 * bw)), int(cy - abs(rng.normal(0, 0.4 * bh))))
                cv2.circle(foam, p, int(rng.integers(1, max(2, w // 150) + 1)), float(rng.uniform(0.5, 1)), -1)
            roi += (np.float32(rng.uniform(0.8, 0.97)) - roi) * cv2.merge([foam, foam, foam])
        if rng.random() < 0.08 * difficulty:  # something in front: boat rail, another animal, ...
            occ = np.zeros((rh, rw), np.uint8)
            ex = xs.min() if rng.random() < 0.5 else xs.max()
            pts = np.array([[ex + rng.normal(0, 0.2 * bw), ys.min() + rng.uniform(0, 1) * bh] for _ in range(5)])
            cv2.fillPoly(occ, [cv2.convexHull(pts.astype(np.int32))], 1)
            occ_f = cv2.GaussianBlur(occ.astype(np.float32), (0, 0), 1.0)
            roi += (np.float32(rng.uniform(0.03, 0.25)) - roi) * cv2.merge([occ_f, occ_f, occ_f])
            visible &= occ == 0
    img = _camera(img, rng, style, difficulty)
    mask = np.zeros((h, w), bool)
    mask[y0:y0 + rh, x0:x0 + rw] = visible
    ys, xs = np.nonzero(visible)
    box = (int(xs.min()) + x0, int(ys.min()) + y0, int(xs.max()) + x0, int(ys.max()) + y0) if xs.size else None
    return img, mask, box


def _camera(img, rng, style: Style, difficulty: float) -> np.ndarray:
    """Exposure, colour cast, contrast, haze, vignette, gamma, greyscale, blur, noise → uint8 RGB."""
    h, w = img.shape[:2]
    k = rng.normal(0, 0.04 * difficulty)  # colour temperature (+ a little green/magenta)
    gain = np.array(style.cast) * np.array([1 + k, 1 + rng.normal(0, 0.015), 1 - k]) * rng.uniform(0.75, 1.25)
    m = float(img[::7, ::7].mean()) * gain.mean()
    contrast = rng.uniform(0.75, 1.25)
    haze = rng.uniform(0, 0.25 * difficulty) if rng.random() < 0.3 else 0.0
    # exposure, contrast and haze are one affine map per channel: img * scale + offset
    affine = np.zeros((3, 4), np.float32)
    affine[:, :3] = np.diag(gain * contrast * (1 - haze))
    affine[:, 3] = (m * (1 - contrast)) * (1 - haze) + haze * rng.uniform(0.6, 0.9)
    yy, xx = np.ogrid[-1:1:complex(0, h), -1:1:complex(0, w)]
    vig = (1 - rng.uniform(*style.vignette) * (xx.astype(np.float32) ** 2 + yy.astype(np.float32) ** 2) / 2)
    img = cv2.multiply(cv2.transform(img, affine), cv2.merge([vig, vig, vig]))
    img = cv2.pow(np.clip(img, 0, 1, out=img), rng.uniform(1 - 0.3 * difficulty, 1 + 0.4 * difficulty))
    if rng.random() < style.grey_prob:
        img = cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    sigma = rng.uniform(0, style.blur * difficulty) * w / 600
    if sigma > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    if rng.random() < 0.15 * difficulty:  # motion blur
        n = int(rng.integers(3, 10))
        kern = np.zeros((n, n), np.float32)
        kern[n // 2, :] = 1 / n
        rot = cv2.getRotationMatrix2D((n / 2 - 0.5, n / 2 - 0.5), rng.uniform(0, 180), 1)
        kern = cv2.warpAffine(kern, rot, (n, n))
        img = cv2.filter2D(img, -1, kern / max(kern.sum(), 1e-6))
    noise = np.empty((h, w), np.float32)
    cv2.setRNGSeed(int(rng.integers(2 ** 31)))  # sensor noise from OpenCV's (seeded) generator: fast
    cv2.randn(noise, 0.0, rng.uniform(0.003, 0.03))
    img += cv2.merge([noise, noise, noise])
    return cv2.convertScaleAbs(np.clip(img, 0, 1, out=img), alpha=255, beta=0.5)


def encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


# ---------------------------------------------------------------------------------------------
# The competition plan: who is photographed where, and the planted dirt
# ---------------------------------------------------------------------------------------------
def resolve_config(demo_cfg: dict | None) -> dict:
    """The ``demo:`` section of configs/default.yaml updated with ``demo_cfg``, validated.

    Raises DemoError naming the bad key.
    """
    from .config import load_config

    defaults = load_config()["demo"]
    cfg = {**defaults, **(demo_cfg or {})}
    unknown = sorted(set(cfg) - set(defaults))
    if unknown:
        raise DemoError(f"unknown demo config key(s): {', '.join('demo.' + k for k in unknown)}")
    for k, v in cfg.items():
        if k in ("width", "difficulty", "tail_alpha"):
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise DemoError(f"demo.{k} must be a non-negative integer, got {v!r}")
    wd = cfg["width"]
    if not (isinstance(wd, (list, tuple)) and len(wd) == 2 and all(isinstance(x, int) for x in wd)
            and 64 <= wd[0] <= wd[1]):
        raise DemoError(f"demo.width must be [min, max] pixel widths with 64 <= min <= max, got {wd!r}")
    for k in ("difficulty", "tail_alpha"):
        if not isinstance(cfg[k], (int, float)) or cfg[k] < 0:
            raise DemoError(f"demo.{k} must be a non-negative number, got {cfg[k]!r}")
    if cfg["n_individuals"] < 2 or cfg["max_images"] < 2:
        raise DemoError("demo.n_individuals and demo.max_images must be at least 2")
    return cfg


def _names(rng, n: int, taken: set, prefix: str = "", suffix: str = "", digits: int = 9) -> list[str]:
    out = []
    while len(out) < n:
        name = prefix + "".join(rng.choice(list("0123456789abcdef"), digits)) + suffix
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


def make_plan(cfg: dict) -> tuple[pd.DataFrame, list[dict]]:
    """Every photo to render and every dirt file to plant.

    Returns ``(photos, dirt)``: photos has one row per rendered image (split, Image, Id written
    to the CSV, truth Id, whale key, population) and dirt is a list of {kind, split, Image, Id,
    source?}.
    """
    rng = np.random.default_rng([cfg["seed"], 0])
    taken_ids, taken_names = set(), set()
    n_known = cfg["n_individuals"]
    sizes = np.arange(1, cfg["max_images"] + 1)
    p = sizes ** -float(cfg["tail_alpha"])
    counts = rng.choice(sizes, n_known, p=p / p.sum())
    counts[0], counts[-1] = cfg["max_images"], 1  # the tail's both ends always present
    known_ids = _names(rng, n_known, taken_ids, "w_", digits=7)
    unseen_ids = _names(rng, cfg["n_unseen"], taken_ids, "w_", digits=7)
    rows = []

    def add(split, key, truth, label=None, population="competition"):
        rows.append({"split": split, "key": key, "truth": truth, "Id": truth if label is None else label,
                     "population": population})

    for i, n in enumerate(counts):
        for _ in range(n):
            add("train", f"k{i}", known_ids[i])
    for i in range(cfg["n_new_whale"]):
        add("train", f"n{i}", f"new{i}", label=NEW_WHALE)
    # Test: unseen individuals mostly with >= 2 photos, the rest photos of known individuals.
    unseen_counts = rng.choice([1, 2, 3, 4], cfg["n_unseen"], p=[0.1, 0.4, 0.3, 0.2])
    while unseen_counts.sum() > cfg["n_test"] // 2 and unseen_counts.max() > 1:
        unseen_counts[np.argmax(unseen_counts)] -= 1
    for i, n in enumerate(unseen_counts):
        for _ in range(n):
            add("test", f"u{i}", unseen_ids[i])
    weight = counts ** 0.7 / (counts ** 0.7).sum()
    for i in rng.choice(n_known, max(0, cfg["n_test"] - int(unseen_counts.sum())), p=weight):
        add("test", f"k{i}", known_ids[i])
    pre_ids = _names(rng, cfg["n_pretrain_individuals"], taken_ids, "w_", digits=7)
    mean = max(1, cfg["pretrain_images"])
    for i, pid in enumerate(pre_ids):
        for _ in range(int(np.clip(1 + rng.poisson(mean - 1), 1, 3 * mean))):
            add("pretrain", f"p{i}", pid, population="related")
    photos = pd.DataFrame(rows, columns=["split", "key", "truth", "Id", "population"])
    photos["Image"] = _names(rng, len(photos), taken_names, suffix=".jpg")

    # Dirt in train: corrupt files and tiny images (extra photos of known whales), duplicates.
    dirt = []
    multi = [i for i in range(n_known) if counts[i] >= 2]
    kinds = ["truncated", "not_an_image", "empty"]
    for j in range(cfg["n_corrupt"]):
        i = rng.choice(multi)
        dirt.append({"kind": kinds[j % 3], "key": f"k{i}", "Id": known_ids[i]})
    for _ in range(cfg["n_tiny"]):
        i = rng.choice(multi)
        dirt.append({"kind": "tiny", "key": f"k{i}", "Id": known_ids[i]})
    train_known = photos.index[(photos.split == "train") & (photos.Id != NEW_WHALE)].to_numpy()
    for j, src in enumerate(rng.choice(train_known, min(cfg["n_duplicates"], len(train_known)), replace=False)):
        label = photos.at[src, "Id"]
        if j == 0:  # one duplicate pair disagrees on Id (label noise)
            label = rng.choice([x for x in known_ids if x != label])
        dirt.append({"kind": "duplicate", "key": photos.at[src, "key"], "Id": str(label), "source": int(src)})
    for d, name in zip(dirt, _names(rng, len(dirt), taken_names, suffix=".jpg")):
        d.update(split="train", Image=name)
    return photos, dirt


# ---------------------------------------------------------------------------------------------
# Writing the competition
# ---------------------------------------------------------------------------------------------
def _render_all(photos: pd.DataFrame, dirt: list[dict], cfg: dict, root: Path, progress: bool) -> list:
    from tqdm import tqdm

    from .paths import Paths

    paths = Paths(root, root)
    for split in ("train", "test", "pretrain"):
        paths.raw_dir(split).mkdir(parents=True, exist_ok=True)
    lo, hi = cfg["width"]
    boxes = [None] * len(photos)
    dirt_by_key = {}
    for d in dirt:
        if d["kind"] != "duplicate":
            dirt_by_key.setdefault(d["key"], []).append(d)
    bar = tqdm(total=len(photos) + len(dirt), desc="demo photos", unit="img", disable=not progress)
    kinds = {"k": 1, "u": 2, "n": 3, "p": 4}
    for key, group in photos.groupby("key", sort=False):
        style = RELATED if group["population"].iloc[0] == "related" else COMPETITION
        fluke = make_fluke(np.random.default_rng([cfg["seed"], 1, kinds[key[0]], int(key[1:])]), style)
        for idx, row in group.iterrows():
            rng = np.random.default_rng([cfg["seed"], 2, int(idx)])
            width = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
            img, _, box = photograph(fluke, rng, width, style, cfg["difficulty"])
            paths.raw_image(row["split"], row["Image"]).write_bytes(encode_jpeg(img, rng.integers(*style.jpeg)))
            boxes[idx] = None if box is None else (*box, img.shape[1], img.shape[0])
            bar.update()
        for j, d in enumerate(dirt_by_key.get(key, [])):
            rng = np.random.default_rng([cfg["seed"], 3, int(d["Image"][:7], 16), j])
            img, _, _ = photograph(fluke, rng, max(lo, 160), style, cfg["difficulty"])
            if d["kind"] == "tiny":  # a thumbnail: shorter side well below any sensible clean.min_side
                tw = int(rng.integers(30, 44))
                img = cv2.resize(img, (tw, max(8, tw * img.shape[0] // img.shape[1])), interpolation=cv2.INTER_AREA)
            data = encode_jpeg(img, 85)
            if d["kind"] == "truncated":
                data = data[: int(len(data) * rng.uniform(0.3, 0.7))]
            elif d["kind"] == "not_an_image":
                data = b"<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"
            elif d["kind"] == "empty":
                data = b""
            paths.raw_image("train", d["Image"]).write_bytes(data)
            bar.update()
    for d in dirt:
        if d["kind"] == "duplicate":
            src = photos.loc[d["source"]]
            shutil.copyfile(paths.raw_image(src["split"], src["Image"]), paths.raw_image("train", d["Image"]))
            bar.update()
    bar.close()
    return boxes


def _write_tables(photos, dirt, boxes, cfg, root: Path) -> dict:
    from .io import write_csv
    from .paths import Paths

    paths = Paths(root, root)
    train = pd.concat([photos.loc[photos.split == "train", ["Image", "Id"]],
                       pd.DataFrame([{"Image": d["Image"], "Id": d["Id"]} for d in dirt], columns=["Image", "Id"])])
    write_csv(paths.raw_train_csv, train.sort_values("Image"))
    test = photos[photos.split == "test"]
    write_csv(paths.truth_csv, test[["Image", "truth"]].rename(columns={"truth": "Id"}).sort_values("Image"))
    pre = photos[photos.split == "pretrain"]
    write_csv(paths.raw_pretrain_csv, pre[["Image", "Id"]].sort_values("Image"))
    # Boxes: train + pretrain photos (never dirt or test), drawn at random.
    rng = np.random.default_rng([cfg["seed"], 4])
    cand = [i for i in photos.index[photos.split != "test"] if boxes[i] is not None]
    chosen = sorted(rng.choice(cand, min(cfg["n_boxes"], len(cand)), replace=False)) if cand else []
    rows = []
    for i in chosen:
        x0, y0, x1, y1, iw, ih = boxes[i]
        rows.append(["fluke", x0, y0, x1 - x0 + 1, y1 - y0 + 1, photos.at[i, "Image"], iw, ih])
    write_csv(paths.raw_boxes_csv, pd.DataFrame(rows, columns=BOX_COLUMNS))
    train_ids = train.loc[train.Id != NEW_WHALE, "Id"]
    per_id = train_ids.value_counts()
    return {
        "train_rows": len(train), "train_individuals": int(per_id.size), "singletons": int((per_id == 1).sum()),
        "new_whale_rows": int((train.Id == NEW_WHALE).sum()), "test_images": len(test),
        "test_unseen_images": int((~test.truth.isin(set(train_ids))).sum()),
        "test_unseen_individuals": int(test.loc[~test.truth.isin(set(train_ids)), "truth"].nunique()),
        "pretrain_rows": len(pre), "pretrain_individuals": int(pre.Id.nunique()), "boxes": len(rows),
        "corrupt": sum(d["kind"] in ("truncated", "not_an_image", "empty") for d in dirt),
        "tiny": sum(d["kind"] == "tiny" for d in dirt), "duplicates": sum(d["kind"] == "duplicate" for d in dirt),
    }


def _move_into(tmp: Path, out: Path) -> None:
    """Rename the finished competition onto ``out`` (train.csv last, as it marks completion)."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        os.replace(tmp, out)
        return
    for name in ENTRIES:
        if (tmp / name).exists():
            os.replace(tmp / name, out / name)
    shutil.rmtree(tmp, ignore_errors=True)


def generate(out_dir, demo_cfg: dict | None = None, progress: bool = True) -> dict:
    """Write the demo competition into ``out_dir``; returns summary counts (plus seconds, bytes)."""
    start = time.time()
    out = Path(out_dir).resolve()
    cfg = resolve_config(demo_cfg)
    if (out / "train.csv").exists():
        raise FileExistsError(f"{out} already holds a competition (train.csv); remove it or choose another --out")
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out} exists and is not a folder")
    clash = [n for n in ENTRIES if (out / n).exists()]
    if clash:
        raise DemoError(f"{out} already has {', '.join(clash)} but no train.csv; remove them or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # small images: OpenCV's thread pool costs more than it saves
    try:
        photos, dirt = make_plan(cfg)
        boxes = _render_all(photos, dirt, cfg, tmp, progress)
        summary = _write_tables(photos, dirt, boxes, cfg, tmp)
        summary["bytes"] = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        _move_into(tmp, out)
    finally:
        cv2.setNumThreads(threads)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    summary["seconds"] = round(time.time() - start, 2)
    return summary


# ---------------------------------------------------------------------------------------------
# A contact sheet to look at the competition
# ---------------------------------------------------------------------------------------------
def contact_sheet(raw_dir, dest, n_whales: int = 6, per_whale: int = 6, thumb: int = 220):
    """PNG grid: rows = the most photographed train whales (+ one pretrain whale), boxes in green."""
    from .io import atomic_path, read_image
    from .paths import Paths

    paths = Paths(raw_dir, raw_dir)
    train = pd.read_csv(paths.raw_train_csv, dtype=str, keep_default_na=False)
    pre = pd.read_csv(paths.raw_pretrain_csv, dtype=str, keep_default_na=False)
    boxes = pd.read_csv(paths.raw_boxes_csv).set_index("image_name")
    known = train[train.Id != NEW_WHALE]
    ids = list(known.Id.value_counts().index[:n_whales])
    groups = [("train", i, known[known.Id == i].Image.tolist()) for i in ids]
    top_pre = pre.Id.value_counts().index[0]
    groups.append(("pretrain", top_pre, pre[pre.Id == top_pre].Image.tolist()))
    groups.append(("train", "new_whale (one-offs)", train[train.Id == NEW_WHALE].Image.tolist()))
    sheet = np.full((len(groups) * (thumb // 2 + 24), per_whale * thumb, 3), 255, np.uint8)
    for r, (split, label, names) in enumerate(groups):
        for c, name in enumerate(names[:per_whale]):
            try:
                img = read_image(paths.raw_image(split, name))
            except OSError:
                continue
            if name in boxes.index:
                b = boxes.loc[name]
                cv2.rectangle(img, (int(b.bbox_x), int(b.bbox_y)),
                              (int(b.bbox_x + b.bbox_width - 1), int(b.bbox_y + b.bbox_height - 1)), (0, 255, 0),
                              max(1, img.shape[1] // 200))
            s = min(thumb / img.shape[1], (thumb // 2) / img.shape[0])
            img = cv2.resize(img, (max(1, int(img.shape[1] * s)), max(1, int(img.shape[0] * s))),
                             interpolation=cv2.INTER_AREA)
            y, x = r * (thumb // 2 + 24) + 20, c * thumb
            sheet[y:y + img.shape[0], x:x + img.shape[1]] = img
        cv2.putText(sheet, f"{split}: {label}", (4, r * (thumb // 2 + 24) + 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    with atomic_path(dest) as tmp:
        tmp.write_bytes(buf.tobytes())
    return Path(dest)


def main(argv=None) -> int:
    from .config import ConfigError, load_config

    ap = argparse.ArgumentParser(prog="python -m common.demo_data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder to create the competition in (must not hold train.csv)")
    ap.add_argument("--config", default=os.environ.get("CONFIG", "configs/demo.yaml"),
                    help="profile YAML merged over configs/default.yaml; its demo: section is used")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set demo.seed=3 (repeatable)")
    ap.add_argument("--sheet", default=None, metavar="PNG", help="also write a contact sheet PNG here")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        summary = generate(args.out, cfg["demo"], progress=not args.quiet)
    except (ConfigError, DemoError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("demo competition in {}: {}".format(args.out, ", ".join(f"{k}={v}" for k, v in summary.items())))
    if args.sheet:
        print(f"contact sheet: {contact_sheet(args.out, args.sheet)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
