"""common.deps: the code each stage runs, which the Makefile reruns the stage on."""
import subprocess
import sys

from common.config import ROOT
from common.deps import closure


def test_closure_follows_imports_inside_functions_and_through_modules():
    s06 = closure(ROOT / "06_ensemble_submit.py")
    assert s06[0] == "06_ensemble_submit.py"
    # 06 imports evaluation inside main(); evaluation imports submission at module level
    assert {"common/evaluation.py", "common/submission.py", "common/retrieval.py", "common/config.py"} <= set(s06)
    s00 = closure(ROOT / "00_clean_data.py")
    assert "common/cleaning.py" in s00 and "common/training.py" not in s00 and "common/models.py" not in s00
    assert "common/training.py" in closure(ROOT / "04_train_embed.py")


def test_cli_writes_one_line_per_stage(tmp_path):
    out = tmp_path / "deps.mk"
    subprocess.run([sys.executable, "-m", "common.deps", "--out", str(out)], cwd=ROOT, check=True)
    lines = [l for l in out.read_text().splitlines() if l.startswith("CODE_")]
    assert [l.split()[0] for l in lines] == [f"CODE_0{i}" for i in range(7)]
    assert all(l.split()[2].startswith(f"0{i}_") for i, l in enumerate(lines))
