"""Embedded demo competition: synthetic humpback-fluke photos in the Kaggle Humpback layout.

``python -m common.demo_data --out DIR [--config configs/demo.yaml] [--set demo.seed=3]``
writes a complete competition into DIR (refused when DIR already has a train.csv)::

    DIR/train.csv              Image,Id   long tail of identities, singletons, new_whale rows
    DIR/train/*.jpg            incl. planted dirt: corrupt files, tiny images, exact duplicates
    DIR/test/*.jpg             known individuals and individuals never seen in train
    DIR/boxes.csv              makesense.ai export of tight fluke boxes (see below)
    DIR/pretrain/train.csv     a related dataset: another population, sea and camera
    DIR/pretrain/train/*.jpg
    DIR/.truth/test.csv        Image,Id of every test photo (withheld truth for local scoring)
    DIR/.demo.json             the demo config and counts (marks the folder as the demo: PROFILE=demo)

Every individual has its own fluke: outline (lobe sweep and chord, median notch, ragged
trailing edge, nicks, sometimes a missing tip) and a black/white underside pattern (white
patches from an individual noise field, dark spots, white rake scars, barnacle rings). The
pattern is not mirror-symmetric, so a mirrored fluke looks like another whale. Each photo
draws its own pose (roll, yaw/pitch perspective, lobe bend, scale, position, sometimes partly
out of frame), water line (partly submerged lobes), splashes, dripping water, occluders, sea
(waves, glints, foam), lighting, colour cast, greyscale, blur, noise and JPEG quality.

Identities: ``w_`` + 7 hex digits. In the truth file, test Ids that never occur in train.csv
are new individuals (Kaggle's ``new_whale`` in ID mode); most of them have >= 2 test photos,
so image retrieval over train + test has something to find. ``new_whale`` rows of train.csv
are one-off individuals that appear nowhere else.

Boxes: ``label_name,bbox_x,bbox_y,bbox_width,bbox_height,image_name,image_width,image_height``
with the tight pixel box of the visible fluke (after every warp and the water line; clipped to
the frame). Boxed images are train and pretrain photos only, named by their plain file name,
and every image name is unique across train, test and pretrain: the detector finds a boxed
image at ``RAW/train/<name>`` or else ``RAW/pretrain/train/<name>``. Dirt (corrupt, tiny,
duplicate copies) is never boxed.

Difficulty (``demo.difficulty`` scales every per-photo variation). Measured on ground-truth
crops at 128 px, 29 held-out identities (183 photos, leave-one-out), EfficientNet-Lite0:

    difficulty   frozen ImageNet MAP@20 / top-1   ArcFace, 8 CPU epochs MAP@20 / top-1
    0.6          0.17 / 0.38                      0.57 / 0.75
    0.8          0.16 / 0.37                      0.40 / 0.57   (default)
    1.0          0.12 / 0.30                      0.33 / 0.48

Everything is a pure function of ``demo.seed`` and the ``demo:`` config (same seed → the
same bytes on a given machine); the competition is built in a sibling temp folder and renamed
into place.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from .demo_render import COMPETITION, RELATED, encode_jpeg, make_fluke, photograph
from .errors import PipelineError
from .metrics import NEW_WHALE

BOX_COLUMNS = ["label_name", "bbox_x", "bbox_y", "bbox_width", "bbox_height", "image_name", "image_width",
               "image_height"]
# Top-level entries the generator writes; train.csv is moved into place last (it marks "done").
ENTRIES = ("train", "test", "pretrain", "boxes.csv", ".truth", ".demo.json", "train.csv")

class DemoError(PipelineError, ValueError):
    """Bad demo config or output folder; the message names it."""



# ---------------------------------------------------------------------------------------------
# The competition plan: who is photographed where, and the planted dirt
# ---------------------------------------------------------------------------------------------
def resolve_config(demo_cfg: dict | None) -> dict:
    """The ``demo:`` section of configs/default.yaml updated with ``demo_cfg``, validated.

    Raises DemoError naming the bad key.
    """
    from .config import load_config

    defaults = load_config()["demo"]
    cfg = {**defaults, **(demo_cfg or {})}
    unknown = sorted(set(cfg) - set(defaults))
    if unknown:
        raise DemoError(f"unknown demo config key(s): {', '.join('demo.' + k for k in unknown)}")
    for k, v in cfg.items():
        if k in ("width", "difficulty", "tail_alpha"):
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise DemoError(f"demo.{k} must be a non-negative integer, got {v!r}")
    wd = cfg["width"]
    if not (isinstance(wd, (list, tuple)) and len(wd) == 2 and all(isinstance(x, int) for x in wd)
            and 64 <= wd[0] <= wd[1]):
        raise DemoError(f"demo.width must be [min, max] pixel widths with 64 <= min <= max, got {wd!r}")
    for k in ("difficulty", "tail_alpha"):
        if not isinstance(cfg[k], (int, float)) or cfg[k] < 0:
            raise DemoError(f"demo.{k} must be a non-negative number, got {cfg[k]!r}")
    if cfg["n_individuals"] < 2 or cfg["max_images"] < 2:
        raise DemoError("demo.n_individuals and demo.max_images must be at least 2")
    return cfg


def _names(rng, n: int, taken: set, prefix: str = "", suffix: str = "", digits: int = 9) -> list[str]:
    out = []
    while len(out) < n:
        name = prefix + "".join(rng.choice(list("0123456789abcdef"), digits)) + suffix
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


def make_plan(cfg: dict) -> tuple[pd.DataFrame, list[dict]]:
    """Every photo to render and every dirt file to plant.

    Returns ``(photos, dirt)``: photos has one row per rendered image (split, Image, Id written
    to the CSV, truth Id, whale key, population) and dirt is a list of {kind, split, Image, Id,
    source?}.
    """
    rng = np.random.default_rng([cfg["seed"], 0])
    taken_ids, taken_names = set(), set()
    n_known = cfg["n_individuals"]
    sizes = np.arange(1, cfg["max_images"] + 1)
    p = sizes ** -float(cfg["tail_alpha"])
    counts = rng.choice(sizes, n_known, p=p / p.sum())
    counts[0], counts[-1] = cfg["max_images"], 1  # the tail's both ends always present
    known_ids = _names(rng, n_known, taken_ids, "w_", digits=7)
    unseen_ids = _names(rng, cfg["n_unseen"], taken_ids, "w_", digits=7)
    rows = []

    def add(split, key, truth, label=None, population="competition"):
        rows.append({"split": split, "key": key, "truth": truth, "Id": truth if label is None else label,
                     "population": population})

    for i, n in enumerate(counts):
        for _ in range(n):
            add("train", f"k{i}", known_ids[i])
    for i in range(cfg["n_new_whale"]):
        add("train", f"n{i}", f"new{i}", label=NEW_WHALE)
    # Test: unseen individuals mostly with >= 2 photos, the rest photos of known individuals.
    unseen_counts = rng.choice([1, 2, 3, 4], cfg["n_unseen"], p=[0.1, 0.4, 0.3, 0.2])
    while unseen_counts.sum() > cfg["n_test"] // 2 and unseen_counts.max() > 1:
        unseen_counts[np.argmax(unseen_counts)] -= 1
    for i, n in enumerate(unseen_counts):
        for _ in range(n):
            add("test", f"u{i}", unseen_ids[i])
    weight = counts ** 0.7 / (counts ** 0.7).sum()
    for i in rng.choice(n_known, max(0, cfg["n_test"] - int(unseen_counts.sum())), p=weight):
        add("test", f"k{i}", known_ids[i])
    pre_ids = _names(rng, cfg["n_pretrain_individuals"], taken_ids, "w_", digits=7)
    mean = max(1, cfg["pretrain_images"])
    for i, pid in enumerate(pre_ids):
        for _ in range(int(np.clip(1 + rng.poisson(mean - 1), 1, 3 * mean))):
            add("pretrain", f"p{i}", pid, population="related")
    photos = pd.DataFrame(rows, columns=["split", "key", "truth", "Id", "population"])
    photos["Image"] = _names(rng, len(photos), taken_names, suffix=".jpg")

    # Dirt in train: corrupt files and tiny images (extra photos of known whales), duplicates.
    dirt = []
    multi = [i for i in range(n_known) if counts[i] >= 2]
    kinds = ["truncated", "not_an_image", "empty"]
    for j in range(cfg["n_corrupt"]):
        i = rng.choice(multi)
        dirt.append({"kind": kinds[j % 3], "key": f"k{i}", "Id": known_ids[i]})
    for _ in range(cfg["n_tiny"]):
        i = rng.choice(multi)
        dirt.append({"kind": "tiny", "key": f"k{i}", "Id": known_ids[i]})
    train_known = photos.index[(photos.split == "train") & (photos.Id != NEW_WHALE)].to_numpy()
    for j, src in enumerate(rng.choice(train_known, min(cfg["n_duplicates"], len(train_known)), replace=False)):
        label = photos.at[src, "Id"]
        if j == 0:  # one duplicate pair disagrees on Id (label noise)
            label = rng.choice([x for x in known_ids if x != label])
        dirt.append({"kind": "duplicate", "key": photos.at[src, "key"], "Id": str(label), "source": int(src)})
    for d, name in zip(dirt, _names(rng, len(dirt), taken_names, suffix=".jpg")):
        d.update(split="train", Image=name)
    return photos, dirt


# ---------------------------------------------------------------------------------------------
# Writing the competition
# ---------------------------------------------------------------------------------------------
def _render_all(photos: pd.DataFrame, dirt: list[dict], cfg: dict, root: Path, progress: bool) -> list:
    from tqdm import tqdm

    from .paths import Paths

    paths = Paths(root, root)
    for split in ("train", "test", "pretrain"):
        paths.raw_dir(split).mkdir(parents=True, exist_ok=True)
    lo, hi = cfg["width"]
    boxes = [None] * len(photos)
    dirt_by_key = {}
    for d in dirt:
        if d["kind"] != "duplicate":
            dirt_by_key.setdefault(d["key"], []).append(d)
    bar = tqdm(total=len(photos) + len(dirt), desc="demo photos", unit="img", disable=not progress)
    kinds = {"k": 1, "u": 2, "n": 3, "p": 4}
    for key, group in photos.groupby("key", sort=False):
        style = RELATED if group["population"].iloc[0] == "related" else COMPETITION
        fluke = make_fluke(np.random.default_rng([cfg["seed"], 1, kinds[key[0]], int(key[1:])]), style)
        for idx, row in group.iterrows():
            rng = np.random.default_rng([cfg["seed"], 2, int(idx)])
            width = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
            img, _, box = photograph(fluke, rng, width, style, cfg["difficulty"])
            paths.raw_image(row["split"], row["Image"]).write_bytes(encode_jpeg(img, rng.integers(*style.jpeg)))
            boxes[idx] = None if box is None else (*box, img.shape[1], img.shape[0])
            bar.update()
        for j, d in enumerate(dirt_by_key.get(key, [])):
            rng = np.random.default_rng([cfg["seed"], 3, int(d["Image"][:7], 16), j])
            img, _, _ = photograph(fluke, rng, max(lo, 160), style, cfg["difficulty"])
            if d["kind"] == "tiny":  # a thumbnail: shorter side well below any sensible clean.min_side
                tw = int(rng.integers(30, 44))
                img = cv2.resize(img, (tw, max(8, tw * img.shape[0] // img.shape[1])), interpolation=cv2.INTER_AREA)
            data = encode_jpeg(img, 85)
            if d["kind"] == "truncated":
                data = data[: int(len(data) * rng.uniform(0.3, 0.7))]
            elif d["kind"] == "not_an_image":
                data = b"<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"
            elif d["kind"] == "empty":
                data = b""
            paths.raw_image("train", d["Image"]).write_bytes(data)
            bar.update()
    for d in dirt:
        if d["kind"] == "duplicate":
            src = photos.loc[d["source"]]
            shutil.copyfile(paths.raw_image(src["split"], src["Image"]), paths.raw_image("train", d["Image"]))
            bar.update()
    bar.close()
    return boxes


def _write_tables(photos, dirt, boxes, cfg, root: Path) -> dict:
    from .io import write_csv
    from .paths import Paths

    paths = Paths(root, root)
    train = pd.concat([photos.loc[photos.split == "train", ["Image", "Id"]],
                       pd.DataFrame([{"Image": d["Image"], "Id": d["Id"]} for d in dirt], columns=["Image", "Id"])])
    write_csv(paths.raw_train_csv, train.sort_values("Image"))
    test = photos[photos.split == "test"]
    write_csv(paths.truth_csv, test[["Image", "truth"]].rename(columns={"truth": "Id"}).sort_values("Image"))
    pre = photos[photos.split == "pretrain"]
    write_csv(paths.raw_pretrain_csv, pre[["Image", "Id"]].sort_values("Image"))
    # Boxes: train + pretrain photos (never dirt or test), drawn at random.
    rng = np.random.default_rng([cfg["seed"], 4])
    cand = [i for i in photos.index[photos.split != "test"] if boxes[i] is not None]
    chosen = sorted(rng.choice(cand, min(cfg["n_boxes"], len(cand)), replace=False)) if cand else []
    rows = []
    for i in chosen:
        x0, y0, x1, y1, iw, ih = boxes[i]
        rows.append(["fluke", x0, y0, x1 - x0 + 1, y1 - y0 + 1, photos.at[i, "Image"], iw, ih])
    write_csv(paths.raw_boxes_csv, pd.DataFrame(rows, columns=BOX_COLUMNS))
    train_ids = train.loc[train.Id != NEW_WHALE, "Id"]
    per_id = train_ids.value_counts()
    return {
        "train_rows": len(train), "train_individuals": int(per_id.size), "singletons": int((per_id == 1).sum()),
        "new_whale_rows": int((train.Id == NEW_WHALE).sum()), "test_images": len(test),
        "test_unseen_images": int((~test.truth.isin(set(train_ids))).sum()),
        "test_unseen_individuals": int(test.loc[~test.truth.isin(set(train_ids)), "truth"].nunique()),
        "pretrain_rows": len(pre), "pretrain_individuals": int(pre.Id.nunique()), "boxes": len(rows),
        "corrupt": sum(d["kind"] in ("truncated", "not_an_image", "empty") for d in dirt),
        "tiny": sum(d["kind"] == "tiny" for d in dirt), "duplicates": sum(d["kind"] == "duplicate" for d in dirt),
    }


def _move_into(tmp: Path, out: Path) -> None:
    """Rename the finished competition onto ``out`` (train.csv last, as it marks completion)."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        os.replace(tmp, out)
        return
    for name in ENTRIES:
        if (tmp / name).exists():
            os.replace(tmp / name, out / name)
    shutil.rmtree(tmp, ignore_errors=True)


def generate(out_dir, demo_cfg: dict | None = None, progress: bool = True) -> dict:
    """Write the demo competition into ``out_dir``; returns summary counts (plus seconds, bytes)."""
    start = time.time()
    out = Path(out_dir).resolve()
    cfg = resolve_config(demo_cfg)
    if (out / "train.csv").exists():
        raise FileExistsError(f"{out} already holds a competition (train.csv); remove it or choose another --out")
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out} exists and is not a folder")
    clash = [n for n in ENTRIES if (out / n).exists()]
    if clash:
        raise DemoError(f"{out} already has {', '.join(clash)} but no train.csv; remove them or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # small images: OpenCV's thread pool costs more than it saves
    try:
        photos, dirt = make_plan(cfg)
        boxes = _render_all(photos, dirt, cfg, tmp, progress)
        summary = _write_tables(photos, dirt, boxes, cfg, tmp)
        # marks the folder as the synthetic demo: `make all` then picks PROFILE=demo (common/profile.py)
        (tmp / ".demo.json").write_text(json.dumps({"demo": cfg, "counts": summary}, indent=1, sort_keys=True) + "\n")
        summary["bytes"] = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        _move_into(tmp, out)
    finally:
        cv2.setNumThreads(threads)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    summary["seconds"] = round(time.time() - start, 2)
    return summary


# ---------------------------------------------------------------------------------------------
# A contact sheet to look at the competition
# ---------------------------------------------------------------------------------------------
def contact_sheet(raw_dir, dest, n_whales: int = 6, per_whale: int = 6, thumb: int = 220):
    """PNG grid: rows = the most photographed train whales (+ one pretrain whale), boxes in green."""
    from .io import atomic_path, read_image
    from .paths import Paths

    paths = Paths(raw_dir, raw_dir)
    train = pd.read_csv(paths.raw_train_csv, dtype=str, keep_default_na=False)
    pre = pd.read_csv(paths.raw_pretrain_csv, dtype=str, keep_default_na=False)
    boxes = pd.read_csv(paths.raw_boxes_csv).set_index("image_name")
    known = train[train.Id != NEW_WHALE]
    ids = list(known.Id.value_counts().index[:n_whales])
    groups = [("train", i, known[known.Id == i].Image.tolist()) for i in ids]
    top_pre = pre.Id.value_counts().index[0]
    groups.append(("pretrain", top_pre, pre[pre.Id == top_pre].Image.tolist()))
    groups.append(("train", "new_whale (one-offs)", train[train.Id == NEW_WHALE].Image.tolist()))
    sheet = np.full((len(groups) * (thumb // 2 + 24), per_whale * thumb, 3), 255, np.uint8)
    for r, (split, label, names) in enumerate(groups):
        for c, name in enumerate(names[:per_whale]):
            try:
                img = read_image(paths.raw_image(split, name))
            except OSError:
                continue
            if name in boxes.index:
                b = boxes.loc[name]
                cv2.rectangle(img, (int(b.bbox_x), int(b.bbox_y)),
                              (int(b.bbox_x + b.bbox_width - 1), int(b.bbox_y + b.bbox_height - 1)), (0, 255, 0),
                              max(1, img.shape[1] // 200))
            s = min(thumb / img.shape[1], (thumb // 2) / img.shape[0])
            img = cv2.resize(img, (max(1, int(img.shape[1] * s)), max(1, int(img.shape[0] * s))),
                             interpolation=cv2.INTER_AREA)
            y, x = r * (thumb // 2 + 24) + 20, c * thumb
            sheet[y:y + img.shape[0], x:x + img.shape[1]] = img
        cv2.putText(sheet, f"{split}: {label}", (4, r * (thumb // 2 + 24) + 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    with atomic_path(dest) as tmp:
        tmp.write_bytes(buf.tobytes())
    return Path(dest)


def main(argv=None) -> int:
    from .config import ConfigError, load_config

    ap = argparse.ArgumentParser(prog="python -m common.demo_data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder to create the competition in (must not hold train.csv)")
    ap.add_argument("--config", default=os.environ.get("CONFIG", "configs/demo.yaml"),
                    help="profile YAML merged over configs/default.yaml; its demo: section is used")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set demo.seed=3 (repeatable)")
    ap.add_argument("--sheet", default=None, metavar="PNG", help="also write a contact sheet PNG here")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        summary = generate(args.out, cfg["demo"], progress=not args.quiet)
    except (ConfigError, DemoError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("demo competition in {}: {}".format(args.out, ", ".join(f"{k}={v}" for k, v in summary.items())))
    if args.sheet:
        print(f"contact sheet: {contact_sheet(args.out, args.sheet)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
