"""Stage 02 - crop flukes with the detector, or without one with the backbone's attention map.

For every image of clean/train.csv, clean/test.csv and clean/pretrain.csv one box, grown by
`crop.margin` and clipped to the image: the detector's most confident box (source yolo) or,
without a trained detector (`crop.attention: auto`), the largest hot region of the frozen ImageNet
backbone's activation map (source cam, common/attention.py). No box, a detector box below
`crop.conf`, or an attention box covering more than `crop.attention_max_area` of the photo: the
whole image, fallback=1 (source full). Crops are stored with their longest side <= `crop.max_side`
under DATA/crops/<split>/, listed in crops/crops.csv
(Image,split,x0,y0,x1,y1,conf,fallback,width,height,source; box in source pixels), summarised per
split and per source in crops/report.json and drawn in crops/samples.png. A rerun only redoes
crops that are out of date.
"""
import sys
import time

from common.config import parse_stage_args
from common.errors import run_stage


def main() -> int:
    cfg, paths, _ = parse_stage_args(__doc__)
    from common import cropping
    from common.io import ImageReadError, read_json, write_csv, write_json

    crop = cfg["crop"]
    if not paths.detector_metrics.exists():
        print(f"error: {paths.detector_metrics} is missing: run stage 01 first (make 01)", file=sys.stderr)
        return 1
    trained = bool(read_json(paths.detector_metrics).get("trained"))
    source = cropping.crop_source(crop, trained)
    weights = paths.detector_weights if source == "yolo" else None
    sig = cropping.signature(weights, crop, cropping.detector_imgsz(cfg), source)
    jobs = cropping.crop_jobs(paths)

    previous = None
    if paths.crops_csv.exists() and paths.crops_report.exists() and read_json(paths.crops_report).get("signature") == sig:
        previous = cropping.read_crops(paths.crops_csv)
    cropper = cropping.make_cropper(cfg, paths, trained=trained)
    if not trained:
        print("02: no trained detector (see detector/metrics.json): "
              + ("boxes from the ImageNet backbone's attention map (crop.attention)" if source == "cam"
                 else "every image is used whole (fallback=1)"))

    t0 = time.perf_counter()
    try:
        rows, n_new = cropping.run_crops(jobs, cropper, batch=crop["batch"], quality=crop["quality"],
                                         previous=previous, threads=crop["threads"])
    except ImageReadError as e:
        print(f"error: {e} (stage 00 should have dropped it: rerun make 00)", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - t0
    summary, sources = cropping.summarize(rows), cropping.summarize_sources(rows)
    cropping.plot_samples(rows, jobs, paths.crops_samples_png, n=crop["n_samples"], seed=cfg["seed"],
                          maps=cropper.maps if source == "cam" else None)
    write_json(paths.crops_report, {"signature": sig, "detector": trained, "source": source, "processed": n_new,
                                    "reused": len(rows) - n_new, "seconds": round(seconds, 1), "splits": summary,
                                    "sources": sources})
    write_csv(paths.crops_csv, rows)
    for split, s in summary.items():
        print(f"02: {split:8s} {s['images']:6d} images  fallback {s['fallback']:5d} ({s['fallback_rate']:.1%})  "
              f"median conf {s['median_conf']:.2f}  " + "  ".join(f"{k} {s[k]}" for k in cropping.SOURCES))
    print(f"02: cropped {n_new} images in {seconds:.0f} s, {len(rows) - n_new} up to date -> {paths.crops_dir}")
    return 0


if __name__ == "__main__":
    run_stage(main)
