"""Stage 00 through the Makefile on a tiny generated demo competition (CI smoke)."""
import os
import subprocess
import sys

import pandas as pd
import pytest

from common.config import ROOT, load_config
from common.io import read_json


def make_00(raw, data, *extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RAW", "DATA", "PROFILE", "SET", "MODEL", "CONFIG")}
    return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "00", f"RAW={raw}", f"DATA={data}",
                           "PROFILE=tiny", *extra], env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def competition(tmp_path_factory):
    from common.demo_data import generate

    raw = tmp_path_factory.mktemp("stage00") / "raw"
    planted = generate(raw, load_config("tiny")["demo"], progress=False)
    return raw, planted


def test_help():
    out = subprocess.run([sys.executable, "00_clean_data.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "clean.min_side" in out.stdout and "--raw" in out.stdout


def test_make_00_cleans_the_tiny_demo(competition, tmp_path, tree_hash):
    (raw, planted), data = competition, tmp_path / "data"
    before = tree_hash(raw)
    out = make_00(raw, data)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "val queries" in out.stdout
    assert tree_hash(raw) == before, "stage 00 wrote into RAW"

    clean = data / "clean"
    train = pd.read_csv(clean / "train.csv", dtype={"Image": str, "Id": str}, keep_default_na=False)
    test = pd.read_csv(clean / "test.csv", dtype=str)
    assert list(train.columns) == ["Image", "Id", "val", "train_local", "train_full"]
    assert list(test.columns) == ["Image"]
    assert (clean / "summary.png").stat().st_size > 0

    listed = pd.read_csv(raw / "train.csv", dtype=str, keep_default_na=False)
    report = read_json(clean / "report.json")
    assert len(train) == report["train"]["kept"] == len(listed) - sum(report["train"]["dropped"].values())
    assert set(train["Image"]) <= set(listed["Image"])
    assert len(test) == report["test"]["kept"] and set(test["Image"]) <= {p.name for p in (raw / "test").iterdir()}
    dropped = report["train"]["dropped"]
    assert dropped["unreadable"] == planted["corrupt"] and dropped["too_small"] == planted["tiny"]
    assert dropped["duplicate"] + dropped["conflicting_duplicate"] / 2 == planted["duplicates"]
    assert (train.loc[train["Id"] == "new_whale", ["val", "train_local", "train_full"]] == 0).all().all()
    assert train["val"].sum() > 0 and train["train_local"].sum() > 0

    if (raw / "pretrain").exists():
        pre = pd.read_csv(clean / "pretrain.csv")
        assert list(pre.columns) == list(train.columns) and len(pre) == report["pretrain"]["kept"]

    again = make_00(raw, data)
    assert again.returncode == 0
    rerun = pd.read_csv(clean / "train.csv", dtype={"Image": str, "Id": str}, keep_default_na=False)
    pd.testing.assert_frame_equal(rerun, train, obj="clean/train.csv of a rerun (same raw, same seed)")


def test_make_00_fails_cleanly_without_a_competition(tmp_path):
    out = make_00(tmp_path / "nothing", tmp_path / "data")
    assert out.returncode != 0
    assert "train.csv" in out.stderr or "raw competition folder is missing" in out.stderr
    assert not (tmp_path / "data" / "clean").exists()
