import warnings

import albumentations as A
import numpy as np
import pytest
import torch

from common.augment import build_transforms, image_hw, preview

MEAN = STD = (0.5, 0.5, 0.5)


def _image(h=90, w=140, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _names(compose):
    out = []
    for t in compose.transforms:
        out.append(type(t).__name__)
        if isinstance(t, A.BaseCompose):
            out += _names(t)
    return out


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("strength", [0.0, 1.0])
@pytest.mark.parametrize("size", [64, [48, 96]])
def test_output_shape_and_dtype(train, strength, size):
    tf = build_transforms(size, MEAN, STD, train=train, strength=strength, seed=0)
    h, w = image_hw(size)
    for seed in range(3):
        x = tf(image=_image(seed=seed))["image"]
        assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and tuple(x.shape) == (3, h, w)
        assert torch.isfinite(x).all()


def test_strength_zero_is_the_validation_pipeline():
    img = _image()
    val = build_transforms(64, MEAN, STD, train=False)(image=img)["image"]
    train0 = build_transforms(64, MEAN, STD, train=True, strength=0.0)(image=img)["image"]
    assert torch.equal(val, train0)


def test_validation_normalises_with_given_mean_std():
    img = np.full((40, 50, 3), 255, dtype=np.uint8)
    img[..., 2] = 0
    x = build_transforms(32, (0.4, 0.5, 0.6), (0.2, 0.25, 0.5), train=False)(image=img)["image"]
    expected = [(1 - 0.4) / 0.2, (1 - 0.5) / 0.25, (0 - 0.6) / 0.5]
    for c in range(3):
        assert torch.allclose(x[c], torch.full_like(x[c], expected[c]), atol=1e-5)


def test_training_draws_vary_and_are_reproducible_with_a_seed():
    img = _image()
    a = build_transforms(64, MEAN, STD, train=True, seed=3)
    b = build_transforms(64, MEAN, STD, train=True, seed=3)
    draws_a = [a(image=img)["image"] for _ in range(6)]
    draws_b = [b(image=img)["image"] for _ in range(6)]
    assert all(torch.equal(x, y) for x, y in zip(draws_a, draws_b))
    val = build_transforms(64, MEAN, STD, train=False)(image=img)["image"]
    assert sum(not torch.equal(x, val) for x in draws_a) >= 4
    assert len({x.sum().item() for x in draws_a}) >= 4


def test_stronger_augmentation_moves_images_further():
    img = np.asarray(np.mgrid[0:80, 0:120][1] * 2, dtype=np.uint8)[..., None].repeat(3, axis=2)
    val = build_transforms(64, MEAN, STD, train=False)(image=img)["image"]

    def mean_change(strength):
        tf = build_transforms(64, MEAN, STD, train=True, strength=strength, seed=0)
        return np.mean([(tf(image=img)["image"] - val).abs().mean().item() for _ in range(40)])

    assert mean_change(0.3) < mean_change(1.0) < mean_change(2.0)


def test_heavy_set_is_complete_and_has_no_flip():
    names = _names(build_transforms(64, MEAN, STD, train=True))
    for want in ["GaussNoise", "GaussianBlur", "MotionBlur", "RandomRain", "RGBShift", "RandomBrightnessContrast",
                 "HueSaturationValue", "CLAHE", "Sharpen", "Emboss", "Perspective", "ElasticTransform", "Affine",
                 "CoarseDropout"]:
        assert want in names
    assert not any("Flip" in n or "Transpose" in n for n in names)
    assert _names(build_transforms(64, MEAN, STD, train=False)) == ["Resize", "Normalize", "ToTensorV2"]


def test_no_deprecation_or_other_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tf = build_transforms(64, MEAN, STD, train=True, strength=2.0, seed=0)
        for _ in range(20):
            tf(image=_image())


def test_bad_arguments():
    with pytest.raises(ValueError, match="strength"):
        build_transforms(64, MEAN, STD, train=True, strength=-1)
    with pytest.raises(ValueError, match="img_size"):
        build_transforms([64, 64, 3], MEAN, STD, train=True)


def test_preview_writes_png(tmp_path):
    import cv2

    for i in range(2):
        cv2.imwrite(str(tmp_path / f"{i}.png"), _image(seed=i))
    out = preview([tmp_path / "0.png", tmp_path / "1.png"], tmp_path / "aug.png", 48, MEAN, STD, n_aug=2)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.png", "1.png", "aug.png"]
