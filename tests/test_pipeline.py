"""End to end through the Makefile on a tiny generated competition (the CI-sized `make all`)."""
import os
import subprocess
import sys

import pandas as pd
import pytest

from common.config import ROOT, load_config

STAGE_SCRIPTS = ["00_clean_data.py", "01_train_detector.py", "02_crop_flukes.py", "03_pretrain_humpback.py",
                 "04_train_embed.py", "05_pseudo_label.py", "06_ensemble_submit.py"]


def make(*args, check=True):
    env = {k: v for k, v in os.environ.items() if k not in ("RAW", "DATA", "PROFILE", "SET", "MODEL", "CONFIG")}
    out = subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"make {' '.join(args)} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    return out


def ran(out, script):
    return f"{script} --raw" in out.stdout


@pytest.fixture(scope="module")
def competition(tmp_path_factory):
    from common.demo_data import generate

    root = tmp_path_factory.mktemp("e2e")
    generate(root / "raw", load_config("tiny")["demo"], progress=False)
    return root


def test_make_all_writes_a_valid_submission_then_reruns_nothing(competition):
    raw, data = competition / "raw", competition / "data"
    args = ["PROFILE=tiny", f"RAW={raw}", f"DATA={data}"]
    first = make("all", *args)
    for script in STAGE_SCRIPTS:
        assert ran(first, script), f"{script} did not run:\n{first.stdout[-3000:]}"

    sub = pd.read_csv(data / "submission" / "submission.csv", header=None, dtype=str)
    tests = sorted(p.name for p in (raw / "test").iterdir())
    assert sorted(sub[0]) == tests, "one row per test image"
    assert sub.shape[1] == 21, "query + 20 matches"
    db = {p.name for p in (raw / "train").iterdir()} | set(tests)
    for row in sub.itertuples(index=False):
        matches = list(row[1:])
        assert len(set(matches)) == 20 and row[0] not in matches
        assert set(matches) <= db
    ids = pd.read_csv(data / "submission" / "submission_ids.csv", dtype=str)
    assert list(ids.columns) == ["Image", "Id"] and len(ids) == len(tests)
    assert all(len(x.split()) == 5 for x in ids["Id"])

    report = (data / "report" / "index.html").read_text()
    assert "5. Local scores" in report and report.count("data:image/png;base64,") >= 6

    second = make("all", *args)
    assert not any(ran(second, s) for s in STAGE_SCRIPTS), f"nothing changed but stages reran:\n{second.stdout}"

    weights = make("all", *args, "SET=ensemble.lite0_64_do=2.0")
    assert ran(weights, "06_ensemble_submit.py")
    assert not any(ran(weights, s) for s in STAGE_SCRIPTS[:-1]), "an ensemble weight must only rerun stage 06"

    # a code edit reruns the stages that import the edited module (mtime only; restored afterwards)
    for module, first_stage in [("common/gallery.py", 6), ("common/training.py", 3), ("common/cleaning.py", 0)]:
        path = ROOT / module
        old = path.stat().st_mtime_ns
        try:
            os.utime(path, ns=(old, max(old, (data / "submission" / "submission.csv").stat().st_mtime_ns) + 10**9))
            dry = make("-n", "all", *args, "SET=ensemble.lite0_64_do=2.0")
        finally:
            os.utime(path, ns=(old, old))
        assert [ran(dry, s) for s in STAGE_SCRIPTS] == [i >= first_stage for i in range(7)], (module, dry.stdout)


def test_make_stage_passes_the_member_to_03_04_05(competition):
    args = ["PROFILE=tiny", f"RAW={competition / 'raw'}", f"DATA={competition / 'data'}", "MODEL=lite0_64"]
    for stage in ("03", "04", "05"):
        assert "--model lite0_64" in make("-n", stage, *args).stdout


def test_make_passes_a_mapping_override_unexpanded(competition):
    """SET="ensemble={a:1,b:0.5}" reaches the stage as one --set (bash would brace-expand it unquoted)."""
    args = ["PROFILE=tiny", f"RAW={competition / 'raw'}", f"DATA={competition / 'data'}",
            "SET=ensemble={lite0_64:1,lite0_64_do:0.5} train.lr=3e-3"]
    out = make("-n", "06", *args).stdout
    assert "--set 'ensemble={lite0_64:1,lite0_64_do:0.5}' --set 'train.lr=3e-3'" in out, out


def test_make_all_refuses_a_missing_competition(tmp_path):
    out = make("all", "PROFILE=tiny", f"RAW={tmp_path / 'none'}", f"DATA={tmp_path / 'data'}", check=False)
    assert out.returncode != 0
    assert "no competition at" in out.stderr
    assert not (tmp_path / "data" / "clean").exists()


@pytest.mark.parametrize("script", STAGE_SCRIPTS)
def test_every_stage_has_help(script):
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0 and "--config" in out.stdout and "--set" in out.stdout
