"""Stages 05 and 06 on a hand-built tiny competition with untrained tiny members (no training wait).

Whales are random 'patterns' (each photo: its whale's pattern plus noise), so even an untrained
network embeds photos of one whale close together.
"""
import contextlib
import io
import json
import os
import runpy
import sys
from types import SimpleNamespace

import cv2
import numpy as np
import pandas as pd
import pytest

from common.config import ROOT, load_config, member_config, member_names
from common.embedding_store import load_vectors
from common.handoff import final_checkpoints
from common.paths import Paths
from common.submission import read_image_submission, validate_image_submission

N_IDS, PER_ID, N_TEST = 8, 3, 8
OVERRIDES = ["train.batch_embed=8", "pseudo.epochs=1", "pseudo.threshold=0.0", "pseudo.margin=0.0",
             "search.gallery_queries=3", "search.gallery_k=3", "train.P=4", "train.K=2"]


def _photo(rng, pattern):
    img = np.clip(pattern + rng.normal(0, 18, pattern.shape), 0, 255).astype(np.uint8)
    return cv2.resize(img, (72, 48), interpolation=cv2.INTER_NEAREST)


def build_competition(root, seed=0):
    """raw/ (train, test with one corrupt file, .truth) and data/clean/ as stage 00 would write them."""
    rng = np.random.default_rng(seed)
    raw = root / "raw"
    for d in ("train", "test", ".truth"):
        (raw / d).mkdir(parents=True, exist_ok=True)
    patterns = {f"w_{i:03d}": rng.uniform(0, 255, (6, 9, 3)) for i in range(N_IDS + 2)}
    train, test = [], []
    for i, (wid, pat) in enumerate(list(patterns.items())[:N_IDS]):
        for j in range(PER_ID):
            name = f"tr_{i}_{j}.jpg"
            cv2.imwrite(str(raw / "train" / name), _photo(rng, pat))
            train.append((name, wid, int(j == 0 and i % 2 == 0)))
    for j in range(2):
        name = f"nw_{j}.jpg"
        cv2.imwrite(str(raw / "train" / name), _photo(rng, rng.uniform(0, 255, (6, 9, 3))))
        train.append((name, "new_whale", 0))
    ids = list(patterns)
    for t in range(N_TEST):
        wid = ids[t % len(ids)]  # the last two whales are unseen in train
        name = f"te_{t}.jpg"
        cv2.imwrite(str(raw / "test" / name), _photo(rng, patterns[wid]))
        test.append((name, wid))
    (raw / "test" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    pd.DataFrame([r[:2] for r in train], columns=["Image", "Id"]).to_csv(raw / "train.csv", index=False)
    pd.DataFrame(test + [("broken.jpg", "w_000")], columns=["Image", "Id"]).to_csv(raw / ".truth" / "test.csv", index=False)
    df = pd.DataFrame(train, columns=["Image", "Id", "val"])
    known = df["Id"] != "new_whale"
    df["train_local"] = (known & (df["val"] == 0)).astype(int)
    df["train_full"] = known.astype(int)
    paths = Paths(raw, root / "data")
    paths.clean_dir.mkdir(parents=True)
    df.to_csv(paths.clean_train_csv, index=False)
    pd.DataFrame({"Image": [t[0] for t in test]}).to_csv(paths.clean_test_csv, index=False)
    paths.clean_report.write_text(json.dumps({"test": {"dropped_files": [
        {"Image": "broken.jpg", "reason": "unreadable", "detail": "cannot identify image file"}]}}))
    return paths


def save_untrained_members(paths, cfg):
    import torch

    from common.io import save_torch, write_json
    from common.models import build_model

    for name in member_names(cfg):
        member = member_config(cfg, name)
        torch.manual_seed(0)
        model = build_model(dict(member["model"], pretrained="none"))
        save_torch(paths.member_ckpt(name), {"model": model.state_dict(), "head": None, "member": member, "classes": [],
                                             "epoch": 0, "metrics": {}, "history": []})
    write_json(paths.members_summary, {"members": {n: {"ckpt": str(paths.member_ckpt(n))} for n in member_names(cfg)}})


def stage(script, paths, *extra):
    """Run a stage script in this process (saves the interpreter and torch start-up of a
    subprocess); returns ``(exit code, stdout, stderr)``."""
    argv = [script, "--raw", str(paths.raw), "--data", str(paths.data), "--config", "tiny"]
    for o in OVERRIDES:
        argv += ["--set", o]
    env, old_argv = dict(os.environ), sys.argv
    out, err = io.StringIO(), io.StringIO()
    sys.argv = argv + list(extra)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(ROOT / script), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old_argv
        os.environ.clear()
        os.environ.update(env)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture(scope="module")
def comp(tmp_path_factory):
    paths = build_competition(tmp_path_factory.mktemp("retr"))
    save_untrained_members(paths, load_config("tiny", OVERRIDES))
    out = stage("05_pseudo_label.py", paths, "--set", "pseudo.enabled=false")  # names stage 04's checkpoints
    assert out.returncode == 0, out.stderr
    return paths


def test_stage06_writes_valid_submissions_and_reuses_embeddings(comp):
    out = stage("06_ensemble_submit.py", comp)
    assert out.returncode == 0, out.stderr[-3000:]
    tests = sorted(p.name for p in (comp.raw / "test").iterdir())
    rows = read_image_submission(comp.submission_csv)
    db = pd.read_csv(comp.clean_train_csv)["Image"].tolist() + pd.read_csv(comp.clean_test_csv)["Image"].tolist()
    validate_image_submission(rows, tests, db, k=20)  # raises on any flaw
    assert "1 unreadable test images got filler rows: broken.jpg" in out.stdout
    ids = pd.read_csv(comp.submission_ids_csv, dtype=str)
    assert sorted(ids["Image"]) == tests and all(len(set(x.split())) == 5 for x in ids["Id"])
    assert ids.set_index("Image").loc["broken.jpg", "Id"].split()[0] == "new_whale"
    scores = pd.read_json(comp.scores_json, typ="series")
    assert set(scores["scores"]) == {*member_names(load_config("tiny")), "ensemble", "ensemble+local", "ensemble+fused"}
    assert 0 <= scores["rerank"]["weight"] <= 1
    assert scores["search"] == {"index": "flat", "n_db": len(db), "n_sample": 0, "recall": 1.0}  # auto: exact here
    sec = scores["seconds"]
    assert 0 < sec["rerank_matching"] <= sec["rerank_total"] <= sec["stage"] and "local matching" in out.stdout
    for f in (comp.rerank_calibration, comp.reliability_png, comp.matches_png, comp.rerank_report):
        assert f.exists(), f
    assert "ensemble+fused" in out.stdout
    rep = json.loads(comp.rerank_report.read_text())  # inlier_score auto: the one that validates better
    got = rep["inlier_scores"]
    assert set(got) == {"count", "lnbnn"} and got[rep["inlier_score"]]["map20"] == max(g["map20"] for g in got.values())
    assert json.loads(comp.rerank_calibration.read_text())["inlier_score"] == rep["inlier_score"]
    # rerank.xfeat (default on): every validation pair matched, a share chosen; XFeat features of the
    # test photos only when that share is used (validation matches training photos only)
    xf, n_train = rep["features"]["xfeat"], len(pd.read_csv(comp.clean_train_csv))
    assert rep["xfeat"] and 0 <= rep["xfeat_share"] <= 1 and rep["features"]["computed"] == len(db)
    assert xf["computed"] == (len(db) if rep["xfeat_share"] > 0 else n_train), (xf, rep["xfeat_share"])
    assert xf["pairs"] > 0 and rep["seconds"]["xfeat_matching"] > 0  # (seconds kept to 1 ms)
    assert len(rep["grid"]) == 11 ** 3 and "XFeat share" in out.stdout
    for s in scores["scores"].values():
        assert 0 <= s["val"]["map20"] <= 1 and s["val"]["n_queries"] == N_IDS // 2
        assert 0 <= s["test"]["map5_nw"] <= 1
    assert comp.gallery_png.stat().st_size > 1000
    for name in member_names(load_config("tiny")):
        vectors = load_vectors(comp.embeddings_file(name))
        assert vectors.dtype == np.float16 and len(vectors) == len(db)

    # only a weight changes: nothing is re-embedded, the submission is still valid
    again = stage("06_ensemble_submit.py", comp, "--set", "ensemble.lite0_64_do=3.0")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("embedded 0 images") == 2
    validate_image_submission(read_image_submission(comp.submission_csv), tests, db, k=20)


def test_rerank_off_or_weight_zero_keeps_the_embedding_ranking(comp, tmp_path):
    off = stage("06_ensemble_submit.py", comp, "--set", "rerank.enabled=false")
    assert off.returncode == 0, off.stderr[-3000:]
    plain = comp.submission_csv.read_bytes()
    scores = pd.read_json(comp.scores_json, typ="series")
    assert set(scores["scores"]) == {*member_names(load_config("tiny")), "ensemble"} and "rerank" not in scores
    zero = stage("06_ensemble_submit.py", comp, "--set", "rerank.fusion_weight=0.0")
    assert zero.returncode == 0, zero.stderr[-3000:]
    assert comp.submission_csv.read_bytes() == plain  # weight 0: the embedding's image ranking
    s = pd.read_json(comp.scores_json, typ="series")["scores"]
    for m in ("map20", "top1", "hit20"):
        assert s["ensemble+fused"]["val"][m] == s["ensemble"]["val"][m]
        assert s["ensemble+fused"]["test"][m] == s["ensemble"]["test"][m]
    diffs = json.loads(comp.rerank_report.read_text())["differences"]  # fused = embedding, query by query
    for where in ("val", "test"):
        assert set(diffs[where]) == {"fused-local", "fused-embedding"}
        assert all(d == {**d, "diff": 0.0, "lo": 0.0, "hi": 0.0} for d in diffs[where]["fused-embedding"].values())
    assert "fused - embedding on withheld truth (95 % bootstrap interval" in zero.stdout


def test_predict_prints_and_writes_matches(comp, tmp_path):
    # a calibration that weighs XFeat (validation may give it 0 on this tiny set): --predict matches with it too
    assert stage("06_ensemble_submit.py", comp, "--set", "rerank.xfeat_share=0.5").returncode == 0
    assert json.loads(comp.rerank_calibration.read_text())["learned_share"] == 0.5
    photo = comp.raw / "test" / "te_0.jpg"
    out = stage("06_ensemble_submit.py", comp, "--predict", str(photo), "--top-k", "4", "--out", str(tmp_path / "m.csv"))
    assert out.returncode == 0, out.stderr[-3000:]
    m = pd.read_csv(tmp_path / "m.csv", dtype=str, keep_default_na=False)
    assert len(m) == 4 and m["rank"].tolist() == ["1", "2", "3", "4"]
    assert m["match"].iloc[0] == "te_0.jpg"  # the photo itself is in the database: similarity ~1
    assert float(m["similarity"].iloc[0]) > 0.99 and "te_0.jpg" in out.stdout
    assert {"inliers", "probability"} <= set(m.columns)  # re-ranked by the fused probability
    assert "nearest known Id" in out.stdout or "probably a new individual" in out.stdout

    broken = comp.raw / "test" / "broken.jpg"
    bad = stage("06_ensemble_submit.py", comp, "--predict", str(broken))
    assert bad.returncode != 0 and "broken.jpg" in bad.stderr and "Traceback" not in bad.stderr

    mixed = stage("06_ensemble_submit.py", comp, "--predict", str(broken), str(photo), "--top-k", "2",
                  "--out", str(tmp_path / "mixed.csv"))  # the bad photo is skipped, the others matched
    assert mixed.returncode == 1 and "skipped" in mixed.stderr and "broken.jpg" in mixed.stderr, mixed.stderr[-3000:]
    m = pd.read_csv(tmp_path / "mixed.csv", dtype=str, keep_default_na=False)
    assert m["query"].tolist() == [str(photo)] * 2 and m["match"].iloc[0] == "te_0.jpg"


def test_stages_05_06_without_upstream_reports_fail_clearly(tmp_path):
    paths = build_competition(tmp_path)
    out = stage("05_pseudo_label.py", paths)
    assert out.returncode == 1 and out.stderr.strip() == f"error: {paths.members_summary} not found: run stage 04 first (make all)"
    out = stage("06_ensemble_submit.py", paths)
    assert out.returncode == 1 and out.stderr.strip() == f"error: {paths.pseudo_report} not found: run stage 05 first (make all)"
    assert not paths.submission_csv.exists() and not paths.pseudo_report.exists()
    save_untrained_members(paths, load_config("tiny", OVERRIDES))
    assert stage("05_pseudo_label.py", paths, "--set", "pseudo.enabled=false").returncode == 0
    paths.member_ckpt("lite0_64").unlink()  # the report names a checkpoint that is gone
    out = stage("06_ensemble_submit.py", paths)
    assert out.returncode == 1 and "best.pt named by" in out.stderr and "rerun stage 05" in out.stderr
    assert not paths.submission_csv.exists()


def test_stage05_labels_retrains_and_stage06_uses_it(comp):
    out = stage("05_pseudo_label.py", comp)
    assert out.returncode == 0, out.stderr[-3000:]
    report = pd.read_json(comp.pseudo_report, typ="series")
    labels = pd.read_csv(comp.pseudo_csv, dtype=str)
    assert list(labels.columns) == ["Image", "Id", "score", "margin"]
    assert report["labelled"] == len(labels) > 0  # threshold 0: every test image near a known whale
    assert set(labels["Image"]) <= set(pd.read_csv(comp.clean_test_csv)["Image"])
    assert 0 <= report["precision_truth"] <= 1
    member = report["rounds"][0]["members"]["lite0_64"]
    ckpt = comp.pseudo_round_dir("lite0_64", 1) / ("best.pt" if member["kept"] else "best_rejected.pt")
    assert ckpt.exists() and member["n_pseudo"] == len(labels)
    final = final_checkpoints(comp, ["lite0_64", "lite0_64_do"])
    assert final["lite0_64"] == (ckpt if member["kept"] else comp.member_ckpt("lite0_64"))
    assert final["lite0_64_do"] == comp.member_ckpt("lite0_64_do")
    assert not comp.pseudo_member_dir("lite0_64_do").exists()  # pseudo: false in the tiny profile

    off = stage("05_pseudo_label.py", comp, "--set", "pseudo.enabled=false")
    assert off.returncode == 0 and "skipped" in pd.read_json(comp.pseudo_report, typ="series")
    assert final_checkpoints(comp, ["lite0_64"])["lite0_64"] == comp.member_ckpt("lite0_64")
    assert not comp.pseudo_csv.exists() and not comp.pseudo_member_dir("lite0_64").exists()


def test_a_worse_second_round_keeps_the_model_round_one_accepted(comp):
    """Round 1 improves, round 2 scores below its start: stage 06 must use round 1's checkpoint."""
    import shutil

    from common.pseudo import run_rounds

    scores = iter([(0.2, 0.5), (0.5, 0.3)])  # (start, best) validation score per round
    starts = []

    def fake_fit(member, rows, val_df, out_dir, init, **kw):
        before, after = next(scores)
        starts.append(init)
        out_dir.mkdir(parents=True)
        shutil.copy(init, out_dir / "best.pt")
        return {"history": [{"epoch": 0, "map20": before}, {"epoch": 1, "map20": after}], "metrics": {"map20": after}}

    cfg = load_config("tiny", OVERRIDES + ["pseudo.rounds=2"])
    names = member_names(cfg)
    report = run_rounds(cfg, comp, names, ["lite0_64"], {n: comp.member_ckpt(n) for n in names}, fit_fn=fake_fit)
    r1, r2 = comp.pseudo_round_dir("lite0_64", 1), comp.pseudo_round_dir("lite0_64", 2)
    assert starts == [comp.member_ckpt("lite0_64"), r1 / "best.pt"]  # round 2 starts from round 1's model
    assert [r["members"]["lite0_64"]["kept"] for r in report["rounds"]] == [True, False]
    assert report["checkpoints"] == {"lite0_64": str(r1 / "best.pt"), "lite0_64_do": str(comp.member_ckpt("lite0_64_do"))}
    assert (r1 / "best.pt").exists() and (r2 / "best_rejected.pt").exists() and not (r2 / "best.pt").exists()
    shutil.rmtree(comp.pseudo_member_dir("lite0_64"))
