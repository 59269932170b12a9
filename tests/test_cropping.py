"""Crop geometry (margin, clipping, fallback), the crop rule and its sources, the crop loop and its
incremental reruns."""
import os

import cv2
import numpy as np
import pandas as pd
import pytest

from common import cropping
from common.paths import Paths


def test_margin_grows_each_side_by_a_share_of_the_box():
    assert cropping.expand_box((100, 100, 300, 200), 0.0, 1000, 1000) == (100, 100, 300, 200)
    assert cropping.expand_box((100, 100, 300, 200), 0.25, 1000, 1000) == (50, 75, 350, 225)
    assert cropping.expand_box((100.4, 100.6, 299.2, 199.9), 0.0, 1000, 1000) == (100, 100, 300, 200)  # outwards


def test_box_is_clipped_to_the_image_and_never_empty():
    assert cropping.expand_box((-20, -5, 90, 70), 0.1, 80, 60) == (0, 0, 80, 60)
    x0, y0, x1, y1 = cropping.expand_box((79.5, 59.5, 79.6, 59.6), 0.0, 80, 60)
    assert 0 <= x0 < x1 <= 80 and 0 <= y0 < y1 <= 60


def yolo(det, conf=0.5, max_side=64, margin=0.1):
    return cropping.Cropper("yolo", det, conf=conf, margin=margin, max_side=max_side)


def test_fallback_below_threshold_or_without_detection():
    assert cropping.crop_region(None, 120, 90, conf=0.25, margin=0.1) == (0, 0, 120, 90, 0.0, 1)
    assert cropping.crop_region((10, 10, 50, 40, 0.249), 120, 90, conf=0.25, margin=0.1)[4:] == (0.249, 1)
    assert cropping.crop_region((10, 10, 50, 40, 0.25), 120, 90, conf=0.25, margin=0.1) == (6, 7, 54, 43, 0.25, 0)
    # a grown box covering more than max_area of the image: the photo is the crop already
    assert cropping.crop_region((2, 2, 118, 88, 0.9), 120, 90, conf=0.0, margin=0.0, max_area=0.9)[4:] == (0.9, 1)
    assert cropping.crop_region((2, 2, 118, 88, 0.9), 120, 90, conf=0.0, margin=0.0, max_area=1.0)[4:] == (0.9, 0)


def test_crop_source_follows_crop_attention():
    assert cropping.crop_source({"attention": "auto"}, trained=True) == "yolo"
    assert cropping.crop_source({"attention": "auto"}, trained=False) == "cam"
    assert cropping.crop_source({"attention": True}, trained=True) == "cam"
    assert cropping.crop_source({"attention": False}, trained=True) == "yolo"
    assert cropping.crop_source({"attention": False}, trained=False) == "full"
    with pytest.raises(cropping.CropConfigError, match="crop.attention"):
        cropping.crop_source({"attention": "maybe"}, trained=False)


def test_fit_max_side_downscales_only():
    img = np.zeros((100, 400, 3), np.uint8)
    assert cropping.fit_max_side(img, 200).shape == (50, 200, 3)
    assert cropping.fit_max_side(img, 1000).shape == (100, 400, 3)
    assert cropping.fit_max_side(img, None).shape == (100, 400, 3)


@pytest.fixture
def project(tmp_path):
    """Raw train/test/pretrain images with a dark rectangle, and stage 00's clean CSVs."""
    paths = Paths(tmp_path / "raw", tmp_path / "data")
    rng = np.random.default_rng(0)
    names = {"train": ["t0.jpg", "t1.jpg", "t2.jpg"], "test": ["q0.jpg", "q1.png"], "pretrain": ["p0.jpg"]}
    for split, files in names.items():
        paths.raw_dir(split).mkdir(parents=True, exist_ok=True)
        for n in files:
            img = rng.integers(100, 200, (120, 300, 3), dtype=np.uint8)
            img[40:80, 100:200] = 10
            cv2.imwrite(str(paths.raw_image(split, n)), img)
    paths.clean_dir.mkdir(parents=True)
    pd.DataFrame({"Image": names["train"], "Id": ["a", "a", "b"], "val": 0, "train_local": 1, "train_full": 1}) \
        .to_csv(paths.clean_train_csv, index=False)
    pd.DataFrame({"Image": names["test"]}).to_csv(paths.clean_test_csv, index=False)
    return paths, names


class FakeDetector:
    """The dark rectangle when the image has one, with a fixed confidence; counts calls."""

    def __init__(self, conf=0.9):
        self.conf, self.seen = conf, 0

    def __call__(self, images):
        self.seen += len(images)
        out = []
        for im in images:
            ys, xs = np.where(im.mean(axis=2) < 40)
            out.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, self.conf) if len(xs) else None)
        return out


def test_jobs_cover_every_clean_image_and_pretrain_only_when_listed(project):
    paths, names = project
    jobs = cropping.crop_jobs(paths)
    assert list(jobs["split"]) == ["train"] * 3 + ["test"] * 2
    pd.DataFrame({"Image": names["pretrain"], "Id": ["z"], "val": 0, "train_local": 0, "train_full": 0}) \
        .to_csv(paths.clean_pretrain_csv, index=False)
    jobs = cropping.crop_jobs(paths)
    assert list(jobs["Image"][jobs["split"] == "pretrain"]) == ["p0.jpg"]
    assert jobs["dst"][5] == str(paths.crop_image("pretrain", "p0.jpg"))


def test_crops_written_with_margin_and_max_side(project):
    paths, _ = project
    jobs = cropping.crop_jobs(paths)
    det = FakeDetector()
    rows, n = cropping.run_crops(jobs, yolo(det), batch=2, progress=False)
    assert n == 5 and det.seen == 5 and list(rows.columns) == cropping.CROP_COLUMNS
    assert list(rows.columns)[-1] == "source" and (rows["source"] == "yolo").all()
    assert list(rows["Image"]) == list(jobs["Image"])
    assert (rows[["x0", "y0", "x1", "y1"]].to_numpy() == [90, 36, 210, 84]).all()
    assert (rows["fallback"] == 0).all() and (rows["width"] == 300).all() and (rows["height"] == 120).all()
    for dst in jobs["dst"]:
        crop = cv2.imread(dst)
        assert crop.shape[:2] == (26, 64)  # 120x48 crop scaled to longest side 64
    summary = cropping.summarize(rows)
    assert summary["train"] == {"images": 3, "fallback": 0, "fallback_rate": 0.0, "median_conf": 0.9,
                                "yolo": 3, "cam": 0, "full": 0}
    assert cropping.summarize_sources(rows) == {"yolo": {"images": 5, "median_conf": 0.9, "median_area": 0.16}}


def test_without_detector_or_below_threshold_whole_images_are_used(project):
    paths, _ = project
    jobs = cropping.crop_jobs(paths)
    for cropper in (cropping.Cropper("full", None, max_side=1000), yolo(FakeDetector(conf=0.1), 0.25, 1000)):
        rows, _ = cropping.run_crops(jobs, cropper, progress=False)
        assert (rows["fallback"] == 1).all() and (rows["source"] == "full").all()
        assert (rows[["x0", "y0", "x1", "y1"]].to_numpy() == [0, 0, 300, 120]).all()
        assert cv2.imread(jobs["dst"][0]).shape[:2] == (120, 300)  # never upscaled


def test_rerun_redoes_only_stale_crops(project):
    paths, _ = project
    jobs = cropping.crop_jobs(paths)
    first, _ = cropping.run_crops(jobs, yolo(FakeDetector()), progress=False)
    det = FakeDetector()
    again, n = cropping.run_crops(jobs, yolo(det), previous=first, progress=False)
    assert n == 0 and det.seen == 0 and again.equals(first)

    os.remove(jobs["dst"][1])  # a missing crop ...
    src = jobs["src"][3]  # ... and a source image newer than its crop
    t = os.path.getmtime(jobs["dst"][3]) + 10
    os.utime(src, (t, t))
    det = FakeDetector()
    again, n = cropping.run_crops(jobs, yolo(det), previous=first, progress=False)
    assert n == 2 and det.seen == 2 and os.path.exists(jobs["dst"][1])
    assert again.equals(first)


def test_signature_changes_with_weights_and_settings(tmp_path):
    cfg = {"conf": 0.25, "margin": 0.1, "max_side": 512, "quality": 95}
    w = tmp_path / "best.pt"
    w.write_bytes(b"weights-1")
    base = cropping.signature(w, cfg, 320)
    assert base == cropping.signature(w, dict(cfg), 320)
    assert base != cropping.signature(w, {**cfg, "margin": 0.2}, 320)
    assert base != cropping.signature(w, cfg, 256)
    assert base != cropping.signature(None, cfg, 320)
    w.write_bytes(b"weights-2")
    assert base != cropping.signature(w, cfg, 320)


def test_signature_changes_with_the_source_and_the_attention_settings():
    from common.config import default_config

    crop = default_config()["crop"]
    cam = cropping.signature(None, crop, 320, "cam")
    assert cam == cropping.signature(None, dict(crop), 320, "cam")
    assert cam != cropping.signature(None, crop, 320, "full")
    for key, value in (("attention_threshold", 0.6), ("attention_size", 224), ("attention_map", "cam"),
                       ("attention_min_area", 0.1), ("attention_max_area", 0.5), ("attention_merge", 1.0)):
        assert key in cropping.ATTENTION_KEYS
        assert cam != cropping.signature(None, {**crop, key: value}, 320, "cam"), key
    # a detector's crops do not depend on the attention settings
    assert cropping.signature(None, crop, 320, "yolo") == cropping.signature(
        None, {**crop, "attention_threshold": 0.6}, 320, "yolo")


def test_old_crops_csv_without_source_reads_with_one(tmp_path):
    old = pd.DataFrame({"Image": ["a.jpg", "b.jpg"], "split": "train", "x0": 0, "y0": 0, "x1": 5, "y1": 5,
                        "conf": [0.9, 0.1], "fallback": [0, 1], "width": 5, "height": 5})
    old.to_csv(tmp_path / "crops.csv", index=False)
    df = cropping.read_crops(tmp_path / "crops.csv")
    assert list(df["source"]) == ["yolo", "full"]
    assert cropping.summarize(old)["train"]["full"] == 1


def test_unreadable_source_raises_naming_the_file(project):
    from common.io import ImageReadError

    paths, _ = project
    jobs = cropping.crop_jobs(paths)
    paths.raw_image("test", "q1.png").write_bytes(b"garbage")
    with pytest.raises(ImageReadError, match="q1.png"):
        cropping.run_crops(jobs, cropping.Cropper("full", max_side=64), progress=False)


def test_sample_grid_png(project, tmp_path):
    paths, _ = project
    jobs = cropping.crop_jobs(paths)
    rows, _ = cropping.run_crops(jobs, yolo(FakeDetector()), progress=False)
    rows.loc[0, ["fallback", "source"]] = [1, "full"]
    out = cropping.plot_samples(rows, jobs, tmp_path / "s.png", n=4)
    img = cv2.imread(str(out))
    assert img is not None and img.shape[0] > 100 and img.shape[1] > 300
    # with attention maps: each photo's heat map is drawn under its box
    seen = []

    def maps(images):
        seen.append(len(images))
        return [np.linspace(0, 1, im.shape[1], dtype=np.float32)[None].repeat(im.shape[0], 0) for im in images]

    rows["source"] = "cam"
    heat = cv2.imread(str(cropping.plot_samples(rows, jobs, tmp_path / "h.png", n=4, maps=maps)))
    assert seen == [4] and heat.shape == img.shape and not np.array_equal(heat, img)


def test_png_crops_are_written_without_opencv_warnings(tmp_path, capfd):
    img = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    cropping.write_crop(img, tmp_path / "a.png", quality=80)
    cropping.write_crop(img, tmp_path / "b.jpg", quality=80)
    assert capfd.readouterr().err == "", "OpenCV warned (a JPEG option given for a PNG)"
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "a.png"))[..., ::-1], img)  # PNG stays lossless
    assert cv2.imread(str(tmp_path / "b.jpg")).shape == (30, 40, 3)
