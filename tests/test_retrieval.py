"""Meta-embedding math, faiss search against numpy brute force, local evaluation."""
import numpy as np
import pytest

from common.retrieval import evaluate_embeddings, l2_normalize, meta_embedding, rank_identities, search


def brute_topk(db, q, k, exclude=None):
    sim = q @ db.T
    if exclude is not None:
        sim[np.arange(len(q)), exclude] = -np.inf
    idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sim, idx, 1), idx


def test_meta_embedding_normalises_and_weights():
    a = np.array([[3.0, 4.0], [1.0, 0.0]])
    b = np.array([[0.0, 10.0], [5.0, 0.0]])
    m = meta_embedding([a, b], [1.0, 2.0])
    assert m.shape == (2, 4)
    np.testing.assert_allclose(np.linalg.norm(m, axis=1), 1.0, rtol=1e-6)
    # each part is w * unit vector, then the whole row is divided by sqrt(1 + 4)
    np.testing.assert_allclose(m[0], np.array([0.6, 0.8, 0.0, 2.0]) / np.sqrt(5), rtol=1e-6)
    # the cosine similarity is the weighted mean of member cosines: (1*cos_a + 4*cos_b) / 5
    ca = l2_normalize(a)[0] @ l2_normalize(a)[1]
    cb = l2_normalize(b)[0] @ l2_normalize(b)[1]
    assert m[0] @ m[1] == pytest.approx((ca + 4 * cb) / 5, rel=1e-6)
    # weight 0 drops a member; scaling all weights changes nothing
    np.testing.assert_allclose(meta_embedding([a, b], [1, 0]), l2_normalize(a), rtol=1e-6)
    np.testing.assert_allclose(meta_embedding([a, b], [2, 4]), m, rtol=1e-6)


@pytest.mark.parametrize("bad", [dict(weights=[1.0]), dict(weights=[0, 0]), dict(weights=[-1, 1])])
def test_meta_embedding_rejects_bad_weights(bad):
    e = np.ones((2, 3))
    with pytest.raises(ValueError):
        meta_embedding([e, e], **bad)


def test_meta_embedding_in_blocks_of_float16_memory_maps_equals_whole(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(10, 3)).astype(np.float16), rng.normal(size=(10, 5)).astype(np.float16)
    np.save(tmp_path / "a.npy", a)
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    whole = meta_embedding([a, b], [1.0, 0.5])
    blocks = meta_embedding([mapped, b], [1.0, 0.5], chunk=3)
    assert blocks.dtype == np.float32 and blocks.shape == (10, 8)
    np.testing.assert_array_equal(blocks, whole)
    np.testing.assert_allclose(np.linalg.norm(blocks, axis=1), 1.0, rtol=1e-6)


def test_meta_embedding_rejects_row_mismatch():
    with pytest.raises(ValueError, match="number of images"):
        meta_embedding([np.ones((2, 3)), np.ones((3, 3))])


def test_faiss_search_equals_numpy_bruteforce():
    rng = np.random.default_rng(0)
    db = l2_normalize(rng.normal(size=(300, 16)))
    q = l2_normalize(rng.normal(size=(40, 16)))
    s, i = search(db, q, 20)
    bs, bi = brute_topk(db, q, 20)
    np.testing.assert_array_equal(i, bi)
    np.testing.assert_allclose(s, bs, atol=1e-5)
    assert s.dtype == np.float32 and i.dtype == np.int64 and s.shape == (40, 20)


def test_search_excludes_query_itself_and_pads():
    rng = np.random.default_rng(1)
    db = l2_normalize(rng.normal(size=(30, 8)))
    rows = np.arange(0, 30, 3)
    s, i = search(db, db[rows], 5, exclude=rows)
    assert not (i == rows[:, None]).any()
    bs, bi = brute_topk(db, db[rows], 5, exclude=rows)
    np.testing.assert_array_equal(i, bi)
    # k larger than the database: padded with -1 / -inf after the 29 real neighbours
    s, i = search(db, db[:2], 35, exclude=np.array([0, -1]))
    assert (i[0, :29] >= 0).all() and (i[0, 29:] == -1).all() and np.isneginf(s[0, 29:]).all()
    assert (i[1, :30] >= 0).all() and (i[1, 30:] == -1).all()


def test_ivf_search_with_all_lists_probed_is_exact():
    rng = np.random.default_rng(2)
    db = l2_normalize(rng.normal(size=(800, 8)))
    q = l2_normalize(rng.normal(size=(10, 8)))
    s, i = search(db, q, 10, index="ivf", nlist=8, nprobe=8)
    np.testing.assert_array_equal(i, brute_topk(db, q, 10)[1])
    with pytest.raises(ValueError, match="search.index"):
        search(db, q, 3, index="hnsw")


def test_float16_vectors_from_a_memory_map_find_the_float32_neighbours(tmp_path):
    import faiss

    from common.retrieval import build_index

    rng = np.random.default_rng(4)
    db16 = l2_normalize(rng.normal(size=(500, 16))).astype(np.float16)  # what the embedding cache stores
    np.save(tmp_path / "db.npy", db16)
    mapped = np.load(tmp_path / "db.npy", mmap_mode="r")
    q = l2_normalize(rng.normal(size=(20, 16)))
    exact = brute_topk(db16.astype(np.float32), q, 10)
    for kw in (dict(index="flat"), dict(index="ivf", nlist=4, nprobe=4)):
        s, i = search(mapped, q, 10, vectors="float16", gpu=False, **kw)
        np.testing.assert_array_equal(i, exact[1])
        np.testing.assert_allclose(s, exact[0], atol=1e-3)  # faiss computes in float16 precision
    idx = build_index(mapped, "flat", vectors="float16", gpu=False, chunk=64)
    assert isinstance(idx, faiss.IndexScalarQuantizer) and idx.ntotal == 500
    assert faiss.serialize_index(idx).nbytes < 0.6 * faiss.serialize_index(build_index(mapped, gpu=False)).nbytes
    with pytest.raises(ValueError, match="search.vectors"):
        search(mapped, q, 3, vectors="int8")


def test_auto_index_is_exact_up_to_ivf_above_and_ivf_beyond_with_its_recall_measured():
    import faiss

    from common.retrieval import build_index, index_recall

    rng = np.random.default_rng(3)
    centres = l2_normalize(rng.normal(size=(60, 16)))
    db = l2_normalize(np.repeat(centres, 10, axis=0) + 0.3 * rng.normal(size=(600, 16)))
    assert isinstance(build_index(db, "auto", ivf_above=600, gpu=False), faiss.IndexFlatIP)
    assert isinstance(build_index(db, "auto", ivf_above=599, gpu=False), faiss.IndexIVFFlat)
    kw = dict(index="auto", ivf_above=100, nlist=15, gpu=False)
    exact = index_recall(db, db[:50], 10, n_sample=20, **{**kw, "ivf_above": 10_000})
    assert exact == {"index": "flat", "n_db": 600, "n_sample": 0, "recall": 1.0}
    one = index_recall(db, db[:50], 10, n_sample=20, nprobe=1, **kw)
    every = index_recall(db, db[:50], 10, n_sample=20, nprobe=15, **kw)
    assert one["index"] == "ivf" and one["n_sample"] == 20
    assert every["recall"] == 1.0 and 0.0 < one["recall"] < 1.0  # one list of 15 misses neighbours
    assert build_index(db, "ivf", nlist=32, nprobe="auto", gpu=False).nprobe == 1  # 15 lists (capped), 1/16


def test_rank_identities_best_image_first():
    ids, sims = rank_identities([[0.9, 0.8, 0.7, 0.5]], [[1, 2, 0, 3]], ["a", "b", "a", "c"], n=5)
    assert ids == [["b", "a", "c"]]
    assert sims[0] == pytest.approx([0.9, 0.8, 0.5])


def test_evaluate_embeddings_hand_case():
    # two tight clusters a and b; one query per cluster plus a query of an unseen whale
    emb = np.array([[1, 0, 0], [0.99, 0.1, 0], [0, 1, 0], [0.1, 0.99, 0], [0, 0, 1], [0.7, 0.7, 0.1]], float)
    ids = np.array(["a", "a", "b", "b", "c", "new_whale"])
    is_query = np.array([1, 0, 1, 0, 1, 0])
    r = evaluate_embeddings(emb, ids, is_query, k=3)
    assert r["n_queries"] == 3
    assert r["map20"] == pytest.approx(1.0)             # c has no relevant image: skipped
    assert r["top1"] == pytest.approx(2 / 3)            # ... but counts as a miss here
    assert r["hit20"] == pytest.approx(2 / 3)
    assert r["map5"] == pytest.approx(2 / 3)
    # a wrong nearest neighbour lowers every figure
    emb2 = emb.copy()
    emb2[1] = [0, 0.95, 0.3]
    r2 = evaluate_embeddings(emb2, ids, is_query, k=3)
    assert r2["top1"] < r["top1"] and r2["map20"] < r["map20"]
