"""The run report: sections from the stages' reports, 'what to do next' hints, and a real browser."""
import json
import os
import shutil
import subprocess

import cv2
import numpy as np
import pytest

from common.config import load_config
from common.io import write_json
from common.paths import Paths
from common.report import build_report


def png(path, color=(40, 120, 200), size=(60, 90)):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((*size, 3), color, np.uint8))


def fake_run(tmp_path, good=False):
    """DATA as stages 00-06 leave it (small JSONs and PNGs); ``good=False`` plants four problems."""
    paths = Paths(tmp_path / "raw", tmp_path / "data")
    write_json(paths.clean_report, {
        "train": {"listed": 50, "kept": 47, "dropped": {"unreadable": 2, "too_small": 1},
                  "dropped_files": [{"Image": "bad<1>.jpg", "Id": "w1", "reason": "unreadable", "detail": "truncated"}],
                  "identities": {"known": 20, "singletons": 3}, "split": {"val_queries": 40 if good else 6}},
        "test": {"found": 10, "kept": 10, "dropped": {"unreadable": 0}, "dropped_files": []}})
    write_json(paths.detector_metrics, {"trained": True, "map50": 0.97 if good else 0.41, "map50_95": 0.6,
                                        "annotations": {"skipped": {"unreadable_image": 1}}})
    write_json(paths.crops_report, {"detector": True, "splits": {"train": {"images": 47, "fallback": 2 if good else 30,
                                                                          "fallback_rate": 0.04 if good else 0.64}}})
    write_json(paths.members_summary, {"members": {"m1": {"n_images": 40, "best_epoch": 3, "init": "x/m1.pt",
                                                          "baseline": {"map20": 0.10, "top1": 0.2},
                                                          "metrics": {"map20": 0.30 if good else 0.08, "top1": 0.4}}}})
    write_json(paths.pseudo_report, {"rounds": [{"threshold": 0.8, "labelled": 3, "n_test": 10, "val_precision": 1.0,
                                                 "truth_precision": None, "members": {"m1": {"kept": True}}}],
                                     "checkpoints": {"m1": str(paths.member_ckpt("m1"))}})
    write_json(paths.scores_json, {"final": "ensemble", "scores": {
        "m1": {"val": {"map20": 0.3, "top1": 0.4}}, "ensemble": {"val": {"map20": 0.35, "top1": 0.45}}}})
    for p in (paths.clean_summary_png, paths.detector_curves_png, paths.crops_samples_png, paths.pseudo_png,
              paths.gallery_png, paths.member_dir("m1") / "curves.png"):
        png(p)
    return paths


def test_sections_in_pipeline_order_with_embedded_images(tmp_path):
    paths = fake_run(tmp_path, good=True)
    page = build_report(load_config("tiny"), paths).read_text()
    heads = [page.index(f"<h2>{n}.") for n in range(1, 8)]
    assert heads == sorted(heads)
    assert page.count('src="data:image/png;base64,') == 6 and "src=\"http" not in page
    assert "nothing looks wrong in this run" in page
    assert "bad&lt;1&gt;.jpg" in page  # file names are escaped
    assert "checkpoint stage 06 uses" in page and "resolved config" in page and "git commit" in page


def test_what_to_do_next_names_each_problem(tmp_path):
    page = build_report(load_config("tiny"), fake_run(tmp_path, good=False)).read_text()
    box = page[page.index("What to do next"):page.index("<section")]
    assert box.count("<li>") == 4
    for text in ("only 6 queries", "Detector mAP50 is 0.4100", "64% of train images fell back",
                 "m1 ended at MAP@20 0.0800, not above its untrained backbone (0.1000)"):
        assert text in box, text


def test_a_run_that_stopped_early_says_which_stages_are_missing(tmp_path):
    paths = Paths(tmp_path / "raw", tmp_path / "data")
    write_json(paths.clean_report, {"train": {"listed": 3, "kept": 3, "dropped": {}}})
    page = build_report(load_config("tiny"), paths).read_text()
    for stage in ("01", "02", "04", "05", "06"):
        assert f"stage {stage} has not run" in page


# ---------------------------------------------------------------------------------------------
# In a real browser (headless Chromium): renders, every image decodes, no console or page errors
# ---------------------------------------------------------------------------------------------
def chromium():
    exe = os.environ.get("CHROMIUM") or next(
        (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if not exe:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium; `make test` installs it "
                    "where it may): the browser test needs a real browser")
    return exe


def browse(page, tmp_path, *args):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=5000", *args, page.as_uri()]
    return subprocess.run([chromium(), *flags], capture_output=True, text=True, timeout=120)


def selfcheck(dom: str) -> dict:
    start = dom.index('data-selfcheck="') + len('data-selfcheck="')
    return json.loads(dom[start:dom.index('"', start)].replace("&quot;", '"'))


def test_report_renders_in_chromium_without_errors_or_broken_images(tmp_path):
    page = build_report(load_config("tiny"), fake_run(tmp_path, good=False))
    dom = browse(page, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert selfcheck(dom.stdout) == {"images": 6, "broken": 0, "errors": 0}
    assert "CONSOLE" not in dom.stderr, [l for l in dom.stderr.splitlines() if "CONSOLE" in l]
    shot = tmp_path / "shot.png"
    out = browse(page, tmp_path, "--window-size=1200,1600", f"--screenshot={shot}")
    assert out.returncode == 0, out.stderr[-2000:]
    img = cv2.imread(str(shot))
    assert img.shape[:2] == (1600, 1200)
    assert img.std() > 10, "the screenshot is blank"


def test_the_browser_check_catches_a_broken_image(tmp_path):
    """Control: the same check must fail on a page whose image does not decode."""
    page = build_report(load_config("tiny"), fake_run(tmp_path, good=True))
    page.write_text(page.read_text().replace('src="data:image/png;base64,', 'src="data:image/png;base64,AAAA', 1))
    dom = browse(page, tmp_path, "--dump-dom")
    assert selfcheck(dom.stdout)["broken"] == 1
