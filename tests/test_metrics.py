"""Local metrics against hand-computed cases."""
import numpy as np
import pytest

from common.metrics import (average_precision_at_k, count_relevant, hit_at_k, image_scores, kaggle_map5, map_at_k,
                            relevance, top1)


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
