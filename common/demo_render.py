"""Rendering of the demo's synthetic fluke photos: styles, individual flukes, sea, pose, camera.

A :class:`Fluke` is one individual (outline and underside pattern, see :func:`make_fluke`);
:func:`photograph` renders it in a scene with a random pose, water line, sea, lighting and camera
artefacts and returns the photo with the fluke's tight box. Everything is a pure function of the
random generators passed in. :mod:`common.demo_data` plans and writes the competition.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

# Canonical fluke canvas (pixels): tips at u = ±1, i.e. x = CX ± HALF; notch near (CX, Y0).
CW, CH, CX, HALF, Y0 = 512, 320, 256.0, 236.0, 130.0
_X, _Y = np.meshgrid(np.arange(CW, dtype=np.float32), np.arange(CH, dtype=np.float32))
_U = (_X[0] - CX) / HALF


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
