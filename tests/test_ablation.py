"""The ablation harness on the tiny competition with one cheap variant (only stage 06 reruns):
the table's rows and columns, not its figures."""
import shutil

import pandas as pd

from common import ablation
from common.config import load_config, member_config


def test_every_variant_sets_only_known_keys():
    table = ablation.variants(load_config("demo"))
    assert {"frozen", "triplet", "arcface", "subcenter", "cosface", "softmax", "with_singletons", "full_photos",
            "no_pretrain", "no_flip_tta", "no_pseudo"} <= set(table)
    for name, v in table.items():
        if name != "no_rerank":  # needs the re-ranking feature
            assert all(ablation._known(k) for k in v.requires()), name
    load_config("demo", table["frozen"].sets + table["size_96"].sets)  # valid overrides
    cpu = load_config("cpu")  # its member sets img_size 224 itself: the size variants must reach it
    small = ablation.variants(cpu)["size_160"]
    assert all(ablation._known(k) for k in small.requires())
    assert member_config(load_config("cpu", small.sets), "lite0_224")["model"]["img_size"] == 160


def test_a_variant_that_changes_nothing_is_named_and_skipped():
    assert ablation.no_op("cpu", [], ablation.variants(load_config("cpu"))["no_pseudo"].sets)  # cpu: pseudo is off
    assert ablation.no_op("cpu", [], ablation.variants(load_config("cpu"))["with_pseudo"].sets) is None
    assert ablation.no_op("demo", [], ["pseudo.enabled=true"]) and not ablation.no_op("demo", [], ["pseudo.enabled=false"])
    assert ablation.no_op("cpu", ["pseudo.enabled=true"], ["pseudo.enabled=true"])


def test_harness_on_the_tiny_competition(tmp_path, capsys):
    from common.demo_data import generate

    raw, data = tmp_path / "raw", tmp_path / "data"
    generate(raw, load_config("tiny")["demo"], progress=False)
    assert ablation.main(["--raw", str(raw), "--data", str(data), "--config", "configs/tiny.yaml",
                          "--variants", "no_flip_tta,with_pseudo"]) == 0
    assert "skipping with_pseudo: it would be the baseline again (the profile already has pseudo.enabled=true); " \
           "try no_pseudo" in capsys.readouterr().out
    assert not (data / "bench" / "runs" / "with_pseudo").exists()
    df = pd.read_csv(data / "bench" / "ablation.csv")
    assert df["variant"].tolist() == ["baseline", "embedding:lite0_64", "embedding:lite0_64_do", "embedding:ensemble",
                                      "embedding:ensemble+local", "no_flip_tta"]
    assert df.loc[0, "embedding"] == "ensemble+fused"  # the submission's ranking (re-ranking is on)
    assert {"val_map20", "val_top1", "val_hit20", "val_map5", "test_map20", "test_top1", "train_s", "images_per_s"} <= set(df)
    assert df["val_map20"].between(0, 1).all() and df.loc[0, "train_s"] > 0
    assert df.loc[5, "train_s"] == df.loc[0, "train_s"], "tta.hflip reruns stage 06 only: same training"
    assert (data / "bench" / "ablation.png").stat().st_size > 1000
    assert "| variant | what |" in (data / "bench" / "ablation.md").read_text()
    # --table-only rebuilds the same table from the finished runs without running anything
    (data / "bench" / "ablation.csv").unlink()
    shutil.copytree(data / "bench" / "runs" / "baseline", data / "bench" / "runs" / "no_rerank")  # killed after the copy
    assert ablation.main(["--raw", str(raw), "--data", str(data), "--config", "configs/tiny.yaml",
                          "--variants", "no_flip_tta,no_rerank", "--table-only"]) == 0
    again = pd.read_csv(data / "bench" / "ablation.csv")  # no_rerank never ran: left out
    pd.testing.assert_frame_equal(again.drop(columns="wall_s", errors="ignore"), df.drop(columns="wall_s"))
