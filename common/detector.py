"""The ultralytics YOLO fluke detector: offline setup, training, evaluation, best-box inference.

Ultralytics is imported lazily (only inside these functions) and only after
``common.config.prepare_environment`` set ``YOLO_OFFLINE=1`` and a project-local
``YOLO_CONFIG_DIR``; :func:`setup_ultralytics` then switches off settings sync and every
third-party logger and keeps its folders inside the project, so a run never touches the
network, ``~/.config`` or the current directory.

>>> yolo_device("cpu"), yolo_device("cuda"), yolo_device("cuda:1")
('cpu', '0', '1')
"""
from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np

from .errors import PipelineError

LOGGERS_OFF = ("clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb")


class DetectorError(PipelineError, RuntimeError):
    """A detector setup that cannot work (missing weights, bad model spec); the message says why."""


def yolo_device(device) -> str:
    """torch-style device (``cpu``, ``cuda``, ``cuda:1``) -> ultralytics' spelling (``cpu``, ``0``, ``1``)."""
    s = str(device)
    if s.startswith("cuda"):
        return s.split(":", 1)[1] if ":" in s else "0"
    return s


def setup_ultralytics(config_dir) -> None:
    """Keep ultralytics offline and inside ``config_dir`` (its settings, weights, datasets, runs).

    Also places a local stand-in for the Arial font ultralytics wants for labels, so it never
    tries to download one, and keeps torch's CPU threads: ultralytics sets OMP_NUM_THREADS=1 when
    it is unset and trains on ``cpu_count - 1`` threads, i.e. one of a 2-core machine's two.
    """
    import torch

    threads = torch.get_num_threads()  # all cores, or what the user set with OMP_NUM_THREADS
    config_dir = Path(config_dir).resolve()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(config_dir))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import ultralytics.utils as uu
    import ultralytics.utils.torch_utils as ut

    ut.NUM_THREADS = threads  # select_device() sets torch.set_num_threads(NUM_THREADS) for CPU runs
    torch.set_num_threads(threads)
    from ultralytics import settings
    from ultralytics.utils import USER_CONFIG_DIR

    folders = {f"{k}_dir": config_dir / k for k in ("datasets", "weights", "runs")}
    settings.update({"sync": False, **{k: False for k in LOGGERS_OFF}, **{k: str(v) for k, v in folders.items()},
                     "vscode_msg": False, "openvino_msg": False})
    # the module constants were read from the settings at import time (defaults on a first run)
    uu.DATASETS_DIR, uu.WEIGHTS_DIR, uu.RUNS_DIR = folders["datasets_dir"], folders["weights_dir"], folders["runs_dir"]
    font = Path(USER_CONFIG_DIR) / "Arial.ttf"
    if not font.exists():
        import matplotlib

        shutil.copyfile(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf", font)


def check_model_spec(spec: str) -> str:
    """A model YAML (ultralytics' own like ``yolov8n.yaml``, or a file) or an existing ``.pt`` file."""
    spec = str(spec)
    if spec.endswith((".yaml", ".yml")):
        return spec
    if spec.endswith(".pt"):
        if not Path(spec).is_file():
            raise DetectorError(f"detector weights {spec} not found (runs are offline, nothing is downloaded): "
                                f"give a path to a .pt file, or a model YAML such as yolov8n.yaml to train from scratch")
        return str(Path(spec).resolve())
    raise DetectorError(f"detector.model {spec!r} must be a model YAML (e.g. yolov8n.yaml) or a .pt weights file")


def train(data_yaml, det_cfg: dict, runs_dir, *, device="cpu", seed: int = 0) -> Path:
    """Train YOLO on ``data_yaml``; returns the run folder (``weights/best.pt``, ``results.csv``)."""
    from ultralytics import YOLO

    dev = yolo_device(device)
    amp = det_cfg["amp"]
    amp = dev != "cpu" if amp in (None, "auto") else bool(amp)
    if amp and dev != "cpu" and os.environ.get("YOLO_OFFLINE") == "1":
        _skip_amp_self_test()
    model = YOLO(check_model_spec(det_cfg["model"]))
    model.train(data=str(data_yaml), epochs=int(det_cfg["epochs"]), imgsz=int(det_cfg["imgsz"]),
                batch=int(det_cfg["batch"]), patience=int(det_cfg["patience"]), workers=int(det_cfg["workers"]),
                optimizer=det_cfg["optimizer"], lr0=float(det_cfg["lr0"]),
                nbs=int(det_cfg["nbs"] or det_cfg["batch"]), warmup_epochs=float(det_cfg["warmup_epochs"]),
                mosaic=float(det_cfg["mosaic"]),
                close_mosaic=int(det_cfg["close_mosaic"]), cache=det_cfg["cache"] or False,
                device=dev, amp=amp, seed=int(seed), plots=False, project=str(Path(runs_dir).resolve()),
                name="train", exist_ok=True, verbose=False)
    return Path(model.trainer.save_dir)


def _skip_amp_self_test() -> None:
    """ultralytics checks AMP on CUDA by downloading yolo26n.pt; offline we trust AMP instead."""
    import ultralytics.engine.trainer as trainer

    if hasattr(trainer, "check_amp"):
        trainer.check_amp = lambda model: True


def install_weights(run_dir, dest) -> Path:
    """Copy the run's ``weights/best.pt`` (``last.pt`` if no best was saved) atomically to ``dest``."""
    from .io import atomic_path

    weights = Path(run_dir) / "weights"
    src = weights / "best.pt" if (weights / "best.pt").exists() else weights / "last.pt"
    if not src.exists():
        raise DetectorError(f"training wrote no weights in {weights}")
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dest)


def evaluate(weights, data_yaml, *, imgsz: int, batch: int = 16, device="cpu", runs_dir=None) -> dict:
    """Box metrics of ``weights`` on the data YAML's val images: mAP50, mAP50-95, precision, recall."""
    from ultralytics import YOLO

    kwargs = {"project": str(Path(runs_dir).resolve()), "name": "val", "exist_ok": True} if runs_dir else {}
    m = YOLO(str(weights)).val(data=str(data_yaml), imgsz=int(imgsz), batch=int(batch), device=yolo_device(device),
                               plots=False, verbose=False, **kwargs)
    return {"map50": float(m.box.map50), "map50_95": float(m.box.map),
            "precision": float(m.box.mp), "recall": float(m.box.mr)}


def read_results(run_dir) -> list[dict]:
    """ultralytics' per-epoch ``results.csv`` as a list of dicts (keys stripped, values float)."""
    path = Path(run_dir) / "results.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k.strip(): float(v) for k, v in row.items() if k and v not in (None, "")} for row in csv.DictReader(f)]


def plot_history(history: list[dict], dest) -> Path | None:
    """Training curves (losses, mAP50, mAP50-95 per epoch) as a PNG."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import save_figure

    ep = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for key in ("train/box_loss", "train/cls_loss", "train/dfl_loss", "val/box_loss"):
        if key in history[0]:
            axes[0].plot(ep, [h[key] for h in history], label=key)
    for key, label in (("metrics/mAP50(B)", "mAP50"), ("metrics/mAP50-95(B)", "mAP50-95")):
        if key in history[0]:
            axes[1].plot(ep, [h[key] for h in history], marker="o", label=label)
    axes[0].set(title="losses", xlabel="epoch")
    axes[1].set(title="held-out boxes", xlabel="epoch", ylim=(0, 1))
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return save_figure(fig, dest)


class FlukeDetector:
    """Best fluke box per image: ``detector(list of RGB arrays) -> [(x0, y0, x1, y1, conf) | None]``."""

    def __init__(self, weights, *, imgsz: int, device="cpu", min_conf: float = 0.01, max_det: int = 10):
        from ultralytics import YOLO

        if not Path(weights).is_file():
            raise DetectorError(f"detector weights {weights} not found: run stage 01 first (make 01)")
        self.model = YOLO(str(weights))
        self.imgsz, self.device = int(imgsz), yolo_device(device)
        self.min_conf, self.max_det = float(min_conf), int(max_det)

    def __call__(self, images: list[np.ndarray]) -> list[tuple | None]:
        if not images:
            return []
        bgr = [np.ascontiguousarray(im[..., ::-1]) for im in images]
        results = self.model.predict(bgr, imgsz=self.imgsz, conf=self.min_conf, max_det=self.max_det,
                                     device=self.device, batch=len(bgr), verbose=False)
        out = []
        for r in results:
            if r.boxes is None or len(r.boxes) == 0:
                out.append(None)
                continue
            conf = r.boxes.conf.cpu().numpy()
            i = int(conf.argmax())
            x0, y0, x1, y1 = (float(v) for v in r.boxes.xyxy[i].cpu().numpy())
            out.append((x0, y0, x1, y1, float(conf[i])))
        return out

