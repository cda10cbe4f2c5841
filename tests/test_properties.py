"""Property tests (hypothesis): code packing and FAISS bit order, the store round trip,
BinaryIndex k-NN / range search against numpy brute force with stable ties, metrics
against naive implementations."""

from __future__ import annotations

import os
import tempfile

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deephash_faiss.index import BinaryIndex, IndexSpec, hamming_numpy, pack_codes, unpack_codes

BITS = [8, 16, 48, 64, 128]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def code_sets(draw, min_n=0, max_n=60):
    bits = draw(st.sampled_from(BITS))
    n = draw(st.integers(min_n, max_n))
    m = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**32 - 1))
    few = draw(st.booleans())  # few distinct codes: many exact ties
    rng = np.random.default_rng(seed)
    nb = bits // 8
    if few and n:
        pool = rng.integers(0, 256, (3, nb), dtype=np.uint8)
        db = pool[rng.integers(0, 3, n)]
        q = pool[rng.integers(0, 3, m)]
    else:
        db = rng.integers(0, 256, (n, nb), dtype=np.uint8)
        q = rng.integers(0, 256, (m, nb), dtype=np.uint8)
    return bits, db, q


@SETTINGS
@given(st.sampled_from(BITS), st.integers(0, 20), st.integers(0, 2**32 - 1))
def test_pack_round_trip_and_faiss_bit_order(bits, n, seed):
    import faiss

    rng = np.random.default_rng(seed)
    h = rng.random((n, bits)).astype(np.float32)
    codes = pack_codes(h)
    assert codes.shape == (n, bits // 8) and codes.dtype == np.uint8
    np.testing.assert_array_equal(unpack_codes(codes), (h > 0.5).astype(np.uint8))
    # bit j lives in byte j // 8 at position j % 8 (LSB first)
    for i in range(n):
        for j in np.flatnonzero(h[i] > 0.5)[:5]:
            assert codes[i, j // 8] >> (j % 8) & 1
    # FAISS agrees: a code with only bit j set is at distance 1 from zero, and
    # flipping bit j of a code changes its FAISS distance by exactly one
    if n:
        idx = faiss.IndexBinaryFlat(bits)
        idx.add(codes)
        j = int(rng.integers(0, bits))
        flipped = codes.copy()
        flipped[:, j // 8] ^= np.uint8(1 << (j % 8))
        D, I = idx.search(flipped[:1], 1)
        assert D[0, 0] == 1 or (D[0, 0] == 0 and (codes == flipped[0]).all(1).any())
        np.testing.assert_array_equal(hamming_numpy(flipped, codes).diagonal(), np.ones(n, np.int32))


def _brute_knn(q, db, k):
    d = hamming_numpy(q, db) if len(db) else np.zeros((len(q), 0), np.int32)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), order


@SETTINGS
@given(code_sets(), st.integers(1, 70))
def test_knn_equals_stable_brute_force(data, k):
    bits, db, q = data
    idx = BinaryIndex.build(db, IndexSpec("flat")) if len(db) else BinaryIndex.build(
        np.zeros((0, bits // 8), np.uint8))
    D, I = idx.search(q, k)
    bd, bi = _brute_knn(q, db, k)
    kk = min(k, len(db))
    np.testing.assert_array_equal(I[:, :kk], bi)
    np.testing.assert_array_equal(D[:, :kk], bd)
    assert (I[:, kk:] == -1).all()


@SETTINGS
@given(code_sets(), st.integers(0, 40), st.one_of(st.none(), st.integers(1, 30)))
def test_range_search_equals_brute_force(data, radius, cap):
    bits, db, q = data
    idx = BinaryIndex.build(db if len(db) else np.zeros((0, bits // 8), np.uint8))
    lims, D, I = idx.range_search(q, radius, cap)
    d = hamming_numpy(q, db) if len(db) else np.zeros((len(q), 0), np.int32)
    for i in range(len(q)):
        want = np.flatnonzero(d[i] < radius)  # FAISS: strictly below the radius
        want = want[np.argsort(d[i][want], kind="stable")]
        if cap is not None:
            want = want[:cap]
        np.testing.assert_array_equal(I[lims[i]:lims[i + 1]], want)
        np.testing.assert_array_equal(D[lims[i]:lims[i + 1]], d[i][want])


@SETTINGS
@given(code_sets(min_n=1), st.integers(1, 20), st.integers(0, 2**32 - 1))
def test_deleted_rows_hidden(data, k, seed):
    bits, db, q = data
    rng = np.random.default_rng(seed)
    deleted = rng.random(len(db)) < 0.3
    idx = BinaryIndex.build(db)
    idx.deleted = deleted
    D, I = idx.search(q, k)
    live = np.flatnonzero(~deleted)
    bd, bi = _brute_knn(q, db[live], k)
    kk = min(k, len(live))
    np.testing.assert_array_equal(I[:, :kk], live[bi])
    lims, D2, I2 = idx.range_search(q, bits + 1)
    assert not deleted[I2].any() and len(I2) == len(q) * len(live)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(BITS), st.integers(0, 30), st.integers(1, 9), st.sampled_from(["float32", "float16"]),
       st.integers(0, 2**32 - 1))
def test_store_round_trip(bits, n, dim, dtype, seed):
    from deephash_faiss.store import FeatureStore, read_shard, write_shard

    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (n, bits // 8), dtype=np.uint8)
    feats = rng.standard_normal((n, dim)).astype(dtype)
    labels = rng.integers(-1, 5, n).astype(np.int32)
    names = ["a b.png", "ünï 名.jpg", os.fsdecode(b"x\xff\xe9.png"), "t\\ab.png"]
    paths = [f"/d/{i}-{names[i % len(names)]}" for i in range(n)]
    with tempfile.TemporaryDirectory() as d:
        os.makedirs(os.path.join(d, "shards"))
        half = n // 2
        entries = []
        for j, (lo, hi) in enumerate([(0, half), (half, n)]):
            info = write_shard(os.path.join(d, "shards", f"part-{j:05d}.h5"), codes[lo:hi], feats[lo:hi],
                               np.arange(lo, hi), paths[lo:hi], labels[lo:hi])
            entries.append({**info, "start": lo})
        r = read_shard(os.path.join(d, "shards", "part-00000.h5"))
        assert r["paths"] == paths[:half]
        m = {"count": n, "feature_dim": dim, "feature_dtype": dtype, "bits": bits, "shards": entries}
        fs = FeatureStore(d, m)
        np.testing.assert_array_equal(fs.codes(), codes)
        assert fs.paths() == paths
        np.testing.assert_array_equal(fs.labels(), labels)
        if n:
            ids = rng.integers(0, n, 12)
            np.testing.assert_array_equal(fs.gather(ids), feats[ids])
        np.testing.assert_array_equal(fs.load_features(), feats)


# ---------------------------------------------------------------- metrics vs naive

def _naive_ap(rel_row, top_k):
    rel = rel_row[:top_k] if top_k else rel_row
    hits, s = 0, 0.0
    for j, r in enumerate(rel, 1):
        if r:
            hits += 1
            s += hits / j
    return s / hits if hits else 0.0


@SETTINGS
@given(st.integers(1, 6), st.integers(1, 40), st.sampled_from([8, 16, 48]), st.integers(1, 3),
       st.integers(0, 2**32 - 1), st.sampled_from([None, 1, 5, 20]))
def test_metrics_match_naive(m, n, bits, nclass, seed, top_k):
    from deephash_faiss import metrics

    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 256, (4, bits // 8), dtype=np.uint8)  # few codes: many ties
    db = pool[rng.integers(0, 4, n)]
    q = pool[rng.integers(0, 4, m)]
    ql, dl = rng.integers(0, nclass, m), rng.integers(0, nclass, n)
    d = metrics.hamming_distance_matrix(q, db)
    np.testing.assert_array_equal(d, hamming_numpy(q, db))
    order = np.argsort(d, axis=1, kind="stable")
    rel = dl[order] == ql[:, None]
    ap = metrics.average_precision(rel, top_k)
    np.testing.assert_allclose(ap, [_naive_ap(r, top_k) for r in rel])
    ks = [1, 3, n + 2]
    p = metrics.precision_at_k(rel, ks)
    np.testing.assert_allclose(p, [np.mean([r[:k].sum() / k for r in rel]) for k in ks])
    radius = 2
    pr = metrics.precision_within_radius(d, ql, dl, radius)
    naive = np.mean([((d[i] <= radius) & (dl == ql[i])).sum() / max(1, (d[i] <= radius).sum())
                     if (d[i] <= radius).any() else 0.0 for i in range(m)])
    assert abs(pr - naive) < 1e-12
    ev = metrics.evaluate_codes(q, db, ql, dl, top_k=top_k, ks=ks, radius=radius, n_threads=1)
    assert abs(ev["map_at_k"] - float(np.mean([_naive_ap(r, top_k) for r in rel]))) < 1e-12
    assert abs(ev["map_full"] - float(np.mean([_naive_ap(r, None) for r in rel]))) < 1e-12
    ranked = metrics.evaluate_ranking(order, ql, dl, top_k=top_k, ks=ks)
    assert abs(ranked["map_at_k"] - ev["map_at_k"]) < 1e-12
