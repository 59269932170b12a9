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

Artifacts (DATA, default ``data/``): one folder per stage, named in ``Paths.__init__``.
No stage spells a path itself; everything goes through :class:`Paths`.
"""
from __future__ import annotations

from pathlib import Path

SPLITS = ("train", "test", "pretrain")


class Paths:
    """Every path of a run. Fixed names are attributes set here; paths that depend on a split,
    image or member name are methods below."""

    def __init__(self, raw="data/raw", data="data"):
        self.raw = Path(raw).resolve()
        self.data = Path(data).resolve()

        # ---- raw competition ---------------------------------------------------------------------
        self.raw_train_csv = self.raw / "train.csv"
        self.raw_boxes_csv = self.raw / "boxes.csv"
        self.raw_pretrain = self.raw / "pretrain"
        self.raw_pretrain_csv = self.raw_pretrain / "train.csv"
        self.truth_csv = self.raw / ".truth" / "test.csv"
        # Optional test-side encounter mapping (Image,encounter).
        self.test_encounters_csv = self.raw / "test_encounters.csv"

        # ---- 00 clean ----------------------------------------------------------------------------
        self.clean_dir = self.data / "clean"
        # Usable train images with split flags (Image,Id,val,train_local,train_full).
        self.clean_train_csv = self.clean_dir / "train.csv"
        # Usable test images (Image).
        self.clean_test_csv = self.clean_dir / "test.csv"
        # Usable pretrain images, same columns as clean_train_csv (absent without pretrain/).
        self.clean_pretrain_csv = self.clean_dir / "pretrain.csv"
        self.clean_report = self.clean_dir / "report.json"
        # Images per identity, local-validation roles and drops per reason (stage 00).
        self.clean_summary_png = self.clean_dir / "summary.png"

        # ---- 01 detector -------------------------------------------------------------------------
        self.detector_dir = self.data / "detector"
        # ultralytics dataset (images/{train,val}, labels/{train,val}).
        self.detector_dataset = self.detector_dir / "dataset"
        self.detector_yaml = self.detector_dir / "data.yaml"
        self.detector_runs = self.detector_dir / "runs"
        self.detector_weights = self.detector_dir / "best.pt"
        # Written by stage 01 in every case (``{"trained": false, ...}`` without boxes).
        self.detector_metrics = self.detector_dir / "metrics.json"
        # Stage 01 training curves (losses, held-out mAP per epoch).
        self.detector_curves_png = self.detector_dir / "curves.png"

        # ---- 02 crops ----------------------------------------------------------------------------
        self.crops_dir = self.data / "crops"
        self.crops_csv = self.crops_dir / "crops.csv"
        self.crops_samples_png = self.crops_dir / "samples.png"
        # Stage 02 summary (fallback rates per split) and the signature that keeps reruns incremental.
        self.crops_report = self.crops_dir / "report.json"

        # ---- 03/04 models ------------------------------------------------------------------------
        self.models_dir = self.data / "models"
        # Stage 03 done-marker: JSON with each member's pretrain checkpoint and scores (or skipped).
        self.pretrain_summary = self.models_dir / "pretrain" / "summary.json"
        # Stage 04 done-marker: JSON with each member's best checkpoint and validation scores.
        self.members_summary = self.models_dir / "summary.json"
        # Frozen-trunk feature caches (train.cache_trunk), shared by 03/04/05 runs with the same trunk.
        self.trunk_cache_dir = self.models_dir / "trunk_cache"

        # ---- 05 pseudo labels --------------------------------------------------------------------
        self.pseudo_dir = self.data / "pseudo"
        self.pseudo_csv = self.pseudo_dir / "pseudo_labels.csv"
        self.pseudo_report = self.pseudo_dir / "report.json"
        # Stage 05: label precision on validation vs threshold, test similarity histogram.
        self.pseudo_png = self.pseudo_dir / "report.png"

        # ---- 06 embeddings and submission --------------------------------------------------------
        self.embeddings_dir = self.data / "embeddings"
        self.submission_dir = self.data / "submission"
        self.submission_csv = self.submission_dir / "submission.csv"
        self.submission_ids_csv = self.submission_dir / "submission_ids.csv"
        self.scores_json = self.submission_dir / "scores.json"
        self.gallery_png = self.submission_dir / "gallery.png"
        # Default output of ``06_ensemble_submit.py --predict`` (top-k matches of new photos).
        self.predictions_csv = self.submission_dir / "predictions.csv"

        # ---- run report and benchmarks -----------------------------------------------------------
        self.report_dir = self.data / "report"
        # One self-contained page per run (python -m common.report, end of make all).
        self.report_html = self.report_dir / "index.html"
        # `make bench` runs the pipeline into this folder (a DATA of its own).
        self.bench_dir = self.data / "bench"
        self.bench_json = self.bench_dir / "bench.json"
        # The latest ablation table of `make bench` (Markdown).
        self.ablation_md = self.bench_dir / "ablation.md"

        # ---- 06 local-feature re-ranking (common/rerank.py) --------------------------------------
        self.rerank_dir = self.data / "rerank"
        # Cached SIFT/RootSIFT features, one .npz per image (``<split>/<Image>.npz``).
        self.features_dir = self.rerank_dir / "features"
        # Isotonic calibrations of cosine and inlier count, fusion weight, ID-mode threshold (JSON).
        self.rerank_calibration = self.rerank_dir / "calibration.json"
        # Fusion-weight grid, timings, pair counts of the last stage 06 run.
        self.rerank_report = self.rerank_dir / "report.json"
        # Calibrated probability vs observed share of same-individual pairs (validation).
        self.reliability_png = self.rerank_dir / "reliability.png"
        # Inlier matches drawn between sample validation queries and their best candidate.
        self.matches_png = self.rerank_dir / "matches.png"
        # Stage 05's own calibration (fitted on the stage 04 meta-embedding).
        self.pseudo_calibration = self.pseudo_dir / "rerank_calibration.json"

        # ---- tool state kept inside the project --------------------------------------------------
        # ultralytics' settings folder (kept here so it never writes ~/.config).
        self.yolo_config_dir = self.data / ".yolo"
        # Per-stage resolved-config stamps used by the Makefile (see common/config.py).
        self.config_stamps = self.data / ".config"

    def __repr__(self) -> str:
        return f"Paths(raw={str(self.raw)!r}, data={str(self.data)!r})"

    def raw_dir(self, split: str) -> Path:
        """Folder of raw images for split 'train', 'test' or 'pretrain'."""
        if split == "pretrain":
            return self.raw_pretrain / "train"
        if split in ("train", "test"):
            return self.raw / split
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")

    def raw_image(self, split: str, name: str) -> Path:
        return self.raw_dir(split) / name

    def crop_image(self, split: str, name: str) -> Path:
        return self.crops_dir / split / name

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

    def pseudo_member_dir(self, name: str) -> Path:
        """Run folder of a member retrained with pseudo labels (same files as member_dir)."""
        return self.pseudo_dir / "models" / name

    def pseudo_round_dir(self, name: str, round_: int) -> Path:
        """Run folder of one label -> retrain round (stage 05's report names the one stage 06 uses)."""
        return self.pseudo_member_dir(name) / f"round{round_}"

    def embeddings_file(self, name: str) -> Path:
        return self.embeddings_dir / f"{name}.npz"
