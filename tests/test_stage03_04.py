"""Stages 03 and 04 as the Makefile runs them, on a toy competition with a clean/ folder."""
import json
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest

from common.config import ROOT
from common.models import load_checkpoint
from common.paths import Paths

FAST = ["train.P=3", "train.K=2", "train.batch_embed=32", "train.lr_find_iters=8", "augment.strength=0.2"]


def write_split(paths: Paths, split: str, n_ids: int, per_id: int, seed: int) -> None:
    """Toy photos (one random colour pattern per identity) and the clean/ table stage 00 would write."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_ids):
        pattern = cv2.resize(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8), (80, 48), interpolation=cv2.INTER_NEAREST)
        for j in range(per_id):
            name = f"{split}_{i}_{j}.jpg"
            paths.raw_image(split, name).parent.mkdir(parents=True, exist_ok=True)
            noisy = np.clip(pattern.astype(int) + rng.integers(-20, 21, pattern.shape), 0, 255).astype(np.uint8)
            cv2.imwrite(str(paths.raw_image(split, name)), noisy)
            val = int(j == 0 and i % 2 == 0)
            rows.append({"Image": name, "Id": f"{split}{i}", "val": val, "train_local": 1 - val, "train_full": 1})
    dest = paths.clean_pretrain_csv if split == "pretrain" else paths.clean_train_csv
    dest.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(dest, index=False)


@pytest.fixture
def comp(tmp_path):
    paths = Paths(tmp_path / "raw", tmp_path / "data")
    write_split(paths, "train", n_ids=5, per_id=3, seed=0)
    return paths


def stage(script, paths, *extra):
    args = [sys.executable, script, "--raw", str(paths.raw), "--data", str(paths.data), "--config", "tiny"]
    for s in FAST:
        args += ["--set", s]
    out = subprocess.run(args + list(extra), cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, f"{script} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def test_04_starts_every_member_from_its_stage03_checkpoint(comp):
    write_split(comp, "pretrain", n_ids=4, per_id=3, seed=1)
    comp.raw_pretrain_csv.write_text("Image,Id\n")  # the raw pretrain set exists
    stage("03_pretrain_humpback.py", comp)
    pre = json.loads(comp.pretrain_summary.read_text())
    assert set(pre["members"]) == {"lite0_64", "lite0_64_do"}
    for name in pre["members"]:
        _, ckpt = load_checkpoint(comp.pretrain_ckpt(name))
        assert ckpt["classes"] == [f"pretrain{i}" for i in range(4)]
        assert (comp.pretrain_dir(name) / "history.csv").exists()

    out = stage("04_train_embed.py", comp)
    assert "starting from stage 03 checkpoint" in out
    summary = json.loads(comp.members_summary.read_text())["members"]
    assert set(summary) == {"lite0_64", "lite0_64_do"}
    entry_metric = "map20"  # train.metric of the tiny profile
    for name, entry in summary.items():
        assert entry["init"] == str(comp.pretrain_ckpt(name))
        assert set(entry["baseline"]) >= {"map20", "top1"}
        assert set(entry["metrics"]) >= {"map20", "map5", "top1", "hit20"}
        # one tiny epoch may end below the untrained backbone: then (train.below_baseline: frozen)
        # the summary names the frozen fallback and best.pt is still the trained model
        below = entry["metrics"][entry_metric] < entry["baseline"][entry_metric]
        assert entry.get("fallback") == ("frozen" if below else None)
        assert entry["ckpt"] == str(comp.member_dir(name) / ("frozen.pt" if below else "best.pt"))
        model, ckpt = load_checkpoint(comp.member_dir(name) / "best.pt")
        assert ckpt["classes"] == [f"train{i}" for i in range(5)] and ckpt["epoch"] == 1
        assert [r["epoch"] for r in entry["history"]] == [0, 1]
        for f in ("last.pt", "curves.png", "history.csv", "config.json", "tb"):
            assert (comp.member_dir(name) / f).exists()


def test_03_skips_without_a_pretrain_set_and_04_model_trains_one_member(comp):
    out = stage("03_pretrain_humpback.py", comp)
    assert "skipped" in out and "skipped" in json.loads(comp.pretrain_summary.read_text())
    stage("04_train_embed.py", comp, "--model", "lite0_64_do", "--set", "train.baseline=false")
    summary = json.loads(comp.members_summary.read_text())["members"]
    assert list(summary) == ["lite0_64_do"] and summary["lite0_64_do"]["init"] is None
    assert summary["lite0_64_do"]["baseline"] is None

    out = stage("04_train_embed.py", comp, "--model", "lite0_64", "--lr-find")
    assert "suggested train.lr" in out and (comp.member_dir("lite0_64") / "lr_find.png").exists()
    assert list(json.loads(comp.members_summary.read_text())["members"]) == ["lite0_64_do"], "lr-find trains nothing"


def test_04_unknown_member_is_a_clear_error(comp):
    out = subprocess.run([sys.executable, "04_train_embed.py", "--raw", str(comp.raw), "--data", str(comp.data),
                          "--config", "tiny", "--model", "nope"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0 and "unknown member 'nope'" in out.stderr
    assert not comp.members_summary.exists()
