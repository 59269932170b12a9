"""Submission files: the validators refuse every kind of wrong file; ID-mode new_whale handling."""
import numpy as np
import pandas as pd
import pytest

from common.submission import (SubmissionError, fill_rows, id_frame, image_rows, insert_new_whale, pad_ids,
                               read_image_submission, tune_new_whale_threshold, validate_id_submission,
                               write_id_submission, write_image_submission)

K = 3
TESTS = ["q1.jpg", "q2.jpg"]
DB = ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "q1.jpg", "q2.jpg"]
GOOD = [["q1.jpg", "a.jpg", "b.jpg", "q2.jpg"], ["q2.jpg", "c.jpg", "q1.jpg", "d.jpg"]]


def test_good_file_round_trips_without_header(tmp_path):
    dest = write_image_submission(tmp_path / "sub.csv", GOOD, TESTS, DB, k=K)
    assert dest.read_text().splitlines()[0] == "q1.jpg,a.jpg,b.jpg,q2.jpg"
    assert read_image_submission(dest) == GOOD


@pytest.mark.parametrize("rows, message", [
    (GOOD[:1], "1 test images have no row"),
    (GOOD + [GOOD[0]], "appears twice"),
    (GOOD + [["zz.jpg", "a.jpg", "b.jpg", "c.jpg"]], "not a test image"),
    ([GOOD[0], ["q2.jpg", "a.jpg", "b.jpg"]], "2 matches, expected 3"),
    ([GOOD[0], ["q2.jpg", "a.jpg", "b.jpg", "c.jpg", "d.jpg"]], "4 matches, expected 3"),
    ([GOOD[0], ["q2.jpg", "a.jpg", "a.jpg", "b.jpg"]], "repeated matches"),
    ([GOOD[0], ["q2.jpg", "a.jpg", "q2.jpg", "b.jpg"]], "its own match"),
    ([GOOD[0], ["q2.jpg", "a.jpg", "b.jpg", "nope.jpg"]], "not in the database"),
    ([GOOD[0], ["", "a.jpg", "b.jpg", "c.jpg"]], "empty query name"),
])
def test_validator_rejects_wrong_files_and_writes_nothing(tmp_path, rows, message):
    dest = tmp_path / "sub.csv"
    with pytest.raises(SubmissionError, match=message):
        write_image_submission(dest, rows, TESTS, DB, k=K)
    assert not dest.exists() and list(tmp_path.iterdir()) == []


def test_image_rows_and_fill_rows():
    rows = image_rows(["q1.jpg"], np.array([[2, 0, -1]]), DB)
    assert rows == [["q1.jpg", "c.jpg", "a.jpg"]]
    filled = fill_rows(["x.jpg", "c.jpg"], [["q1.jpg", "c.jpg", "a.jpg"], ["q2.jpg", "c.jpg", "b.jpg"]], DB, k=3)
    assert filled[0] == ["x.jpg", "c.jpg", "a.jpg", "b.jpg"]      # most returned first, then database order
    assert filled[1] == ["c.jpg", "a.jpg", "b.jpg", "d.jpg"]      # never the image itself


def test_insert_new_whale_positions():
    ids, sims = ["a", "b", "c", "d", "e"], [0.9, 0.8, 0.7, 0.6, 0.5]
    assert insert_new_whale(ids, sims, 0.95) == ["new_whale", "a", "b", "c", "d"]
    assert insert_new_whale(ids, sims, 0.75) == ["a", "b", "new_whale", "c", "d"]
    assert insert_new_whale(ids, sims, 0.1) == ["a", "b", "c", "d", "e"]          # rank 6 falls off
    assert insert_new_whale(["a"], [0.9], 0.1) == ["a", "new_whale"]             # short list: appended
    assert pad_ids(["a", "new_whale"], ["b", "a", "c", "d", "e"]) == ["a", "new_whale", "b", "c", "d"]


def test_threshold_tuning_puts_new_whale_first_for_unseen_whales():
    # known whales match at ~0.9, unseen ones at ~0.5: the best threshold separates them
    ids = [["a", "b"], ["b", "a"], ["a", "b"], ["b", "a"]]
    sims = [[0.92, 0.4], [0.88, 0.3], [0.52, 0.5], [0.48, 0.45]]
    truth = ["a", "b", "new_whale", "new_whale"]
    thr, best, curve = tune_new_whale_threshold(ids, sims, truth)
    assert 0.52 < thr <= 0.88 and best == 1.0
    assert max(m for _, m in curve) == best and min(m for _, m in curve) < 1.0
    # lowest candidate: below every top-1 similarity, so new_whale is never first (q3: rank 3, q4: rank 2)
    never = dict(curve)[min(dict(curve))]
    assert never == pytest.approx((1 + 1 + 1 / 3 + 1 / 2) / 4)


def test_id_submission_validation(tmp_path):
    good = id_frame(TESTS, [["a", "b", "c", "d", "new_whale"], ["new_whale", "a", "b", "c", "d"]])
    write_id_submission(tmp_path / "ids.csv", good, TESTS)
    assert pd.read_csv(tmp_path / "ids.csv").columns.tolist() == ["Image", "Id"]
    bad_cases = {
        "expected 5 distinct": id_frame(TESTS, [["a", "b", "c", "d"], ["a", "b", "c", "d", "e"]]),
        "appears twice": id_frame(["q1.jpg", "q1.jpg"], [list("abcde")] * 2),
        "have no row": id_frame(["q1.jpg"], [list("abcde")]),
        "not a test image": id_frame(TESTS + ["z.jpg"], [list("abcde")] * 3),
        "columns must be": good.rename(columns={"Id": "whale"}),
    }
    for message, df in bad_cases.items():
        with pytest.raises(SubmissionError, match=message):
            validate_id_submission(df, TESTS)
