"""common/profile.py: which profile `make all` runs when none is named."""
import subprocess
import sys
from pathlib import Path

from common import profile

ROOT = Path(__file__).resolve().parent.parent


def test_demo_where_there_is_no_competition_or_the_demo_marker(tmp_path):
    assert profile.choose(tmp_path / "empty", cuda=True)[0] == "demo"
    (tmp_path / "train.csv").write_text("Image,Id\n")
    (tmp_path / profile.DEMO_MARKER).write_text("{}")
    name, why = profile.choose(tmp_path, cuda=True)
    assert name == "demo" and "synthetic demo" in why


def test_real_competition_gets_cpu_or_full(tmp_path):
    (tmp_path / "train.csv").write_text("Image,Id\n")
    assert profile.choose(tmp_path, cuda=False) == ("cpu", f"{tmp_path} is a real competition and this machine has no CUDA GPU")
    assert profile.choose(tmp_path, cuda=True)[0] == "full"
    for name in ("cpu", "full", "demo"):
        assert (ROOT / "configs" / f"{name}.yaml").exists()


def test_command_prints_the_name_and_says_why_once(tmp_path):
    (tmp_path / "train.csv").write_text("Image,Id\n")
    out = subprocess.run([sys.executable, "-m", "common.profile", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    expected = "full" if profile.has_cuda() else "cpu"
    assert out.returncode == 0 and out.stdout.strip() == expected
    assert out.stderr.startswith(f"profile: {expected} (") and "PROFILE=demo|cpu|full" in out.stderr
    quiet = subprocess.run([sys.executable, "-m", "common.profile", str(tmp_path), "--quiet"], cwd=ROOT,
                           capture_output=True, text=True)
    assert quiet.stdout.strip() == expected and quiet.stderr == ""


def test_make_uses_it_only_when_no_profile_is_named(tmp_path):
    (tmp_path / "train.csv").write_text("Image,Id\n")
    out = subprocess.run(["make", "-n", "00", f"RAW={tmp_path}", f"DATA={tmp_path / 'data'}"], cwd=ROOT,
                         capture_output=True, text=True)
    expected = "full" if profile.has_cuda() else "cpu"
    assert f"--config configs/{expected}.yaml" in out.stdout and out.stderr.count(f"profile: {expected}") == 1
    named = subprocess.run(["make", "-n", "00", f"RAW={tmp_path}", "PROFILE=tiny"], cwd=ROOT, capture_output=True, text=True)
    assert "--config configs/tiny.yaml" in named.stdout and "profile:" not in named.stderr
