"""Catalogue of bad competitions, run through the stage scripts as a user would.

Each case spoils a small, valid competition made here, runs stage 00 (and stage 01 where the
effect shows there) on it, and checks the exit code, that the message names the file / row /
column, that nothing half-written is left in DATA and that RAW is byte-identical afterwards.
The README's "What the pipeline refuses, and what it repairs" table lists the same cases.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pandas as pd
import pytest

from common.config import ROOT
from common.errors import run_stage
from common.io import read_json, temp_writer_pid

IDS = {"w1": 3, "w2": 3, "w3": 2, "w4": 2, "w5": 1, "new_whale": 2}   # 4 identities with >= 2 images
QUIET = ["clean.min_val_queries=0"]  # the base has 4 validation queries; only one case wants the warning
_rng = np.random.default_rng(0)


def _jpeg(w=64, h=56, ext=".jpg") -> bytes:
    ok, buf = cv2.imencode(ext, _rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    assert ok
    return buf.tobytes()


def build(raw: Path) -> Path:
    """A valid tiny competition: 13 train images of 5 whales + new_whale, 4 test images."""
    (raw / "train").mkdir(parents=True)
    (raw / "test").mkdir()
    rows = []
    for wid, n in IDS.items():
        for i in range(n):
            (raw / "train" / f"{wid}_{i}.jpg").write_bytes(_jpeg())
            rows.append((f"{wid}_{i}.jpg", wid))
    pd.DataFrame(rows, columns=["Image", "Id"]).to_csv(raw / "train.csv", index=False)
    for i in range(4):
        (raw / "test" / f"t{i}.jpg").write_bytes(_jpeg())
    return raw


def _labels(raw, edit: Callable[[pd.DataFrame], pd.DataFrame]):
    df = pd.read_csv(raw / "train.csv", dtype=str, keep_default_na=False)
    edit(df).to_csv(raw / "train.csv", index=False)


def _set(col, row, value):
    def edit(df):
        df.loc[row, col] = value
        return df
    return edit


def _add_train(raw, name, data, wid):
    (raw / "train" / name).write_bytes(data)
    _labels(raw, lambda df: pd.concat([df, pd.DataFrame({"Image": [name], "Id": [wid]})]))


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---- running a stage -------------------------------------------------------------------------
_spec = importlib.util.spec_from_file_location("stage00", ROOT / "00_clean_data.py")
STAGE00 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(STAGE00)


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str


def run00(raw, data, sets=(), subprocess_run=False) -> Result:
    """Stage 00 with the tiny profile: in-process (fast) or as a subprocess (what a user sees)."""
    argv = ["--raw", str(raw), "--data", str(data), "--config", "tiny"]
    for s in sets:
        argv += ["--set", s]
    if subprocess_run:
        out = subprocess.run([sys.executable, "00_clean_data.py", *argv], cwd=ROOT, capture_output=True, text=True)
        return Result(out.returncode, out.stdout, out.stderr)
    env, old_argv = dict(os.environ), sys.argv
    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["00_clean_data.py", *argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                run_stage(STAGE00.main)  # as `python 00_clean_data.py` ends: always by SystemExit
            except SystemExit as e:
                rc = e.code
    finally:
        sys.argv = old_argv
        os.environ.clear()
        os.environ.update(env)
    return Result(rc, out.getvalue(), err.getvalue())


def half_written(data: Path) -> list[Path]:
    """Temporaries of atomic writes (files or folders) and old-style staging folders under DATA."""
    if not data.exists():
        return []
    return [p for p in data.rglob("*") if temp_writer_pid(p.name) is not None or p.name.endswith(".tmp")]


def error_line(res: Result) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    return lines[0]


# ---- the catalogue ----------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    spoil: Callable[[Path], None]
    message: str                      # regex: the error line (refused) or stdout + stderr (accepted)
    rc: int = 1
    check: Callable[[dict], None] | None = None   # on clean/report.json when accepted
    sets: list = field(default_factory=lambda: list(QUIET))
    data: Callable[[Path], Path] | None = None    # DATA from the case's tmp folder (default tmp/data)


def _one_identity(raw):
    _labels(raw, lambda df: df.assign(Id="w1"))


def _all_new_whale(raw):
    _labels(raw, lambda df: df.assign(Id="new_whale"))


def _name_clash(raw):
    for name in ("w1_0.jpg", "w2_0.jpg"):
        (raw / "test" / name).write_bytes(_jpeg())


def _spaced_file(raw):
    (raw / "train" / "w3_1.jpg").rename(raw / "train" / "w3_1.jpg ")


def _spaced_cell(raw):
    _labels(raw, _set("Image", 4, "  w2_1.jpg "))


def _bom_crlf(raw):
    text = (raw / "train.csv").read_text()
    (raw / "train.csv").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())


def _not_utf8(raw):
    (raw / "train.csv").write_bytes("Image,Id\nw1_0.jpg,baleine\u00e9\n".encode("utf-16"))


def _all_unreadable(raw):
    for p in (raw / "train").iterdir():
        p.write_bytes(b"<html>not an image</html>")


def _corrupt(raw):
    _add_train(raw, "w1_trunc.jpg", _truncate(_jpeg()), "w1")
    _add_train(raw, "w2_trunc.png", _jpeg(ext=".png")[:-40], "w2")
    _add_train(raw, "w3_html.jpg", b"<html>404</html>", "w3")
    _add_train(raw, "w4_empty.jpg", b"", "w4")


def _duplicates(raw):
    _add_train(raw, "w1_copy.jpg", (raw / "train" / "w1_0.jpg").read_bytes(), "w1")
    _add_train(raw, "w4_copy.jpg", (raw / "train" / "w3_0.jpg").read_bytes(), "w4")


def _unlisted_and_ignored(raw):
    (raw / "train" / "stray.jpg").write_bytes(_jpeg())
    (raw / "test" / "notes.txt").write_text("not an image")
    (raw / "test" / "t_bad.jpg").write_bytes(b"garbage")


def _stale_temporaries(data):
    """A checkpoint save killed by SIGKILL (a real one) and a dead writer's staging folder."""
    dest = data / "models" / "m" / "last.pt"
    code = (f"import os, signal, sys; sys.path.insert(0, {str(ROOT)!r}); from common import io\n"
            f"with io.atomic_path({str(dest)!r}) as t:\n    t.write_bytes(b'half'); os.kill(os.getpid(), signal.SIGKILL)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    (data / f".clean.part-{_dead_pid()}-abc123").mkdir()
    assert len(half_written(data)) == 2


def _check(**expected):
    """report.json checks: dotted path -> value (or a callable returning True)."""
    def check(report):
        for key, want in expected.items():
            node = report
            for k in key.split("."):
                node = node[int(k)] if isinstance(node, list) else node[k]
            assert want(node) if callable(want) else node == want, (key, node)
    return check


def _reasons(**want):
    """A split's report: its dropped files and their reasons."""
    return lambda rep: {d["Image"]: d["reason"] for d in rep["dropped_files"]} == want


CASES = [
    # ---- refused: exit 1, one error line naming the file / row / column, nothing written --------
    Case("no-train-csv", lambda raw: (raw / "train.csv").unlink(), r"train\.csv: label file is missing"),
    Case("missing-column", lambda raw: _labels(raw, lambda df: df[["Image"]]), r"train\.csv: missing column\(s\) Id"),
    Case("renamed-column", lambda raw: _labels(raw, lambda df: df.rename(columns={"Id": "whale"})),
         r"train\.csv: missing column\(s\) Id; found Image, whale"),
    Case("duplicate-row", lambda raw: _labels(raw, lambda df: pd.concat([df, df.iloc[[0]]])),
         r"train\.csv lines 2, 15: w1_0\.jpg is listed more than once"),
    Case("empty-id", lambda raw: _labels(raw, _set("Id", 2, "")), r"train\.csv line 4: empty Id"),
    Case("path-as-name", lambda raw: _labels(raw, _set("Image", 0, "train/w1_0.jpg")),
         r"train\.csv line 2: Image 'train/w1_0\.jpg' must be a file name"),
    Case("listed-image-missing", lambda raw: (raw / "train" / "w3_1.jpg").unlink(),
         r"train\.csv line 9: image w3_1\.jpg does not exist in .*train"),
    Case("file-name-with-trailing-space", _spaced_file,
         r"train\.csv line 9: image w3_1\.jpg does not exist in .*; the folder has 'w3_1\.jpg '"),
    Case("csv-not-utf8", _not_utf8, r"train\.csv: not a readable CSV"),
    Case("no-test-folder", lambda raw: (raw / "test").rename(raw / "tests"), r"test: image folder is missing"),
    Case("test-folder-without-images", lambda raw: [p.rename(p.with_suffix(".txt")) for p in (raw / "test").iterdir()],
         r"test: no image files"),
    Case("same-name-in-train-and-test", _name_clash,
         r"train and .*test both hold 2 file name\(s\): w1_0\.jpg, w2_0\.jpg; image names must be unique"),
    Case("single-identity", _one_identity, r"train\.csv: 1 identity has >= 2 usable images.*\(1 Id\(s\) in all, 0 with one image, 0 new_whale"),
    Case("all-new-whale", _all_new_whale, r"train\.csv: 0 identities have >= 2 usable images.*13 new_whale images"),
    Case("every-image-unreadable", _all_unreadable, r"train\.csv: no usable image left after cleaning \(unreadable 13"),
    Case("pretrain-without-csv", lambda raw: (raw / "pretrain" / "train").mkdir(parents=True),
         r"pretrain/train\.csv: label file is missing"),
    Case("data-inside-raw", lambda raw: None, r"DATA .*raw/data lies inside the raw folder", data=lambda tmp: tmp / "raw" / "data"),
    Case("data-under-a-file", lambda raw: (raw.parent / "afile").write_text("x"), r"DATA .*afile/data cannot be created: .*afile is not a folder",
         data=lambda tmp: tmp / "afile" / "data"),
    Case("typo-in-an-override", lambda raw: None, r"unknown config key 'clean\.min_sid' in --set clean\.min_sid=64 "
         r"\(did you mean 'clean\.min_side'\?\)", rc=2, sets=[*QUIET, "clean.min_sid=64"]),
    Case("typo-in-a-section-name", lambda raw: None, r"unknown config key 'claen' in --set claen\.seed=1 "
         r"\(did you mean 'clean'\?\)", rc=2, sets=[*QUIET, "claen.seed=1"]),
    Case("hub-weights-out-of-reach", lambda raw: None, r"model\.pretrained=hub: 'tf_efficientnet_lite0' weights are not "
         r"in the local cache and offline: true forbids downloads.*pretrained=imagenet", sets=[*QUIET, "model.pretrained=hub"]),
    # ---- accepted: repaired or skipped, and reported ------------------------------------------
    Case("bom-and-crlf", _bom_crlf, r"13/13 images kept", rc=0, check=_check(**{"train.kept": 13})),
    Case("spaces-around-a-csv-cell", _spaced_cell, r"13/13 images kept", rc=0),
    Case("corrupt-and-truncated-images", _corrupt, r"w1_trunc\.jpg: unreadable: file is truncated", rc=0,
         check=_check(**{"train.dropped.unreadable": 4, "train": _reasons(**dict.fromkeys(
             ["w1_trunc.jpg", "w2_trunc.png", "w3_html.jpg", "w4_empty.jpg"], "unreadable"))})),
    Case("tiny-image", lambda raw: _add_train(raw, "w1_tiny.jpg", _jpeg(40, 30), "w1"), r"w1_tiny\.jpg: too_small", rc=0,
         check=_check(**{"train": _reasons(**{"w1_tiny.jpg": "too_small"})})),
    Case("duplicate-images", _duplicates, r"w4_copy\.jpg: conflicting_duplicate", rc=0,
         check=_check(**{"train": _reasons(**{"w1_copy.jpg": "duplicate", "w3_0.jpg": "conflicting_duplicate",
                                              "w4_copy.jpg": "conflicting_duplicate"})})),
    Case("unlisted-unreadable-and-non-image-test-files", _unlisted_and_ignored, r"1 unlisted files not used", rc=0,
         check=_check(**{"train.unlisted_files": ["stray.jpg"], "test.ignored_files": ["notes.txt"],
                         "test": _reasons(**{"t_bad.jpg": "unreadable"})})),
    Case("test-image-identical-to-a-train-image",
         lambda raw: (raw / "test" / "t_same.jpg").write_bytes((raw / "train" / "w2_1.jpg").read_bytes()),
         r"1 identical image\(s\) across test and train", rc=0,
         check=_check(**{"cross_duplicates.test~train": [{"test": "t_same.jpg", "train": "w2_1.jpg", "Id": "w2"}]})),
    Case("few-validation-queries", lambda raw: None,
         r"warning: local validation has only 4 queries \(< clean\.min_val_queries = 20\)", rc=0, sets=[],
         check=_check(warnings=lambda w: len(w) == 1 and "4 queries" in w[0])),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_stage00_on_a_bad_competition(case, tmp_path, tree_hash):
    raw = build(tmp_path / "raw")
    case.spoil(raw)
    data = case.data(tmp_path) if case.data else tmp_path / "data"
    before = tree_hash(raw)
    res = run00(raw, data, case.sets)
    assert res.rc == case.rc, res.stdout[-2000:] + res.stderr[-2000:]
    if case.rc:
        assert re.search(case.message, error_line(res)), error_line(res)
        assert not (data / "clean").exists()
    else:
        assert re.search(case.message, res.stdout + res.stderr), res.stdout + res.stderr
        report = read_json(data / "clean" / "report.json")
        assert (data / "clean" / "train.csv").exists() and (data / "clean" / "summary.png").exists()
        if case.check:
            case.check(report)
    assert half_written(data) == []
    assert tree_hash(raw) == before, "RAW was written"


def test_stale_temporaries_of_a_killed_stage_are_removed(tmp_path, tree_hash):
    raw, data = build(tmp_path / "raw"), tmp_path / "data"
    _stale_temporaries(data)
    before = tree_hash(raw)
    res = run00(raw, data, QUIET)
    assert res.rc == 0 and half_written(data) == [] and tree_hash(raw) == before
    assert list((data / "models" / "m").iterdir()) == []


def test_refusals_are_one_line_without_traceback_for_a_user(tmp_path):
    raw = build(tmp_path / "raw")
    _name_clash(raw)
    res = run00(raw, tmp_path / "data", QUIET, subprocess_run=True)
    assert res.rc == 1 and "w1_0.jpg, w2_0.jpg" in error_line(res)
    (tmp_path / "afile").write_text("x")
    res = run00(build(tmp_path / "raw2"), tmp_path / "afile" / "data", QUIET, subprocess_run=True)
    assert res.rc == 1 and "is not a folder" in error_line(res) and res.stdout == ""
    out = subprocess.run([sys.executable, "-m", "common.config", "--data", str(tmp_path / "afile" / "data"), "--stamps"],
                         cwd=ROOT, capture_output=True, text=True)  # what `make` runs first
    assert out.returncode == 1 and "is not a folder" in error_line(Result(out.returncode, out.stdout, out.stderr))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_data_is_refused_before_any_work(tmp_path):
    raw, data = build(tmp_path / "raw"), tmp_path / "data"
    data.mkdir()
    data.chmod(0o555)
    try:
        res = run00(raw, data, QUIET)
    finally:
        data.chmod(0o755)
    assert res.rc == 1 and re.search(r"DATA .*data is not writable", error_line(res))
    assert "inspect" not in res.stderr, "the image pass ran before the check"


def test_stage01_uses_only_images_stage00_accepted(tmp_path, tree_hash):
    """A truncated (but header-readable) annotated image, swapped corners, an unlisted image, an
    unknown name: stage 01 skips and lists those lines, repairs and counts the swap, leaves no temp."""
    raw, data = build(tmp_path / "raw"), tmp_path / "data"
    _add_train(raw, "w1_trunc.jpg", _truncate(_jpeg(160, 120)), "w1")
    (raw / "train" / "stray.jpg").write_bytes(_jpeg())
    good = sorted(p.name for p in (raw / "train").iterdir() if not p.name.startswith(("w1_trunc", "stray")))
    rows = [f"{name},8,6,{56 - i % 3},{48 - i % 2}" for i, name in enumerate(good)]
    rows += ["w3_0.jpg,ten,1,20,30", "w3_1.jpg,5,5,5,30",  # unparseable, zero area
             "w1_trunc.jpg,10,10,100,80", "w2_0.jpg,50,40,9,7", "stray.jpg,5,5,40,40", "ghost.jpg,1,1,20,20"]
    (raw / "boxes.csv").write_text("Image,x0,y0,x1,y1\n" + "\n".join(rows) + "\n")
    assert run00(raw, data, QUIET).rc == 0
    stale = data / "detector" / f".dataset.part-{_dead_pid()}-abc123"
    (stale / "images").mkdir(parents=True)
    before = tree_hash(raw)
    env = {k: v for k, v in os.environ.items() if k not in ("YOLO_CONFIG_DIR", "TORCH_HOME", "MPLCONFIGDIR")}
    out = subprocess.run([sys.executable, "01_train_detector.py", "--raw", str(raw), "--data", str(data),
                          "--config", "tiny"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ann = json.loads((data / "detector" / "metrics.json").read_text())["annotations"]
    n = len(rows) + 1  # header is line 1
    assert {r["row"]: r["reason"] for r in ann["skipped_rows"]} == {
        f"boxes.csv:{n - 5}": "unparseable", f"boxes.csv:{n - 4}": "zero_area", f"boxes.csv:{n - 3}": "not_accepted", f"boxes.csv:{n - 1}": "not_accepted", f"boxes.csv:{n}": "unknown_image"}
    trunc = next(r for r in ann["skipped_rows"] if r["row"] == f"boxes.csv:{n - 3}")
    assert "w1_trunc.jpg" in trunc["detail"] and "truncated" in trunc["detail"]
    assert ann["swapped"] == 1 and ann["valid"] == 14 and f"boxes.csv:{n - 3}" in out.stdout
    assert half_written(data) == [] and not stale.exists()
    assert tree_hash(raw) == before
