"""Stage 01 - train the YOLO fluke detector on the annotated boxes.

Reads RAW/boxes.csv (makesense.ai export or Image,x0,y0,x1,y1; or `detector.boxes`: another CSV
or a folder of YOLO txt labels), finds each image in train/, test/ or pretrain/train/ and uses it
only when stage 00 accepted it (clean/*.csv), skips and counts bad rows (each listed with its
reason in metrics.json "annotations.skipped_rows"), writes an ultralytics dataset with an
image-level train/val split to DATA/detector/dataset + data.yaml, trains `detector.model` offline, and writes
DATA/detector/best.pt, curves.png and metrics.json (mAP50, mAP50-95 on the held-out boxes).
Without annotations it writes metrics.json with "trained": false and stage 02 uses whole images.
"""
import sys
import time
from pathlib import Path

from common.config import parse_stage_args
from common.errors import run_stage


def main() -> int:
    cfg, paths, _ = parse_stage_args(__doc__)
    from common import annotations, detector
    from common.io import ImageReadError, write_json
    from common.tables import accepted_images, rejected_images
    from common.runtime import resolve_device

    det = cfg["detector"]
    source = Path(det["boxes"]) if det["boxes"] else paths.raw_boxes_csv
    if not source.exists():
        reason = (f"no annotations at {source}: stage 02 will crop with the ImageNet backbone's attention map "
                  f"(crop.attention: auto), or use whole images (crop.attention: false)")
        print(f"01: {reason}")
        write_json(paths.detector_metrics, {"trained": False, "skipped": reason})
        return 0

    folders = {s: paths.raw_dir(s) for s in ("train", "test", "pretrain")}
    try:
        detector.check_model_spec(det["model"])
        boxes, report = annotations.load_annotations(source, folders, accepted_images(paths), rejected_images(paths))
    except (annotations.AnnotationError, detector.DetectorError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    skipped = ", ".join(f"{k} {v}" for k, v in report["skipped"].items() if v) or "none"
    print(f"01: {report['valid']} valid boxes on {report['images']} images from {source} "
          f"({report['rows']} rows; skipped: {skipped}; corners swapped {report['swapped']}; clipped {report['clipped']})")
    for r in report["skipped_rows"][:10]:
        print(f"01:   skipped {r['row']}: {r['reason']}: {r['detail']}")
    if len(report["skipped_rows"]) > 10:
        print(f"01:   ... {len(report['skipped_rows']) - 10} more in {paths.detector_metrics}")

    try:
        counts = annotations.write_yolo_dataset(boxes, paths.detector_dataset, val_frac=det["val_frac"],
                                                seed=cfg["seed"], max_side=det["imgsz"])
    except ImageReadError as e:
        print(f"error: {e} (it changed since stage 00 accepted it: rerun make 00)", file=sys.stderr)
        return 1
    if counts["val"]["images"] == 0:
        print("01: warning: too few images for a hold-out; mAP is measured on the training images")
    annotations.write_data_yaml(paths.detector_yaml, paths.detector_dataset,
                                val="images/val" if counts["val"]["images"] else "images/train")

    device = resolve_device(cfg["device"])
    detector.setup_ultralytics(paths.yolo_config_dir)
    t0 = time.perf_counter()
    run_dir = detector.train(paths.detector_yaml, det, paths.detector_runs, device=device, seed=cfg["seed"])
    train_s = time.perf_counter() - t0
    detector.install_weights(run_dir, paths.detector_weights)
    history = detector.read_results(run_dir)
    detector.plot_history(history, paths.detector_curves_png)
    scores = detector.evaluate(paths.detector_weights, paths.detector_yaml, imgsz=det["imgsz"], batch=det["batch"],
                               device=device, runs_dir=paths.detector_runs)
    write_json(paths.detector_metrics, {
        "trained": True, **scores, "weights": paths.detector_weights, "device": str(device),
        "epochs_run": len(history), "train_seconds": round(train_s, 1), "dataset": counts, "annotations": report})
    print(f"01: held-out boxes ({counts['val']['images']} images): mAP50 {scores['map50']:.3f}  "
          f"mAP50-95 {scores['map50_95']:.3f}  P {scores['precision']:.3f}  R {scores['recall']:.3f}  "
          f"(trained {len(history)} epochs in {train_s:.0f} s on {device}) -> {paths.detector_weights}")
    return 0


if __name__ == "__main__":
    run_stage(main)
