"""The per-member embedding cache: reuse, partial re-embedding, float16 memory-mapped storage."""
import os

import numpy as np
import pandas as pd
import pytest

from common.embedding_store import cached_embeddings, database_table, load_vectors, model_key, save_cache


def make_table(tmp_path, n=4):
    paths = []
    for i in range(n):
        p = tmp_path / f"img{i}.jpg"
        p.write_bytes(bytes([i]) * 10)
        paths.append(str(p))
    return pd.DataFrame({"split": ["train"] * (n - 1) + ["test"], "Image": [f"img{i}.jpg" for i in range(n)],
                         "Id": ["a"] * (n - 1) + [""], "path": paths, "is_query": [0] * n})


class FakeEmbed:
    def __init__(self):
        self.calls = []

    def __call__(self, paths):
        self.calls.append(list(paths))
        return np.array([[len(p) + 0.123456, 1.0 / 3] for p in paths])


def test_cache_reuses_rows_and_reembeds_only_changed_files(tmp_path):
    table, cache, embed = make_table(tmp_path), tmp_path / "emb" / "m.npz", FakeEmbed()
    first, n = cached_embeddings(table, cache, "model-1", embed)
    assert n == 4 and first.dtype == np.float16 and cache.exists()
    np.testing.assert_array_equal(first, np.array([[len(p) + 0.123456, 1.0 / 3] for p in table["path"]], np.float16))
    again, n = cached_embeddings(table, cache, "model-1", embed)
    assert n == 0 and len(embed.calls) == 1
    assert isinstance(again, np.memmap) and not again.flags.writeable  # unchanged: the cache file itself, mapped
    np.testing.assert_array_equal(again, first)
    # a re-cropped image (new mtime) is the only one embedded again
    st = os.stat(table["path"][2])
    os.utime(table["path"][2], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _, n = cached_embeddings(table, cache, "model-1", embed)
    assert n == 1 and embed.calls[-1] == [table["path"][2]]
    # a new model invalidates everything; a subset of rows comes back in table order
    _, n = cached_embeddings(table, cache, "model-2", embed)
    assert n == 4
    sub, n = cached_embeddings(table.iloc[[3, 1]].reset_index(drop=True), cache, "model-2", embed)
    assert n == 0 and sub.shape == (2, 2)


def test_unreadable_cache_is_rebuilt(tmp_path):
    table, cache, embed = make_table(tmp_path), tmp_path / "m.npz", FakeEmbed()
    cache.write_bytes(b"garbage")
    _, n = cached_embeddings(table, cache, "k", embed)
    assert n == 4 and cached_embeddings(table, cache, "k", embed)[1] == 0


def test_model_key_tracks_checkpoint_and_tta(tmp_path):
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"1")
    k1 = model_key(ckpt, None, True)
    assert k1 != model_key(ckpt, None, False) and k1 != model_key(ckpt, 224, True)
    ckpt.write_bytes(b"22")
    assert model_key(ckpt, None, True) != k1


def test_database_table_order_and_unique_names():
    train = pd.DataFrame({"Image": ["a", "b"], "Id": ["w1", "new_whale"], "path": ["pa", "pb"], "is_query": [1, 0]})
    test = pd.DataFrame({"Image": ["c"], "path": ["pc"]})
    t = database_table(train, test)
    assert t["split"].tolist() == ["train", "train", "test"] and t["Id"].tolist() == ["w1", "new_whale", ""]
    assert t["is_query"].tolist() == [1, 0, 0]
    with pytest.raises(ValueError, match="'a' occurs twice"):
        database_table(train, pd.DataFrame({"Image": ["a"], "path": ["px"]}))


def test_rewrite_keeps_one_vectors_file_and_a_killed_rewrite_leaves_the_old_cache(tmp_path, monkeypatch):
    table, cache, embed = make_table(tmp_path), tmp_path / "emb" / "m.npz", FakeEmbed()
    first, _ = cached_embeddings(table, cache, "model-1", embed)
    cached_embeddings(table, cache, "model-2", embed)
    cached_embeddings(table, cache, "model-3", embed)
    assert sorted(p.suffix for p in cache.parent.iterdir()) == [".npy", ".npz"]  # old vector files removed
    assert load_vectors(cache).shape == (4, 2)

    def killed(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(np, "savez", killed)  # killed after the new vectors were written, before the .npz
    with pytest.raises(KeyboardInterrupt):
        save_cache(cache, "model-4", table, ["x"] * 4, np.zeros((4, 2), np.float16))
    monkeypatch.undo()
    again, n = cached_embeddings(table, cache, "model-3", embed)
    assert n == 0 and np.array_equal(again, first)
