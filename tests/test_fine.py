"""HDS without truncation (fine.FineIndex, Searcher hds_mode="ivf"): recall@10 against
exact HDS (the whole radius pool ranked by L2) on a fixed seed, the safety limit reported,
small pools exact, deletions honoured."""

from __future__ import annotations

import numpy as np
import pytest

from deephash_faiss import fine as fine_mod
from deephash_faiss.fine import FineIndex, FineParams, _key_distance, _order_keys
from deephash_faiss.index import BinaryIndex, IndexSpec
from deephash_faiss.rerank import rank_pools_cpu
from reference import exact_hds

RECALL_BOUND = 0.95  # stated bound: recall@10 of ivf HDS against exact HDS on this data


def _data(seed=0, n=30_000, dim=32):
    rng = np.random.default_rng(seed)
    codes_u = rng.integers(0, 256, (6, 6), dtype=np.uint8)
    lab = rng.choice(6, n, p=[0.4, 0.3, 0.15, 0.1, 0.04, 0.01])
    codes = codes_u[lab].copy()
    codes[rng.random(n) < 0.05, 0] ^= 1  # a tail of neighbouring codes
    centres = rng.standard_normal((6, 40, dim)).astype(np.float32) * 2
    feats = centres[lab, rng.integers(0, 40, n)] + rng.standard_normal((n, dim)).astype(np.float32)
    qi = rng.integers(0, n, 60)
    qf = feats[qi] + 0.3 * rng.standard_normal((60, dim)).astype(np.float32)
    return codes, feats, codes[qi], qf


def _exact(idx, feats, qc, qf, k, radius):
    lims, D, I = idx.range_search(qc, radius)
    pools = [I[lims[i]:lims[i + 1]] for i in range(len(qc))]
    ranked = rank_pools_cpu(qf, pools, lambda ids: feats[ids], k)
    return [p[o] for p, (o, _) in zip(pools, ranked)], [len(p) for p in pools]


@pytest.mark.parametrize("storage", ["pq4", "pq4-one-dim", "sq8"])
def test_ivf_hds_recall_against_exact_hds(storage, monkeypatch):
    codes, feats, qc, qf = _data()
    idx = BinaryIndex.build(codes, IndexSpec("buckets"))
    if storage == "pq4-one-dim":  # the sub-quantizer width of indexes above PQ4_PAIRS_MAX_ROWS
        monkeypatch.setattr("deephash_faiss.fine.PQ4_PAIRS_MAX_ROWS", 0)
        storage = "pq4"
        pq_m = feats.shape[1]
    else:
        pq_m = feats.shape[1] // 2 if storage == "pq4" else None  # 30,000 rows: 2 dimensions each
    fine = FineIndex.build(idx, feats, cell_size=256, storage=storage)
    if pq_m:
        assert fine.ivf.pq.M == pq_m
    assert fine.n_lists > idx.n_codes  # big codes are split into cells
    k = 10
    exact, sizes = _exact(idx, feats, qc, qf, k, 3)
    out = fine.search(qc, qf, k, 3, lambda ids: feats[ids], FineParams(nprobe=8, refine=100, exact_max=0))
    rec = [len(np.intersect1d(e, o[0])) / len(e) for e, o in zip(exact, out)]
    assert all(not o[5] for o in out) and max(sizes) > 5000
    assert np.mean(rec) >= RECALL_BOUND, np.mean(rec)
    # examined rows are far fewer than the pool; distances are exact L2 of the ids returned
    assert np.mean([o[3] for o in out]) < 0.5 * np.mean(sizes)
    for (ids, d, *_), q in zip(out, qf):
        np.testing.assert_allclose(d, ((feats[ids] - q) ** 2).sum(1), rtol=1e-4, atol=1e-3)
    # the safety limit: fewer rows examined, reported as truncated
    lim = fine.search(qc, qf, k, 3, lambda ids: feats[ids], FineParams(8, 100, 0), max_candidates=600)
    assert all(o[3] <= max(600, fine._list_sizes().max()) for o in lim) and any(o[4] for o in lim)


def test_ivf_hds_small_pools_exact_and_deletions():
    codes, feats, qc, qf = _data(1, n=5000)
    idx = BinaryIndex.build(codes, IndexSpec("buckets"))
    mask = np.zeros(len(codes), bool)
    mask[::7] = True
    idx.deleted = mask
    fine = FineIndex.build(idx, feats, cell_size=256, storage="fp16")
    out = fine.search(qc, qf, 10, 3, lambda ids: feats[ids], FineParams(nprobe=8, exact_max=0))
    assert not any(mask[o[0]].any() for o in out)
    # exact_max above every pool: everything goes back to the exact path
    out = fine.search(qc, qf, 10, 3, lambda ids: feats[ids], FineParams(exact_max=10**9))
    assert all(o[5] and len(o[0]) == 0 for o in out)


def _assert_exact(ref, out):
    """Same top k as brute force where the k-th distance is not tied with the next."""
    for (ids, d), o in zip(ref, out):
        assert not o[5]
        np.testing.assert_allclose(o[1], d[:len(o[1])], rtol=1e-4, atol=1e-3)
        assert len(o[0]) == len(ids)
        assert set(o[0].tolist()) == set(ids.tolist()) or np.isclose(d[-1], o[1][-1], rtol=1e-4)


@pytest.mark.parametrize("storage", ["pq4", "sq8"])
def test_ivf_hds_probing_everything_is_exact_hds_through_add_compact_save(storage, tmp_path):
    """Batched search (queries sharing codes, blocks of queries) and single queries against brute force, on the
    lists as built, after adding rows (a known and a new code), after compacting and after a
    save/load: probing every list and refining every candidate gives exact HDS."""
    codes, feats, qc, qf = _data(2, n=6000)
    qc = np.concatenate([qc, qc[:5], qc[:1]])  # repeated codes: one radius, one group
    qf = np.concatenate([qf, qf[:5] + 0.5, qf[:1] - 0.5])
    idx = BinaryIndex.build(codes, IndexSpec("buckets"))
    fine = FineIndex.build(idx, feats, cell_size=64, storage=storage)
    full = FineParams(nprobe=10**6, refine=len(codes) + 100, exact_max=0)
    none = np.zeros(len(codes), bool)

    def check(fine, codes, feats, deleted, gather_feats, block=1 << 19, in_place=False):
        gather = gather_feats if in_place else (lambda ids: gather_feats[ids])
        out = fine.search(qc, qf, 10, 3, gather, full, block_elems=block)
        ref = exact_hds(codes, feats, deleted, qc, qf, 3, k=10)
        _assert_exact(ref, out)
        # each query alone (FineIndex._search_one) too
        _assert_exact(ref, [fine.search(qc[i:i + 1], qf[i:i + 1], 10, 3, gather, full)[0] for i in range(len(qc))])

    check(fine, codes, feats, none, feats)
    check(fine, codes, feats, none, feats, block=1)  # one distinct code a block
    check(fine, codes, feats, none, np.ascontiguousarray(feats, np.float32), in_place=True)
    # add rows: one of a known code, two of a code new to the index
    rng = np.random.default_rng(3)
    new_codes = np.stack([codes[0], codes[0] ^ np.uint8(0x80), codes[0] ^ np.uint8(0x80)])
    new_feats = qf[:3] + 0.01 * rng.standard_normal((3, feats.shape[1])).astype(np.float32)
    fine.add(new_codes, new_feats)
    codes2, feats2 = np.concatenate([codes, new_codes]), np.concatenate([feats, new_feats])
    idx2 = BinaryIndex.build(codes2, IndexSpec("buckets"))
    fine.attach(idx2)
    check(fine, codes2, feats2, np.zeros(len(codes2), bool), feats2)
    # deletions, then compaction renumbers
    gone = np.zeros(len(codes2), bool)
    gone[::4] = True
    idx2.deleted = gone
    check(fine, codes2, feats2, gone, feats2)
    fine.compact(~gone)
    codes3, feats3 = codes2[~gone], feats2[~gone]
    fine.attach(BinaryIndex.build(codes3, IndexSpec("buckets")))
    check(fine, codes3, feats3, np.zeros(len(codes3), bool), feats3)
    fine.save(str(tmp_path / "fine.bin"))
    back = FineIndex.load(str(tmp_path / "fine.bin")).attach(BinaryIndex.build(codes3, IndexSpec("buckets")))
    assert back.storage == storage and back.n_lists == fine.n_lists
    check(back, codes3, feats3, np.zeros(len(codes3), bool), feats3)
    a, b = fine.export_lists(), back.export_lists()
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_rank_pools_cpu_small_batch_and_in_place_match_brute_force():
    """The padded small-pool batch of rank_pools_cpu (given a gather or the features in
    place) ranks like brute force: by (L2, position in the pool)."""
    from deephash_faiss.rerank import SMALL_POOL, rank_pools_cpu

    rng = np.random.default_rng(5)
    feats = rng.standard_normal((3000, 16)).astype(np.float32)
    feats[7] = feats[8]  # a tie: the earlier position wins
    pools = [rng.choice(3000, s, replace=False) for s in (50, 1, 0, 300)] + [np.array([8, 7, 9])]
    q = rng.standard_normal((len(pools), 16)).astype(np.float32)
    q[-1] = feats[7] + 0.01
    assert max(len(p) for p in pools) <= SMALL_POOL
    for gather in (lambda ids: feats[ids], feats):
        got = rank_pools_cpu(q, pools, gather, 10)
        for p, qi, (o, d) in zip(pools, q, got):
            ref = ((feats[p].astype(np.float64) - qi) ** 2).sum(1)
            want = np.lexsort((np.arange(len(p)), ref))[:10]
            assert np.array_equal(o, want)
            np.testing.assert_allclose(d, ref[want], rtol=1e-5, atol=1e-5)


def test_auto_storage_is_pq4_only_where_its_recall_was_measured():
    from deephash_faiss.fine import PQ4_MAX_ROWS, default_storage

    assert default_storage(10**6) == "pq4" and default_storage(PQ4_MAX_ROWS + 1) == "sq8"


def test_default_probe_by_index_size():
    """Small indexes probe fewer rows by default (fine.default_probe); given values are kept."""
    from deephash_faiss.fine import SMALL_PROBE, SMALL_PROBE_ROWS, default_probe

    assert default_probe(1000) == SMALL_PROBE == default_probe(SMALL_PROBE_ROWS)
    assert default_probe(4 * SMALL_PROBE_ROWS) == (2 * SMALL_PROBE[0], FineParams.refine)  # sqrt growth
    assert default_probe(200_000) == (34, SMALL_PROBE[1])  # measured: 32 / 100 gave 0.962 there
    assert default_probe(10**6) == default_probe(10**9) == (FineParams.nprobe, FineParams.refine)
    p = FineParams.for_rows(10, nprobe=3)
    assert (p.nprobe, p.refine, p.exact_max) == (3, SMALL_PROBE[1], FineParams.exact_max)
    p = FineParams.for_rows(10**7, refine=7, exact_max=0)
    assert (p.nprobe, p.refine, p.exact_max) == (FineParams.nprobe, 7, 0)


def test_pq4_subquantizers_by_index_size():
    from deephash_faiss.fine import PQ4_PAIRS_MAX_ROWS, pq4_subquantizers

    assert pq4_subquantizers(256, PQ4_PAIRS_MAX_ROWS) == 128
    assert pq4_subquantizers(256, PQ4_PAIRS_MAX_ROWS + 1) == 256
    assert pq4_subquantizers(33, 10) == 33  # odd: one dimension each


@pytest.mark.parametrize("width", [100, 2**31])
def test_order_keys_sort_as_distance_then_column(width):
    """The probe's packed keys order as a lexsort by (distance, column): negative distances,
    -0.0 equal to 0.0, ties broken by column; the distance comes back from the key."""
    rng = np.random.default_rng(0)
    d = rng.choice(np.array([-1.5, -0.0, 0.0, 0.25, 3.0, 1e30], np.float32), 3000)
    c = rng.integers(0, width, 3000)
    kb = (width - 1).bit_length()
    keys = _order_keys(d, c, kb)
    o = np.lexsort((c, d))
    np.testing.assert_array_equal(np.argsort(keys, kind="stable"), o)
    np.testing.assert_array_equal(keys[o] & ((1 << kb) - 1), c[o])
    np.testing.assert_array_equal(_key_distance(keys, kb), d + np.float32(0))


@pytest.mark.parametrize("prefix", [1, 10**6])
def test_probe_prefix_does_not_change_the_lists_probed(prefix, monkeypatch):
    """Sorting only a partitioned prefix of each query's lists (falling back to the whole row
    where its rows run short) probes what sorting every reached list does: prefix 10**6 sorts
    every row whole, prefix 1 forces the fallback; with and without a safety limit."""
    codes, feats, qc, qf = _data(seed=4)
    idx = BinaryIndex.build(codes, IndexSpec("buckets"))
    fi = FineIndex.build(idx, feats, cell_size=64, seed=0)
    fp = FineParams(nprobe=6, refine=40, exact_max=0)
    want = [fi.search(qc, qf, 10, 3, feats, fp, mc) for mc in (None, 300)]
    monkeypatch.setattr(fine_mod, "PROBE_PREFIX", prefix)
    for mc, w in zip((None, 300), want):
        got = fi.search(qc, qf, 10, 3, feats, fp, mc)
        for a, b in zip(got, w):
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])
            assert a[2:] == b[2:]


@pytest.mark.parametrize("max_candidates", [None, 320])
def test_pools_within_the_budget_scan_the_lists_the_probe_picks(max_candidates, monkeypatch):
    """A query whose reached lists hold at most nprobe x cell_size rows scans all of them,
    unranked (:meth:`FineIndex._assign`): the same lists, per query, as the centroid-ranked
    probe (WHOLE_POOL_FACTOR 0 sends every query through it), with and without a safety limit."""
    codes, feats, qc, qf = _data(seed=4)
    idx = BinaryIndex.build(codes, IndexSpec("buckets"))
    fi = FineIndex.build(idx, feats, cell_size=64, seed=0)
    fp = FineParams(nprobe=6, refine=40, exact_max=0)
    real = fine_mod._scan_lists
    seen = []

    def spy(index, x, k, Iq, Dq):
        seen.append((Iq.copy(), Dq.copy()))
        return real(index, x, k, Iq, Dq)

    monkeypatch.setattr(fine_mod, "_scan_lists", spy)
    got = {}
    for factor in (1.0, 0.0):
        monkeypatch.setattr(fine_mod, "WHOLE_POOL_FACTOR", factor)
        res = fi.search(qc, qf, 10, 3, feats, fp, max_candidates)
        got[factor] = (seen[-1], [r[2:5] for r in res])
    (Iw, Dw), meta_w = got[1.0]
    (Ip, Dp), meta_p = got[0.0]
    assert meta_w == meta_p  # pool rows, rows examined, truncated
    whole = (Dw == 0).all(1) & (Dp != 0).any(1)
    assert 0 < whole.sum() < len(Iw)  # both kinds of query in this batch
    for a, b in zip(Iw, Ip):
        assert sorted(a[a >= 0]) == sorted(b[b >= 0])


def _tail_data(rng, n=3000):
    """Codes of 2 bytes: 4 big codes, 20 of ~40 rows and a long tail of a few rows each."""
    common = rng.integers(0, 256, (24, 2), dtype=np.uint8)
    codes = common[np.where(rng.random(n) < 0.6, rng.integers(0, 4, n), rng.integers(4, 24, n))]
    rare = rng.random(n) < 0.15
    codes[rare] = rng.integers(0, 256, (int(rare.sum()), 2), dtype=np.uint8)
    return codes


def _tail_fine(seed: int, storage: str, n: int = 3000):
    """(rng, codes, feats float32 [n, 16], bucket index, fine index of cells of 64) on _tail_data."""
    rng = np.random.default_rng(seed)
    codes = _tail_data(rng, n)
    feats = rng.standard_normal((n, 16)).astype(np.float32)
    idx = BinaryIndex.build(codes, IndexSpec("buckets"))
    return rng, codes, feats, idx, FineIndex.build(idx, feats, cell_size=64, storage=storage)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("max_candidates", [None, 5])
def test_hds_ivf_small_pools_ranked_like_brute_force(max_candidates, threads, monkeypatch):
    """search.hds_ivf ranks the pools of at most exact_max rows whole, from the fine search's
    own reach: the same as brute force (pool by (Hamming, id), cut at max_candidates, topped up
    to k by the Hamming k-NN, ranked by L2), deletions honoured; the others come from the lists.
    The same with the batch split over two threads, for each query searched alone (the
    single-query path), searched again, and after other rows are deleted (as many: the live
    count unchanged)."""
    from deephash_faiss import search as search_mod
    from deephash_faiss.search import hds_ivf

    monkeypatch.setattr(search_mod, "HDS_THREAD_MIN_QUERIES", 8)

    rng = np.random.default_rng(5)
    n, k, radius = 3000, 10, 2
    codes = _tail_data(rng, n)
    feats = rng.standard_normal((n, 16)).astype(np.float32)
    deleted = np.zeros(n, bool)
    deleted[::11] = True
    idx = BinaryIndex.build(codes, IndexSpec("buckets"))
    idx.deleted = deleted
    fine = FineIndex.build(idx, feats, cell_size=64, storage="fp16")
    qc = np.concatenate([codes[rng.integers(0, n, 30)], rng.integers(0, 256, (30, 2), dtype=np.uint8)])
    qc[45:50] = qc[40:45]  # (repeated small-pool codes)
    qf = rng.standard_normal((len(qc), 16)).astype(np.float32)
    ham = np.unpackbits(qc[:, None, :] ^ codes[None], axis=2).sum(2)
    ids = np.arange(n)

    def check():
        res, _, modes = hds_ivf(fine, qc, qf, k, radius, feats, FineParams(nprobe=4, refine=50, exact_max=128),
                                max_candidates, int((~deleted).sum()), threads=threads)
        small = under = mid = 0
        for i, (r, mode) in enumerate(zip(res, modes)):
            live = ~deleted
            order = np.lexsort((ids[live], ham[i][live]))  # by (Hamming, id)
            by_ham, h = ids[live][order], ham[i][live][order]
            pool = by_ham[h < radius]
            if mode == "ivf":
                assert len(pool) > 128 and not deleted[r.ids].any()
                continue
            pool = pool[:max_candidates]
            small += 1
            mid += len(pool) > k
            if len(pool) < k:
                under += 1
                pool = np.concatenate([pool, [j for j in by_ham[:k] if j not in pool]]).astype(np.int64)
            d = ((feats[pool].astype(np.float64) - qf[i]) ** 2).sum(1)
            want = pool[np.argsort(d, kind="stable")[:k]]
            alone = hds_ivf(fine, qc[i:i + 1], qf[i:i + 1], k, radius, feats,  # (the single-query path)
                            FineParams(nprobe=4, refine=50, exact_max=128), max_candidates, int((~deleted).sum()))
            assert alone[2] == ["exact"]
            for got in (r, alone[0][0]):
                np.testing.assert_array_equal(got.ids, want)
                np.testing.assert_allclose(got.distance, ((feats[want] - qf[i]) ** 2).sum(1), rtol=1e-4, atol=1e-4)
                np.testing.assert_array_equal(got.hamming, ham[i][want])
        assert small >= 10 and under >= 5 and (mid >= 5 or max_candidates) and modes.count("ivf") >= 10

    check()
    check()
    deleted = deleted.copy()  # as many rows deleted as before, other ones: a new index state (whose
    swap = rng.permutation(n)  # live count, part of the memo's keys, is the old one's)
    back, gone = swap[deleted[swap]][:200], swap[~deleted[swap]][:200]
    deleted[back], deleted[gone] = False, True
    idx.deleted = deleted
    check()


def test_hds_ivf_over_threads_equals_one_call(monkeypatch):
    """A batch split over threads (search.hds_ivf, from 2 x HDS_THREAD_MIN_QUERIES queries)
    gives each query what one call for the whole batch gives: ids, distances, Hamming
    distances, pool sizes, rows examined and modes. (Every pool within the probe budget here:
    no centroid GEMM, whose float rounding could depend on the batch.) The parts keep the
    queries of a code together and the work is really split."""
    from deephash_faiss import search as search_mod
    from deephash_faiss.search import _thread_parts, hds_ivf

    n = 3000
    rng, codes, feats, idx, fine = _tail_fine(8, "pq4", n)
    qc = np.concatenate([codes[rng.integers(0, n, 90)], rng.integers(0, 256, (30, 2), dtype=np.uint8)])
    qf = rng.standard_normal((len(qc), 16)).astype(np.float32)
    fp = FineParams(nprobe=1000, refine=50, exact_max=32)
    monkeypatch.setattr(search_mod, "HDS_THREAD_MIN_QUERIES", 20)
    parts = _thread_parts(qc, 3)
    assert len(parts) == 3 and sorted(np.concatenate(parts).tolist()) == list(range(len(qc)))
    keys = [set(map(bytes, qc[p])) for p in parts]
    assert all(not (a & b) for i, a in enumerate(keys) for b in keys[i + 1:])  # a code in one part
    assert _thread_parts(qc, 1) == [] and _thread_parts(qc[:39], 3) == []
    seen = []
    one = search_mod._hds_ivf_one
    monkeypatch.setattr(search_mod, "_hds_ivf_one", lambda f, c, *a: seen.append(len(c)) or one(f, c, *a))
    r1, e1, m1 = hds_ivf(fine, qc, qf, 10, 2, feats, fp, None, n, threads=1)
    r3, e3, m3 = hds_ivf(fine, qc, qf, 10, 2, feats, fp, None, n, threads=3)
    assert seen[0] == len(qc) and sorted(seen[1:]) == sorted(len(p) for p in parts)
    assert e1 == e3 and m1 == m3 and "ivf" in m1 and "exact" in m1
    for a, b in zip(r1, r3):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.distance, b.distance)
        np.testing.assert_array_equal(a.hamming, b.hamming)
        assert (a.candidates, a.truncated) == (b.candidates, b.truncated)
    # an exact callback (the Searcher's GPU path) or features read through a function: one call
    seen.clear()
    hds_ivf(fine, qc, qf, 10, 2, lambda ids: feats[ids], fp, None, n, threads=3)
    assert seen == [len(qc)]


@pytest.mark.parametrize("big_ids", [False, True])
def test_refine_is_top_k_by_distance_then_id(big_ids):
    """fine._refine: each query's k best candidates by (squared L2, id), -1 / inf past its
    candidates; ties (duplicate rows) by id; the packed-key path and the wide-id fallback."""
    from deephash_faiss.fine import _refine

    rng = np.random.default_rng(3)
    base = rng.standard_normal((50, 8)).astype(np.float32)
    feats = base[rng.integers(0, 50, 400)]  # duplicate rows: equal distances
    off = 1 << 40 if big_ids else 0
    gather = (lambda ids: feats[ids - off]) if big_ids else feats
    q = rng.standard_normal((30, 8)).astype(np.float32)
    cand = np.stack([rng.permutation(400)[:25] for _ in range(30)]).astype(np.int64)
    cand[rng.random(cand.shape) < 0.3] = -1
    cand[0] = -1  # a query with no candidate
    cand[1, 3:] = -1  # one with fewer than k
    cand = np.where(cand >= 0, cand + off, -1)
    cand[2] = np.where(cand[2] >= 0, cand[2], cand[2].max())  # one with no empty slot (repeats)
    ids, dist = _refine(q, cand, gather, 10)
    assert ids.shape == dist.shape == (30, 10)
    for i in range(30):
        c = cand[i][cand[i] >= 0]
        d = ((feats[c - off] - q[i]) ** 2).sum(1)
        o = np.lexsort((c, d))[:10]
        np.testing.assert_array_equal(ids[i, :len(o)], c[o])
        np.testing.assert_allclose(dist[i, :len(o)], d[o], rtol=1e-5, atol=1e-5)
        assert (ids[i, len(o):] == -1).all() and np.isinf(dist[i, len(o):]).all()
        # one query alone (its own path) gives its row of the batch
        i1, d1 = _refine(q[i:i + 1], cand[i:i + 1], gather, 10)
        np.testing.assert_array_equal(i1[0], ids[i])
        np.testing.assert_array_equal(d1[0], dist[i])


@pytest.mark.parametrize("max_candidates", [None, 300])
def test_single_query_path_equals_the_batch_path(max_candidates, monkeypatch):
    """A single query (FineIndex._search_one) gets what the batch machinery gives it: the same
    ids, distances, pool, examined rows and flags, with deleted rows and the safety limit, and
    the same small-pool rows for the exact path (``small_pools``)."""
    codes, feats, qc, qf = _data(4, n=8000)
    idx = BinaryIndex.build(codes, IndexSpec("buckets"))
    gone = np.zeros(len(codes), bool)
    gone[::9] = True
    idx.deleted = gone
    fine = FineIndex.build(idx, feats, cell_size=64)
    qc = np.concatenate([qc, qc[:3] ^ np.uint8(0xF0)])  # codes far from every row: empty pools
    qf = np.concatenate([qf, qf[:3]])
    sizes = np.sort(idx.pool_sizes(qc, 2))
    p = FineParams(nprobe=4, refine=40, exact_max=int(sizes[len(sizes) // 5]))  # a fifth of the pools small
    calls = []
    orig = FineIndex._search_one
    monkeypatch.setattr(FineIndex, "_search_one", lambda self, *a: calls.append(1) or orig(self, *a))

    def one(i, single):
        monkeypatch.setattr(fine_mod, "SINGLE_QUERY_PATH", single)
        return fine.search(qc[i:i + 1], qf[i:i + 1], 10, 2, feats, p, max_candidates, small_pools=True)

    kinds = set()
    for i in range(len(qc)):
        (a,), pa = one(i, True)
        (b,), pb = one(i, False)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        assert a[2:] == b[2:]
        assert all(np.array_equal(x, y) for x, y in zip(pa, pb))
        assert not gone[a[0]].any()
        kinds.add((a[5], a[3] < a[2], a[4]))
    assert len(calls) == len(qc)  # every single query took the single-query path
    assert (True, False, False) in kinds and (False, True, max_candidates is not None) in kinds


def test_single_query_memo_follows_the_index_state(monkeypatch):
    """Single queries keep what depends on their code alone (fine.CodeMemo: reach, pool, lists,
    small-pool rows) across calls: the results are those of a search with no memo, repeated
    codes included, and stay so after rows are deleted, added (fine.add + attach) and with the
    memo bounded to two entries; deleted rows never come back, added ones are found."""
    from deephash_faiss.search import hds_ivf

    n, k, radius = 4000, 10, 2
    rng, codes, feats, idx, fine = _tail_fine(8, "fp16", n)
    pick = rng.integers(0, n, 40)
    qc = np.concatenate([codes[pick], codes[pick[:10]]])  # every code of the first ten twice
    qf = np.concatenate([feats[pick], feats[pick[:10]]]) + 0.1 * rng.standard_normal((50, 16)).astype(np.float32)
    p = FineParams(nprobe=4, refine=50, exact_max=128)

    def single(memo=True):
        live = int(idx.ntotal - (0 if idx.deleted is None else idx.deleted.sum()))
        with monkeypatch.context() as mp:
            if not memo:  # a fresh, empty memo each call
                mp.setattr(fine_mod.CodeMemo, "entry", lambda self, key, state: {})
            return [hds_ivf(fine, qc[i:i + 1], qf[i:i + 1], k, radius, feats_now, p, None, live)[0][0]
                    for i in range(len(qc))]

    def same(a, b):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x.ids, y.ids)
            np.testing.assert_array_equal(x.hamming, y.hamming)
            np.testing.assert_array_equal(x.distance, y.distance)
            assert (x.candidates, x.truncated) == (y.candidates, y.truncated)

    feats_now = feats
    first = single()
    assert len(fine._memo) == len(np.unique(qc, axis=0))
    same(first, single(memo=False))
    same(first, single())  # every code from the memo now
    pools = {r.candidates for r in first}
    assert min(pools) <= 128 < max(pools)  # small pools and listed ones

    gone = np.zeros(n, bool)
    gone[np.concatenate([r.ids[:3] for r in first])] = True
    idx.deleted = gone
    after = single()
    same(after, single(memo=False))
    assert not any(gone[r.ids].any() for r in after)

    new_codes, new_feats = qc[:5].copy(), qf[:5].copy()  # rows equal to five queries
    idx.add(new_codes)
    fine.add(new_codes, new_feats)
    fine.attach(idx)
    feats_now = np.ascontiguousarray(np.vstack([feats, new_feats]))
    grown = single()
    same(grown, single(memo=False))
    assert all(grown[i].ids[0] == n + i for i in range(5))

    monkeypatch.setattr(fine_mod, "MEMO_ENTRIES", 2)
    fine._memo.clear()
    same(single(), grown)
    assert len(fine._memo) <= 2


def test_small_batches_run_on_one_openmp_thread_and_restore_it(monkeypatch):
    """search.hds_ivf runs a batch whose probe budget (queries x nprobe x cell_size rows) is at
    most HDS_ONE_THREAD_MAX_ROWS on one OpenMP thread: the kernels see one thread, the caller's
    setting comes back, and the results equal the same batch searched on the caller's threads."""
    import faiss

    from deephash_faiss import search as search_mod
    from deephash_faiss.search import hds_ivf

    n = 3000
    rng, codes, feats, idx, fine = _tail_fine(9, "fp16", n)
    qc, qf = codes[rng.integers(0, n, 8)], rng.standard_normal((8, 16)).astype(np.float32)
    p = FineParams(nprobe=4, refine=50, exact_max=128)
    seen = []
    orig = fine_mod._scan_lists
    monkeypatch.setattr(fine_mod, "_scan_lists", lambda *a: seen.append(faiss.omp_get_max_threads()) or orig(*a))
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    assert 8 * p.nprobe * fine.cell_size <= search_mod.HDS_ONE_THREAD_MAX_ROWS
    try:
        small = hds_ivf(fine, qc, qf, 10, 2, feats, p, None, n)[0]
        assert faiss.omp_get_max_threads() == 2 and seen and set(seen) == {1}
        seen.clear()
        monkeypatch.setattr(search_mod, "HDS_ONE_THREAD_MAX_ROWS", 0)
        fine._memo.clear()
        wide = hds_ivf(fine, qc, qf, 10, 2, feats, p, None, n)[0]
        assert set(seen) == {2}
    finally:
        faiss.omp_set_num_threads(before)
    for x, y in zip(small, wide):
        np.testing.assert_array_equal(x.ids, y.ids)
        np.testing.assert_array_equal(x.distance, y.distance)


def test_a_few_queries_are_searched_one_at_a_time(monkeypatch):
    """search.hds_ivf searches a batch of 2 to HDS_SINGLE_LOOP_MAX_QUERIES queries one query at
    a time: each result is the one that query gets alone (exact small pools included), the
    ``exact`` callback sees the batch's own indices, the single-query path runs on one OpenMP
    thread and the caller's setting comes back."""
    import faiss

    from deephash_faiss import search as search_mod
    from deephash_faiss.search import hds_ivf

    n = 3000
    rng, codes, feats, idx, fine = _tail_fine(11, "fp16", n)
    m = search_mod.HDS_SINGLE_LOOP_MAX_QUERIES
    assert m >= 2
    qc, qf = codes[rng.integers(0, n, m)], rng.standard_normal((m, 16)).astype(np.float32)
    qc[-1] = rng.integers(0, 256, qc.shape[1], dtype=np.uint8)  # (a code far from the index's: a small pool)
    p = FineParams(nprobe=4, refine=50, exact_max=128)
    alone = [hds_ivf(fine, qc[i:i + 1], qf[i:i + 1], 10, 2, feats, p, None, n) for i in range(m)]
    assert {a[2][0] for a in alone} == {"ivf", "exact"}
    paths = []
    for name in ("_search_one", "search"):
        orig = getattr(fine_mod.FineIndex, name)
        def spy(self, qcodes, *a, _o=orig, _n=name, **kw):
            paths.append((_n, len(qcodes)))
            return _o(self, qcodes, *a, **kw)

        monkeypatch.setattr(fine_mod.FineIndex, name, spy)
    seen = []
    orig_scan = fine_mod._scan_lists
    monkeypatch.setattr(fine_mod, "_scan_lists", lambda *a: seen.append(faiss.omp_get_max_threads()) or orig_scan(*a))
    asked = []
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    try:
        res, examined, modes = hds_ivf(fine, qc, qf, 10, 2, feats, p, None, n,
                                       exact=lambda si: asked.append(np.asarray(si).tolist()))
        assert faiss.omp_get_max_threads() == 2 and set(seen) == {1}
    finally:
        faiss.omp_set_num_threads(before)
    assert all(k == 1 for _, k in paths) and ("_search_one", 1) in paths  # never a batch call
    assert asked == [[i] for i in range(m) if alone[i][2][0] == "exact"]
    assert modes == [a[2][0] for a in alone] and examined == [a[1][0] for a in alone]
    for r, a in zip(res, alone):
        np.testing.assert_array_equal(r.ids, a[0][0].ids)
        np.testing.assert_array_equal(r.distance, a[0][0].distance)
        np.testing.assert_array_equal(r.hamming, a[0][0].hamming)
