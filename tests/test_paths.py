"""The path registry: every stage's artifacts under DATA, raw inputs under RAW."""
from pathlib import Path

import pytest

from common.paths import Paths


def test_artifacts_live_under_data_and_inputs_under_raw(tmp_path):
    p = Paths(tmp_path / "raw", tmp_path / "art")
    for attr in ["clean_train_csv", "clean_test_csv", "clean_report", "detector_weights", "detector_metrics",
                 "crops_csv", "pretrain_summary", "members_summary", "pseudo_csv", "submission_csv",
                 "submission_ids_csv", "scores_json", "gallery_png", "yolo_config_dir"]:
        assert getattr(p, attr).is_relative_to(tmp_path / "art"), attr
    for attr in ["raw_train_csv", "raw_boxes_csv", "raw_pretrain_csv", "truth_csv"]:
        assert getattr(p, attr).is_relative_to(tmp_path / "raw"), attr
    assert p.raw_dir("pretrain") == tmp_path / "raw" / "pretrain" / "train"
    assert p.member_ckpt("m", "last").name == "last.pt"
    with pytest.raises(ValueError, match="unknown split"):
        p.raw_dir("val")


def test_pseudo_rounds_have_their_own_folders(tmp_path):
    p = Paths(tmp_path / "raw", tmp_path / "art")
    assert p.pseudo_round_dir("m", 1) != p.pseudo_round_dir("m", 2)
    assert p.pseudo_round_dir("m", 2).parent == p.pseudo_member_dir("m")


def test_relative_paths_are_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = Paths("r", "d")
    assert p.raw == tmp_path / "r" and p.data == tmp_path / "d"
    assert isinstance(p.clean_dir, Path)
