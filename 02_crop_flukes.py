"""Stage 02 - crop flukes with the detector.

For every image of clean/train.csv, clean/test.csv and clean/pretrain.csv: the detector's most
confident box, grown by `crop.margin` and clipped to the image; below `crop.conf` (or without a
trained detector) the whole image, flagged fallback=1. Crops are stored with their longest side
<= `crop.max_side` under DATA/crops/<split>/, listed in crops/crops.csv
(Image,split,x0,y0,x1,y1,conf,fallback,width,height; box in source pixels), summarised in
crops/report.json and drawn in crops/samples.png. A rerun only redoes crops that are out of date.
"""
import sys
import time

from common.config import parse_stage_args
from common.errors import run_stage


def main() -> int:
    cfg, paths, _ = parse_stage_args(__doc__)
    import pandas as pd

    from common import cropping
    from common.io import ImageReadError, read_json, write_csv, write_json
    from common.runtime import resolve_device

    crop = cfg["crop"]
    if not paths.detector_metrics.exists():
        print(f"error: {paths.detector_metrics} is missing: run stage 01 first (make 01)", file=sys.stderr)
        return 1
    trained = bool(read_json(paths.detector_metrics).get("trained"))
    imgsz = int(crop["imgsz"] or cfg["detector"]["imgsz"])
    weights = paths.detector_weights if trained else None
    sig = cropping.signature(weights, crop, imgsz)
    jobs = cropping.crop_jobs(paths)

    previous = None
    if paths.crops_csv.exists() and paths.crops_report.exists() and read_json(paths.crops_report).get("signature") == sig:
        previous = pd.read_csv(paths.crops_csv, dtype={"Image": str, "split": str}, keep_default_na=False)
    detect = None
    if trained:
        from common.detector import FlukeDetector, setup_ultralytics

        setup_ultralytics(paths.yolo_config_dir)
        detect = FlukeDetector(weights, imgsz=imgsz, device=resolve_device(cfg["device"]))
    else:
        print("02: no trained detector (see detector/metrics.json): every image is used whole (fallback=1)")

    t0 = time.perf_counter()
    try:
        rows, n_new = cropping.run_crops(jobs, detect, conf=crop["conf"], margin=crop["margin"],
                                         max_side=crop["max_side"], batch=crop["batch"], quality=crop["quality"],
                                         previous=previous, threads=crop["threads"])
    except ImageReadError as e:
        print(f"error: {e} (stage 00 should have dropped it: rerun make 00)", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - t0
    summary = cropping.summarize(rows)
    cropping.plot_samples(rows, jobs, paths.crops_samples_png, n=crop["n_samples"], seed=cfg["seed"])
    write_json(paths.crops_report, {"signature": sig, "detector": trained, "processed": n_new,
                                    "reused": len(rows) - n_new, "seconds": round(seconds, 1), "splits": summary})
    write_csv(paths.crops_csv, rows)
    for split, s in summary.items():
        print(f"02: {split:8s} {s['images']:6d} images  fallback {s['fallback']:5d} ({s['fallback_rate']:.1%})  "
              f"median conf {s['median_conf']:.2f}")
    print(f"02: cropped {n_new} images in {seconds:.0f} s, {len(rows) - n_new} up to date -> {paths.crops_dir}")
    return 0


if __name__ == "__main__":
    run_stage(main)
