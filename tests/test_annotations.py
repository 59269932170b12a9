"""Box annotations: every accepted format, bad rows, YOLO dataset round trip."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from common import annotations as ann


def _image(path, w, h, exif_orientation=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))
    if exif_orientation:
        exif = im.getexif()
        exif[0x0112] = exif_orientation
        im.save(path, exif=exif)
    else:
        im.save(path)
    return path


@pytest.fixture
def raw(tmp_path):
    """train/a.jpg 200x100, train/b.jpg 300x150, test/c.png 120x80, pretrain/train/d.jpg 100x100."""
    r = tmp_path / "raw"
    _image(r / "train" / "a.jpg", 200, 100)
    _image(r / "train" / "b.jpg", 300, 150)
    _image(r / "test" / "c.png", 120, 80)
    _image(r / "pretrain" / "train" / "d.jpg", 100, 100)
    return r


def folders(r):
    return {"train": r / "train", "test": r / "test", "pretrain": r / "pretrain" / "train"}


def boxes_of(valid):
    return {row.Image: (round(row.x0, 3), round(row.y0, 3), round(row.x1, 3), round(row.y1, 3))
            for row in valid.itertuples()}


MAKESENSE_ROWS = ["fluke,10,20,100,50,a.jpg,200,100", "fluke,5,5,50,40,c.png,120,80", "fluke,0,0,100,100,d.jpg,100,100"]
EXPECTED = {"a.jpg": (10, 20, 110, 70), "c.png": (5, 5, 55, 45), "d.jpg": (0, 0, 100, 100)}


@pytest.mark.parametrize("header", [True, False])
def test_makesense_export_with_or_without_header(raw, tmp_path, header):
    csv = tmp_path / "boxes.csv"
    lines = ([",".join(ann.MAKESENSE_COLUMNS)] if header else []) + MAKESENSE_ROWS
    csv.write_text("\n".join(lines) + "\n")
    valid, report = ann.load_annotations(csv, folders(raw))
    assert boxes_of(valid) == EXPECTED
    assert dict(zip(valid["Image"], valid["split"])) == {"a.jpg": "train", "c.png": "test", "d.jpg": "pretrain"}
    assert report["valid"] == 3 and report["rows"] == 3 and sum(report["skipped"].values()) == 0


def test_corner_format(raw, tmp_path):
    csv = tmp_path / "boxes.csv"
    csv.write_text("Image,x0,y0,x1,y1\na.jpg,10,20,110,70\nc.png,55,45,5,5\n")  # swapped corners: repaired, counted
    valid, report = ann.load_annotations(csv, folders(raw))
    assert boxes_of(valid) == {"a.jpg": (10, 20, 110, 70), "c.png": (5, 5, 55, 45)}
    assert report["swapped"] == 1 and report["examples"]["swapped"] == ["boxes.csv:3"] and report["skipped_rows"] == []


def test_yolo_label_folder(raw, tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "a.txt").write_text("0 0.3 0.45 0.5 0.5\n0 0.5 0.5 0.1 0.2\n")
    (labels / "c.txt").write_text("0 0.25 0.3125 0.4166667 0.5\n")
    valid, report = ann.load_annotations(labels, folders(raw))
    assert report["valid"] == 3 and sorted(valid["Image"]) == ["a.jpg", "a.jpg", "c.png"]
    a = valid[valid["Image"] == "a.jpg"].sort_values("x0")
    np.testing.assert_allclose(a[["x0", "y0", "x1", "y1"]].to_numpy(), [[10, 20, 110, 70], [90, 40, 110, 60]], atol=1e-3)
    c = valid[valid["Image"] == "c.png"].iloc[0]
    np.testing.assert_allclose([c.x0, c.y0, c.x1, c.y1], [5, 5, 55, 45], atol=1e-3)


def test_bad_rows_are_skipped_and_counted(raw, tmp_path):
    csv = tmp_path / "boxes.csv"
    csv.write_text("\n".join([
        "Image,x0,y0,x1,y1",
        "a.jpg,10,20,110,70",        # valid
        "b.jpg,-5,10,100,160",       # pokes out a little: clipped
        "b.jpg,250,100,400,300",     # mostly outside
        "a.jpg,500,500,600,600",     # entirely outside
        "a.jpg,10,20,10,70",         # zero width
        "nope.jpg,1,1,20,20",        # unknown image
        "a.jpg,ten,20,110,70",       # not a number
        "a.jpg,10,20",               # too few fields
    ]) + "\n")
    valid, report = ann.load_annotations(csv, folders(raw))
    assert report["rows"] == 8 and report["valid"] == 2
    assert report["skipped"] == {"unparseable": 2, "unknown_image": 1, "not_accepted": 0, "unreadable_image": 0,
                                 "zero_area": 1, "outside_image": 2}
    assert [(r["row"], r["reason"]) for r in report["skipped_rows"]] == [
        ("boxes.csv:4", "outside_image"), ("boxes.csv:5", "outside_image"), ("boxes.csv:6", "zero_area"),
        ("boxes.csv:7", "unknown_image"), ("boxes.csv:8", "unparseable"), ("boxes.csv:9", "unparseable")]
    assert report["clipped"] == 1
    assert boxes_of(valid)["b.jpg"] == (0, 10, 100, 150)
    assert report["examples"]["unknown_image"] == ["boxes.csv:7"]
    assert report["examples"]["unparseable"] == ["boxes.csv:8", "boxes.csv:9"]


def test_unreadable_image_is_skipped(raw, tmp_path):
    (raw / "train" / "broken.jpg").write_bytes(b"not an image")
    csv = tmp_path / "boxes.csv"
    csv.write_text("Image,x0,y0,x1,y1\nbroken.jpg,1,1,20,20\na.jpg,10,20,110,70\n")
    valid, report = ann.load_annotations(csv, folders(raw))
    assert report["skipped"]["unreadable_image"] == 1 and list(valid["Image"]) == ["a.jpg"]


def test_only_images_accepted_by_stage00_are_used(raw, tmp_path):
    csv = tmp_path / "boxes.csv"
    csv.write_text("Image,x0,y0,x1,y1\na.jpg,10,20,110,70\nb.jpg,30,15,270,135\nc.png,5,5,55,45\n")
    accepted = {"train": ["a.jpg"], "test": ["c.png"]}
    valid, report = ann.load_annotations(csv, folders(raw), accepted, {("train", "b.jpg"): "unreadable: file is truncated"})
    assert sorted(valid["Image"]) == ["a.jpg", "c.png"] and report["skipped"]["not_accepted"] == 1
    assert report["skipped_rows"] == [{"row": "boxes.csv:3", "reason": "not_accepted",
                                       "detail": "train/b.jpg: stage 00: unreadable: file is truncated"}]


def test_failed_dataset_write_leaves_no_staging_folder(raw, tmp_path, monkeypatch):
    csv = tmp_path / "boxes.csv"
    csv.write_text("Image,x0,y0,x1,y1\na.jpg,10,20,110,70\nb.jpg,30,15,270,135\n")
    valid, _ = ann.load_annotations(csv, folders(raw))
    out = tmp_path / "det" / "dataset"
    ann.write_yolo_dataset(valid, out, val_frac=0.5, seed=0, progress=False)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("common.io.read_image", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        ann.write_yolo_dataset(valid, out, val_frac=0.5, seed=0, progress=False)
    assert [p.name for p in out.parent.iterdir()] == ["dataset"], "no staging folder left"
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before, "the previous dataset is kept"


def test_no_valid_box_is_a_clear_error(raw, tmp_path):
    csv = tmp_path / "boxes.csv"
    csv.write_text("Image,x0,y0,x1,y1\nnope.jpg,1,1,20,20\na.jpg,5,5,5,9\n")
    with pytest.raises(ann.AnnotationError, match=r"boxes.csv: no valid box.*unknown_image: 1.*zero_area: 1"):
        ann.load_annotations(csv, folders(raw))


def test_unknown_layout_and_missing_file_are_errors(raw, tmp_path):
    csv = tmp_path / "boxes.csv"
    csv.write_text("file,left,top\na.jpg,1,2\n")
    with pytest.raises(ann.AnnotationError, match="unrecognised header"):
        ann.read_boxes(csv)
    with pytest.raises(ann.AnnotationError, match="not found"):
        ann.read_boxes(tmp_path / "missing.csv")


def test_makesense_boxes_drawn_on_a_resized_copy_are_rescaled(raw, tmp_path):
    csv = tmp_path / "boxes.csv"
    csv.write_text("fluke,5,10,50,25,a.jpg,100,50\n")  # annotator saw a.jpg at half size
    valid, _ = ann.load_annotations(csv, folders(raw))
    assert boxes_of(valid) == {"a.jpg": (10, 20, 110, 70)}


def test_exif_rotation_is_applied_to_the_image_size(tmp_path):
    p = _image(tmp_path / "r.jpg", 200, 100, exif_orientation=6)
    assert ann.oriented_size(p) == (100, 200)


def test_yolo_conversion_round_trip():
    rng = np.random.default_rng(1)
    for _ in range(20):
        w, h = rng.integers(50, 2000, 2)
        x0, x1 = sorted(rng.uniform(0, w, 2))
        y0, y1 = sorted(rng.uniform(0, h, 2))
        yolo = ann.to_yolo((x0, y0, x1, y1), w, h)
        assert all(0 <= v <= 1 for v in yolo)
        np.testing.assert_allclose(ann.from_yolo(yolo, w, h), (x0, y0, x1, y1), rtol=1e-9, atol=1e-9)


def test_split_is_by_image_seeded_and_never_empty():
    imgs = [f"i{i}" for i in range(40)]
    val = ann.split_images(imgs * 2, 0.15, seed=3)  # duplicates (several boxes per image) count once
    assert len(val) == 6 and val <= set(imgs)
    assert val == ann.split_images(imgs, 0.15, seed=3) and val != ann.split_images(imgs, 0.15, seed=4)
    assert len(ann.split_images(imgs[:3], 0.01, seed=0)) == 1
    assert ann.split_images(imgs[:1], 0.5, seed=0) == set()


def test_dataset_round_trip_pixels_to_yolo_txt_and_back(raw, tmp_path):
    csv = tmp_path / "boxes.csv"
    csv.write_text("Image,x0,y0,x1,y1\na.jpg,10,20,110,70\na.jpg,150,10,190,40\nb.jpg,30,15,270,135\n"
                   "c.png,5,5,55,45\nd.jpg,20,30,80,90\n")
    valid, _ = ann.load_annotations(csv, folders(raw))
    out = tmp_path / "dataset"
    (out / "stale").mkdir(parents=True)  # a previous dataset is replaced entirely
    counts = ann.write_yolo_dataset(valid, out, val_frac=0.25, seed=0, max_side=64, progress=False)
    assert counts["train"]["images"] + counts["val"]["images"] == 4 and counts["val"]["images"] == 1
    assert counts["train"]["boxes"] + counts["val"]["boxes"] == 5
    assert not (out / "stale").exists()
    originals = {"train__a": (200, 100), "train__b": (300, 150), "test__c": (120, 80), "pretrain__d": (100, 100)}
    truth = {"train__a": [(10, 20, 110, 70), (150, 10, 190, 40)], "train__b": [(30, 15, 270, 135)],
             "test__c": [(5, 5, 55, 45)], "pretrain__d": [(20, 30, 80, 90)]}
    seen = set()
    for img in (out / "images").glob("*/*.jpg"):
        stem, part = img.stem, img.parent.name
        with Image.open(img) as im:
            assert max(im.size) <= 64  # stored at the detector's input size
        label = out / "labels" / part / f"{stem}.txt"
        back = read_yolo_labels(label, *originals[stem])
        np.testing.assert_allclose(sorted(back), sorted(truth[stem]), atol=0.01)
        seen.add(stem)
    assert seen == set(truth)
    data = yaml.safe_load(ann.write_data_yaml(tmp_path / "data.yaml", out).read_text())
    assert data["path"] == str(out.resolve()) and data["names"] == {0: "fluke"}
    assert (out / data["val"]).is_dir() and (out / data["train"]).is_dir()


def test_check_boxes_without_reference_size_keeps_pixels():
    boxes = pd.DataFrame([("x", 1.0, 2.0, 30.0, 40.0, np.nan, np.nan, False, "r1", "p")],
                         columns=ann.BOX_FRAME + ["path"])
    valid, counts = ann.check_boxes(boxes, {"p": (50, 50)})
    assert (valid.x0[0], valid.y0[0], valid.x1[0], valid.y1[0]) == (1, 2, 30, 40)
    assert counts["clipped"] == 0 and valid.width[0] == 50


def read_yolo_labels(label_file, width: int, height: int) -> list[tuple[float, float, float, float]]:
    """Pixel corners of every box in a YOLO txt label file (for checks and round trips)."""
    out = []
    for line in Path(label_file).read_text().splitlines():
        if line.strip():
            out.append(ann.from_yolo([float(v) for v in line.split()[1:5]], width, height))
    return out
