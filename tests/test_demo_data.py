"""The embedded demo competition: determinism, layout, long tail, dirt, boxes, refusal, atomicity."""
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common import demo_data as D
from common import demo_render as R
from common.config import load_config
from common.io import ImageReadError, read_image
from common.paths import Paths

SMALL = {"n_individuals": 4, "n_unseen": 1, "max_images": 3, "n_test": 3, "n_new_whale": 1,
         "n_pretrain_individuals": 2, "pretrain_images": 2, "n_boxes": 4, "width": [96, 128], "n_corrupt": 1,
         "n_tiny": 1, "n_duplicates": 1}


def _read(path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny profile's competition, built through the CLI: (Paths, demo config)."""
    raw = tmp_path_factory.mktemp("demo") / "raw"
    assert D.main(["--out", str(raw), "--config", "tiny", "--quiet"]) == 0
    return Paths(raw, raw.parent / "data"), D.resolve_config(load_config("tiny")["demo"])


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = D.generate(tmp_path / "a", SMALL, progress=False)
    D.generate(tmp_path / "b", SMALL, progress=False)
    D.generate(tmp_path / "c", {**SMALL, "seed": 1}, progress=False)
    ta, tb, tc = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "c")
    assert len(ta) > 20 and ta == tb
    assert ta.keys() != tc.keys() and a["train_rows"] >= 4 + SMALL["n_new_whale"]
    photos = lambda tree: {v for v in tree.values() if len(v) > 200}  # noqa: E731 (skips planted junk)
    assert len(photos(ta)) > 15 and not photos(ta) & photos(tc)


def test_layout_and_columns(tiny):
    paths, cfg = tiny
    train, truth = _read(paths.raw_train_csv), _read(paths.truth_csv)
    pre, boxes = _read(paths.raw_pretrain_csv), _read(paths.raw_boxes_csv)
    assert list(train.columns) == ["Image", "Id"] and list(truth.columns) == ["Image", "Id"]
    assert list(pre.columns) == ["Image", "Id"] and list(boxes.columns) == D.BOX_COLUMNS
    for split, df in (("train", train), ("test", truth), ("pretrain", pre)):
        files = sorted(p.name for p in paths.raw_dir(split).iterdir())
        assert files == sorted(df.Image), split
    names = pd.concat([train.Image, truth.Image, pre.Image])
    assert names.is_unique and names.str.fullmatch(r"[0-9a-f]{9}\.jpg").all()
    assert len(truth) == cfg["n_test"]
    assert not (paths.raw / "test.csv").exists()  # the truth stays apart
    assert not [p for p in paths.raw.parent.iterdir() if p.name.endswith(".tmp")]


def test_long_tail_new_whale_and_unseen(tiny):
    paths, cfg = tiny
    train, truth = _read(paths.raw_train_csv), _read(paths.truth_csv)
    known = train[train.Id != D.NEW_WHALE]
    photos, dirt = D.make_plan(cfg)
    clean = photos[(photos.split == "train") & (photos.Id != D.NEW_WHALE)]
    counts = clean.Id.value_counts()
    assert counts.max() == cfg["max_images"] and (counts == 1).sum() >= 1
    assert known.Id.nunique() == cfg["n_individuals"] and known.Id.str.fullmatch(r"w_[0-9a-f]{7}").all()
    assert (train.Id == D.NEW_WHALE).sum() == cfg["n_new_whale"]
    unseen = truth[~truth.Id.isin(set(known.Id))]
    per_unseen = unseen.Id.value_counts()
    assert per_unseen.size == cfg["n_unseen"] and (per_unseen >= 2).mean() >= 0.5
    assert truth.Id.isin(set(known.Id)).any() and D.NEW_WHALE not in set(truth.Id)


def test_dirt_planted_as_configured(tiny):
    paths, cfg = tiny
    train = _read(paths.raw_train_csv)
    broken, small = [], []
    for name in train.Image:
        try:
            img = read_image(paths.raw_image("train", name))
        except ImageReadError:
            broken.append(name)
            continue
        if min(img.shape[:2]) < 48:
            small.append(name)
    assert len(broken) == cfg["n_corrupt"] and len(small) == cfg["n_tiny"]
    digest = train.assign(md5=[hashlib.md5(paths.raw_image("train", n).read_bytes()).hexdigest() for n in train.Image])
    digest = digest[~digest.Image.isin(broken)]
    groups = digest.groupby("md5")
    assert sum(len(g) - 1 for _, g in groups) == cfg["n_duplicates"]
    assert any(g.Id.nunique() > 1 for _, g in groups)  # one duplicate pair disagrees on Id


def test_boxes_inside_images_on_train_and_pretrain(tiny):
    paths, cfg = tiny
    boxes, test = _read(paths.raw_boxes_csv), _read(paths.truth_csv)
    assert len(boxes) == cfg["n_boxes"] and boxes.image_name.is_unique
    assert (boxes.label_name == "fluke").all() and not boxes.image_name.isin(set(test.Image)).any()
    b = boxes[D.BOX_COLUMNS[1:5] + ["image_width", "image_height"]].astype(int)
    assert (b.bbox_x >= 0).all() and (b.bbox_y >= 0).all() and (b.bbox_width > 4).all()
    assert (b.bbox_x + b.bbox_width <= b.image_width).all() and (b.bbox_y + b.bbox_height <= b.image_height).all()
    splits = set()
    for name, w, h in zip(boxes.image_name, b.image_width, b.image_height):
        path = paths.raw_image("train", name)
        if not path.exists():
            path = paths.raw_image("pretrain", name)
        splits.add(path.parent.parent.name)
        assert read_image(path).shape[1::-1] == (w, h)
    assert len(splits) == 2  # tiny has boxes on both train and pretrain photos


def test_box_is_the_tight_box_of_the_visible_fluke():
    fluke = R.make_fluke(np.random.default_rng(3), R.COMPETITION)
    for k in range(6):
        img, mask, box = R.photograph(fluke, np.random.default_rng(k), 256)
        ys, xs = np.nonzero(mask)
        assert img.shape[:2] == mask.shape and img.dtype == np.uint8
        assert box == (xs.min(), ys.min(), xs.max(), ys.max())
        x0, y0, x1, y1 = box
        assert mask.sum() >= 0.2 * (x1 - x0 + 1) * (y1 - y0 + 1)  # the fluke fills its box
        assert (x1 - x0 + 1) * (y1 - y0 + 1) < 0.95 * mask.size  # ... and not the whole frame


def test_fluke_pattern_is_individual_and_not_mirror_symmetric():
    a = R.make_fluke(np.random.default_rng(1), R.COMPETITION)
    b = R.make_fluke(np.random.default_rng(2), R.COMPETITION)
    body = (a.alpha > 0.5) & (a.alpha[:, ::-1] > 0.5) & (b.alpha > 0.5)
    assert np.abs(a.grey - a.grey[:, ::-1])[body].mean() > 0.1
    assert np.abs(a.grey - b.grey)[body].mean() > 0.1


def test_pretrain_is_another_population(tiny):
    paths, cfg = tiny
    train, pre = _read(paths.raw_train_csv), _read(paths.raw_pretrain_csv)
    assert pre.Id.nunique() == cfg["n_pretrain_individuals"] and len(pre) >= cfg["n_pretrain_individuals"]
    assert not set(pre.Id) & set(train.Id)
    sea = R.make_sea(np.random.default_rng(0), 64, 96, R.RELATED).reshape(-1, 3).mean(0)
    assert sea[2] > sea[0] + 0.1  # related dataset: bluer sea


def test_refuses_existing_competition_and_leaves_it_alone(tiny, tmp_path, capsys):
    paths, _ = tiny
    before = _read(paths.raw_train_csv)
    with pytest.raises(FileExistsError, match="train.csv"):
        D.generate(paths.raw, SMALL, progress=False)
    assert D.main(["--out", str(paths.raw), "--config", "tiny", "--quiet"]) == 2
    assert "already holds a competition" in capsys.readouterr().err
    assert before.equals(_read(paths.raw_train_csv))


def test_bad_config_names_the_key(tmp_path):
    with pytest.raises(D.DemoError, match="demo.width"):
        D.generate(tmp_path / "x", {**SMALL, "width": [300]}, progress=False)
    with pytest.raises(D.DemoError, match="demo.n_whales"):
        D.resolve_config({"n_whales": 3})
    assert D.main(["--out", str(tmp_path / "y"), "--config", "tiny", "--set", "demo.n_test=-1"]) == 2
    assert not list(tmp_path.iterdir())


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def boom(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    real = R.photograph
    monkeypatch.setattr(D, "photograph", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        D.generate(tmp_path / "raw", SMALL, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_fills_an_existing_folder_without_competition(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "README").write_text("mine")
    summary = D.generate(tmp_path / "raw", SMALL, progress=False)
    assert (tmp_path / "raw" / "train.csv").exists() and (tmp_path / "raw" / "README").read_text() == "mine"
    assert summary["boxes"] == SMALL["n_boxes"] and summary["bytes"] > 0


def test_contact_sheet_png(tiny, tmp_path):
    paths, _ = tiny
    dest = D.contact_sheet(paths.raw, tmp_path / "sheet.png", n_whales=3, per_whale=4, thumb=100)
    sheet = read_image(dest)
    assert sheet.shape[1] == 400 and sheet.shape[0] == 5 * (50 + 24)  # 3 whales + pretrain + new_whale rows
    assert sheet.std() > 10 and list(tmp_path.iterdir()) == [dest]
