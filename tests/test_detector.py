"""The YOLO detector: model spec checks and a CI-sized run of stages 01 + 02 on planted flukes."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from common import detector
from common.config import ROOT


def test_model_spec_accepts_yaml_and_existing_weights_only(tmp_path):
    assert detector.check_model_spec("yolov8n.yaml") == "yolov8n.yaml"
    w = tmp_path / "my.pt"
    w.write_bytes(b"x")
    assert detector.check_model_spec(str(w)) == str(w.resolve())
    with pytest.raises(detector.DetectorError, match="not found.*offline"):
        detector.check_model_spec(str(tmp_path / "yolov8n.pt"))
    with pytest.raises(detector.DetectorError, match="model YAML"):
        detector.check_model_spec("yolov8n")


def test_results_csv_is_read_and_plotted(tmp_path):
    (tmp_path / "results.csv").write_text(
        "                  epoch,   train/box_loss,  metrics/mAP50(B),  metrics/mAP50-95(B)\n"
        "1,2.5,0.1,0.05\n2,2.0,0.4,0.2\n")
    hist = detector.read_results(tmp_path)
    assert hist == [{"epoch": 1, "train/box_loss": 2.5, "metrics/mAP50(B)": 0.1, "metrics/mAP50-95(B)": 0.05},
                    {"epoch": 2, "train/box_loss": 2.0, "metrics/mAP50(B)": 0.4, "metrics/mAP50-95(B)": 0.2}]
    assert detector.plot_history(hist, tmp_path / "c.png").stat().st_size > 1000
    assert detector.read_results(tmp_path / "none") == [] and detector.plot_history([], tmp_path / "d.png") is None


def test_ultralytics_keeps_torch_cpu_threads(tmp_path):
    """ultralytics trains on min(8, cpu_count - 1) CPU threads (1 on a 2-core machine) and sets
    OMP_NUM_THREADS=1; after setup_ultralytics its CPU device keeps torch's threads (9: above its cap)."""
    code = ("import os, torch; torch.set_num_threads(9)\n"
            "from common.detector import setup_ultralytics; setup_ultralytics(os.environ['CFG'])\n"
            "from ultralytics.utils.torch_utils import select_device; select_device('cpu', verbose=False)\n"
            "print(torch.get_num_threads(), os.environ['OMP_NUM_THREADS'])")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "CFG": str(tmp_path)},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[-2:] == ["9", "9"]


def plant(root, data, n_train=16, n_test=4, boxes=True):
    """Grey-noise photos with a dark ellipse 'fluke', boxes.csv (makesense, no header), clean CSVs."""
    rng = np.random.default_rng(0)
    rows = []
    for split, n in (("train", n_train), ("test", n_test)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            w, h = int(rng.integers(140, 200)), 100
            img = rng.normal(150, 20, (h, w, 3)).clip(0, 255).astype(np.uint8)
            bw, bh = int(rng.integers(w // 3, w // 2)), int(rng.integers(h // 4, h // 2))
            cx, cy = int(rng.integers(bw // 2 + 2, w - bw // 2 - 2)), int(rng.integers(bh // 2 + 2, h - bh // 2 - 2))
            cv2.ellipse(img, (cx, cy), (bw // 2, bh // 2), 0, 0, 360, (30, 30, 30), -1)
            name = f"{split}{i:02d}.jpg"
            cv2.imwrite(str(root / split / name), img)
            if split == "train":
                rows.append(f"fluke,{cx - bw // 2},{cy - bh // 2},{bw},{bh},{name},{w},{h}")
    rows.append("fluke,10,10,20,20,missing.jpg,100,100")  # unknown image: skipped, counted
    if boxes:
        (root / "boxes.csv").write_text("\n".join(rows) + "\n")
    (data / "clean").mkdir(parents=True)
    train = [f"train{i:02d}.jpg" for i in range(n_train)]
    pd.DataFrame({"Image": train, "Id": [f"w{i % 4}" for i in range(n_train)], "val": 0, "train_local": 1,
                  "train_full": 1}).to_csv(data / "clean" / "train.csv", index=False)
    pd.DataFrame({"Image": [f"test{i:02d}.jpg" for i in range(n_test)]}).to_csv(data / "clean" / "test.csv", index=False)


def stage(script, root, data, *sets, cwd, home):
    """Run a stage as users do, with a private HOME and cwd to prove nothing is written there."""
    env = {k: v for k, v in os.environ.items() if k not in ("YOLO_CONFIG_DIR", "TORCH_HOME", "MPLCONFIGDIR")}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), PYTHONPATH=str(ROOT))
    args = [sys.executable, str(ROOT / script), "--raw", str(root), "--data", str(data), "--config", "tiny"]
    for s in sets:
        args += ["--set", s]
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def dirs(tmp_path):
    d = {k: tmp_path / k for k in ("raw", "data", "cwd", "home")}
    for k in ("cwd", "home"):
        d[k].mkdir()
    return d


def test_stages_01_02_train_detect_crop_and_rerun_incrementally(dirs):
    plant(dirs["raw"], dirs["data"])
    kw = {"cwd": dirs["cwd"], "home": dirs["home"]}
    out = stage("01_train_detector.py", dirs["raw"], dirs["data"], **kw)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    det = dirs["data"] / "detector"
    metrics = json.loads((det / "metrics.json").read_text())
    assert metrics["trained"] is True and 0 <= metrics["map50"] <= 1 and 0 <= metrics["map50_95"] <= metrics["map50"]
    assert metrics["annotations"]["valid"] == 16 and metrics["annotations"]["skipped"]["unknown_image"] == 1
    assert metrics["dataset"]["val"]["images"] >= 1 and sum(p["images"] for p in metrics["dataset"].values()) == 16
    assert "mAP50" in out.stdout and (det / "best.pt").stat().st_size > 100_000 and (det / "curves.png").exists()
    data_yaml = yaml.safe_load((det / "data.yaml").read_text())
    assert os.path.isabs(data_yaml["path"]) and len(list((det / "dataset" / "labels" / "train").glob("*.txt"))) >= 12

    out = stage("02_crop_flukes.py", dirs["raw"], dirs["data"], "crop.conf=0.0", "crop.max_side=64", **kw)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    crops = pd.read_csv(dirs["data"] / "crops" / "crops.csv")
    assert list(crops.columns)[:8] == ["Image", "split", "x0", "y0", "x1", "y1", "conf", "fallback"]
    assert sorted(zip(crops["split"], crops["Image"])) == sorted(
        [("train", f"train{i:02d}.jpg") for i in range(16)] + [("test", f"test{i:02d}.jpg") for i in range(4)])
    assert ((crops["x0"] < crops["x1"]) & (crops["x1"] <= crops["width"]) & (crops["y1"] <= crops["height"])).all()
    for r in crops.itertuples():
        h, w = cv2.imread(str(dirs["data"] / "crops" / r.split / r.Image)).shape[:2]
        assert max(h, w) <= 64
    assert (dirs["data"] / "crops" / "samples.png").stat().st_size > 1000

    again = stage("02_crop_flukes.py", dirs["raw"], dirs["data"], "crop.conf=0.0", "crop.max_side=64", **kw)
    assert again.returncode == 0 and json.loads((dirs["data"] / "crops" / "report.json").read_text())["processed"] == 0

    assert list(dirs["cwd"].iterdir()) == [], "ultralytics wrote into the working directory"
    assert not (dirs["home"] / ".config" / "Ultralytics").exists(), "ultralytics wrote into the user's config"
    assert (dirs["data"] / ".yolo" / "Ultralytics" / "settings.json").exists()
    settings = json.loads((dirs["data"] / ".yolo" / "Ultralytics" / "settings.json").read_text())
    assert settings["sync"] is False and not any(settings[k] for k in detector.LOGGERS_OFF)


def test_without_boxes_the_crop_stage_uses_whole_images(dirs):
    plant(dirs["raw"], dirs["data"], n_train=4, n_test=2, boxes=False)
    kw = {"cwd": dirs["cwd"], "home": dirs["home"]}
    out = stage("01_train_detector.py", dirs["raw"], dirs["data"], **kw)
    assert out.returncode == 0 and "no annotations" in out.stdout
    assert json.loads((dirs["data"] / "detector" / "metrics.json").read_text())["trained"] is False
    out = stage("02_crop_flukes.py", dirs["raw"], dirs["data"], **kw)  # crop.attention: auto
    assert out.returncode == 0 and "attention map" in out.stdout, out.stderr[-3000:]
    crops = pd.read_csv(dirs["data"] / "crops" / "crops.csv")
    report = json.loads((dirs["data"] / "crops" / "report.json").read_text())
    assert len(crops) == 6 and set(crops["source"]) <= {"cam", "full"} and report["source"] == "cam"
    assert ((crops["source"] == "full") == (crops["fallback"] == 1)).all()
    assert sum(v["images"] for v in report["sources"].values()) == 6

    out = stage("02_crop_flukes.py", dirs["raw"], dirs["data"], "crop.attention=false", **kw)
    assert out.returncode == 0, out.stderr[-3000:]
    crops = pd.read_csv(dirs["data"] / "crops" / "crops.csv")
    assert len(crops) == 6 and (crops["fallback"] == 1).all() and (crops["x1"] == crops["width"]).all()
    assert (crops["source"] == "full").all()
    assert json.loads((dirs["data"] / "crops" / "report.json").read_text())["processed"] == 6  # all redone


def test_no_valid_box_fails_clearly_and_writes_no_marker(dirs):
    plant(dirs["raw"], dirs["data"], n_train=2, n_test=1, boxes=False)
    (dirs["raw"] / "boxes.csv").write_text("Image,x0,y0,x1,y1\nghost.jpg,1,1,20,20\ntrain00.jpg,5,5,5,50\n")
    out = stage("01_train_detector.py", dirs["raw"], dirs["data"], cwd=dirs["cwd"], home=dirs["home"])
    assert out.returncode != 0 and "boxes.csv" in out.stderr and "no valid box" in out.stderr
    assert not (dirs["data"] / "detector" / "metrics.json").exists()
    out = stage("01_train_detector.py", dirs["raw"], dirs["data"], "detector.model=nowhere/yolov8n.pt",
                cwd=dirs["cwd"], home=dirs["home"])
    assert out.returncode != 0 and "nowhere/yolov8n.pt not found" in out.stderr and "Traceback" not in out.stderr
