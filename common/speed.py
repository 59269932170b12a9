"""Speed as ratios, measured in one run (``make bench-speed``): each pipeline path against the bare
work it cannot avoid, on the same machine, batch and size, so the figures travel between machines.

* ``search``: faiss exact top-k vs scikit-learn brute-force NearestNeighbors vs a numpy argsort, on
  gallery-shaped unit vectors (identities of 8 photos; 10k, 100k and 1M x 256 by default): same
  neighbours for the exact ones, speed ratio, memory, faiss flat on float16 vectors
  (``search.vectors: float16``), and faiss IVF's recall@k against exact with
  its build and search times (the README's memory/time model comes from these rows);
* ``extract``: the pipeline's embedding extraction (decode JPEG, resize, normalise, model, flip TTA)
  vs the bare backbone forward on ready tensors (both flips), same batch and size; target >= 0.9x;
* ``train``: the training loop's images/s (data loading, augmentation, loss, optimiser, one epoch
  of :func:`common.training.fit` without validation, its 2nd epoch; the 1st, with the workers' start and
  the first steps' warm-up, in a row of its own) vs a bare forward + backward + step on ready tensors;
  target >= 0.8x;
* ``match``: SIFT extraction images/s, and the re-ranking's local matching pairs/s vs the bare OpenCV
  calls on the same features (stage 06 prints and saves the share of its time matching takes).

Writes ``DATA/bench/speed.json`` and ``speed.md`` (a table) and prints the table.
    python -m common.speed [--data DATA] [--sizes 10000 100000 1000000] [--images 128] [--img-size 224]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .config import section
from .io import write_json, write_text


def _timed(fn, repeat: int = 1):
    """Best wall time of ``repeat`` calls, and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


# ---------------------------------------------------------------------------------------------
# search
# ---------------------------------------------------------------------------------------------
def gallery_vectors(n: int, dim: int, per_identity: int = 8, spread: float = 0.6, seed: int = 0) -> np.ndarray:
    """``n`` unit vectors shaped like a re-identification gallery: ``n / per_identity`` random
    identity centres, each photo its centre plus Gaussian noise of norm ~``spread`` (photos of
    one identity at cosine ~0.7 to each other, ~0 to others). Uniform random vectors have no
    neighbours worth finding, which makes an IVF index look far worse than on embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(1, n // per_identity), dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[np.arange(n) % len(centres)]
    x += (spread / np.sqrt(dim)) * rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def search_speed(n: int, dim: int = 256, n_queries: int = 1000, k: int = 20, seed: int = 0,
                 exact_all_below: int = 200_000, nprobe="auto") -> list[dict]:
    """Top-k of ``n_queries`` held-out photos among ``n`` gallery vectors (:func:`gallery_vectors`):
    faiss flat, scikit-learn brute and a numpy argsort (exact; the last two only up to
    ``exact_all_below``, beyond which their query x database matrix alone outgrows memory), and a
    faiss IVF index (4 sqrt(n) lists, ``nprobe`` probed: auto = 1/16 as in the config) whose build (k-means + add) and search are
    timed apart. Each row: seconds, queries/s, recall@k against faiss flat, ``identity_recall`` (the
    share of the exact top-k's photos of the query's own identity that it finds: what re-identification
    needs; the rest of an exact top-k is near-random here), ratio to faiss flat's time, and the index's memory (``mem_mib``: vectors as float32 + faiss' ids / centroids)."""
    import faiss
    from sklearn.neighbors import NearestNeighbors

    from .retrieval import build_index, ivf_lists

    x = gallery_vectors(n + n_queries, dim, seed=seed)
    label = np.arange(n + n_queries) % max(1, (n + n_queries) // 8)  # gallery_vectors' identity of each row
    rng = np.random.default_rng(seed + 1)
    held = rng.choice(n + n_queries, n_queries, replace=False)
    q, db = x[held], np.delete(x, held, axis=0)
    q_label, db_label = label[held], np.delete(label, held)
    nlist = ivf_lists("auto", n)
    mem_flat = db.nbytes / 2**20
    mem_ivf = (db.nbytes + 8 * n + 4 * nlist * dim) / 2**20

    def flat():
        index = faiss.IndexFlatIP(dim)
        index.add(db)
        return index.search(q, k)[1]

    def brute():
        return NearestNeighbors(n_neighbors=k, algorithm="brute", metric="cosine").fit(db).kneighbors(q)[1]

    def numpy_sort():
        return np.argsort(-(q @ db.T), axis=1, kind="stable")[:, :k]

    flat16 = build_index(db.astype(np.float16), "flat", vectors="float16", gpu=False)  # search.vectors: float16

    def half():
        return flat16.search(q, k)[1]

    t_build, ivf_index = _timed(lambda: build_index(db, "ivf", nlist=nlist, nprobe=nprobe, gpu=False))

    def ivf():
        return ivf_index.search(q, k)[1]

    cases = [("faiss flat (exact)", flat, mem_flat), ("faiss flat, float16 vectors", half, mem_flat / 2)]
    if n < exact_all_below:
        cases += [("sklearn brute (exact)", brute, mem_flat), ("numpy argsort (exact)", numpy_sort, mem_flat)]
    cases += [(f"faiss IVF nlist={nlist} nprobe={ivf_index.nprobe} (built in {t_build:.1f}s)", ivf, mem_ivf)]
    rows, secs, ref = [], [], None
    for name, fn, mem in cases:
        sec, idx = _timed(fn, repeat=2 if n <= 20000 else 1)
        ref = idx if ref is None else ref
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(idx, ref)]))
        same = [set(b[db_label[b] == ql]) for b, ql in zip(ref, q_label)]  # exact hits of the query's identity
        id_recall = sum(len(set(a) & m) for a, m in zip(idx, same)) / max(1, sum(map(len, same)))
        sec = max(sec, 1e-9)  # a tiny search can time at 0
        secs.append(sec)
        rows.append({"bench": "search", "case": f"{n // 1000}k x {dim}: {name}", "seconds": round(sec, 4),
                     "per_s": round(n_queries / sec, 1), "unit": "queries", f"recall@{k}": round(recall, 4),
                     "identity_recall": round(id_recall, 4), "mem_mib": round(mem, 3)})
    for r, sec in zip(rows, secs):
        r["ratio"] = round(secs[0] / sec, 3)  # > 1: faster than faiss flat (unrounded times: tiny ones round to 0)
    return rows


# ---------------------------------------------------------------------------------------------
# extraction and training
# ---------------------------------------------------------------------------------------------
def _photos(folder: Path, n: int, size: int = 320, seed: int = 0) -> list[Path]:
    import cv2

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        img = cv2.GaussianBlur(rng.integers(0, 255, (size, int(size * 1.5), 3), dtype=np.uint8), (0, 0), 3)
        cv2.imwrite(str(folder / f"p{i}.jpg"), img)
        out.append(folder / f"p{i}.jpg")
    return out


def _model(backbone: str, img_size: int):
    import torch

    from .models import build_model

    torch.manual_seed(0)
    return build_model(section("model", backbone=backbone, pretrained="none", img_size=img_size, emb_dim=128))


def extract_speed(photos: list[Path], backbone: str, img_size: int, batch: int, workers: int) -> list[dict]:
    import torch

    from .inference import embed_images

    model = _model(backbone, img_size).eval()
    n = len(photos)
    x = torch.randn(batch, 3, img_size, img_size).contiguous(memory_format=torch.channels_last)

    def bare():  # what embed_images cannot avoid: image and mirror through the model, channels-last
        with torch.inference_mode():
            for _ in range(max(1, n // batch)):
                model(torch.cat([x, torch.flip(x, dims=[3])]))

    embed_images(model, photos[:batch], img_size, batch_size=batch, tta_hflip=True, progress=False)  # warm-up
    t_bare, _ = _timed(bare)
    t_pipe, _ = _timed(lambda: embed_images(model, photos, img_size, batch_size=batch, tta_hflip=True,
                                            num_workers=workers, progress=False))
    per_bare = max(1, n // batch) * batch / t_bare
    return [{"bench": "extract", "case": f"bare forward x2 (flip), {backbone} @{img_size} batch {batch}",
             "seconds": round(t_bare, 3), "per_s": round(per_bare, 1), "unit": "images", "ratio": 1.0},
            {"bench": "extract", "case": f"pipeline embed_images (decode, resize, TTA), {workers} workers",
             "seconds": round(t_pipe, 3), "per_s": round(n / t_pipe, 1), "unit": "images",
             "ratio": round((n / t_pipe) / per_bare, 3), "target": ">= 0.9"}]


def train_speed(photos: list[Path], backbone: str, img_size: int, P: int, K: int, workers: int, tmp: Path) -> list[dict]:
    import pandas as pd
    import torch

    from .config import load_config, member_config
    from .losses import MetricLoss
    from .training import fit

    n = len(photos)
    ids = [f"w{i // K}" for i in range(n)]
    cfg = load_config(None, [f"train.P={P}", f"train.K={K}", "train.epochs=2", "train.warmup_epochs=0",
                             "train.eval_init=false", "train.imprint=false", "augment.hflip=false"])
    cfg["members"] = {"m": {"model": {"backbone": backbone, "pretrained": "none", "img_size": img_size, "emb_dim": 128}}}
    member = member_config(cfg, "m")
    df = pd.DataFrame({"Image": [p.name for p in photos], "Id": ids, "path": [str(p) for p in photos]})
    res = fit(member, df, None, tmp / "run", device="cpu", num_workers=workers, progress=False)
    t_first, t_loop = (h["time_s"] for h in res["history"][-2:])  # epoch 1 pays the start-up, epoch 2 is steady

    model = _model(backbone, img_size).train()
    loss_fn = MetricLoss(member["train"], model.emb_dim, max(P, n // K))
    opt = torch.optim.AdamW([*model.parameters(), *loss_fn.parameters()], lr=1e-4)
    x, y = torch.randn(P * K, 3, img_size, img_size), torch.arange(P).repeat_interleave(K)
    if member["train"]["channels_last"]:  # the memory format the training loop uses (1.6x on CPU with oneDNN)
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def bare():  # warm: the fit above ran the same shapes in this process
        for _ in range(max(1, n // (P * K))):
            opt.zero_grad()
            loss, _ = loss_fn(model(x), y)
            loss.backward()
            opt.step()

    t_bare, _ = _timed(bare)
    per_bare = max(1, n // (P * K)) * P * K / t_bare
    return [{"bench": "train", "case": f"bare forward+backward+step, {backbone} @{img_size} batch {P}x{K}",
             "seconds": round(t_bare, 3), "per_s": round(per_bare, 1), "unit": "images", "ratio": 1.0},
            {"bench": "train", "case": f"training loop (load, augment, loss, step), {workers} workers, 2nd epoch",
             "seconds": t_loop, "per_s": round(n / t_loop, 1), "unit": "images",
             "ratio": round((n / t_loop) / per_bare, 3), "target": ">= 0.8"},
            {"bench": "train", "case": "the same, 1st epoch (worker start, first batch, first-step warm-up)",
             "seconds": t_first, "per_s": round(n / t_first, 1), "unit": "images",
             "ratio": round((n / t_first) / per_bare, 3)}]


def match_speed(photos: list[Path], size: int = 384, max_keypoints: int = 500, threads: int = 2,
                repeat: int = 4) -> list[dict]:
    """Local-feature matching as the re-ranking runs it by default (:func:`common.local_features.match_many`:
    ratio test, RANSAC affine map, mirror check, ``threads``) vs the bare OpenCV calls on the same
    features in one thread (2-NN match, ratio test, estimateAffine2D); each photo against a rotated,
    scaled copy of itself (a true match: RANSAC has inliers to find) and an unrelated photo."""
    import cv2

    from .local_features import extract, match_many

    def load(i, warp=False):
        img = cv2.imread(str(photos[i]))
        rng = np.random.default_rng(i)
        for _ in range(40):  # marks with corners for SIFT (the smooth noise photos have few keypoints)
            x, y = (int(v) for v in rng.integers(0, img.shape[1::-1]))
            colour = tuple(int(c) for c in rng.integers(0, 255, 3))
            cv2.rectangle(img, (x, y), (x + int(rng.integers(5, 40)), y + int(rng.integers(5, 40))), colour, -1)
            cv2.circle(img, tuple(int(v) for v in rng.integers(0, img.shape[1::-1])), int(rng.integers(3, 20)), colour, 2)
        if warp:
            h, w = img.shape[:2]
            img = cv2.warpAffine(img, cv2.getRotationMatrix2D((w / 2, h / 2), 15, 0.8), (w, h))
        return img

    n = len(photos)
    t_feat, feats = _timed(lambda: [extract(load(i), size, max_keypoints) for i in range(n)])
    feats += [extract(load(i, warp=True), size, max_keypoints) for i in range(n)]
    pairs = [(i, n + i) for i in range(n)] + [(i, (i + 1) % n) for i in range(n)]
    pairs = pairs * repeat

    def bare():
        matcher = cv2.BFMatcher(cv2.NORM_L2)
        for a, b in pairs:
            knn = matcher.knnMatch(feats[a].desc, feats[b].desc, k=2)
            good = [m for m, m2 in (x for x in knn if len(x) == 2) if m.distance < 0.8 * m2.distance]
            if len(good) >= 6:
                cv2.estimateAffine2D(feats[a].xy[[m.queryIdx for m in good]], feats[b].xy[[m.trainIdx for m in good]],
                                     method=cv2.RANSAC, ransacReprojThreshold=5.0, maxIters=2000, confidence=0.995)

    t_bare, _ = _timed(bare)
    t_pipe, matched = _timed(lambda: match_many(feats, pairs, threads=threads, progress=False, geometry="affine"))
    inliers = np.array([len(m) for m in matched])
    per_bare = len(pairs) / t_bare
    true, false = inliers[: n].mean(), inliers[n: 2 * n].mean()
    return [{"bench": "match", "case": f"SIFT + RootSIFT extraction, longest side {size}, {max_keypoints} keypoints",
             "seconds": round(t_feat, 3), "per_s": round(n / t_feat, 1), "unit": "images", "ratio": 1.0},
            {"bench": "match", "case": "bare OpenCV 2-NN + ratio + RANSAC affine, 1 thread", "seconds": round(t_bare, 3),
             "per_s": round(per_bare, 1), "unit": "pairs", "ratio": 1.0},
            {"bench": "match", "case": f"pipeline match_many, {threads} threads (inliers: copy {true:.0f}, other {false:.0f})",
             "seconds": round(t_pipe, 3), "per_s": round(len(pairs) / t_pipe, 1), "unit": "pairs",
             "ratio": round(len(pairs) / t_pipe / per_bare, 3)}]


# ---------------------------------------------------------------------------------------------
def markdown(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


BENCHES = ("search", "extract", "train", "match")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data", help="DATA: results go to DATA/bench/speed.{json,md}")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000],
                    help="search database sizes")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--images", type=int, default=128, help="photos for the extraction/training runs")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the config's num_workers: auto)")
    ap.add_argument("--only", nargs="+", choices=BENCHES, default=list(BENCHES))
    args = ap.parse_args(argv)
    from .config import data_workers
    from .paths import Paths

    args.workers = data_workers("auto", "cpu") if args.workers is None else args.workers

    paths = Paths(args.data, args.data)
    rows = []
    with tempfile.TemporaryDirectory(prefix="speed_") as tmp:
        photos = _photos(Path(tmp) / "photos", args.images) if {"extract", "train", "match"} & set(args.only) else []
        if "search" in args.only:
            for n in args.sizes:
                rows += search_speed(n, args.dim, n_queries=min(1000, n // 4))
        if "extract" in args.only:
            rows += extract_speed(photos, args.backbone, args.img_size, 32, args.workers)
        if "train" in args.only:
            rows += train_speed(photos, args.backbone, args.img_size, 8, 4, args.workers, Path(tmp))
        if "match" in args.only:
            rows += match_speed(photos, threads=args.workers)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "argv": sys.argv[1:] if argv is None else argv}
    write_json(paths.bench_dir / "speed.json", {**meta, "rows": rows})
    text = markdown(rows)
    write_text(paths.bench_dir / "speed.md", text)
    print(text + f"wrote {paths.bench_dir / 'speed.json'}, {paths.bench_dir / 'speed.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
