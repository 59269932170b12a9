"""Pseudo-label assignment, threshold calibration and the rows a retrain sees."""
import numpy as np
import pandas as pd
import pytest

from common.pseudo import (assign, calibrate_threshold, candidate_rows, label_precision, nearest_identities,
                           precision_curve, training_rows)


def unit(*rows):
    x = np.array(rows, float)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_nearest_identities_scores_each_whale_by_its_best_image():
    db = unit([1, 0, 0], [0.8, 0.6, 0], [0, 1, 0], [0, 0, 1])
    ids, sims = nearest_identities(unit([1, 0.1, 0]), db, ["a", "a", "b", "new_whale"])
    assert ids.tolist() == [["a", "b"]]
    assert sims[0, 0] == pytest.approx(unit([1, 0.1, 0])[0] @ db[0], abs=1e-5)
    assert sims[0, 1] == pytest.approx(unit([1, 0.1, 0])[0] @ db[2], abs=1e-5)
    ids, sims = nearest_identities(unit([1, 0, 0]), db[:2], ["a", "a"])    # only one identity known
    assert ids[0, 1] == "" and np.isneginf(sims[0, 1])


def test_assign_applies_threshold_margin_and_cap():
    ids = np.array([["a", "b"], ["b", "a"], ["c", "a"], ["d", ""]], object)
    sims = np.array([[0.9, 0.5], [0.95, 0.93], [0.5, 0.1], [0.8, -np.inf]])
    df = assign(["t1", "t2", "t3", "t4"], ids, sims, threshold=0.6, margin=0.05)
    assert df["Image"].tolist() == ["t1", "t4"] and df["Id"].tolist() == ["a", "d"]   # most confident first
    assert df["margin"].tolist() == pytest.approx([0.4, 0.8])
    assert assign(["t1", "t2", "t3", "t4"], ids, sims, 0.6, 0.05, max_count=1)["Image"].tolist() == ["t1"]


def test_precision_curve_and_auto_threshold():
    ids = np.array([["a", "x"], ["b", "x"], ["c", "x"], ["d", "x"]], object)
    sims = np.array([[0.9, 0.1], [0.8, 0.1], [0.7, 0.1], [0.6, 0.1]])
    curve = precision_curve(ids, sims, ["a", "b", "zz", "d"], margin=0.0)
    assert curve["n_labelled"].tolist() == [1, 2, 3, 4]
    assert curve["precision"].tolist() == pytest.approx([1, 1, 2 / 3, 3 / 4])
    assert calibrate_threshold(curve, 0.9) == pytest.approx(0.8)
    assert calibrate_threshold(curve, 0.7) == pytest.approx(0.6)
    assert calibrate_threshold(precision_curve(ids, sims, ["q"] * 4, 0.0), 0.5) > 1.0   # nothing reaches it


def test_label_precision_against_truth():
    labels = pd.DataFrame({"Image": ["t1", "t2", "t3"], "Id": ["a", "b", "c"]})
    truth = pd.DataFrame({"Image": ["t1", "t2", "t3"], "Id": ["a", "b", "w_new"]})
    assert label_precision(labels, truth) == pytest.approx(2 / 3)
    assert label_precision(labels, None) is None and label_precision(labels.head(0), truth) is None


CLEAN = pd.DataFrame({
    "Image": ["a1", "a2", "a3", "h1", "h2", "s1", "n1"],
    "Id":    ["a", "a", "a", "held", "held", "single", "new_whale"],
    "val":         [1, 0, 0, 1, 0, 0, 0],
    "train_local": [0, 1, 1, 0, 0, 0, 0],
    "train_full":  [1, 1, 1, 1, 1, 0, 0],
})


def test_candidate_rows_keep_validation_out_of_local_labels():
    assert CLEAN["Image"][candidate_rows(CLEAN, "local")].tolist() == ["a2", "a3", "s1"]
    assert CLEAN["Image"][candidate_rows(CLEAN, "full")].tolist() == ["a1", "a2", "a3", "h1", "h2", "s1"]


def test_training_rows_add_pseudo_images_and_known_images_of_new_identities():
    train_df = pd.DataFrame({"Image": ["a2", "a3"], "Id": ["a", "a"], "path": ["tr/a2", "tr/a3"]})
    labels = pd.DataFrame({"Image": ["t1", "t2"], "Id": ["a", "single"], "score": [0.9, 0.8]})
    rows = training_rows(train_df, labels, CLEAN, candidate_rows(CLEAN, "local"), lambda n: f"te/{n}", lambda n: f"tr/{n}")
    assert rows["path"].tolist() == ["tr/a2", "tr/a3", "tr/s1", "te/t1", "te/t2"]
    assert rows["Id"].tolist() == ["a", "a", "single", "a", "single"]
