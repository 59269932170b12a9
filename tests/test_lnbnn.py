"""One-vs-many LNBNN scoring (common/lnbnn.py) and the candidates it adds to shortlists (common/rerank.py)."""
import numpy as np
import pytest

import common.lnbnn as lnbnn
from common.lnbnn import DescriptorIndex, lnbnn_scores
from common.local_features import extract
from common.rerank import Calibration, LnbnnRows, fit_isotonic, widen
from tests.test_local_features import scene, transformed


@pytest.fixture(scope="module")
def gallery():
    """Rows 0-5: unrelated scenes; row 6: a rotated, scaled, cropped copy of scene 3."""
    return {r: extract(scene(r), 320, 300) for r in range(6)} | {6: extract(transformed(scene(3)), 320, 300)}


@pytest.mark.parametrize("flat_below,sq8_above", [(10**9, 10**9), (100, 10**9), (100, 100)])  # exact, IVF, IVF 8-bit
def test_lnbnn_finds_the_transformed_copy_among_unrelated_images(gallery, monkeypatch, flat_below, sq8_above):
    monkeypatch.setattr(lnbnn, "FLAT_BELOW", flat_below)
    monkeypatch.setattr(lnbnn, "SQ8_ABOVE", sq8_above)
    index = DescriptorIndex(gallery, [0, 1, 2, 3, 4, 5], n_images=7, k=4)
    s = index.scores(gallery[6].desc, exclude=None)
    assert int(np.argmax(s)) == 3 and s[3] > 3 * np.sort(s)[-2] and s[6] == 0.0   # row 6 is not in the database
    own = index.scores(gallery[3].desc, exclude=3)            # its own descriptors skipped: no self-match
    assert own[3] == 0.0 and own.max() < s[3]


@pytest.mark.parametrize("sq8_above", [10**9, 100])  # IVF, IVF 8-bit
def test_the_trained_ivf_lists_are_kept_and_reused_with_the_same_scores(gallery, monkeypatch, tmp_path, sq8_above):
    monkeypatch.setattr(lnbnn, "FLAT_BELOW", 100)
    monkeypatch.setattr(lnbnn, "SQ8_ABOVE", sq8_above)
    trained = tmp_path / "lnbnn" / "t.faiss"
    first = DescriptorIndex(gallery, [0, 1, 2, 3, 4, 5], n_images=7, k=4, trained=trained)
    assert trained.exists() and not first.trained_from_cache
    saved = trained.read_bytes()
    again = DescriptorIndex(gallery, [0, 1, 2, 3, 4, 5], n_images=7, k=4, trained=trained)
    assert again.trained_from_cache and trained.read_bytes() == saved               # read, not written again
    np.testing.assert_array_equal(again.scores(gallery[6].desc, exclude=None), first.scores(gallery[6].desc, exclude=None))
    other = DescriptorIndex(gallery, [0, 1, 2, 3], n_images=7, k=4, trained=trained)  # other lists: trained afresh
    assert not other.trained_from_cache
    trained.write_bytes(b"not an index")                                           # unreadable: trained afresh
    assert not DescriptorIndex(gallery, [0, 1, 2, 3], n_images=7, k=4, trained=trained).trained_from_cache


def test_only_the_most_recently_used_trained_lists_are_kept(gallery, monkeypatch, tmp_path):
    """Each new image set trains lists under a new name; the folder keeps the KEEP_TRAINED most
    recently used (a reuse counts as a use), so experimenting does not fill the disk."""
    import os

    monkeypatch.setattr(lnbnn, "FLAT_BELOW", 100)
    monkeypatch.setattr(lnbnn, "KEEP_TRAINED", 2)
    folder = tmp_path / "lnbnn"
    sets = {"a": [0, 1, 2, 3], "b": [1, 2, 3, 4], "c": [2, 3, 4, 5]}
    for age, name in enumerate(("a", "b")):
        DescriptorIndex(gallery, sets[name], n_images=7, k=4, trained=folder / f"{name}.faiss")
        os.utime(folder / f"{name}.faiss", (age + 1, age + 1))                      # a used long ago, b later
    assert DescriptorIndex(gallery, sets["a"], n_images=7, k=4, trained=folder / "a.faiss").trained_from_cache
    DescriptorIndex(gallery, sets["c"], n_images=7, k=4, trained=folder / "c.faiss")  # a third set: b goes
    assert sorted(p.name for p in folder.iterdir()) == ["a.faiss", "c.faiss"]


def test_lnbnn_score_is_distance_margin_to_the_normaliser():
    owner = np.array([0, 1, 1, 2])
    d2 = np.array([[0.0, 1.0, 4.0, 9.0]])                     # distances 0 1 2 3; k = 2: normaliser 2
    assert lnbnn_scores(d2, np.array([[1, 2, 0, 3]]), owner, 3, k=2).tolist() == [0.0, 2.0, 0.0]  # image 1 once
    assert lnbnn_scores(d2, np.array([[1, 0, -1, -1]]), owner, 3, k=2).tolist() == [0.0, 0.0, 0.0]  # too few neighbours


class _Scorer:
    def __init__(self, feats):
        self.feats, self.progress, self.seconds, self.r = feats, False, {"lnbnn": 0.0}, {"seed": 0}

    def ensure(self, rows):
        pass

    def lnbnn_index(self, rows, k):
        return DescriptorIndex(self.feats, rows, len(self.feats), k)


def test_widen_appends_lnbnn_candidates_after_the_shortlist(gallery):
    emb = np.eye(7, dtype=np.float32)
    emb[6] = emb[0] + 0.1                                     # the embedding puts the copy nearest row 0
    rows = LnbnnRows(_Scorer(gallery), [0, 1, 2, 3, 4, 5], [6], k=4)
    cos, idx = np.array([[0.99, 0.1]], np.float32), np.array([[0, 1]])
    c, i, s = widen(rows, emb, emb[[6]], cos, idx, n_extra=2)
    assert i.shape == (1, 4) and i[0, :2].tolist() == [0, 1] and i[0, 2] == 3   # the copy's scene, found by LNBNN
    assert len(set(i[0][i[0] >= 0].tolist())) == (i[0] >= 0).sum()          # no candidate twice
    assert c[0, 2] <= c[0, 1] and s[0, 2] == s[0].max() > 0                   # after the shortlist in cosine


def test_fusion_with_lnbnn_weighs_three_log_odds_and_share_zero_is_the_two_score_fusion():
    cal = Calibration(fit_isotonic([0, 1], [0, 1]), fit_isotonic([0, 20], [0, 1]), weight=0.5, fusion="logodds",
                      lnbnn=fit_isotonic([0, 10], [0, 1]), share=0.0)
    cos, inl, lnb = np.array([[0.3, 0.6]]), np.array([[10, 2]]), np.array([[1.0, 9.0]])
    assert np.array_equal(cal.fuse(cos, inl, lnbnn=lnb), cal.fuse(cos, inl))
    cal.share = 1.0                                            # the local evidence is LNBNN alone
    z = 0.5 * np.log(0.6 / 0.4) + 0.5 * np.log(0.9 / 0.1)
    assert cal.fuse(cos, inl, lnbnn=lnb)[0, 1] == pytest.approx(1 / (1 + np.exp(-z)))
    back = Calibration.from_dict(cal.to_dict())
    assert back.share == 1.0 and back.lnbnn == cal.lnbnn
    assert Calibration.from_dict({k: v for k, v in cal.to_dict().items() if k not in ("lnbnn", "share")}).lnbnn is None


def _labelled(img):
    """``img`` with a black banner and white text, as field photos carry a label or timestamp."""
    import cv2

    img = img.copy()
    cv2.rectangle(img, (0, 0), (img.shape[1], 60), (0, 0, 0), -1)
    cv2.putText(img, "RIGHT 2019", (8, 44), cv2.FONT_HERSHEY_SIMPLEX, 1.3, (255, 255, 255), 3)
    return img


def test_verified_lnbnn_score_discounts_inliers_on_a_label_every_image_carries():
    from common.lnbnn import verified_score
    from common.local_features import match_pair

    q = extract(_labelled(scene(100)), 320, 300)
    db = {r: extract(_labelled(scene(r)), 320, 300) for r in range(8)}      # other animals, the same label
    db[8] = extract(transformed(_labelled(scene(100))), 320, 300)         # the query's animal, another photo
    _, norms = DescriptorIndex(db, list(range(9)), 9, k=4).scores(q.desc, None, return_norms=True)
    assert norms.shape == (len(q),) and (norms >= 0).all()
    count, verified = {}, {}
    for r in db:
        count[r], pairs = match_pair(q, db[r], return_matches=True)
        verified[r] = verified_score(q.desc, db[r].desc, pairs, norms)
    others = [r for r in db if r != 8]
    assert min(count[r] for r in others) >= 0.8 * count[8] > 0       # counted, the label ties with the real match
    assert verified[8] > 10 * max(verified[r] for r in others)        # verified, each label inlier counts ~0


def test_the_calibration_keeps_its_inlier_score_and_old_files_read_as_counts():
    cal = Calibration(fit_isotonic([0, 1], [0, 1]), fit_isotonic([0, 5], [0, 1]), inlier_score="lnbnn")
    back = Calibration.from_dict(cal.to_dict())
    assert back.inlier_score == "lnbnn"
    rows = type("Rows", (), {"norms": [np.ones(3, np.float32)]})()
    assert back.norms(rows) is rows.norms and back.norms(None) is None
    old = {k: v for k, v in cal.to_dict().items() if k != "inlier_score"}
    assert Calibration.from_dict(old).inlier_score == "count" and Calibration.from_dict(old).norms(rows) is None
