"""Attention crops: the box of the frozen ImageNet backbone's activation map, on synthetic scenes
(a textured object on a flat, slightly noisy background), its fallbacks, and the one crop rule
that stage 02 and --predict share."""
import cv2
import numpy as np
import pandas as pd
import pytest

from common import attention, cropping
from common.config import default_config
from common.paths import Paths

W, H = 320, 240
BG = (70, 110, 150)


def scene(x0, y0, w, h, seed=0):
    """A flat background (grey-level noise std 2) with a blocky random texture at (x0, y0, w, h)."""
    rng = np.random.default_rng(seed)
    img = (np.full((H, W, 3), BG, np.float64) + rng.normal(0, 2, (H, W, 3))).clip(0, 255).astype(np.uint8)
    tex = rng.integers(0, 256, (h // 6 + 1, w // 6 + 1, 3), dtype=np.uint8)
    img[y0:y0 + h, x0:x0 + w] = cv2.resize(tex, (w, h), interpolation=cv2.INTER_NEAREST)
    return img


@pytest.fixture(scope="module")
def cropper():
    """The attention Cropper with the default crop settings (backbone loaded once for the module)."""
    crop = default_config()["crop"]
    find = attention.AttentionCropper(size=crop["attention_size"], threshold=crop["attention_threshold"],
                                      min_area=crop["attention_min_area"], merge=crop["attention_merge"])
    return cropping.Cropper("cam", find, conf=0.0, margin=crop["margin"], max_area=crop["attention_max_area"])


OBJECTS = [(40, 30, 80, 60), (200, 150, 80, 60), (210, 20, 70, 70)]  # 6-6.5 % of the photo each


def test_box_covers_the_object_and_excludes_most_background(cropper):
    regions = cropper.regions([scene(*o, seed=i) for i, o in enumerate(OBJECTS)])
    for (x0, y0, w, h), (X0, Y0, X1, Y1, score, fallback, source) in zip(OBJECTS, regions):
        assert fallback == 0 and source == "cam" and 0 < score <= 1
        inter = max(0, min(X1, x0 + w) - max(X0, x0)) * max(0, min(Y1, y0 + h) - max(Y0, y0))
        assert inter >= 0.95 * w * h, "the box cuts the object"
        kept_bg = (X1 - X0) * (Y1 - Y0) - inter
        assert kept_bg < 0.5 * (W * H - w * h), "the box keeps most of the background"
        cx, cy = x0 + w / 2, y0 + h / 2  # the photo's corner farthest from the object stays out
        far = (0 if cx > W / 2 else W - 1, 0 if cy > H / 2 else H - 1)
        assert not (X0 <= far[0] < X1 and Y0 <= far[1] < Y1)


def test_flat_photo_falls_back_to_the_whole_image(cropper):
    flat = np.full((H, W, 3), BG, np.uint8)
    black = np.zeros((90, 60, 3), np.uint8)
    assert cropper.find([flat, black]) == [None, None]
    regions = cropper.regions([flat, black])
    assert regions == [(0, 0, W, H, 0.0, 1, "full"), (0, 0, 60, 90, 0.0, 1, "full")]
    assert not cropper.maps([flat])[0].any()


def test_photo_that_is_all_object_is_used_whole(cropper):
    """An already-cropped photo (texture everywhere): the box would be the photo, so fallback=1."""
    (region,) = cropper.regions([scene(0, 0, W, H)])
    assert region[:4] == (0, 0, W, H) and region[5:] == (1, "full")


def test_component_box_largest_component_merge_and_min_area():
    m = np.zeros((20, 20), np.float32)
    m[2:6, 2:8] = 1.0     # 24 px
    m[12:15, 14:18] = 0.9  # 12 px: half the largest
    m[18, 0] = 0.8         # 1 px
    assert attention.component_box(m, threshold=0.5, min_area=0.01) == (2, 2, 8, 6, 0.06)
    assert attention.component_box(m, threshold=0.5, min_area=0.01, merge=0.4) == (2, 2, 18, 15, 0.09)
    assert attention.component_box(m, threshold=0.95, min_area=0.01) == (2, 2, 8, 6, 0.06)
    assert attention.component_box(m, threshold=0.5, min_area=0.1) is None
    assert attention.contrast(np.ones((5, 5))) == 0.0 and attention.normalise(np.ones((3, 3))).max() == 0.0


def test_bad_attention_settings_are_one_line_errors():
    with pytest.raises(cropping.CropConfigError, match="crop.attention_map"):
        attention.AttentionCropper(kind="gradcam")
    with pytest.raises(cropping.CropConfigError, match="crop.attention_threshold"):
        attention.AttentionCropper(threshold=1.5)


@pytest.fixture
def project(tmp_path):
    """Raw train/test scenes without boxes, stage 00's clean CSVs, stage 01's 'no detector' marker."""
    from common.io import write_json

    paths = Paths(tmp_path / "raw", tmp_path / "data")
    names = {"train": ["t0.jpg", "t1.png"], "test": ["q0.jpg"]}
    for i, (split, files) in enumerate(names.items()):
        paths.raw_dir(split).mkdir(parents=True, exist_ok=True)
        for j, n in enumerate(files):
            img = scene(*OBJECTS[j], seed=i) if n != "t1.png" else np.full((H, W, 3), BG, np.uint8)
            cv2.imwrite(str(paths.raw_image(split, n)), img[..., ::-1])
    paths.clean_dir.mkdir(parents=True)
    pd.DataFrame({"Image": names["train"], "Id": ["a", "b"], "val": 0, "train_local": 1, "train_full": 1}) \
        .to_csv(paths.clean_train_csv, index=False)
    pd.DataFrame({"Image": names["test"]}).to_csv(paths.clean_test_csv, index=False)
    write_json(paths.detector_metrics, {"trained": False, "reason": "no boxes"})
    return paths


def test_crop_loop_writes_the_source_column_and_predict_crops_alike(project, tmp_path):
    from common.predict import crop_photos

    paths = project
    cfg = default_config()
    cropper = cropping.make_cropper(cfg, paths)
    assert cropper.source == "cam"  # crop.attention: auto, and stage 01 trained no detector
    jobs = cropping.crop_jobs(paths)
    rows, n = cropping.run_crops(jobs, cropper, progress=False)
    assert n == 3 and list(rows.columns) == cropping.CROP_COLUMNS
    assert list(rows["source"]) == ["cam", "full", "cam"] and list(rows["fallback"]) == [0, 1, 0]
    median = round(float(rows["conf"][:2].median()), 4)  # summarize rounds to 4 decimals
    assert cropping.summarize(rows)["train"] == {"images": 2, "fallback": 1, "fallback_rate": 0.5,
                                                 "median_conf": median, "yolo": 0, "cam": 1, "full": 1}
    assert set(cropping.summarize_sources(rows)) == {"cam", "full"}
    rows.to_csv(tmp_path / "crops.csv", index=False)
    pd.testing.assert_frame_equal(cropping.read_crops(tmp_path / "crops.csv"), rows, check_dtype=False)

    # --predict crops a new photo by the same rule: same box, same pixels as stage 02's crop
    out = tmp_path / "predict"
    out.mkdir()
    (pred,) = crop_photos(cfg, paths, [paths.raw_image("test", "q0.jpg")], out)
    stage02 = cv2.imread(jobs["dst"][2])
    assert cv2.imread(str(pred)).shape == stage02.shape
    r = rows.iloc[2]
    assert stage02.shape[:2] == cropping.fit_max_side(np.zeros((r.y1 - r.y0, r.x1 - r.x0, 3)), 512).shape[:2]

    # crop.attention=false: whole photos, flagged full
    cfg["crop"]["attention"] = False
    full = cropping.make_cropper(cfg, paths)
    assert full.source == "full" and full.find is None
    rows, _ = cropping.run_crops(jobs, full, progress=False)
    assert (rows["source"] == "full").all() and (rows["fallback"] == 1).all()


def test_small_photos_stay_whole_without_a_map(cropper, monkeypatch):
    """crop.attention_min_side: a photo no longer than it is a close crop already; no map is computed."""
    find = cropper.find
    big = scene(*OBJECTS[0])
    small = cv2.resize(big, (200, 150))
    find.min_side = 256
    seen = []
    real = find.raw_maps
    monkeypatch.setattr(find, "raw_maps", lambda images: seen.append(len(images)) or real(images))
    boxes = find([small, big])
    assert boxes[0] is None and boxes[1] is not None and seen == [1]
    assert cropper.regions([small])[0][5:] == (1, "full")
    find.min_side = 0
