"""SIFT/RootSIFT and XFeat features, geometric verification and the per-image feature cache."""
import os

import cv2
import numpy as np
import pytest

from common.local_features import compute_features, extract, match_pair, resize_longest


def scene(seed, size=320):
    """A textured synthetic image: random filled shapes and lines over smooth noise."""
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.uniform(0, 255, (size, size)).astype(np.uint8), (0, 0), 3)
    img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    for _ in range(60):
        c = tuple(int(v) for v in rng.integers(0, 256, 3))
        p = rng.integers(0, size, 2)
        if rng.random() < 0.5:
            cv2.circle(img, (int(p[0]), int(p[1])), int(rng.integers(4, 25)), c, -1)
        else:
            q = p + rng.integers(-40, 40, 2)
            cv2.rectangle(img, (int(p[0]), int(p[1])), (int(q[0]), int(q[1])), c, -1)
    return img


def transformed(img):
    """Rotated 25 degrees, scaled 0.75, then cropped to its central 80 %."""
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), 25, 0.75)
    out = cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_REFLECT)
    return out[h // 10: h - h // 10, w // 10: w - w // 10]


def test_matcher_many_inliers_for_a_transformed_copy_few_for_unrelated_or_mirrored():
    a = extract(scene(1), size=320, max_keypoints=500)
    h = dict(geometry="homography")  # the one model both methods (magsac, ransac) apply to
    same = match_pair(a, extract(transformed(scene(1)), 320, 500), ratio=0.8, threshold=5.0, method="magsac", **h)
    other = max(match_pair(a, extract(scene(s), 320, 500), **h) for s in (2, 3))
    mirrored = match_pair(a, extract(scene(1)[:, ::-1].copy(), 320, 500), **h)
    assert same >= 40, same
    assert other <= 8, other
    assert mirrored <= 8, mirrored
    assert match_pair(a, extract(transformed(scene(1)), 320, 500), method="ransac", **h) >= 40


@pytest.mark.parametrize("geometry", ["affine", "homography", "fundamental"])
def test_every_geometry_counts_many_inliers_for_a_transformed_copy_few_for_unrelated(geometry):
    a = extract(scene(1), size=320, max_keypoints=500)
    same = match_pair(a, extract(transformed(scene(1)), 320, 500), geometry=geometry)
    other = max(match_pair(a, extract(scene(s), 320, 500), geometry=geometry) for s in (2, 3))
    mirrored = match_pair(a, extract(scene(1)[:, ::-1].copy(), 320, 500), geometry=geometry)
    assert same >= 40 and other <= 8 and mirrored <= 8, (same, other, mirrored)
    n, pairs = match_pair(a, extract(transformed(scene(1)), 320, 500), geometry=geometry, return_matches=True)
    assert n == len(pairs) == same


def test_xfeat_matches_a_transformed_copy_by_mutual_neighbours_and_not_unrelated_or_mirrored(tmp_path):
    a = extract(scene(1), size=320, max_keypoints=500, kind="xfeat")
    assert len(a) == 500 and a.desc.shape == (500, 64)
    np.testing.assert_allclose(np.linalg.norm(a.desc, axis=1), 1.0, atol=1e-3)
    same = match_pair(a, extract(transformed(scene(1)), 320, 500, "xfeat"), matcher="mutual")
    other = max(match_pair(a, extract(scene(s), 320, 500, "xfeat"), matcher="mutual") for s in (2, 3))
    mirrored = match_pair(a, extract(scene(1)[:, ::-1].copy(), 320, 500, "xfeat"), matcher="mutual")
    assert same >= 100 and other <= 20 and mirrored <= 30, (same, other, mirrored)
    # cached apart from SIFT's: another kind is another key, so neither file is read as the other
    p = tmp_path / "im.png"
    cv2.imwrite(str(p), scene(5, 160))
    items = [("train", p.name, str(p))]
    _, c1 = compute_features(items, tmp_path / "c", 200, 200, progress=False, kind="xfeat")
    got, c2 = compute_features(items, tmp_path / "c", 200, 200, progress=False, kind="xfeat")
    sift, c3 = compute_features(items, tmp_path / "c", 200, 200, progress=False)
    assert (c1["computed"], c2["cached"], c3["computed"]) == (1, 1, 1)
    assert got[0].desc.shape[1] == 64 and sift[0].desc.shape[1] == 128


def test_an_unknown_geometry_or_method_is_a_config_error_before_any_matching(tmp_path):
    import pandas as pd

    from common.config import ConfigError, load_config
    from common.rerank import LocalScorer

    r = load_config(None)["rerank"]
    for key in ("geometry", "method"):
        with pytest.raises(ConfigError, match=f"rerank.{key} must be one of"):
            LocalScorer(pd.DataFrame(columns=["split", "Image", "path"]), {**r, key: "perspective"}, tmp_path)


def test_threads_auto_uses_every_usable_core_and_a_bad_value_is_a_config_error(tmp_path):
    import os

    import pandas as pd

    from common.config import ConfigError, load_config
    from common.rerank import LocalScorer

    r = load_config(None)["rerank"]
    empty = pd.DataFrame(columns=["split", "Image", "path"])
    assert r["threads"] == "auto"
    assert LocalScorer(empty, r, tmp_path).r["threads"] == len(os.sched_getaffinity(0))
    assert LocalScorer(empty, {**r, "threads": 1}, tmp_path).r["threads"] == 1
    for bad in (0, "many", 1.5, True):
        with pytest.raises(ConfigError, match="rerank.threads must be auto or a whole number >= 1"):
            LocalScorer(empty, {**r, "threads": bad}, tmp_path)


def test_small_images_are_upscaled_and_rootsift_is_unit_norm():
    small = cv2.resize(scene(4), (80, 60))
    up, f = resize_longest(small, 320)
    assert up.shape[:2] == (240, 320) and f == 4.0
    feats = extract(small, size=320, max_keypoints=100)
    assert 0 < len(feats) <= 100
    np.testing.assert_allclose(np.linalg.norm(feats.desc, axis=1), 1.0, atol=1e-3)
    assert feats.xy.max() <= 320


def test_feature_cache_is_reused_until_the_image_changes(tmp_path):
    items = []
    for i in range(3):
        p = tmp_path / f"im{i}.png"
        cv2.imwrite(str(p), scene(10 + i, 160))
        items.append(("train", p.name, str(p)))
    cache = tmp_path / "cache"
    first, c1 = compute_features(items, cache, size=200, max_keypoints=200, threads=2, progress=False)
    again, c2 = compute_features(items, cache, size=200, max_keypoints=200, threads=2, progress=False)
    assert c1 == {"cached": 0, "computed": 3} and c2 == {"cached": 3, "computed": 0}
    assert all(np.array_equal(a.desc, b.desc) for a, b in zip(first, again))
    assert (cache / "train" / "im0.png.npz").exists()
    cv2.imwrite(items[1][2], scene(99, 160))  # new content (and mtime/size): recomputed
    os.utime(items[1][2], ns=(1, 1))
    _, c3 = compute_features(items, cache, size=200, max_keypoints=200, threads=1, progress=False)
    assert c3 == {"cached": 2, "computed": 1}
    _, c4 = compute_features(items, cache, size=256, max_keypoints=200, threads=1, progress=False)
    assert c4 == {"cached": 0, "computed": 3}  # other settings: other features
