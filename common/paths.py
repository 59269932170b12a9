"""The one place that names every input and artifact path.

Raw competition (read-only, Kaggle Humpback layout)::

    RAW/train.csv            Image,Id  (Id may be new_whale)
    RAW/train/, RAW/test/    images
    RAW/boxes.csv            optional fluke boxes (makesense.ai export or Image,x0,y0,x1,y1)
    RAW/pretrain/train.csv   optional related dataset, same layout
    RAW/pretrain/train/
    RAW/.truth/test.csv      optional withheld test truth (Image,Id), demo competition only
    RAW/test_encounters.csv  optional Image,encounter of test photos (train.csv may carry an
                             `encounter` column): photos of one sighting

Artifacts (DATA, default ``data/``): one folder per stage, see the properties below.
No stage spells a path itself; everything goes through :class:`Paths`.
"""
from __future__ import annotations

from pathlib import Path

SPLITS = ("train", "test", "pretrain")


class Paths:
    def __init__(self, raw="data/raw", data="data"):
        self.raw = Path(raw).resolve()
        self.data = Path(data).resolve()

    def __repr__(self) -> str:
        return f"Paths(raw={str(self.raw)!r}, data={str(self.data)!r})"

    # ---- raw competition -------------------------------------------------------------
    @property
    def raw_train_csv(self) -> Path:
        return self.raw / "train.csv"

    @property
    def raw_boxes_csv(self) -> Path:
        return self.raw / "boxes.csv"

    @property
    def raw_pretrain(self) -> Path:
        return self.raw / "pretrain"

    @property
    def raw_pretrain_csv(self) -> Path:
        return self.raw_pretrain / "train.csv"

    @property
    def truth_csv(self) -> Path:
        return self.raw / ".truth" / "test.csv"

    @property
    def test_encounters_csv(self) -> Path:
        """Optional test-side encounter mapping (Image,encounter)."""
        return self.raw / "test_encounters.csv"

    def raw_dir(self, split: str) -> Path:
        """Folder of raw images for split 'train', 'test' or 'pretrain'."""
        if split == "pretrain":
            return self.raw_pretrain / "train"
        if split in ("train", "test"):
            return self.raw / split
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")

    def raw_image(self, split: str, name: str) -> Path:
        return self.raw_dir(split) / name

    # ---- 00 clean --------------------------------------------------------------------
    @property
    def clean_dir(self) -> Path:
        return self.data / "clean"

    @property
    def clean_train_csv(self) -> Path:
        """Usable train images with split flags (Image,Id,val,train_local,train_full)."""
        return self.clean_dir / "train.csv"

    @property
    def clean_test_csv(self) -> Path:
        """Usable test images (Image)."""
        return self.clean_dir / "test.csv"

    @property
    def clean_pretrain_csv(self) -> Path:
        """Usable pretrain images, same columns as clean_train_csv (absent without pretrain/)."""
        return self.clean_dir / "pretrain.csv"

    @property
    def clean_report(self) -> Path:
        return self.clean_dir / "report.json"

    @property
    def clean_summary_png(self) -> Path:
        """Images per identity, local-validation roles and drops per reason (stage 00)."""
        return self.clean_dir / "summary.png"

    # ---- 01 detector -----------------------------------------------------------------
    @property
    def detector_dir(self) -> Path:
        return self.data / "detector"

    @property
    def detector_dataset(self) -> Path:
        """ultralytics dataset (images/{train,val}, labels/{train,val})."""
        return self.detector_dir / "dataset"

    @property
    def detector_yaml(self) -> Path:
        return self.detector_dir / "data.yaml"

    @property
    def detector_runs(self) -> Path:
        return self.detector_dir / "runs"

    @property
    def detector_weights(self) -> Path:
        return self.detector_dir / "best.pt"

    @property
    def detector_metrics(self) -> Path:
        """Written by stage 01 in every case (``{"trained": false, ...}`` without boxes)."""
        return self.detector_dir / "metrics.json"

    @property
    def detector_curves_png(self) -> Path:
        """Stage 01 training curves (losses, held-out mAP per epoch)."""
        return self.detector_dir / "curves.png"

    # ---- 02 crops --------------------------------------------------------------------
    @property
    def crops_dir(self) -> Path:
        return self.data / "crops"

    @property
    def crops_csv(self) -> Path:
        return self.crops_dir / "crops.csv"

    @property
    def crops_samples_png(self) -> Path:
        return self.crops_dir / "samples.png"

    @property
    def crops_report(self) -> Path:
        """Stage 02 summary (fallback rates per split) and the signature that keeps reruns incremental."""
        return self.crops_dir / "report.json"

    def crop_image(self, split: str, name: str) -> Path:
        return self.crops_dir / split / name

    def image(self, split: str, name: str, use_crops: bool = True) -> Path:
        """The image later stages read: the fluke crop when stage 02 made one, else the raw photo."""
        if use_crops:
            crop = self.crop_image(split, name)
            if crop.exists():
                return crop
        return self.raw_image(split, name)

    # ---- 03/04 models ----------------------------------------------------------------
    @property
    def models_dir(self) -> Path:
        return self.data / "models"

    @property
    def pretrain_summary(self) -> Path:
        """Stage 03 done-marker: JSON with each member's pretrain checkpoint and scores (or skipped)."""
        return self.models_dir / "pretrain" / "summary.json"

    @property
    def members_summary(self) -> Path:
        """Stage 04 done-marker: JSON with each member's best checkpoint and validation scores."""
        return self.models_dir / "summary.json"

    def pretrain_dir(self, name: str) -> Path:
        """Run folder of stage 03 for member ``name`` (logs, curves, last.pt)."""
        return self.models_dir / "pretrain" / name

    def pretrain_ckpt(self, name: str) -> Path:
        return self.models_dir / "pretrain" / f"{name}.pt"

    def member_dir(self, name: str) -> Path:
        """Run folder of stage 04 for member ``name``: best.pt, last.pt, history.csv, curves.png,
        config.json, tb/ (TensorBoard)."""
        return self.models_dir / name

    def member_ckpt(self, name: str, which: str = "best") -> Path:
        return self.member_dir(name) / f"{which}.pt"

    # ---- 05 pseudo labels ------------------------------------------------------------
    @property
    def pseudo_dir(self) -> Path:
        return self.data / "pseudo"

    @property
    def pseudo_csv(self) -> Path:
        return self.pseudo_dir / "pseudo_labels.csv"

    @property
    def pseudo_report(self) -> Path:
        return self.pseudo_dir / "report.json"

    @property
    def pseudo_png(self) -> Path:
        """Stage 05: label precision on validation vs threshold, test similarity histogram."""
        return self.pseudo_dir / "report.png"

    def pseudo_member_dir(self, name: str) -> Path:
        """Run folder of a member retrained with pseudo labels (same files as member_dir)."""
        return self.pseudo_dir / "models" / name

    def pseudo_round_dir(self, name: str, round_: int) -> Path:
        """Run folder of one label -> retrain round (stage 05's report names the one stage 06 uses)."""
        return self.pseudo_member_dir(name) / f"round{round_}"

    # ---- 06 embeddings and submission ------------------------------------------------
    @property
    def embeddings_dir(self) -> Path:
        return self.data / "embeddings"

    def embeddings_file(self, name: str) -> Path:
        return self.embeddings_dir / f"{name}.npz"

    @property
    def submission_dir(self) -> Path:
        return self.data / "submission"

    @property
    def submission_csv(self) -> Path:
        return self.submission_dir / "submission.csv"

    @property
    def submission_ids_csv(self) -> Path:
        return self.submission_dir / "submission_ids.csv"

    @property
    def scores_json(self) -> Path:
        return self.submission_dir / "scores.json"

    @property
    def gallery_png(self) -> Path:
        return self.submission_dir / "gallery.png"

    @property
    def predictions_csv(self) -> Path:
        """Default output of ``06_ensemble_submit.py --predict`` (top-k matches of new photos)."""
        return self.submission_dir / "predictions.csv"

    # ---- run report and benchmarks --------------------------------------------------------
    @property
    def report_dir(self) -> Path:
        return self.data / "report"

    @property
    def report_html(self) -> Path:
        """One self-contained page per run (python -m common.report, end of make all)."""
        return self.report_dir / "index.html"

    @property
    def bench_dir(self) -> Path:
        """`make bench` runs the pipeline into this folder (a DATA of its own)."""
        return self.data / "bench"

    @property
    def bench_json(self) -> Path:
        return self.bench_dir / "bench.json"

    @property
    def ablation_md(self) -> Path:
        """The latest ablation table of `make bench` (Markdown)."""
        return self.bench_dir / "ablation.md"

    # ---- 06 local-feature re-ranking (common/rerank.py) ---------------------------------
    @property
    def rerank_dir(self) -> Path:
        return self.data / "rerank"

    @property
    def features_dir(self) -> Path:
        """Cached SIFT/RootSIFT features, one .npz per image (``<split>/<Image>.npz``)."""
        return self.rerank_dir / "features"

    @property
    def rerank_calibration(self) -> Path:
        """Isotonic calibrations of cosine and inlier count, fusion weight, ID-mode threshold (JSON)."""
        return self.rerank_dir / "calibration.json"

    @property
    def rerank_report(self) -> Path:
        """Fusion-weight grid, timings, pair counts of the last stage 06 run."""
        return self.rerank_dir / "report.json"

    @property
    def reliability_png(self) -> Path:
        """Calibrated probability vs observed share of same-individual pairs (validation)."""
        return self.rerank_dir / "reliability.png"

    @property
    def matches_png(self) -> Path:
        """Inlier matches drawn between sample validation queries and their best candidate."""
        return self.rerank_dir / "matches.png"

    @property
    def pseudo_calibration(self) -> Path:
        """Stage 05's own calibration (fitted on the stage 04 meta-embedding)."""
        return self.pseudo_dir / "rerank_calibration.json"

    # ---- tool state kept inside the project ------------------------------------------
    @property
    def yolo_config_dir(self) -> Path:
        """ultralytics' settings folder (kept here so it never writes ~/.config)."""
        return self.data / ".yolo"

    @property
    def config_stamps(self) -> Path:
        """Per-stage resolved-config stamps used by the Makefile (see common/config.py)."""
        return self.data / ".config"
