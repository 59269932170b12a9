"""common/cleaning.py: every cleaning rule on planted dirt, bad input errors, the split, atomic output."""
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest

from common.cleaning import (CleaningError, apply_rules, clean_competition, format_summary, inspect_images,
                             split_flags, summary_figure, write_clean_dir)
from common.config import ROOT, load_config
from common.paths import Paths

CFG = {"min_side": 32, "unseen_frac": 0.0, "seed": 0, "min_val_queries": 20, "min_train_images": 2, "threads": 2}
_rng = np.random.default_rng(0)


def _image_bytes(w=48, h=40, ext=".jpg") -> bytes:
    ok, buf = cv2.imencode(ext, _rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    assert ok
    return buf.tobytes()


def plant(raw, pretrain=True):
    """A small competition with one of every kind of dirt; returns {name: bytes} of the planted files."""
    ids = {"w1": 4, "w2": 3, "w3": 2, "w4": 2, "w5": 1, "new_whale": 2}
    train = {f"{wid}_{i}.jpg": (wid, _image_bytes()) for wid, n in ids.items() for i in range(n)}
    conflict = _image_bytes()
    good = _image_bytes()
    train.update({
        "corrupt.jpg": ("w1", b"\xff\xd8 this is not a jpeg"),
        "truncated.jpg": ("w2", good[: len(good) // 2]),
        "truncated.png": ("w2", _image_bytes(ext=".png")[:-40]),
        "tiny.jpg": ("w3", _image_bytes(20, 16)),
        "w1_dup.jpg": ("w1", train["w1_0.jpg"][1]),            # same Id: one copy kept
        "conflict_a.jpg": ("w2", conflict),                    # Ids disagree: both dropped
        "conflict_b.jpg": ("w4", conflict),
    })
    (raw / "train").mkdir(parents=True)
    for name, (_, data) in train.items():
        (raw / "train" / name).write_bytes(data)
    (raw / "train" / "stray.jpg").write_bytes(_image_bytes())  # not in train.csv
    pd.DataFrame([(n, wid) for n, (wid, _) in train.items()], columns=["Image", "Id"]).to_csv(raw / "train.csv", index=False)

    test = {f"t{i}.jpg": _image_bytes() for i in range(4)}
    test.update({"t_corrupt.jpg": b"garbage", "t_tiny.png": _image_bytes(12, 10, ".png"),
                 "t_copy.jpg": train["w2_0.jpg"][1]})
    (raw / "test").mkdir()
    for name, data in test.items():
        (raw / "test" / name).write_bytes(data)
    (raw / "test" / "notes.txt").write_text("not an image")

    if pretrain:
        pre = {f"p{wid}_{i}.jpg": (f"p{wid}", _image_bytes()) for wid in range(3) for i in range(3)}
        pre["p_bad.jpg"] = ("p0", b"nope")
        (raw / "pretrain" / "train").mkdir(parents=True)
        for name, (_, data) in pre.items():
            (raw / "pretrain" / "train" / name).write_bytes(data)
        pd.DataFrame([(n, w) for n, (w, _) in pre.items()], columns=["Image", "Id"]).to_csv(
            raw / "pretrain" / "train.csv", index=False)
    return raw


@pytest.fixture
def raw(tmp_path):
    return plant(tmp_path / "raw")


@pytest.fixture
def cleaned(raw, tmp_path):
    paths = Paths(raw, tmp_path / "data")
    tables, report = clean_competition(paths, CFG, progress=False)
    return paths, tables, report


def test_every_kind_of_dirt_is_caught(cleaned):
    paths, tables, report = cleaned
    reasons = {d["Image"]: d["reason"] for d in report["train"]["dropped_files"]}
    assert reasons == {"corrupt.jpg": "unreadable", "truncated.jpg": "unreadable", "truncated.png": "unreadable",
                       "tiny.jpg": "too_small", "w1_dup.jpg": "duplicate",
                       "conflict_a.jpg": "conflicting_duplicate", "conflict_b.jpg": "conflicting_duplicate"}
    assert report["train"]["dropped"] == {"unreadable": 3, "too_small": 1, "duplicate": 1, "conflicting_duplicate": 2}
    assert report["train"]["unlisted_files"] == ["stray.jpg"]
    train = tables[paths.clean_train_csv]
    assert list(train.columns) == ["Image", "Id", "val", "train_local", "train_full"]
    assert set(train["Image"]) == {f"{w}_{i}.jpg" for w, n in
                                   {"w1": 4, "w2": 3, "w3": 2, "w4": 2, "w5": 1, "new_whale": 2}.items() for i in range(n)}
    assert report["train"]["listed"] == len(train) + 7

    test = tables[paths.clean_test_csv]
    assert list(test.columns) == ["Image"]
    assert set(test["Image"]) == {"t0.jpg", "t1.jpg", "t2.jpg", "t3.jpg", "t_tiny.png", "t_copy.jpg"}
    assert [d["Image"] for d in report["test"]["dropped_files"]] == ["t_corrupt.jpg"]
    assert report["test"]["small_kept"] == ["t_tiny.png"]
    assert report["test"]["ignored_files"] == ["notes.txt"]
    assert report["cross_duplicates"]["test~train"] == [{"test": "t_copy.jpg", "train": "w2_0.jpg", "Id": "w2"}]

    pre = tables[paths.clean_pretrain_csv]
    assert list(pre.columns) == list(train.columns) and len(pre) == 9 and "p_bad.jpg" not in set(pre["Image"])
    assert report["pretrain"]["dropped"]["unreadable"] == 1


def test_duplicate_names_its_kept_copy_and_conflict_names_both_ids(cleaned):
    _, _, report = cleaned
    detail = {d["Image"]: d["detail"] for d in report["train"]["dropped_files"]}
    assert "w1_0.jpg" in detail["w1_dup.jpg"]
    assert "conflict_b.jpg" in detail["conflict_a.jpg"] and "w2" in detail["conflict_a.jpg"] and "w4" in detail["conflict_a.jpg"]
    assert ["w1_0.jpg", "w1_dup.jpg"] in report["train"]["duplicate_groups"]


def test_min_side_is_configurable(raw, tmp_path):
    paths = Paths(raw, tmp_path / "data")
    _, report = clean_competition(paths, {**CFG, "min_side": 40}, progress=False)
    assert report["train"]["dropped"]["too_small"] == 1          # 20x16; the others are 48x40
    _, report = clean_competition(paths, {**CFG, "min_side": 10}, progress=False)
    assert report["train"]["dropped"]["too_small"] == 0
    with pytest.raises(CleaningError, match=r"train\.csv: no usable image left .*too_small 18"):
        clean_competition(paths, {**CFG, "min_side": 41}, progress=False)


def test_raw_folder_is_never_written(raw, tmp_path, tree_hash):
    before = tree_hash(raw)
    paths = Paths(raw, tmp_path / "data")
    tables, report = clean_competition(paths, CFG, progress=False)
    write_clean_dir(paths, tables, report, summary_figure(tables[paths.clean_train_csv], report))
    assert tree_hash(raw) == before
    with pytest.raises(CleaningError, match="inside the raw folder"):
        clean_competition(Paths(raw, raw / "data"), CFG, progress=False)


def test_inspect_images_reports_truncation_and_sizes(raw):
    info = inspect_images(raw / "train", ["w1_0.jpg", "truncated.jpg", "truncated.png", "corrupt.jpg"], threads=2,
                          progress=False)
    assert (info.loc[0, "width"], info.loc[0, "height"], info.loc[0, "error"]) == (48, 40, "")
    assert "truncated" in info.loc[1, "error"] and "truncated" in info.loc[2, "error"]
    assert info.loc[3, "error"] != ""
    serial = inspect_images(raw / "train", list(info["Image"]), threads=0, progress=False)
    pd.testing.assert_frame_equal(info, serial)


# ---- bad input: error naming the file/row, nothing written ------------------------------------------------
def _drop_column(raw):
    pd.read_csv(raw / "train.csv")[["Image"]].to_csv(raw / "train.csv", index=False)


def _missing_file(raw):
    (raw / "train" / "w3_1.jpg").unlink()


def _empty_train_dir(raw):
    for p in (raw / "train").iterdir():
        p.unlink()


def _empty_test_dir(raw):
    for p in (raw / "test").iterdir():
        p.unlink()


def _repeat_row(raw):
    df = pd.read_csv(raw / "train.csv")
    pd.concat([df, df.iloc[[2]]]).to_csv(raw / "train.csv", index=False)


def _empty_id(raw):
    df = pd.read_csv(raw / "train.csv")
    df.loc[5, "Id"] = ""
    df.to_csv(raw / "train.csv", index=False)


def _pretrain_without_csv(raw):
    (raw / "pretrain" / "train.csv").unlink()


BAD_INPUT = [
    (lambda raw: (raw / "train.csv").unlink(), r"train\.csv: label file is missing"),
    (_drop_column, r"train\.csv: missing column\(s\) Id"),
    (_missing_file, r"train\.csv line \d+: image w3_1\.jpg does not exist"),
    (_empty_train_dir, r"train: image folder is empty"),
    (_empty_test_dir, r"test: image folder is empty"),
    (lambda raw: (raw / "test").rename(raw / "tests"), r"test: image folder is missing"),
    (_repeat_row, r"train\.csv lines 4, \d+: w1_2\.jpg is listed more than once"),
    (_empty_id, r"train\.csv line 7: empty Id"),
    (_pretrain_without_csv, r"pretrain/train\.csv: label file is missing"),
]


@pytest.mark.parametrize("spoil,message", BAD_INPUT)
def test_bad_input_is_a_clear_error(raw, tmp_path, spoil, message):
    spoil(raw)
    paths = Paths(raw, tmp_path / "data")
    with pytest.raises(CleaningError, match=message):
        clean_competition(paths, CFG, progress=False)


def test_bad_input_is_found_before_any_image_is_decoded(raw, tmp_path, monkeypatch):
    _pretrain_without_csv(raw)
    monkeypatch.setattr("common.cleaning.inspect_images", lambda *a, **k: pytest.fail("decoded before validating"))
    with pytest.raises(CleaningError, match="pretrain"):
        clean_competition(Paths(raw, tmp_path / "data"), CFG, progress=False)


def test_stage_exits_nonzero_and_writes_nothing_on_bad_input(raw, tmp_path):
    _missing_file(raw)
    data = tmp_path / "data"
    out = subprocess.run([sys.executable, "00_clean_data.py", "--raw", str(raw), "--data", str(data),
                          "--config", "tiny"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0
    assert "w3_1.jpg does not exist" in out.stderr and "Traceback" not in out.stderr
    assert not (data / "clean").exists()


# ---- atomic output --------------------------------------------------------------------------------------
def test_clean_dir_is_replaced_as_a_whole(raw, tmp_path, cleaned):
    paths, tables, report = cleaned
    write_clean_dir(paths, tables, report, summary_figure(tables[paths.clean_train_csv], report))
    written = {p.name for p in paths.clean_dir.iterdir()}
    assert written == {"train.csv", "test.csv", "pretrain.csv", "report.json", "summary.png"}
    assert pd.read_csv(paths.clean_train_csv).shape == tables[paths.clean_train_csv].shape

    del tables[paths.clean_pretrain_csv]   # a rerun without pretrain leaves no stale pretrain.csv
    write_clean_dir(paths, tables, report)
    assert {p.name for p in paths.clean_dir.iterdir()} == {"train.csv", "test.csv", "report.json"}
    assert sorted(p.name for p in paths.data.iterdir()) == ["clean"], "no staging folders left behind"


def test_failed_write_keeps_the_previous_clean_dir(cleaned, monkeypatch, tree_hash):
    paths, tables, report = cleaned
    write_clean_dir(paths, tables, report)
    before = tree_hash(paths.clean_dir)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("common.cleaning.write_json", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_clean_dir(paths, {paths.clean_train_csv: tables[paths.clean_train_csv].head(2)}, report)
    assert tree_hash(paths.clean_dir) == before
    assert sorted(p.name for p in paths.data.iterdir()) == ["clean"]


# ---- pure rules and split ----------------------------------------------------------------------------------
def test_apply_rules_without_images():
    labels = pd.DataFrame({"Image": ["b", "a", "c"], "Id": ["w1", "w1", "w1"]})
    info = pd.DataFrame({"Image": ["a", "b", "c"], "width": 64, "height": 64, "sha1": ["h", "h", "g"], "error": ""})
    kept, dropped = apply_rules(labels, info, min_side=32)
    assert list(kept["Image"]) == ["a", "c"], "the alphabetically first copy is kept, input order preserved"
    assert dropped == [{"Image": "b", "Id": "w1", "reason": "duplicate", "detail": "identical to a (kept)"}]


def population(n_ids=200, seed=1):
    rng = np.random.default_rng(seed)
    rows = [(f"{i}_{j}.jpg", f"w_{i}") for i in range(n_ids) for j in range(int(rng.integers(1, 8)))]
    rows += [(f"nw_{j}.jpg", "new_whale") for j in range(30)]
    return pd.DataFrame(rows, columns=["Image", "Id"])


def test_split_one_query_per_identity_with_two_or_more():
    df = population()
    flags, _ = split_flags(df, unseen_frac=0.1, seed=3)
    counts = df["Id"].value_counts()
    queries = flags[flags["val"] == 1]
    assert queries["Id"].is_unique
    assert set(queries["Id"]) == {i for i, n in counts.items() if n >= 2 and i != "new_whale"}
    assert (flags["Image"] == df["Image"]).all(), "rows keep the input order"


def test_split_singletons_and_new_whale_never_train():
    df = population()
    flags, _ = split_flags(df, unseen_frac=0.1, seed=3)
    counts = flags["Id"].map(flags["Id"].value_counts())
    never = (flags["Id"] == "new_whale") | (counts == 1)
    assert flags.loc[never, ["val", "train_local", "train_full"]].to_numpy().sum() == 0
    assert (flags.loc[~never, "train_full"] == 1).all()
    local = flags[flags["train_local"] == 1]
    assert local["Id"].value_counts().min() >= 2, "a local training identity always has a positive pair"
    assert not (flags["val"] & flags["train_local"]).any()


def test_split_unseen_share_is_held_out_of_training():
    df = population()
    multi = (df[df["Id"] != "new_whale"]["Id"].value_counts() >= 2).sum()
    flags, unseen = split_flags(df, unseen_frac=0.25, seed=3)
    assert len(unseen) == round(0.25 * multi)
    held = flags[flags["Id"].isin(unseen)]
    assert held["train_local"].sum() == 0 and held.groupby("Id")["val"].sum().eq(1).all()
    assert split_flags(df, unseen_frac=0.0, seed=3)[1] == []
    with pytest.raises(ValueError, match="unseen_frac"):
        split_flags(df, unseen_frac=1.0)


def test_split_is_deterministic_by_seed_and_ignores_row_order():
    df = population()
    a, ua = split_flags(df, 0.1, seed=7)
    b, ub = split_flags(df.sample(frac=1.0, random_state=0), 0.1, seed=7)
    assert ua == ub
    pd.testing.assert_frame_equal(a.set_index("Image").sort_index(), b.set_index("Image").sort_index())
    c, uc = split_flags(df, 0.1, seed=8)
    assert uc != ua and not (c["val"] == a["val"]).all()


def test_summary_text_and_figure(cleaned, tmp_path):
    paths, tables, report = cleaned
    text = format_summary(report)
    assert "corrupt.jpg: unreadable: " in text and "1 unlisted files" in text and "test and train" in text
    fig = summary_figure(tables[paths.clean_train_csv], report)
    assert len(fig.axes) == 3


def test_profiles_have_valid_clean_sections():
    for profile in ("default", "demo", "tiny", "full"):
        clean = load_config(None if profile == "default" else profile)["clean"]
        assert clean["min_side"] >= 1 and 0 <= clean["unseen_frac"] < 1 and clean["threads"] >= 0


def test_min_train_images_one_puts_singletons_into_training():
    t = pd.DataFrame({"Image": list("abcdefg"), "Id": ["w1"] * 3 + ["w2"] * 2 + ["w3", "new_whale"]})
    two, _ = split_flags(t, unseen_frac=0.0, seed=0)
    one, _ = split_flags(t, unseen_frac=0.0, seed=0, min_train_images=1)
    assert two.set_index("Image").loc["f", ["train_local", "train_full"]].tolist() == [0, 0]  # w3: a singleton
    assert one.set_index("Image").loc["f", ["train_local", "train_full"]].tolist() == [1, 1]
    assert one.set_index("Image").loc["g", "train_full"] == 0  # new_whale never trains
