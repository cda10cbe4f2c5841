"""HDS and ES against independent brute force (numpy Hamming + L2)."""

import numpy as np
import pytest

from deephash_faiss import DhfError, api
from deephash_faiss.index import IndexSpec


def _popcount_ref(q, db):
    x = np.unpackbits(np.bitwise_xor(q[None, :], db), axis=1)
    return x.sum(1)


def _data(n=600, nbytes=2, dim=16, seed=0, clusters=6):
    rng = np.random.default_rng(seed)
    centres = rng.integers(0, 256, (clusters, nbytes), dtype=np.uint8)
    lab = rng.integers(0, clusters, n)
    codes = centres[lab].copy()
    flips = rng.random((n, nbytes * 8)) < 0.08
    codes ^= np.packbits(flips, axis=1, bitorder="little")
    codes[::7] = codes[0]  # many exact ties
    feats = rng.normal(size=(n, dim)).astype(np.float32)
    return codes, feats, lab.astype(np.int32)


@pytest.fixture(scope="module")
def synth_index(tmp_path_factory):
    codes, feats, lab = _data()
    d = str(tmp_path_factory.mktemp("idx"))
    api.index_from_arrays(d, codes, feats, lab, shard_size=250)  # 3 shards
    return d, codes, feats, lab


def test_hds_equals_filter_then_sort_by_l2(synth_index):
    d, codes, feats, _ = synth_index
    s = api.open_index(d, device="cpu")
    rng = np.random.default_rng(1)
    qi = rng.choice(len(codes), 12, replace=False)
    qc, qf = codes[qi], feats[qi] + rng.normal(0, 0.1, (12, feats.shape[1])).astype(np.float32)
    for radius in (1, 3, 5):
        b = s.hds(qc, qf, k=20, radius=radius, max_candidates=None)
        for j in range(len(qi)):
            ham = _popcount_ref(qc[j], codes)
            pool = np.flatnonzero(ham < radius)
            if len(pool) < 20:  # documented top-up with the Hamming k-NN
                extra = np.lexsort((np.arange(len(ham)), ham))[:20]
                pool = np.union1d(pool, extra)
            l2 = ((feats[pool] - qf[j]) ** 2).sum(1)
            ref = pool[np.lexsort((pool, l2))][:20]
            got = b.results[j]
            assert got.ids.tolist() == ref.tolist()
            np.testing.assert_allclose(got.distance, ((feats[ref] - qf[j]) ** 2).sum(1), rtol=1e-4, atol=1e-4)
            assert got.hamming.tolist() == ham[ref].tolist()


def test_hds_cap_keeps_nearest_codes(synth_index):
    d, codes, feats, _ = synth_index
    s = api.open_index(d, device="cpu")
    qc, qf = codes[:1], feats[:1]
    b = s.hds(qc, qf, k=5, radius=8, max_candidates=30)
    r = b.results[0]
    ham = _popcount_ref(qc[0], codes)
    capped = np.lexsort((np.arange(len(ham)), ham))[:30]
    assert r.candidates == 30 and r.truncated
    assert set(r.ids.tolist()) <= set(capped.tolist())


def test_es_equals_numpy_l2(synth_index):
    d, codes, feats, _ = synth_index
    s = api.open_index(d, device="cpu")
    q = np.random.default_rng(2).normal(size=(7, feats.shape[1])).astype(np.float32)
    b = s.es(q, codes[:7], k=15)
    for j in range(7):
        l2 = ((feats - q[j]) ** 2).sum(1)
        ref = np.argsort(l2, kind="stable")[:15]
        assert b.results[j].ids.tolist() == ref.tolist()
        assert b.results[j].hamming.tolist() == _popcount_ref(codes[j], codes[ref]).tolist()


def test_bcs_equals_stable_hamming_sort(synth_index):
    d, codes, _, _ = synth_index
    s = api.open_index(d, device="cpu")
    b = s.bcs(codes[:9], k=50)
    for j in range(9):
        ham = _popcount_ref(codes[j], codes)
        ref = np.argsort(ham, kind="stable")[:50]
        assert b.results[j].ids.tolist() == ref.tolist()


def test_features_in_memory_same_results(synth_index):
    d, codes, feats, _ = synth_index
    a = api.open_index(d, device="cpu")
    b = api.open_index(d, device="cpu", features_in_memory=True)
    ra = a.hds(codes[:4], feats[:4], 10, 3, 100).results
    rb = b.hds(codes[:4], feats[:4], 10, 3, 100).results
    assert all(x.ids.tolist() == y.ids.tolist() for x, y in zip(ra, rb))


def test_hash_index_hds_matches_flat(tmp_path):
    codes, feats, lab = _data(seed=3)
    da, db = str(tmp_path / "flat"), str(tmp_path / "hash")
    api.index_from_arrays(da, codes, feats, lab)
    api.index_from_arrays(db, codes, feats, lab, spec=IndexSpec("hash", hash_bits=8, nflip=2))
    a, b = api.open_index(da, device="cpu"), api.open_index(db, device="cpu")
    for radius in (1, 2, 3):  # exact while nflip >= radius - 1
        la, Da, Ia = a.index.range_search(codes[:40], radius)
        lb, Db, Ib = b.index.range_search(codes[:40], radius)
        assert la.tolist() == lb.tolist() and Ia.tolist() == Ib.tolist() and Da.tolist() == Db.tolist()
        # HDS is identical whenever the pool holds >= k images (no k-NN top-up, which
        # uses the index's own, approximate for hash, k-NN)
        full = [i for i in range(40) if la[i + 1] - la[i] >= 10]
        ra = a.hds(codes[full], feats[full], 10, radius, None).results
        rb = b.hds(codes[full], feats[full], 10, radius, None).results
        assert all(x.ids.tolist() == y.ids.tolist() for x, y in zip(ra, rb))


def test_bad_arguments(synth_index):
    d, codes, feats, _ = synth_index
    s = api.open_index(d, device="cpu")
    with pytest.raises(DhfError, match="k must be"):
        s.bcs(codes[:1], 0)
    with pytest.raises(DhfError, match="radius"):
        s.hds(codes[:1], feats[:1], 5, -1)
    with pytest.raises(DhfError, match="bits"):
        s.bcs(np.zeros((1, 4), np.uint8), 5)
    with pytest.raises(DhfError, match="has no model"):
        s.encode(["x.png"])


def test_gpu_code_backend_equals_faiss(synth_index):
    """The torch/Triton code path (here its CPU fallback) returns what the FAISS index does."""
    d, codes, feats, _ = synth_index
    a = api.open_index(d, device="cpu")
    from deephash_faiss.search import Searcher

    b = Searcher(d, device="cpu", code_backend="gpu")
    assert b.code_backend == "gpu" and a.code_backend == "auto" and a.code_path(1) == "flat"
    for s in (a, b):
        mask = np.zeros(s.count, bool)
        mask[[0, 7, 14, 100]] = True  # deleted rows are hidden on both paths
        s.index.deleted = mask
    ra, rb = a.bcs(codes[:20], 30).results, b.bcs(codes[:20], 30).results
    assert all(x.ids.tolist() == y.ids.tolist() and x.hamming.tolist() == y.hamming.tolist() for x, y in zip(ra, rb))
    for radius, cap in ((2, None), (4, 25)):
        ha = a.hds(codes[:20], feats[:20], 10, radius, cap).results
        hb = b.hds(codes[:20], feats[:20], 10, radius, cap).results
        assert all(x.ids.tolist() == y.ids.tolist() and x.candidates == y.candidates for x, y in zip(ha, hb))
        assert all(0 not in x.ids.tolist() and 7 not in x.ids.tolist() for x in hb)


def test_faiss_gpu_backend_dispatch(monkeypatch):
    """ES goes through faiss.knn_gpu when faiss-gpu is importable (simulated here)."""
    import faiss

    from deephash_faiss import rerank

    calls = []

    def fake_knn_gpu(res, xq, xb, k):
        calls.append(k)
        return faiss.knn(xq, xb, k)

    monkeypatch.setattr(faiss, "knn_gpu", fake_knn_gpu, raising=False)
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(rerank, "_GPU_RESOURCES", None)
    rng = np.random.default_rng(0)
    xb = rng.normal(size=(500, 8)).astype(np.float32)
    xq = rng.normal(size=(4, 8)).astype(np.float32)
    shards = [(0, xb[:200]), (200, xb[200:])]
    D1, I1 = rerank.exhaustive_knn(xq, shards, 10, use_gpu=True)
    D0, I0 = rerank.exhaustive_knn(xq, shards, 10)
    assert calls and I1.tolist() == I0.tolist()
    monkeypatch.setattr(rerank, "faiss_has_gpu", lambda: True)
    assert rerank.pick_backend("cuda") == "faiss-gpu" and rerank.pick_backend("cpu") == "faiss"


@pytest.mark.skipif(not __import__("deephash_faiss.rerank", fromlist=["x"]).faiss_has_gpu(),
                    reason="faiss-gpu with a GPU is not available here")
def test_faiss_gpu_es_equals_cpu():  # runs where faiss-gpu and a GPU are present
    from deephash_faiss import rerank

    rng = np.random.default_rng(1)
    xb = rng.normal(size=(2000, 32)).astype(np.float32)
    xq = rng.normal(size=(16, 32)).astype(np.float32)
    D1, I1 = rerank.exhaustive_knn(xq, [(0, xb)], 20, use_gpu=True)
    D0, I0 = rerank.exhaustive_knn(xq, [(0, xb)], 20)
    assert I1.tolist() == I0.tolist()


def test_torch_l2_backend_matches_faiss(synth_index):
    """The GPU L2 code path (gpu.l2_knn for ES, rank_pools_torch_ids -> gpu.l2_rerank for
    HDS), run here on CPU tensors, ranks like the faiss/numpy CPU path."""
    d, codes, feats, _ = synth_index
    a = api.open_index(d, device="cpu")
    b = api.open_index(d, device="cpu")
    b.backend = "torch"
    from deephash_faiss.search import Searcher

    c = Searcher(d, device="cpu", code_backend="gpu")  # pools kept on the device too
    c.backend = "torch"
    rng = np.random.default_rng(5)
    qf = feats[:15] + rng.normal(0, 0.2, (15, feats.shape[1])).astype(np.float32)
    for mode, radius, cap in (("hds", 4, 200), ("hds", 2, 5), ("hds", 6, None), ("es", 4, 200)):
        ra = a.search(mode, codes[:15], qf, k=12, radius=radius, max_candidates=cap).results
        for s in (b, c):
            rb = s.search(mode, codes[:15], qf, k=12, radius=radius, max_candidates=cap).results
            for x, y in zip(ra, rb):
                assert x.ids.tolist() == y.ids.tolist() and x.candidates == y.candidates
                assert x.truncated == y.truncated and x.hamming.tolist() == y.hamming.tolist()
                np.testing.assert_allclose(x.distance, y.distance, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", [IndexSpec("hash", hash_bits=24, nflip=0), IndexSpec("multihash", hash_bits=16,
                                                                                       nhash=2, nflip=0)])
def test_hash_index_lists_are_never_short(tmp_path, spec):
    """faiss's hash k-NN probes nflip flips only: queries far from every code came back with
    no rows (BCS) and HDS pools were not topped up. Short lists are completed by the exact
    flat scan; they then equal brute force."""
    codes, feats, lab = _data(nbytes=4, seed=5)
    d = str(tmp_path / "idx")
    api.index_from_arrays(d, codes, feats, lab, spec=spec)
    s = api.open_index(d, device="cpu")
    rng = np.random.default_rng(1)
    q = rng.integers(0, 256, (30, codes.shape[1]), dtype=np.uint8)  # random codes: most hash buckets empty
    raw_D, raw_I = s.index.search(q, 10)
    short = [i for i in range(len(q)) if (raw_I[i] >= 0).sum() < 10]
    assert short, "the test needs queries the hash probe leaves short"
    b = s.bcs(q, 10)
    for i, r in enumerate(b.results):
        assert len(r.ids) == 10
        if i in short:
            ham = _popcount_ref(q[i], codes)
            assert r.ids.tolist() == np.argsort(ham, kind="stable")[:10].tolist()
    h = s.hds(q, rng.normal(size=(len(q), feats.shape[1])).astype(np.float32), 10, 2, None)
    assert all(len(r.ids) == 10 for r in h.results)
