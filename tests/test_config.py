"""Config loading, profile merge, overrides, members and per-stage stamps."""
import subprocess
import sys

import pytest

from common import config as C

ROOT = C.ROOT


def test_default_has_every_section_a_stage_reads():
    cfg = C.load_config(None)
    for stage, sections in C.STAGE_SECTIONS.items():
        for s in sections:
            assert s in cfg, f"default.yaml lacks section {s!r} read by stage {stage}"


@pytest.mark.parametrize("profile", ["demo", "full", "tiny"])
def test_profiles_load_and_members_resolve(profile):
    cfg = C.load_config(profile)
    assert cfg["profile"] == profile
    names = C.member_names(cfg)
    assert len(names) >= 2, "an ensemble needs at least two members"
    for n in names:
        m = C.member_config(cfg, n)
        assert m["name"] == n
        assert {"backbone", "img_size", "emb_dim", "dropout", "pool"} <= set(m["model"])
        assert m["train"]["epochs"] >= 1
        assert m["weight"] > 0


def test_profile_members_replace_default_members():
    default = C.load_config(None)
    tiny = C.load_config("tiny")
    assert set(C.member_names(tiny)).isdisjoint(C.member_names(default))


def test_overrides_are_yaml_typed_and_nested():
    cfg = C.load_config("tiny", ["train.epochs=3", "train.lr=1e-2", "model.pool=avg",
                                 "train.progressive=[[64, 1], [96, 2]]", "detector.boxes=null"])
    assert cfg["train"]["epochs"] == 3 and isinstance(cfg["train"]["epochs"], int)
    assert cfg["train"]["lr"] == pytest.approx(0.01)
    assert cfg["model"]["pool"] == "avg"
    assert cfg["train"]["progressive"] == [[64, 1], [96, 2]]
    assert cfg["detector"]["boxes"] is None


def test_a_mapping_override_merges_into_a_section_and_replaces_the_ensemble():
    cfg = C.load_config("tiny", ["train={lr: 0.5}", "ensemble={lite0_64_do: 2}"])
    assert cfg["train"]["lr"] == 0.5 and cfg["train"]["epochs"] == C.load_config("tiny")["train"]["epochs"]
    assert cfg["ensemble"] == {"lite0_64_do": 2}
    assert C.member_config(cfg, "lite0_64_do")["weight"] == 2.0


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "unknown config key 'train.epoch' in --set train.epoch=3 (did you mean 'train.epochs'?)"),
    ("trian.lr=5", "unknown config key 'trian' in --set trian.lr=5 (did you mean 'train'?)"),
    ("members.lite0_64.train.lrr=1", "'members.lite0_64.train.lrr' in --set members.lite0_64.train.lrr=1 (did you mean "
                                     "'members.lite0_64.train.lr'?)"),
    ("members.lite0_64.weight=2", "unknown config key 'members.lite0_64.weight'"),
    ("pretrain.train.epochz=2", "did you mean 'pretrain.train.epochs'?"),
    ("ensemble.lite0_6=2", "ensemble.lite0_6 in configs/tiny.yaml / --set names no configured member (did you mean"),
    ("train=3", "train in --set train=3 is a section"),
    ("train.fit=full", "unknown config key 'train.fit' in --set train.fit=full (renamed: 'train.rows')"),
    ("ensemble={lite0_64: 1, zz: 2}", "ensemble.zz in configs/tiny.yaml / --set names no configured member"),
])
def test_typos_in_overrides_are_rejected_with_a_suggestion(override, message):
    with pytest.raises(C.ConfigError) as e:
        C.load_config("tiny", [override])
    assert message in str(e.value)


def test_typos_in_a_profile_are_rejected(tmp_path):
    prof = tmp_path / "mine.yaml"
    prof.write_text("train:\n  epochs: 2\nmodel:\n  imgsize: 96\n")
    with pytest.raises(C.ConfigError, match=r"'model.imgsize' in .*mine.yaml \(did you mean 'model.img_size'\?\)"):
        C.load_config(prof)
    prof.write_text("members:\n  a: {model: {img_size: 96}, pseudo: true}\nensemble: {a: 2.0}\ntrain: {epochs: 2}\n")
    cfg = C.load_config(prof, ["members.a.train.lr=0.01", "pretrain.train.epochs=1", "ensemble.a=1.5"])
    assert C.member_config(cfg, "a")["train"]["lr"] == 0.01 and C.member_config(cfg, "a")["weight"] == 1.5


def test_member_override_beats_section_default():
    cfg = C.load_config("tiny", ["members.lite0_64_do.model.dropout=0.25"])
    assert C.member_config(cfg, "lite0_64_do")["model"]["dropout"] == 0.25
    assert C.member_config(cfg, "lite0_64")["model"]["dropout"] == 0.0


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(C.ConfigError, match="not of the form key=value"):
        C.load_config("tiny", ["train.epochs"])
    with pytest.raises(C.ConfigError, match="not found"):
        C.load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(C.ConfigError, match="bad.yaml"):
        C.load_config(bad)
    with pytest.raises(C.ConfigError, match="unknown member 'zzz'"):
        C.member_config(C.load_config("tiny"), "zzz")


def test_stamps_change_only_for_stages_that_read_the_changed_section(tmp_path):
    cfg = C.load_config("tiny")
    assert set(C.write_stamps(cfg, tmp_path)) == set(C.STAGE_SECTIONS)
    assert C.write_stamps(cfg, tmp_path) == []
    mtime = (tmp_path / "00.json").stat().st_mtime_ns
    cfg2 = C.load_config("tiny", ["search.k=10"])
    assert C.write_stamps(cfg2, tmp_path) == ["06"]
    assert (tmp_path / "00.json").stat().st_mtime_ns == mtime
    cfg3 = C.load_config("tiny", ["search.k=10", "train.epochs=2"])
    assert C.write_stamps(cfg3, tmp_path) == ["03", "04", "05"]


def test_cli_prints_resolved_section_and_rejects_bad_override():
    out = subprocess.run([sys.executable, "-m", "common.config", "--config", "tiny", "--show", "train",
                          "--set", "train.epochs=7"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "epochs: 7" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "common.config", "--set", "oops"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "oops" in bad.stderr
    typo = subprocess.run([sys.executable, "-m", "common.config", "--config", "tiny", "--set", "train.epoch=3"],
                          cwd=ROOT, capture_output=True, text=True)
    assert typo.returncode == 2 and typo.stderr.strip().splitlines() == [
        "error: unknown config key 'train.epoch' in --set train.epoch=3 (did you mean 'train.epochs'?)"]
