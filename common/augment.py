"""Image augmentation (albumentations 2.x): the Humpback winners' heavy training set, plain validation.

``strength`` scales every probability and magnitude (0 = resize + normalise only, 1 = default,
up to 2 = harsher). The image is resized first so every transform runs at model resolution,
which keeps CPU training at 128-160 px cheap. There is no horizontal flip in here: the dataset
flips (``augment.hflip: new_identity`` trains a mirrored fluke as a new whale) and TTA averages
an image with its mirror.

Albumentations keeps its own random state: pass ``seed`` for a reproducible stream and, with
DataLoader workers, reseed per worker (``transform.set_random_seed(seed + worker_id)``).
"""
from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no version check over the network

import cv2  # noqa: E402
import albumentations as A  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402

from .config import ConfigError

MAX_STRENGTH = 2.0


def image_hw(img_size) -> tuple[int, int]:
    """``160`` -> (160, 160); ``[128, 256]`` -> (128, 256) (height, width).

    >>> image_hw(160), image_hw([128, 256])
    ((160, 160), (128, 256))
    """
    if isinstance(img_size, (list, tuple)):
        if len(img_size) != 2:
            raise ConfigError(f"img_size must be an int or [height, width], not {img_size!r}")
        h, w = (int(v) for v in img_size)
    else:
        h = w = int(img_size)
    if h < 8 or w < 8:
        raise ConfigError(f"img_size {img_size!r} is too small (minimum 8 px)")
    return h, w


def build_transforms(img_size, mean, std, train: bool, strength: float = 1.0, seed: int | None = None) -> A.Compose:
    """Compose producing ``{"image": float32 tensor 3xHxW}`` from an RGB uint8 ``image``."""
    s = float(strength)
    if not 0.0 <= s <= MAX_STRENGTH:
        raise ConfigError(f"augment strength must be in [0, {MAX_STRENGTH}], not {strength!r}")
    h, w = image_hw(img_size)
    resize = [A.Resize(h, w, interpolation=cv2.INTER_AREA)]
    finish = [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()]
    heavy = _heavy(h, s) if train and s > 0 else []
    return A.Compose(resize + heavy + finish, seed=seed)


def _heavy(h: int, s: float) -> list:
    """Geometry, then photometry, then degradations, then occlusion; ``s`` scales everything."""

    def p(base: float) -> float:
        return min(1.0, base * s)

    def sym(v: float) -> tuple[float, float]:
        return (-v * s, v * s)

    blur = max(3, int(round(7 * min(s, 1.5))) | 1)  # odd kernel, grows with strength
    border = {"border_mode": cv2.BORDER_CONSTANT, "fill": 0}
    return [
        A.Affine(scale=(1 - 0.15 * min(s, 1.5), 1 + 0.15 * s), translate_percent=sym(0.06), rotate=sym(12),
                 shear=sym(8), p=p(0.8), **border),
        A.OneOf([
            A.Perspective(scale=(0.01, 0.01 + 0.06 * s), p=1.0, **border),
            A.ElasticTransform(alpha=0.5 * h * min(s, 1.5), sigma=0.08 * h, approximate=True, p=1.0, **border),
        ], p=p(0.3)),
        A.OneOf([
            A.RGBShift(r_shift_limit=sym(15), g_shift_limit=sym(15), b_shift_limit=sym(15), p=1.0),
            A.HueSaturationValue(hue_shift_limit=sym(10), sat_shift_limit=sym(25), val_shift_limit=sym(15), p=1.0),
        ], p=p(0.4)),
        A.RandomBrightnessContrast(brightness_limit=sym(0.2), contrast_limit=sym(0.2), p=p(0.5)),
        A.ToGray(p=p(0.1)),  # some fluke photos are black-and-white
        A.OneOf([
            A.CLAHE(clip_limit=(1.0, 1.0 + 3.0 * s), tile_grid_size=(4, 4), p=1.0),
            A.Sharpen(alpha=(0.05, 0.05 + 0.3 * min(s, 1.5)), lightness=(0.8, 1.0), p=1.0),
            A.Emboss(alpha=(0.05, 0.05 + 0.3 * min(s, 1.5)), strength=(0.2, 0.2 + 0.5 * s), p=1.0),
        ], p=p(0.3)),
        A.OneOf([
            A.GaussNoise(std_range=(0.01, 0.01 + 0.05 * s), p=1.0),
            A.GaussianBlur(blur_limit=(3, blur), sigma_limit=(0.1, 0.1 + 1.0 * s), p=1.0),
            A.MotionBlur(blur_limit=(3, blur), p=1.0),
        ], p=p(0.3)),
        A.RandomRain(slant_range=(-10, 10), drop_length=max(1, h // 16), drop_width=1, blur_value=3,
                     brightness_coefficient=0.9, rain_type="drizzle", p=p(0.1)),
        A.CoarseDropout(num_holes_range=(1, max(1, int(round(3 * s)))),
                        hole_height_range=(0.05, min(0.5, 0.05 + 0.15 * s)),
                        hole_width_range=(0.05, min(0.5, 0.05 + 0.15 * s)), fill=0, p=p(0.4)),
    ]


def preview(image_paths, out_png, img_size, mean, std, strength: float = 1.0, n_aug: int = 6, seed: int = 0):
    """Save a grid PNG: each row one image, its validation view then ``n_aug`` training draws."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .io import read_image, save_figure

    val = build_transforms(img_size, mean, std, train=False)
    aug = build_transforms(img_size, mean, std, train=True, strength=strength, seed=seed)
    m, sd = np.asarray(mean).reshape(3, 1, 1), np.asarray(std).reshape(3, 1, 1)

    def show(t):
        return np.clip(t.numpy() * sd + m, 0, 1).transpose(1, 2, 0)

    rows = list(image_paths)
    fig, axes = plt.subplots(len(rows), n_aug + 1, figsize=(1.6 * (n_aug + 1), 1.6 * len(rows)), squeeze=False)
    for r, path in enumerate(rows):
        img = read_image(path)
        views = [val(image=img)["image"]] + [aug(image=img)["image"] for _ in range(n_aug)]
        for c, v in enumerate(views):
            axes[r, c].imshow(show(v))
            axes[r, c].axis("off")
        axes[r, 0].set_title("val" if r == 0 else "", fontsize=8)
    fig.suptitle(f"augmentation, strength {strength}", fontsize=9)
    return save_figure(fig, out_png)
