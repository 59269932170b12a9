"""Image tables: which file a later stage reads is what stage 02's crops.csv says."""
from common.paths import Paths
from common.tables import image_paths


def test_image_paths_follow_crops_csv_not_files_on_disk(tmp_path):
    p = Paths(tmp_path / "raw", tmp_path / "art")
    assert image_paths(p, "train")("a.jpg") == p.raw_image("train", "a.jpg")  # no stage 02 yet
    for name in ("a.jpg", "stale.jpg"):  # stale.jpg: a crop file left from an older run, not listed
        p.crop_image("train", name).parent.mkdir(parents=True, exist_ok=True)
        p.crop_image("train", name).write_bytes(b"x")
    p.crops_csv.write_text("Image,split\na.jpg,train\nt.jpg,test\n")
    train = image_paths(p, "train")
    assert train("a.jpg") == p.crop_image("train", "a.jpg")
    assert train("stale.jpg") == p.raw_image("train", "stale.jpg")
    assert train("t.jpg") == p.raw_image("train", "t.jpg")  # listed under another split
    assert image_paths(p, "test")("t.jpg") == p.crop_image("test", "t.jpg")
    assert image_paths(p, "train", use_crops=False)("a.jpg") == p.raw_image("train", "a.jpg")
