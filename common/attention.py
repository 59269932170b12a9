"""Attention crops: where the animal is, from an ImageNet backbone's activation map (no boxes needed).

Without annotated boxes there is no detector to crop with; the fast.ai "bag of tricks" seed trick
crops with the activation map of a frozen ImageNet backbone instead. Each photo is resized to
``size`` x ``size`` (plain resize: the map is mapped back to source pixels axis by axis) and
run through ``tf_efficientnet_lite0`` with the offline ImageNet weights (built by
``common.models.build_model``, weights from ``common.weights``). The map is

* ``norm`` -- the channel L2 norm of the last feature map (``forward_features``), or
* ``cam`` -- the class-activation map of the top ImageNet class (classifier weights x features),

upsampled to ``size`` px and normalised to [0, 1]. Pixels at or above ``threshold`` are kept, the
largest connected component (``cv2.connectedComponentsWithStats``) gives the box in source pixels.
The photo has no usable box (``None``: the caller uses the whole image, fallback=1, exactly as for
a detector box below its confidence) when the map is flat (relative contrast below ``min_contrast``)
or the component covers less than ``min_area`` of the image. The score of a box is the map's
contrast between the component and the rest, in [0, 1].

>>> m = np.zeros((8, 8), np.float32); m[2:4, 3:7] = 1.0
>>> component_box(m, threshold=0.5, min_area=0.01)
(3, 2, 7, 4, 0.125)
>>> component_box(np.zeros((8, 8), np.float32), threshold=0.5, min_area=0.01) is None
True
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

BACKBONE = "tf_efficientnet_lite0"
MAPS = ("norm", "cam")
STRIDE = 32  # of the last feature map
PAD = 32  # px of mirrored border around the resized photo, cut off the map again (see raw_maps)
MIN_CONTRAST = 0.15
FLAT_STD = 4.0  # grey-level std (of 255) of the resized photo below which it is flat: its map is all zeros  # (max - median) / max of the raw map below this: nothing stands out (flat photo)


def normalise(m: np.ndarray) -> np.ndarray:
    """Scale a map to [0, 1] (min -> 0, max -> 1); a constant map becomes all zeros."""
    m = np.asarray(m, np.float32)
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi - lo > 1e-12 else np.zeros_like(m)


def contrast(raw: np.ndarray) -> float:
    """How much the strongest activation stands out: ``(max - median) / max`` of a non-negative map."""
    hi = float(np.max(raw))
    return 0.0 if hi <= 1e-12 else float((hi - np.median(raw)) / hi)


def component_box(m: np.ndarray, *, threshold: float, min_area: float, merge: float = 1.0):
    """``(x0, y0, x1, y1, share of the map)`` of the largest connected component of ``m >= threshold``
    (``m`` in [0, 1]; box in map pixels, x1/y1 exclusive), or None when it covers < ``min_area``.

    Components of at least ``merge`` times the largest one's area join its box (both tips of a
    fluke whose notch is dimmer than the threshold); ``merge=1`` keeps the largest alone."""
    import cv2

    mask = (np.asarray(m) >= threshold).astype(np.uint8)
    if not mask.any():
        return None
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n < 2:
        return None
    areas = stats[1:, cv2.CC_STAT_AREA]
    best = int(np.argmax(areas))
    if areas[best] / mask.size < min_area:
        return None
    keep = [i for i in range(len(areas)) if i == best or areas[i] >= merge * areas[best]]
    s = stats[1:][keep]
    x0, y0 = int(s[:, 0].min()), int(s[:, 1].min())
    x1, y1 = int((s[:, 0] + s[:, 2]).max()), int((s[:, 1] + s[:, 3]).max())
    return x0, y0, x1, y1, round(float(areas[keep].sum()) / mask.size, 4)


@functools.lru_cache(maxsize=2)
def _network(kind: str, device: str):
    """(frozen backbone, mean, std, ImageNet classifier (weight, bias) or None) -- built once per process."""
    import torch

    from .models import build_model

    model = build_model({"backbone": BACKBONE, "pretrained": "imagenet", "img_size": 224, "emb_dim": 1,
                         "dropout": 0.0, "pool": "avg", "gem_p": 3.0, "drop_path": 0.0})
    backbone = model.backbone.eval().to(torch.device(device))
    classifier = None
    if kind == "cam":  # the classifier of the same offline weights
        import timm

        from .weights import load_offline_imagenet

        net = timm.create_model(BACKBONE, pretrained=False)
        load_offline_imagenet(net, BACKBONE)
        fc = net.get_classifier()
        classifier = fc.weight.detach().to(device), fc.bias.detach().to(device)
    return backbone, model.mean, model.std, classifier


class AttentionCropper:
    """``cropper(list of RGB arrays) -> [(x0, y0, x1, y1, score) | None]`` in source pixels, the same
    contract as ``common.detector.FlukeDetector``; ``maps(images)`` gives the [0, 1] maps for plots."""

    def __init__(self, *, size: int = 320, threshold: float = 0.5, min_area: float = 0.02, merge: float = 1.0,
                 kind: str = "norm", device="cpu", min_side: int = 0):
        import torch

        from .cropping import CropConfigError

        if kind not in MAPS:
            raise CropConfigError(f"crop.attention_map={kind!r}; expected one of {MAPS}")
        if not 0.0 < float(threshold) < 1.0 or int(size) < 32:
            raise CropConfigError(f"crop.attention_threshold must be in (0, 1) and crop.attention_size >= 32 "
                                   f"(got {threshold}, {size})")
        self.size, self.threshold, self.min_area, self.kind = int(size), float(threshold), float(min_area), kind
        self.merge, self.min_side = float(merge), int(min_side or 0)
        self.device = torch.device(device)
        self.backbone, mean, std, self.classifier = _network(kind, str(self.device))
        self.mean = torch.tensor(mean).view(1, 3, 1, 1).to(self.device)
        self.std = torch.tensor(std).view(1, 3, 1, 1).to(self.device)

    def raw_maps(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Non-negative activation maps at ``size`` x ``size`` px, one per RGB image (any sizes)."""
        import cv2
        import torch

        if not images:
            return []
        p = PAD
        small = [cv2.resize(im, (self.size, self.size), interpolation=cv2.INTER_AREA) for im in images]
        flat = [float(cv2.cvtColor(s, cv2.COLOR_RGB2GRAY).std()) < FLAT_STD for s in small]
        x = np.stack([cv2.copyMakeBorder(s, p, p, p, p, cv2.BORDER_REFLECT_101) for s in small])
        x = torch.from_numpy(x).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        with torch.inference_mode():
            f = self.backbone.forward_features((x - self.mean) / self.std)  # (B, C, h, w)
            if self.classifier is None:
                m = f.float().pow(2).sum(1).sqrt()
            else:
                w, b = self.classifier
                top = (f.mean((2, 3)) @ w.T + b).argmax(1)
                m = torch.einsum("bchw,bc->bhw", f.float(), w[top]).clamp_(min=0)
            c = p // STRIDE  # feature cells of the mirrored border: its zero-padding artifacts go with it
            m = m[:, c:m.shape[1] - c, c:m.shape[2] - c]
        # a flat photo (no texture) gets a flat map: the backbone's own response to it is padding artifacts
        return [np.zeros((self.size, self.size), np.float32) if is_flat else
                cv2.resize(a, (self.size, self.size), interpolation=cv2.INTER_LINEAR)
                for a, is_flat in zip(m.cpu().numpy().astype(np.float32), flat)]

    def maps(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """The [0, 1] maps the boxes are taken from."""
        return [normalise(m) for m in self.raw_maps(images)]

    def box(self, raw: np.ndarray, width: int, height: int):
        """Box ``(x0, y0, x1, y1, score)`` in the pixels of a ``width`` x ``height`` source, or None."""
        c = contrast(raw)
        if c < MIN_CONTRAST:
            return None
        m = normalise(raw)
        found = component_box(m, threshold=self.threshold, min_area=self.min_area, merge=self.merge)
        if found is None:
            return None
        x0, y0, x1, y1, _ = found
        inside = np.zeros(m.shape, bool)
        inside[y0:y1, x0:x1] = True
        score = float(m[inside].mean() - (m[~inside].mean() if (~inside).any() else 0.0))
        sx, sy = width / m.shape[1], height / m.shape[0]
        return x0 * sx, y0 * sy, x1 * sx, y1 * sy, round(max(0.0, min(1.0, score)), 4)

    def __call__(self, images: list[np.ndarray]) -> list[tuple | None]:
        """Photos whose longer side is at most ``min_side`` px get None (whole image) without a map:
        they are close crops already (face or body crops of a few hundred px)."""
        out: list[tuple | None] = [None] * len(images)
        big = [i for i, im in enumerate(images) if max(im.shape[:2]) > self.min_side]
        if big:
            for i, r in zip(big, self.raw_maps([images[i] for i in big])):
                out[i] = self.box(r, images[i].shape[1], images[i].shape[0])
        return out


# ---- by eye: a contact sheet of attention boxes on any photos -------------------------------------
def overlay(img: np.ndarray, m: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The photo with the [0, 1] map ``m`` blended on top as a jet heat map (RGB uint8)."""
    import cv2

    heat = cv2.applyColorMap((cv2.resize(m, (img.shape[1], img.shape[0])) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(img, 1 - alpha, cv2.cvtColor(heat, cv2.COLOR_BGR2RGB), alpha, 0)


def contact_sheet(photos, dest, cropper: AttentionCropper, *, margin: float, max_area: float = 1.0, cols: int = 4):
    """PNG of every photo with its attention heat map and crop box (green: crop; red title: whole image)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from .cropping import crop_region
    from .io import read_image, save_figure

    photos = list(photos)
    images = [read_image(p) for p in photos]
    raws = cropper.raw_maps(images)
    rows = -(-len(images) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, p, im, raw in zip(axes.ravel(), photos, images, raws):
        x0, y0, x1, y1, score, fb = crop_region(cropper.box(raw, im.shape[1], im.shape[0]), im.shape[1], im.shape[0],
                                                conf=0.0, margin=margin, max_area=max_area)
        ax.imshow(overlay(im, normalise(raw)))
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=2, ec="red" if fb else "lime"))
        ax.set_title(f"{Path(p).name[:16]} {'full' if fb else 'cam'} {score:.2f}", fontsize=8,
                     color="red" if fb else "black")
    fig.suptitle(f"attention crops ({cropper.kind} map >= {cropper.threshold}, merge {cropper.merge}, {cropper.size} px, "
                 f"margin {margin}, max area {max_area})",
                 fontsize=10)
    return save_figure(fig, dest)


def main(argv=None) -> int:
    """``python -m common.attention PHOTO... --out sheet.png``: attention boxes of any photos, by eye."""
    import argparse

    from .config import default_config

    crop = default_config()["crop"]
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("photos", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--map", default=crop["attention_map"], choices=MAPS)
    ap.add_argument("--threshold", type=float, default=crop["attention_threshold"])
    ap.add_argument("--size", type=int, default=crop["attention_size"])
    ap.add_argument("--min-area", type=float, default=crop["attention_min_area"])
    ap.add_argument("--merge", type=float, default=crop["attention_merge"])
    ap.add_argument("--max-area", type=float, default=crop["attention_max_area"])
    ap.add_argument("--margin", type=float, default=crop["margin"])
    a = ap.parse_args(argv)
    cropper = AttentionCropper(size=a.size, threshold=a.threshold, min_area=a.min_area, merge=a.merge,
                               kind=a.map)
    print(contact_sheet(a.photos, a.out, cropper, margin=a.margin, max_area=a.max_area))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
