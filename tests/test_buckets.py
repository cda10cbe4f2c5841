"""Code-dictionary index (index.BucketIndex, ``--index-type buckets``): k-NN and radius pools
identical to numpy brute force (stable sort: ties by id) and to IndexBinaryFlat, with heavy
ties, deletions and caps; save / load (memory-mapped); add; the maintenance commands."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deephash_faiss.index import BinaryIndex, BucketIndex, IndexSpec, hamming_numpy, pack_codes

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class _Ball:
    """Force one way of finding the dictionary codes near a query for a block: "ball" (the
    Hamming-ball probing of large dictionaries), "scan" (every code's distance) or "faiss"
    (range search over the padded dictionary). ``True`` / ``False`` mean "ball" / "scan"."""

    def __init__(self, mode):
        self.mode = {True: "ball", False: "scan"}.get(mode, mode)

    def __enter__(self):
        from deephash_faiss import routing

        self.saved = routing.thresholds, BucketIndex.SCAN_REACH_MAX_PAIRS
        th = dict(routing.thresholds(), dict_ball_min_codes=0 if self.mode == "ball" else 1 << 62)
        routing.thresholds = lambda: th
        BucketIndex.SCAN_REACH_MAX_PAIRS = -1 if self.mode == "faiss" else 1 << 62

    def __exit__(self, *exc):
        from deephash_faiss import routing

        routing.thresholds, BucketIndex.SCAN_REACH_MAX_PAIRS = self.saved


@st.composite
def tied_codes(draw):
    """Few distinct codes (heavy ties), a deletion mask, queries on and off the codes."""
    bits = draw(st.sampled_from([8, 16, 48, 64, 128]))
    n = draw(st.integers(0, 120))
    u = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    nb = bits // 8
    pool = rng.integers(0, 256, (u, nb), dtype=np.uint8)
    db = pool[rng.integers(0, u, n)]
    flips = rng.random((n, bits)) < draw(st.sampled_from([0.0, 0.02, 0.2]))
    db = db ^ np.packbits(flips, axis=1, bitorder="little")
    q = np.vstack([pool[rng.integers(0, u, 3)], rng.integers(0, 256, (2, nb), dtype=np.uint8)])
    deleted = rng.random(n) < draw(st.sampled_from([0.0, 0.3, 0.9]))
    return bits, db, q, deleted


def _live_brute(q, db, deleted):
    d = hamming_numpy(q, db) if len(db) else np.zeros((len(q), 0), np.int32)
    live = np.flatnonzero(~deleted)
    return d[:, live], live


@SETTINGS
@given(tied_codes(), st.integers(1, 130), st.booleans(), st.booleans(), st.sampled_from([1, 2, 32]))
def test_dictionary_knn_equals_stable_brute_force(data, k, ball, batched, first):
    """``batched``: the batch path (faiss k-NN over the dictionary, one merge for all queries)
    even for these few queries; else the per-query scan and merge. ``first``: codes of its
    first faiss round (small values take several rounds)."""
    bits, db, q, deleted = data
    idx = BinaryIndex.build(db, IndexSpec("buckets"))
    assert isinstance(idx, BucketIndex) and idx.ntotal == len(db)
    idx.deleted = deleted
    idx.KNN_FAISS_MIN_QUERIES = 0 if batched else 1 << 30
    idx.KNN_FIRST_CODES = first
    with _Ball(ball):
        D, I = idx.search(q, k)
    d, live = _live_brute(q, db, deleted)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    kk = order.shape[1]
    np.testing.assert_array_equal(I[:, :kk], live[order])
    np.testing.assert_array_equal(D[:, :kk], np.take_along_axis(d, order, 1))
    assert (I[:, kk:] == -1).all() and (D[:, kk:] == np.iinfo(np.int32).max).all()
    flat = BinaryIndex.build(db, IndexSpec("flat"))
    flat.deleted = deleted
    for a, b in zip(flat.search(q, k), (D, I)):
        np.testing.assert_array_equal(a, b)


@SETTINGS
@given(tied_codes(), st.integers(0, 40), st.one_of(st.none(), st.integers(1, 50)),
       st.sampled_from(["scan", "faiss", "ball"]))
def test_dictionary_pools_equal_brute_force(data, radius, cap, ball):
    bits, db, q, deleted = data
    idx = BinaryIndex.build(db, IndexSpec("buckets"))
    idx.deleted = deleted
    with _Ball(ball):
        lims, D, I = idx.range_search(q, radius, cap)
    d, live = _live_brute(q, db, deleted)
    np.testing.assert_array_equal(idx.pool_sizes(q, radius), (d < radius).sum(1))
    for i in range(len(q)):
        want = np.flatnonzero(d[i] < radius)
        want = want[np.argsort(d[i][want], kind="stable")][:cap]
        np.testing.assert_array_equal(I[lims[i]:lims[i + 1]], live[want])
        np.testing.assert_array_equal(D[lims[i]:lims[i + 1]], d[i][want])
        with _Ball(ball):  # the query alone (pool_rows' one-query path for small pools)
            l1, D1, I1 = idx.range_search(q[i:i + 1], radius, cap)
        np.testing.assert_array_equal(l1, [0, len(want)])
        np.testing.assert_array_equal(I1, live[want])
        np.testing.assert_array_equal(D1, d[i][want])
        assert D1.dtype == np.int32 and I1.dtype == np.int64


def test_big_buckets_and_widening():
    """A few huge buckets and a long tail; k past several distance levels."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2, (3, 48), dtype=np.uint8)
    rows = bits[rng.choice(3, 20_000, p=[0.6, 0.3, 0.1])]
    tail = rng.random(rows.shape) < 0.01
    db = pack_codes(rows ^ tail)
    q = np.vstack([db[:5], pack_codes(rng.integers(0, 2, (5, 48), dtype=np.uint8))])
    a, b = BinaryIndex.build(db, IndexSpec("flat")), BinaryIndex.build(db, IndexSpec("buckets"))
    assert b.n_codes < 3000
    mask = rng.random(len(db)) < 0.5
    for dele, ball in itertools.product((None, mask), ("scan", "faiss", "ball")):
        a.deleted, b.deleted = dele, dele
        with _Ball(ball):
            for k in (1, 10, 5000, 15_000):
                for x, y in zip(a.search(q, k), b.search(q, k)):
                    np.testing.assert_array_equal(x, y)
            for r, cap in ((3, None), (3, 100), (8, 7000), (49, 10)):
                for x, y in zip(a.range_search(q, r, cap), b.range_search(q, r, cap)):
                    np.testing.assert_array_equal(x, y)
                for i in range(len(q)):  # one query at a time: small pools and huge ones
                    want = a.range_search(q[i:i + 1], r, cap)
                    lims_c, Dc, Ic = b.reach(q[i:i + 1], r, ordered=False)
                    o = rng.permutation(len(Ic))  # (one query's codes may come in any order)
                    for got in (b.range_search(q[i:i + 1], r, cap), b.pool_rows(lims_c, Dc[o], Ic[o], cap)):
                        for x, y in zip(want, got):
                            np.testing.assert_array_equal(x, y)


def test_save_load_memory_mapped_add_and_auto(tmp_path):
    rng = np.random.default_rng(1)
    db = rng.integers(0, 4, (500, 6)).astype(np.uint8)
    q = db[:7]
    idx = BinaryIndex.build(db, IndexSpec("buckets"))
    p = str(tmp_path / "codes.index")
    idx.save(p)
    back = BinaryIndex.load(p, IndexSpec("buckets"), 48)
    assert isinstance(back, BucketIndex) and isinstance(back.ids, np.memmap)
    assert back.n_codes == idx.n_codes and back.ntotal == 500
    for x, y in zip(idx.search(q, 40), back.search(q, 40)):
        np.testing.assert_array_equal(x, y)
    # the file's magic is enough (a manifest saying "flat" still loads it right)
    assert isinstance(BinaryIndex.load(p, IndexSpec("flat"), 48), BucketIndex)
    # add: new rows get the next ids, equal to building everything at once
    more = rng.integers(0, 4, (60, 6)).astype(np.uint8)
    back.deleted = np.zeros(500, bool)
    back.deleted[[3, 4]] = True
    back.add(more)
    whole = BinaryIndex.build(np.vstack([db, more]), IndexSpec("flat"))
    whole.deleted = np.zeros(560, bool)
    whole.deleted[[3, 4]] = True
    assert back.ntotal == 560 and back.deleted.shape == (560,)
    for x, y in zip(whole.search(q, 100), back.search(q, 100)):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(back.row_codes(), np.vstack([db, more]))
    # truncated file: one DhfError
    from deephash_faiss.errors import DhfError

    data = open(p, "rb").read()
    open(p, "wb").write(data[:len(data) - 100])
    with pytest.raises(DhfError, match="cannot read code index"):
        BinaryIndex.load(p, IndexSpec("buckets"), 48)
    # auto: few distinct codes -> buckets, spread codes -> flat (resolved in place)
    from deephash_faiss.routing import thresholds

    big = max(1000, int(thresholds()["auto_buckets_min_rows"]))
    spec = IndexSpec("auto")
    few = rng.integers(0, 256, (5, 6), dtype=np.uint8)[rng.integers(0, 5, big)]
    assert isinstance(BinaryIndex.build(few, spec), BucketIndex) and spec.kind == "buckets"
    spec = IndexSpec("auto")  # below the measured minimum size: flat
    assert not isinstance(BinaryIndex.build(few[:big - 1], spec), BucketIndex) and spec.kind == "flat"
    spec = IndexSpec("auto")
    spread = rng.integers(0, 256, (big, 6), dtype=np.uint8)
    assert not isinstance(BinaryIndex.build(spread, spec), BucketIndex) and spec.kind == "flat"


def test_maintenance_and_shards_with_buckets(tmp_path):
    """index_from_arrays with buckets: search == flat, remove / compact / verify / shard keep it."""
    from deephash_faiss import api, maintain
    from deephash_faiss.distributed import ShardedSearcher, split_index
    from deephash_faiss.search import Searcher
    from deephash_faiss.store import read_manifest

    rng = np.random.default_rng(2)
    n = 400
    db = rng.integers(0, 3, (n, 2)).astype(np.uint8)
    feats = rng.standard_normal((n, 8)).astype(np.float32)
    dirs = {}
    for kind in ("flat", "buckets"):
        d = str(tmp_path / kind)
        api.index_from_arrays(d, db, feats, spec=IndexSpec(kind), shard_size=150)
        dirs[kind] = d
    assert read_manifest(dirs["buckets"])["index"]["type"] == "buckets"
    q, qf = db[:6], feats[:6] + 0.01
    for d in dirs.values():
        maintain.remove(d, ids=[0, 7, 8, 300])
    s = {kind: Searcher(d, device="cpu") for kind, d in dirs.items()}
    assert isinstance(s["buckets"].index, BucketIndex)

    def same(a, b):
        for ra, rb in zip(a.results, b.results):
            np.testing.assert_array_equal(ra.ids, rb.ids)
            np.testing.assert_array_equal(ra.hamming, rb.hamming)
            np.testing.assert_array_equal(ra.distance, rb.distance)

    for mode in ("bcs", "hds", "es"):
        same(s["flat"].search(mode, q, qf, 20, 2, 50), s["buckets"].search(mode, q, qf, 20, 2, 50))
    assert maintain.verify(dirs["buckets"], check_model=False) == []
    parts = split_index(dirs["buckets"], str(tmp_path / "split"), 3)
    assert all(read_manifest(p)["index"]["type"] == "buckets" for p in parts)
    ss = ShardedSearcher(parts, use_ray=False)
    for mode in ("bcs", "hds", "es"):
        same(s["flat"].search(mode, q, qf, 20, 2, 50), ss.search(mode, q, qf, 20, 2, 50))
    maintain.compact(dirs["buckets"])
    m = read_manifest(dirs["buckets"])
    assert m["index"]["type"] == "buckets" and m["count"] == n - 4
    assert maintain.verify(dirs["buckets"], check_model=False) == []
    assert Searcher(dirs["buckets"], device="cpu").bcs(q, 5).results[0].ids.size == 5
    assert os.path.exists(os.path.join(dirs["buckets"], m["index"]["file"]))


def test_one_query_codes_in_any_order():
    """pool_rows of one query takes its codes in any order, on both of its paths: a small pool
    (one lexsort) and a large one (the cap's level cut, which needs the codes nearest first:
    here a farther code comes first and the cap is reached at a nearer one)."""
    a = np.zeros(48, np.uint8)
    b, c = a.copy(), a.copy()
    b[0], c[[1, 2]] = 1, 1  # at distance 1 and 2 from a
    for nb in (50, 5000):  # small pool, large pool
        rows = np.vstack([np.repeat(c[None], 8, 0), np.repeat(a[None], 5, 0), np.repeat(b[None], nb, 0)])
        db = pack_codes(rows[np.random.default_rng(nb).permutation(len(rows))])
        idx = BinaryIndex.build(db, IndexSpec("buckets"))
        flat = BinaryIndex.build(db, IndexSpec("flat"))
        q = pack_codes(a[None])
        lims_c, Dc, Ic = idx.reach(q, 3)
        o = np.argsort(-Dc, kind="stable")  # the farthest code first
        assert list(Dc[o]) == [2, 1, 0]
        o = o[[0, 2, 1]]  # c (8 rows), a (5), b: the running count passes 10 at a
        for cap in (None, 10):
            for x, y in zip(flat.range_search(q, 3, cap), idx.pool_rows(lims_c, Dc[o], Ic[o], cap)):
                np.testing.assert_array_equal(x, y)
