"""Local metrics against hand-computed cases."""
import numpy as np
import pytest

from common.metrics import (average_precision_at_k, count_relevant, hit_at_k, image_scores, kaggle_map5, map_at_k,
                            paired_bootstrap, query_scores, relevance, top1)


def test_average_precision_hand_computed():
    # relevant at ranks 2 and 4 of 5; 3 relevant images exist -> (1/2 + 2/4) / 3
    assert average_precision_at_k([0, 1, 0, 1, 0], n_relevant=3, k=5) == pytest.approx(1 / 3)
    # normalised by min(n_relevant, k): 30 relevant, a perfect list of 20 scores 1
    assert average_precision_at_k([1] * 20, n_relevant=30, k=20) == pytest.approx(1.0)
    # a relevant hit beyond k is ignored
    assert average_precision_at_k([0, 0, 1], n_relevant=1, k=2) == 0.0


def test_map_skips_queries_without_relevant_images():
    hits = [[1, 0, 0], [0, 0, 1], [0, 0, 0]]
    assert map_at_k(hits, [1, 1, 0], k=3) == pytest.approx((1 + 1 / 3) / 2)
    assert map_at_k(hits, [1, 1, 4], k=3) == pytest.approx((1 + 1 / 3 + 0) / 3)
    with pytest.raises(ValueError):
        map_at_k(hits, [1, 1], k=3)


def test_top1_hit_and_image_scores():
    hits = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 0], [0, 0, 1]], bool)
    assert top1(hits) == 0.25
    assert hit_at_k(hits, 2) == 0.5 and hit_at_k(hits, 3) == 0.75
    s = image_scores(hits, [1, 1, 0, 2], k=3)
    assert s["n_queries"] == 4 and s["top1"] == 0.25 and s["hit20"] == 0.75
    assert s["map20"] == pytest.approx((0.5 + 1 + (1 / 3) / 2) / 3)


def test_kaggle_map5():
    preds = [["a", "b", "c", "d", "e"], ["b", "a"], ["e", "d", "c", "b", "a"], ["x", "y", "z", "u", "v", "a"]]
    assert kaggle_map5(preds, ["a", "a", "a", "a"]) == pytest.approx((1 + 1 / 2 + 1 / 5 + 0) / 4)
    with pytest.raises(ValueError):
        kaggle_map5(preds, ["a"])


def test_relevance_never_counts_new_whale_or_padding():
    db = ["new_whale", "a", "a", "b"]
    hits = relevance(["new_whale", "a"], db, [[0, -1], [1, -1]])
    assert hits.tolist() == [[False, False], [True, False]]
    assert count_relevant(["new_whale", "a", "b", "zzz"], db).tolist() == [0, 1, 0, 0]


def test_query_scores_average_to_the_image_scores():
    rng = np.random.default_rng(0)
    hits, n_rel = rng.random((50, 20)) < 0.2, rng.integers(0, 6, 50)
    per, whole = query_scores(hits, n_rel), image_scores(hits, n_rel)
    assert np.isnan(per["map20"][n_rel == 0]).all()
    assert np.nanmean(per["map20"]) == pytest.approx(whole["map20"])
    assert per["top1"].mean() == whole["top1"] and per["hit20"].mean() == whole["hit20"]


def test_paired_bootstrap_separates_a_real_gain_from_a_few_lucky_queries():
    rng = np.random.default_rng(1)
    base = rng.random(300)
    gain = paired_bootstrap(base + 0.05 + rng.normal(0, 0.05, 300), base)
    assert 0 < gain["lo"] < gain["diff"] < gain["hi"] and gain["n"] == 300
    luck = paired_bootstrap(np.r_[1.0, np.zeros(299)], np.zeros(300))   # one query better
    assert luck["lo"] == 0.0 and luck["diff"] == pytest.approx(1 / 300)
    same = paired_bootstrap([0.5, np.nan, 0.2], [0.5, 0.1, 0.2])         # NaN queries left out
    assert same == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "n": 2}


def test_ranked_map5_equals_kaggle_map5_of_the_ranked_identities():
    """The vectorised ID-mode MAP@5 of image lists (validation grid) against the per-query path:
    repeated identities, new_whale images and queries, padding (-1) that ends a list."""
    from common.metrics import kaggle_map5, ranked_map5
    from common.retrieval import rank_identities

    rng = np.random.default_rng(0)
    for _ in range(200):
        nq, depth, n_ids = int(rng.integers(1, 30)), int(rng.integers(1, 40)), int(rng.integers(1, 12))
        db = ["new_whale" if rng.random() < 0.15 else f"id{rng.integers(n_ids)}" for _ in range(int(rng.integers(1, 60)))]
        idx = rng.integers(-1, len(db), (nq, depth))
        q = ["new_whale" if rng.random() < 0.1 else f"id{rng.integers(n_ids + 2)}" for _ in range(nq)]
        want = kaggle_map5(rank_identities(np.zeros(idx.shape), idx, db, n=5)[0], q)
        assert abs(ranked_map5(idx, q, db) - want) < 1e-12
    assert ranked_map5(np.zeros((0, 3), np.int64), [], ["a"]) == 0.0


def test_map_at_k_is_the_mean_ap_of_the_queries_with_relevant_images():
    rng = np.random.default_rng(1)
    for _ in range(200):
        nq, depth, k = int(rng.integers(1, 40)), int(rng.integers(1, 30)), int(rng.integers(1, 25))
        hits, n_rel = rng.random((nq, depth)) < rng.random(), rng.integers(0, 8, nq)
        keep = n_rel > 0
        want = np.mean([average_precision_at_k(h, n, k) for h, n in zip(hits[keep], n_rel[keep])]) if keep.any() else 0.0
        assert map_at_k(hits, n_rel, k) == pytest.approx(want, abs=1e-12)
