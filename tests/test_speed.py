"""The speed harness on tiny sizes: the table's columns and the exact-search agreement (the
figures themselves are benchmarks, not tests)."""
import json

from common.speed import _photos, main, match_speed, search_speed


def test_exact_searches_agree_and_ivf_reports_recall():
    rows = search_speed(600, dim=16, n_queries=50, k=5)
    assert [r["case"].split(": ")[1].split(",")[0] for r in rows][:4] == [
        "faiss flat (exact)", "faiss flat", "sklearn brute (exact)", "numpy argsort (exact)"]
    assert [r["recall@5"] for r in (rows[0], rows[2], rows[3])] == [1.0, 1.0, 1.0]  # the exact ones agree with faiss flat
    assert rows[1]["recall@5"] > 0.95 and abs(rows[1]["mem_mib"] - rows[0]["mem_mib"] / 2) < 1e-3  # float16: ties may swap
    assert 0 < rows[4]["recall@5"] <= 1 and rows[0]["ratio"] == 1.0
    assert all(r["mem_mib"] > 0 for r in rows)


def test_large_galleries_time_only_faiss_and_ivf_recall_falls_with_fewer_lists_probed():
    rows = search_speed(3000, dim=16, n_queries=100, k=10, exact_all_below=1000, nprobe=1)
    assert [r["case"].split(": ")[1].split(" ")[1] for r in rows] == ["flat", "flat,", "IVF"]
    assert 0 < rows[2]["recall@10"] < 1  # one list of 76 probed misses some neighbours


def test_harness_writes_the_table(tmp_path):
    assert main(["--data", str(tmp_path), "--sizes", "400", "--dim", "8", "--images", "8", "--img-size", "32",
                 "--workers", "0"]) == 0
    res = json.loads((tmp_path / "bench" / "speed.json").read_text())
    assert {r["bench"] for r in res["rows"]} == {"search", "extract", "train", "match"}
    for r in res["rows"]:
        assert {"bench", "case", "seconds", "per_s", "unit", "ratio"} <= set(r) and r["per_s"] > 0
    assert (tmp_path / "bench" / "speed.md").read_text().startswith("| bench | case |")


def test_matching_bench_finds_the_copy_and_not_the_other_photo(tmp_path):
    rows = match_speed(_photos(tmp_path, 4), size=256, max_keypoints=300, repeat=1)
    assert [r["unit"] for r in rows] == ["images", "pairs", "pairs"] and all(r["per_s"] > 0 for r in rows)
    copy, other = (int(v) for v in rows[2]["case"].split("copy ")[1].rstrip(")").split(", other "))
    assert copy >= 20 and other < copy / 4  # a rotated, scaled copy has many inliers, an unrelated photo few
