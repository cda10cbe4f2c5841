"""CUDA-only tests (skipped on machines without a GPU; run on the H200 with
``pytest tests/test_cuda.py``): the compiled Triton kernels and the product's
``Searcher(device="cuda")`` against independent numpy brute force."""
import numpy as np
import pytest
import torch

from deephash_faiss import api, gpu
from deephash_faiss.search import Searcher

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def ham(xb, q):
    """Hamming distances int64 [n] of one packed query to packed codes [n, B]."""
    return np.unpackbits(xb ^ q[None], axis=1).sum(1).astype(np.int64)


def clustered(rng, n, nbytes, classes=20, flip=0.03, dup=0):
    centres = rng.integers(0, 256, (classes, nbytes), dtype=np.uint8)
    lab = rng.integers(0, classes, n)
    noise = np.packbits(rng.random((n, nbytes * 8)) < flip, axis=1, bitorder="little")
    xb = centres[lab] ^ noise
    if dup:
        xb[rng.choice(n, dup, replace=False)] = centres[0]
    return xb, lab, centres


def same_ranking(got, ref, dist, tol=1e-3):
    """got == ref except where float32 rounding may swap near-ties (reference distances
    of neighbouring ranks closer than tol)."""
    got, ref = np.asarray(got), np.asarray(ref)
    assert len(got) == len(ref)
    gap = np.diff(dist)
    clear = np.ones(len(ref), bool)
    clear[:-1] &= gap > tol
    clear[1:] &= gap > tol
    assert (got[clear] == ref[clear]).all()
    assert set(got.tolist()) == set(ref.tolist()) or not clear[-1]


@pytest.mark.parametrize("nbytes", [6, 8, 16])
def test_cuda_kernel_knn_and_range_exact(nbytes):
    rng = np.random.default_rng(nbytes)
    n = 150_000
    xb, _, centres = clustered(rng, n, nbytes, dup=6000)  # 6,000 exact ties with centre 0
    xq = np.concatenate([centres[:4], rng.integers(0, 256, (8, nbytes), dtype=np.uint8)])
    idx = gpu.GpuBinaryIndex(xb, device="cuda")
    idx.small_n = 0  # always the kernel path
    assert idx.use_triton == gpu.has_triton()
    for k in (1, 100, 1000):
        D, I = idx.search(xq, k)
        for i, q in enumerate(xq):
            d = ham(xb, q)
            order = np.argsort(d, kind="stable")[:k]
            assert I[i].tolist() == order.tolist(), (k, i)
            assert D[i].tolist() == d[order].tolist()
    for r, cap in ((2, None), (nbytes, 500)):
        lims, D, I = idx.range_search(xq, r, max_candidates=cap)
        for i, q in enumerate(xq):
            d = ham(xb, q)
            ids = np.flatnonzero(d < r)
            ids = ids[np.argsort(d[ids], kind="stable")][:cap]
            assert I[lims[i]:lims[i + 1]].tolist() == ids.tolist(), (r, i)


def test_cuda_searcher_matches_numpy(tmp_path):
    rng = np.random.default_rng(0)
    n, dim = 60_000, 48
    codes, lab, _ = clustered(rng, n, 6, classes=30, flip=0.04)
    means = rng.standard_normal((30, dim)).astype(np.float32)
    feats = (means[lab] + 0.5 * rng.standard_normal((n, dim))).astype(np.float32)
    api.index_from_arrays(str(tmp_path), codes, feats, lab.astype(np.int32), shard_size=25_000)
    auto = Searcher(str(tmp_path), device="cuda")
    assert auto.code_backend == "auto" and auto.code_path(16) in ("gpu", "dict", "flat")
    s = Searcher(str(tmp_path), device="cuda", code_backend="gpu")  # the GPU kernels, forced
    assert s.backend in ("torch", "faiss-gpu")
    s.gpu_index().gpu.small_n = 0
    qi = rng.choice(n, 16, replace=False)
    qc, qf = codes[qi], feats[qi] + 0.1 * rng.standard_normal((16, dim)).astype(np.float32)
    k = 50
    bcs, hds, es = s.bcs(qc, k).results, s.hds(qc, qf, k, 3, 2000).results, s.es(qf, qc, k).results
    for j in range(16):
        d = ham(codes, qc[j])
        ref = np.argsort(d, kind="stable")[:k]
        assert bcs[j].ids.tolist() == ref.tolist()
        pool = np.flatnonzero(d < 3)
        pool = pool[np.lexsort((pool, d[pool]))][:2000]
        if len(pool) < k:
            pool = np.union1d(pool, ref)
        l2 = ((feats[pool].astype(np.float64) - qf[j]) ** 2).sum(1)
        o = np.lexsort((pool, l2))[:k]
        same_ranking(hds[j].ids, pool[o], l2[o])
        assert hds[j].candidates == len(pool)
        np.testing.assert_allclose(hds[j].distance, np.sort(l2)[:k], rtol=1e-4, atol=1e-3)
        l2a = ((feats.astype(np.float64) - qf[j]) ** 2).sum(1)
        er = np.lexsort((np.arange(n), l2a))[:k]
        same_ranking(es[j].ids, er, l2a[er])
        np.testing.assert_allclose(es[j].distance, l2a[er], rtol=1e-4, atol=1e-3)
