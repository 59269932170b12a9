"""Calibration, fusion and re-ranking of shortlists (common/rerank.py), grouped search."""
import json

import numpy as np
import pandas as pd
import pytest

from common.paths import Paths
from common.config import ConfigError
from common.rerank import Calibration, apply_isotonic, fit_calibration, fit_isotonic, fuse_probabilities, reorder, shortlist
from common.retrieval import relevant_counts, search
from common.tables import encounters


@pytest.mark.parametrize("kind", ["centered", "isotonic"])
def test_isotonic_calibration_is_monotone_and_a_probability(kind):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 60, 2000)
    y = rng.random(2000) < 1 / (1 + np.exp(-(x - 20) / 5))
    curve = fit_isotonic(x, y, weight=rng.uniform(0.5, 3, 2000), curve=kind)
    p = apply_isotonic(curve, np.linspace(-10, 100, 500))
    assert np.all(np.diff(p) >= 0) and p.min() >= 0 and p.max() <= 1
    assert p[0] < 0.1 and p[-1] > 0.9


def test_centered_calibration_keeps_the_order_inside_a_pooled_block():
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 1, 3000)
    y = rng.random(3000) < 0.05 + 0.3 * x                         # a weak signal: isotonic pools wide blocks
    w = rng.uniform(0.5, 2, 3000)
    steps, centred = fit_isotonic(x, y, w, "isotonic"), fit_isotonic(x, y, w, "centered")
    assert sorted(set(steps["y"])) == centred["y"]                  # the same levels, one breakpoint each
    grid = np.linspace(centred["x"][0], centred["x"][-1], 400)
    assert (np.diff(apply_isotonic(centred, grid)) > 0).all()       # strictly rising between first and last
    assert (np.diff(apply_isotonic(steps, grid)) == 0).mean() > 0.5  # the step fit is flat over most of it
    y_hat = apply_isotonic(centred, x)
    assert abs(np.average(y_hat, weights=w) - np.average(y, weights=w)) < 0.01  # still calibrated on average
    with pytest.raises(ConfigError, match="rerank.calibration"):
        fit_isotonic(x, y, curve="steps")


def _lists(rng, nq=30, s=15):
    cos = -np.sort(-rng.uniform(-0.2, 0.9, (nq, s)), axis=1)
    cos[:, 3] = cos[:, 2]  # ties keep the embedding order
    idx = rng.permutation(nq * s).reshape(nq, s)
    inl = rng.integers(0, 40, (nq, s))
    return cos, idx, inl


@pytest.mark.parametrize("fusion", ["mean", "logodds"])
def test_fusion_weight_zero_gives_the_embedding_ranking_one_the_local_ranking(fusion):
    rng = np.random.default_rng(1)
    cos, idx, inl = _lists(rng)
    same = rng.random(cos.size) < 0.3
    cal = fit_calibration(cos.ravel(), inl.ravel(), same)
    cal.fusion = fusion
    _, order0 = reorder(cal.fuse(cos, inl, 0.0), idx)
    np.testing.assert_array_equal(order0, idx)
    cal.local = {"x": [0.0, 40.0], "y": [0.0, 1.0]}  # strictly increasing in inliers
    _, order1 = reorder(cal.fuse(cos, inl, 1.0), idx)
    got = np.take_along_axis(inl, np.argsort(-inl, axis=1, kind="stable"), 1)
    np.testing.assert_array_equal(np.array([[inl[r][list(idx[r]).index(c)] for c in order1[r]] for r in range(len(idx))]), got)


def test_fused_score_is_the_weighted_mean_and_round_trips():
    cal = Calibration({"x": [0.0, 1.0], "y": [0.0, 1.0]}, {"x": [0.0, 10.0], "y": [0.0, 1.0]}, 0.25, 0.4)
    np.testing.assert_allclose(cal.fuse([0.8], [5]), [0.75 * 0.8 + 0.25 * 0.5])
    assert Calibration.from_dict(cal.to_dict()).to_dict() == cal.to_dict()
    s, i = reorder([[0.2, 0.9, 0.5]], [[7, 8, -1]])
    assert i.tolist() == [[8, 7, -1]]
    old = {k: v for k, v in cal.to_dict().items() if k != "fusion"}  # a calibration.json from before rerank.fusion
    assert Calibration.from_dict(old).fusion == "mean"


def test_logodds_fusion_is_a_monotone_probability_that_a_sure_match_dominates():
    pe, pl = np.meshgrid(np.linspace(0, 1, 21), np.linspace(0, 1, 21), indexing="ij")
    for w in (0.2, 0.5, 0.8):
        f = fuse_probabilities(pe, pl, w, "logodds")
        assert ((f >= 0) & (f <= 1)).all()
        assert (np.diff(f, axis=0) >= -1e-12).all() and (np.diff(f, axis=1) >= -1e-12).all(), "non-decreasing in each"
    np.testing.assert_allclose(fuse_probabilities([0.3], [0.3], 0.7, "logodds"), [0.3])  # agreement stays put
    # a certain geometric match (p_local 0.999) against a weak cosine: the mean caps it at w, log-odds does not
    assert fuse_probabilities([0.1], [0.999], 0.5, "logodds")[0] > 0.9 > fuse_probabilities([0.1], [0.999], 0.5)[0]
    with pytest.raises(ConfigError, match="rerank.fusion must be one of mean, logodds"):
        fuse_probabilities([0.5], [0.5], 0.5, "product")


def test_grouped_search_never_returns_the_query_encounter():
    rng = np.random.default_rng(2)
    db = rng.normal(size=(12, 8)).astype(np.float32)
    groups = np.array(["e1", "e1", "e1", "", "e2", "e2", "", "", "", "", "", ""], dtype=object)
    q = np.array([0, 4, 6])
    _, plain = search(db, db[q], 11, exclude=q, gpu=False)
    _, idx = search(db, db[q], 11, exclude=q, gpu=False, groups=(groups[q], groups))
    assert not {1, 2} & set(idx[0]) and 5 not in idx[1] and (idx[0] >= 0).sum() == 9
    np.testing.assert_array_equal(idx[2], plain[2])
    ids = np.array(["a", "a", "b", "a", "c", "c", "a", "b", "b", "b", "b", "b"], dtype=object)
    assert relevant_counts(ids[q], ids, True, (groups[q], groups)).tolist() == [2, 0, 3]
    _, rows = shortlist(db, q, np.arange(12), 5, True, groups, gpu=False)
    assert not {0, 1, 2} & set(rows[0]) and 4 not in rows[1] and 5 not in rows[1]


def test_encounters_come_from_train_csv_and_the_test_mapping(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    pd.DataFrame({"Image": ["a.jpg", "b.jpg"], "Id": ["w1", "w1"], "encounter": ["s1", ""]}).to_csv(raw / "train.csv", index=False)
    pd.DataFrame({"Image": ["t.jpg"], "encounter": ["s1"]}).to_csv(raw / "test_encounters.csv", index=False)
    table = pd.DataFrame({"split": ["train", "train", "test", "test"], "Image": ["a.jpg", "b.jpg", "t.jpg", "u.jpg"]})
    assert encounters(Paths(raw, tmp_path / "data"), table) == ["s1", "", "s1", ""]
    (raw / "test_encounters.csv").unlink()
    pd.DataFrame({"Image": ["a.jpg"], "Id": ["w1"]}).to_csv(raw / "train.csv", index=False)
    assert encounters(Paths(raw, tmp_path / "data"), table) == ["", "", "", ""]


def test_pair_scores_are_cached_across_scorers_until_an_image_or_setting_changes(tmp_path):
    import os

    import cv2
    from common.config import load_config
    from common.rerank import LocalScorer
    from test_local_features import scene, transformed

    rows = []
    for i, img in enumerate([scene(1, 200), transformed(scene(1, 200)), scene(2, 200), scene(3, 200)]):
        p = tmp_path / f"im{i}.png"
        cv2.imwrite(str(p), img)
        rows.append({"split": "train", "Image": p.name, "path": str(p)})
    table = pd.DataFrame(rows)
    r = dict(load_config(None)["rerank"], size=200, max_keypoints=200)
    idx = np.array([[1, 2, 3], [0, 2, 3]])
    first = LocalScorer(table, r, tmp_path / "f", progress=False)
    s1 = first.scores([0, 1], idx)
    assert first.counts["pairs"] == 6 and first.counts["pairs_cached"] == 0 and s1[0, 0] >= 20
    again = LocalScorer(table, r, tmp_path / "f", progress=False)
    assert np.array_equal(again.scores([0, 1], idx), s1)
    assert again.counts["pairs"] == 0 and again.counts["pairs_cached"] == 6
    cv2.imwrite(rows[3]["path"], scene(9, 200))
    os.utime(rows[3]["path"], ns=(1, 1))  # a changed image: only its two pairs are matched again
    changed = LocalScorer(table, r, tmp_path / "f", progress=False)
    changed.scores([0, 1], idx)
    assert changed.counts["pairs"] == 2 and changed.counts["pairs_cached"] == 4
    other = LocalScorer(table, dict(r, ratio=0.7), tmp_path / "f", progress=False)
    other.scores([0, 1], idx)
    assert other.counts["pairs"] == 6  # other matching settings: nothing reused


def test_the_lnbnn_index_reuses_ivf_lists_trained_on_the_same_images(tmp_path, monkeypatch):
    """A second scorer (stage 06 after stage 05, or a rerun) over the same images reads the trained
    IVF lists back instead of training them; a changed image trains new ones."""
    import os

    import cv2
    import common.lnbnn as lnbnn
    from common.config import load_config
    from common.rerank import LocalScorer
    from test_local_features import scene

    monkeypatch.setattr(lnbnn, "FLAT_BELOW", 100)
    rows = []
    for i in range(4):
        p = tmp_path / f"im{i}.png"
        cv2.imwrite(str(p), scene(i, 200))
        rows.append({"split": "train", "Image": p.name, "path": str(p)})
    table = pd.DataFrame(rows)
    r = dict(load_config(None)["rerank"], size=200, max_keypoints=200, xfeat=False)
    scorer = LocalScorer(table, r, tmp_path / "f", progress=False)
    first = scorer.lnbnn_index([0, 1, 2, 3], 4)
    assert not first.trained_from_cache and len(list((tmp_path / "f" / "lnbnn").glob("*.faiss"))) == 1
    again = LocalScorer(table, r, tmp_path / "f", progress=False).lnbnn_index([0, 1, 2, 3], 4)
    assert again.trained_from_cache
    query = scorer.feats[1].desc
    np.testing.assert_array_equal(again.scores(query, exclude=1), first.scores(query, exclude=1))
    cv2.imwrite(rows[3]["path"], scene(9, 200))
    os.utime(rows[3]["path"], ns=(1, 1))
    assert not LocalScorer(table, r, tmp_path / "f", progress=False).lnbnn_index([0, 1, 2, 3], 4).trained_from_cache


def test_the_xfeat_scorer_keeps_its_own_keypoint_budget_and_cache(tmp_path):
    import cv2
    from common.config import load_config
    from common.rerank import LocalScorer
    from test_local_features import scene, transformed

    rows = []
    for i, img in enumerate([scene(1, 200), transformed(scene(1, 200)), scene(2, 200)]):
        p = tmp_path / f"im{i}.png"
        cv2.imwrite(str(p), img)
        rows.append({"split": "train", "Image": p.name, "path": str(p)})
    r = dict(load_config(None)["rerank"], size=200, max_keypoints=300, xfeat_keypoints=60)
    scorer = LocalScorer(pd.DataFrame(rows), r, tmp_path / "f", progress=False)
    scorer.ensure([0, 1, 2])  # both kinds of features
    xf = scorer.learned_scores([0], np.array([[1, 2]]))
    assert len(scorer.feats[0]) > 60 and len(scorer.learned.feats[0]) == 60
    assert xf[0, 0] >= 15 and xf[0, 1] <= 8, xf                  # the copy matches, the other scene not
    assert (tmp_path / "f" / "xfeat" / "train" / "im0.png.npz").exists() and scorer.learned.counts["pairs"] == 2
    assert LocalScorer(pd.DataFrame(rows), dict(r, xfeat_share=0.0), tmp_path / "g", progress=False).learned is None


class _IdentityScorer:
    """Stands in for LocalScorer: many inliers for the same identity, few otherwise."""

    def __init__(self, ids, seed=0):
        self.ids, self.rng = np.asarray(ids, object), np.random.default_rng(seed)

    def scores(self, q_rows, idx, desc="", norms=None):
        same = self.ids[np.clip(idx, 0, None)] == self.ids[np.asarray(q_rows)][:, None]
        return np.where(idx < 0, 0, np.where(same, 30, 0) + self.rng.integers(0, 4, idx.shape))


def _noisy_identities(seed: int, n_ids: int = 12, per: int = 5):
    """``per`` photos of each of ``n_ids`` identities (the first of each a validation query), embedded
    as the identity's centre plus noise: ``(ids, is_query, embeddings)``."""
    rng = np.random.default_rng(seed)
    ids = np.repeat([f"w{i}" for i in range(n_ids)], per)
    query = np.zeros(len(ids), int)
    query[::per] = 1
    emb = np.repeat(rng.normal(size=(n_ids, 16)), per, axis=0) + rng.normal(scale=1.5, size=(len(ids), 16))
    return ids, query, emb


def _validation_table(ids, query, held) -> pd.DataFrame:
    return pd.DataFrame({"split": "train", "Image": [f"{i}.jpg" for i in range(len(ids))], "Id": ids,
                         "path": "", "is_query": query, "held_out": held})


def test_fusion_validates_on_every_photo_of_the_held_out_identities():
    from common.rerank import validate

    n_ids, per = 12, 5
    ids, query, emb = _noisy_identities(0, n_ids, per)       # one query per identity
    held = np.isin(ids, ["w10", "w11"])                       # never trained: every photo is a query
    table = _validation_table(ids, query, held.astype(int))
    rcfg = {"shortlist": 10, "calib_random": 5, "seed": 0, "fusion_weight": "auto", "select_metric": "map20",
            "local_calibration": "ranking", "fusion": "mean"}
    reports = {}
    for which in ("queries", "held_out"):
        cal, val, rep = validate(emb, table, _IdentityScorer(ids), {**rcfg, "val_queries": which}, k=5, log=lambda *a: None)
        reports[which] = rep
        assert 0.0 <= cal.weight <= 1.0 and val["local"]["top1"] == 1.0  # 30 inliers always win
    assert reports["queries"]["n_queries"] == n_ids and reports["queries"]["n_held_out_queries"] == 0
    assert reports["held_out"]["n_queries"] == n_ids + 2 * (per - 1) and reports["held_out"]["n_held_out_queries"] == 8
    with pytest.raises(ValueError, match="rerank.val_queries must be one of queries, held_out"):
        validate(emb, table, _IdentityScorer(ids), {**rcfg, "val_queries": "all"}, k=5, log=lambda *a: None)
    with pytest.raises(ValueError, match="rerank.inlier_score must be one of auto, count, lnbnn"):
        validate(emb, table, _IdentityScorer(ids), {**rcfg, "val_queries": "queries", "inlier_score": "sum"}, k=5,
                 log=lambda *a: None)
    with pytest.raises(ValueError, match="rerank.local_calibration must be one of shortlist, ranking"):
        validate(emb, table, _IdentityScorer(ids), {**rcfg, "val_queries": "queries", "local_calibration": "x"}, k=5,
                 log=lambda *a: None)


def test_new_whale_threshold_is_tuned_on_held_out_identities_as_new_individuals():
    """ID mode of the validation: a held-out identity's photos are scored with their identity hidden and
    truth new_whale (a test set's new animals are absent from train.csv). Without them no validation query
    is ever new, and the threshold would be tuned never to say new_whale."""
    from common.rerank import validate

    n_ids, per = 12, 5
    ids, query, emb = _noisy_identities(0, n_ids, per)
    rcfg = {"shortlist": 10, "calib_random": 5, "seed": 0, "fusion_weight": 0.5, "select_metric": "map20",
            "local_calibration": "ranking", "fusion": "logodds", "val_queries": "held_out"}
    n_new = {}
    for n_held in (0, 3):
        held = np.isin(ids, [f"w{i}" for i in range(n_ids - n_held, n_ids)]).astype(int)
        table = _validation_table(ids, query, held)
        cal, val, rep = validate(emb, table, _IdentityScorer(ids), rcfg, k=5, log=lambda *a: None)
        n_new[n_held] = rep["n_new_queries"]
        assert val["fused"]["map5"] == 1.0                    # image lists: every query finds its own identity
    assert n_new == {0: 0, 3: 3 * per}                      # every photo of a held-out identity counts as new
    set_cal, set_val, _ = validate(emb, table, _IdentityScorer(ids), rcfg, k=5, log=lambda *a: None, threshold=0.3)
    assert set_cal.new_whale_threshold == set_val["fused"]["new_whale_threshold"] == 0.3   # search.new_whale_threshold
    # MAP@5 1 with 15 new and 9 known queries: the threshold puts new_whale first for exactly the 15, whose
    # best candidate (another animal, <= 3 inliers) it places below, and the known ones' (30 inliers) above
    assert val["fused"]["map5_nw"] == 1.0 and 0.0 < cal.new_whale_threshold < 1.0


def test_local_calibration_on_shortlist_pairs_ignores_the_random_pairs_beyond():
    rng = np.random.default_rng(3)
    sl_inl, sl_same = rng.integers(0, 12, 400), rng.random(400) < 0.4     # shortlist: many positives
    far_inl, far_same = rng.integers(0, 6, 2000), np.zeros(2000, bool)      # beyond it: none
    inl, same = np.concatenate([sl_inl, far_inl]), np.concatenate([sl_same, far_same])
    cos = np.concatenate([rng.uniform(0.5, 1, 400), rng.uniform(-0.2, 0.5, 2000)])
    w = np.concatenate([np.ones(400), np.full(2000, 5.0)])
    ranking = fit_calibration(cos, inl, same, w)
    shortlist_only = fit_calibration(cos, inl, same, w, local_rows=np.arange(400))
    assert shortlist_only.local == fit_isotonic(sl_inl, sl_same)
    assert shortlist_only.emb == ranking.emb                                  # the cosine keeps the whole ranking
    assert shortlist_only.p_local([3])[0] > ranking.p_local([3])[0]          # a few inliers count for more


def test_recalibrated_fused_probability_keeps_every_ranking_and_means_what_it_says():
    from common.metrics import calibration_error
    from common.rerank import fit_platt

    rng = np.random.default_rng(4)
    z = rng.normal(scale=1.5, size=6000)
    same = rng.random(6000) < 1 / (1 + np.exp(-(2.5 * z + 2.0)))   # the truth is surer than the score says
    score = 1 / (1 + np.exp(-z))                                      # an under-confident fused score
    cal = Calibration({"x": [0.0, 1.0], "y": [0.0, 1.0]}, {"x": [0.0, 10.0], "y": [0.0, 1.0]}, 0.5, fusion="logodds")
    cal.platt = fit_platt(score, same)
    assert cal.platt[0] == pytest.approx(2.5, abs=0.3) and cal.platt[1] == pytest.approx(2.0, abs=0.3)
    p = cal.probability(score)
    assert calibration_error(score, same) > 0.15 > 0.03 > calibration_error(p, same)
    order = np.argsort(score)
    assert (np.diff(p[order]) > 0).all(), "strictly increasing: rankings and cuts keep their order"
    assert Calibration.from_dict(cal.to_dict()).platt == cal.platt
    old = {k: v for k, v in cal.to_dict().items() if k != "platt"}  # a calibration.json from before: the score itself
    np.testing.assert_array_equal(Calibration.from_dict(old).probability(score), score)
    assert fit_platt(score, np.ones(6000, bool)) == (1.0, 0.0)         # one class: nothing to fit


def test_validation_recalibrates_the_fused_probability_and_tunes_new_whale_on_it():
    from common.rerank import validate

    n_ids = 12
    ids, query, emb = _noisy_identities(5, n_ids)
    table = _validation_table(ids, query, 0)
    rcfg = {"shortlist": 10, "calib_random": 5, "seed": 0, "fusion_weight": 0.5, "select_metric": "map20",
            "local_calibration": "ranking", "fusion": "logodds", "val_queries": "queries"}
    cal, val, rep = validate(emb, table, _IdentityScorer(ids), rcfg, k=5, log=lambda *a: None)
    assert cal.platt[0] > 1.0, "two agreeing sources, weighted half each, under-state a match"
    best = rep["calibration_error"]["val"]["best"]
    assert best["n"] == n_ids and best["after"] < best["before"]
    assert abs(best["mean_probability"] - best["observed"]) <= abs(best["mean_score"] - best["observed"])
    assert rep["platt"] == list(cal.platt) and len(rep["pairs"]["fused_score"]) == len(rep["pairs"]["same"])
    assert cal.new_whale_threshold == val["fused"]["new_whale_threshold"]


class _NoiseScorer:
    """A matcher that sees nothing: 0-3 inliers whoever the pair."""

    def __init__(self, seed=1):
        self.rng = np.random.default_rng(seed)

    def scores(self, q_rows, idx, desc="", norms=None):
        return np.where(np.asarray(idx) < 0, 0, self.rng.integers(0, 4, np.shape(idx)))


def test_a_second_matcher_gets_the_share_of_the_local_evidence_validation_finds_it_earns():
    """rerank.xfeat: the scorer's ``learned`` matcher (XFeat) is calibrated and fused into the local
    evidence with a share chosen on validation: all of it when only it sees the identities, none when
    it sees nothing (the lists are then those without it)."""
    from common.rerank import validate

    ids, query, emb = _noisy_identities(0)
    table = _validation_table(ids, query, np.zeros(len(ids), int))
    rcfg = {"shortlist": 10, "calib_random": 5, "seed": 0, "fusion_weight": "auto", "select_metric": "map20",
            "local_calibration": "ranking", "fusion": "logodds", "val_queries": "queries", "xfeat_share": "auto"}
    blind = _NoiseScorer()
    blind.learned = _IdentityScorer(ids)
    cal, val, rep = validate(emb, table, blind, rcfg, k=5, log=lambda *a: None)
    assert cal.learned_share > 0 and rep["xfeat"] and rep["xfeat_share"] == cal.learned_share
    assert rep["xfeat_gain"]["kept"] and rep["xfeat_gain"]["diff"] > rep["xfeat_gain"]["se"] > 0  # more than noise
    assert len(rep["pairs"]["p_xfeat"]) == len(rep["pairs"]["p_local"])
    alone = validate(emb, table, _NoiseScorer(), rcfg, k=5, log=lambda *a: None)[1]
    assert val["local"]["top1"] >= 0.9 and val["local"]["top1"] - alone["local"]["top1"] >= 0.3  # noise: embedding order
    only = validate(emb, table, blind, {**rcfg, "xfeat_share": 1.0}, k=5, log=lambda *a: None)[1]
    assert only["local"]["top1"] == 1.0                                  # all the local evidence from XFeat

    sighted = _IdentityScorer(ids)
    sighted.learned = _NoiseScorer()
    cal2, val2, _ = validate(emb, table, sighted, rcfg, k=5, log=lambda *a: None)
    base_cal, base_val, _ = validate(emb, table, _IdentityScorer(ids), rcfg, k=5, log=lambda *a: None)
    assert cal2.learned_share == 0.0 and cal2.weight == base_cal.weight
    assert {n: v["map20"] for n, v in val2.items()} == {n: v["map20"] for n, v in base_val.items()}
    for bad in ("most", 1.5):
        with pytest.raises(ConfigError, match="rerank.xfeat_share must be auto or a number from 0 to 1"):
            validate(emb, table, blind, {**rcfg, "xfeat_share": bad}, k=5, log=lambda *a: None)


def test_the_xfeat_share_round_trips_and_zero_fuses_as_without_it():
    cal = Calibration(fit_isotonic([0, 1], [0, 1]), fit_isotonic([0, 10], [0, 1]), weight=0.7, fusion="logodds",
                      learned=fit_isotonic([0, 50], [0, 1]), learned_share=0.4)
    back = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert back.learned == cal.learned and back.learned_share == 0.4
    cos, inl, xf = np.array([[0.2, 0.9]]), np.array([[8, 1]]), np.array([[45, 0]])
    np.testing.assert_allclose(back.fuse(cos, inl, learned=xf), cal.fuse(cos, inl, learned=xf))
    np.testing.assert_array_equal(cal.fuse(cos, inl, learned=xf, learned_share=0.0), cal.fuse(cos, inl))
    assert cal.fuse(cos, inl, learned=xf)[0, 0] > cal.fuse(cos, inl)[0, 0]   # 45 XFeat inliers: more likely
    old = {k: v for k, v in cal.to_dict().items() if k not in ("learned", "learned_share")}
    assert Calibration.from_dict(old).learned is None and Calibration.from_dict(old).learned_share == 0.0
