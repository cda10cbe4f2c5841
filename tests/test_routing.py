"""Routing by cost (routing.route, Searcher.code_path): every code path returns the same
results; SearchParams validation; ivf HDS through the Searcher; sharding behind one code
index with one device per shard (N "devices" = cpu)."""

from __future__ import annotations

import numpy as np
import pytest

from deephash_faiss import api
from deephash_faiss.errors import DhfError
from deephash_faiss.index import IndexSpec
from deephash_faiss.routing import route, thresholds
from deephash_faiss.search import SearchParams, Searcher


def _same(a, b):
    assert len(a.results) == len(b.results)
    for ra, rb in zip(a.results, b.results):
        np.testing.assert_array_equal(ra.ids, rb.ids)
        np.testing.assert_array_equal(ra.hamming, rb.hamming)
        np.testing.assert_allclose(ra.distance, rb.distance, rtol=1e-5, atol=1e-5)
        assert ra.candidates == rb.candidates and ra.truncated == rb.truncated


@pytest.fixture(scope="module")
def tied_index(tmp_path_factory):
    """6,000 rows on ~40 distinct 16-bit codes (heavy ties), some deleted rows."""
    from deephash_faiss import maintain

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (8, 2), dtype=np.uint8)
    codes = base[rng.integers(0, 8, 6000)]
    codes[rng.random(6000) < 0.1, 1] ^= np.uint8(1 << 3)
    codes[rng.random(6000) < 0.05, 0] ^= np.uint8(1 << 5)
    feats = rng.standard_normal((6000, 16)).astype(np.float32)
    out = {}
    for kind in ("flat", "buckets"):
        d = str(tmp_path_factory.mktemp(kind))
        api.index_from_arrays(d, codes, feats, spec=IndexSpec(kind), shard_size=2500)
        maintain.remove(d, ids=[1, 2, 3, 500, 4000])
        out[kind] = d
    q = np.vstack([codes[:6], rng.integers(0, 256, (2, 2), dtype=np.uint8)])
    return out, q, feats[:8] + 0.05


def test_every_code_path_returns_the_same(tied_index):
    dirs, q, qf = tied_index
    ref = Searcher(dirs["flat"], device="cpu", code_backend="flat")
    for d in dirs.values():
        for cb in ("auto", "faiss", "dict", "flat", "gpu"):
            s = Searcher(d, device="cpu", code_backend=cb, hds_mode="exact")
            for k, r, mc in ((1, 2, None), (10, 3, 50), (300, 5, 1000), (7000, 17, None)):
                _same(ref.bcs(q, k), s.bcs(q, k))
                _same(ref.hds(q, qf, k, min(r, 16), mc, hds_mode="exact"), s.hds(q, qf, k, min(r, 16), mc))
            assert s.last_path == (cb if cb in ("dict", "flat", "gpu") else s.code_path(len(q)))
    small = Searcher(dirs["buckets"], device="cpu").code_path(1)
    assert small == ("dict" if 6000 - 5 >= thresholds()["auto_buckets_min_rows"] else "flat")
    assert Searcher(dirs["flat"], device="cpu").code_path(1) == "flat"


def test_route_rules():
    t = thresholds()
    r, big = float(t["dict_knn_max_ratio"]), max(int(t["auto_buckets_min_rows"]), 1000)
    assert route(big, 10, 1, "cpu") == "dict"
    assert route(big, int(big * r) + 100, 1, "cpu") == "flat"
    assert route(big - 1, 10, 1, "cpu") == "flat"  # small: the scan is measured faster
    assert route(10_000, None, 1, "cpu", saved="dict") == "dict"
    assert route(10_000, None, 1, "cpu", saved="hash") == "faiss"
    # CUDA: a single query over a small index stays on the CPU (no GPU start-up to win back)
    assert route(50_000, None, 1, "cuda") == "flat"
    margin = float(t["cuda_win_margin"])
    assert 0 < margin <= 1
    for n, u, b, gpu_ms, cpu_ms in t.get("cuda_grid") or []:
        # at every measured point: the GPU only where it measured faster by the margin; a near
        # tie stays on the CPU; never a point where the GPU measured slower
        assert (route(n, u, b, "cuda") == "gpu") == (gpu_ms < margin * cpu_ms), (n, u, b)
        if gpu_ms >= cpu_ms:
            assert route(n, u, b, "cuda") != "gpu"


def test_cuda_grid_nearest_point():
    from deephash_faiss.routing import cuda_wins

    grid = [[1e4, 1e4, 1, 2.0, 0.1], [1e4, 1e4, 1024, 0.01, 0.1], [1e8, 1e8, 1, 3.0, 200.0], [1e8, 2, 1, 3.0, 0.05]]
    assert not cuda_wins(grid, 20_000, 20_000, 1) and cuda_wins(grid, 20_000, 20_000, 900)
    assert cuda_wins(grid, 5 * 10**7, 5 * 10**7, 1) and not cuda_wins(grid, 5 * 10**7, 3, 1)
    assert not cuda_wins(grid, 100, 100, 1024)  # below the smallest measured index: the CPU
    assert not cuda_wins([], 10**8, 10**8, 1024)


def test_search_params_validation():
    assert SearchParams(5, 3, 10).check(10, 48).k == 5
    for bad, msg in ((dict(k=0), "k must be"), (dict(radius=-1), "radius must be"),
                     (dict(radius=50), "above the code length"), (dict(max_candidates=0), "max_candidates"),
                     (dict(mode="x"), "unknown mode"), (dict(hds_mode="x"), "unknown HDS mode"),
                     (dict(nprobe=0), "nprobe"), (dict(k=1.5), "integer")):
        with pytest.raises(DhfError, match=msg):
            SearchParams(**bad).check(10, 48)
    with pytest.raises(DhfError, match="empty"):
        SearchParams().check(0)


def test_searcher_ivf_hds_and_auto(tied_index):
    dirs, q, qf = tied_index
    s = Searcher(dirs["buckets"], device="cpu")
    exact = s.hds(q, qf, 10, 3, None, hds_mode="exact")
    assert s.fine is None and s.hds(q, qf, 10, 3, None).extra["hds_mode"] == "exact"  # auto, no fine index
    s.build_fine_index(cell_size=64, storage="fp16")
    b = s.hds(q, qf, 10, 3, None)  # auto -> ivf
    assert b.extra["hds_mode"] == "ivf"
    rec = np.mean([len(np.intersect1d(e.ids, g.ids)) / max(1, len(e.ids)) for e, g in zip(exact.results, b.results)])
    assert rec >= 0.9
    for r in b.results:  # hamming and distances of what comes back are exact
        assert not np.isin(r.ids, [1, 2, 3, 500, 4000]).any()
    codes = s.codes()
    for qi, r in enumerate(b.results):
        np.testing.assert_array_equal(r.hamming, [bin(int.from_bytes((codes[i] ^ q[qi]).tobytes(), "little"))
                                                  .count("1") for i in r.ids])


def test_sharded_one_device_per_shard_equals_unsharded(tied_index, tmp_path):
    from deephash_faiss.distributed import ShardedCodeIndex, ShardedSearcher, split_index

    dirs, q, qf = tied_index
    s = Searcher(dirs["buckets"], device="cpu")
    parts = split_index(dirs["buckets"], str(tmp_path / "split"), 3)
    with ShardedSearcher(parts, use_ray=False, devices=["cpu", "cpu", "cpu"]) as ss:
        assert ss.devices == ["cpu"] * 3 and isinstance(ss.code_index(), ShardedCodeIndex)
        for k, r, mc in ((5, 3, 10_000), (40, 2, 7), (600, 4, None)):
            _same(s.bcs(q, k), ss.bcs(q, k))
            _same(s.hds(q, qf, k, r, mc, hds_mode="exact"), ss.hds(q, qf, k, r, mc))
            _same(s.es(qf, q, k), ss.es(qf, q, k))
