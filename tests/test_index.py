"""BinaryIndex: bit order, BCS / radius results against brute force, padding, caps."""
from __future__ import annotations

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from deephash_faiss.index import (BinaryIndex, IndexSpec, hamming_numpy, pack_codes, pad_codes,  # noqa: E402
                                  padded_nbytes, sort_and_cap, unpack_codes)


def brute_knn(q, db, k):
    d = hamming_numpy(q, db)
    o = np.argsort(d, axis=1, kind="stable")[:, :k]
    D = np.take_along_axis(d, o, 1)
    if o.shape[1] < k:
        pad = k - o.shape[1]
        D = np.hstack([D, np.full((len(q), pad), np.iinfo(np.int32).max, np.int32)])
        o = np.hstack([o, np.full((len(q), pad), -1)])
    return D, o.astype(np.int64)


def brute_range(q, db, r, cap=None):
    d = hamming_numpy(q, db)
    out = []
    for row in d:
        ids = np.flatnonzero(row < r)
        ids = ids[np.argsort(row[ids], kind="stable")]
        out.append(ids if cap is None else ids[:cap])
    return out


def split(lims, I):
    return [I[lims[i]:lims[i + 1]] for i in range(len(lims) - 1)]


def clustered(rng, n, nbytes, classes=5, flips=2):
    """Supervised-like codes: class centres + a few flips, with exact duplicates."""
    bits = nbytes * 8
    cent = rng.integers(0, 2, (classes, bits), dtype=np.uint8)
    b = cent[rng.integers(0, classes, n)]
    for _ in range(flips):
        pos = rng.integers(0, bits, n)
        b[np.arange(n), pos] ^= rng.integers(0, 2, n).astype(np.uint8)
    return pack_codes(b)


def test_pack_order_matches_numpy_little_and_faiss():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2, (50, 48), dtype=np.uint8)
    codes = pack_codes(bits)
    assert np.array_equal(codes, np.packbits(bits, axis=1, bitorder="little"))
    assert np.array_equal(unpack_codes(codes), bits)
    # bit j lives in byte j // 8 at position j % 8 from the LSB
    for j in (0, 7, 8, 13, 47):
        e = np.zeros((1, 48), np.uint8)
        e[0, j] = 1
        c = pack_codes(e)
        assert c[0, j // 8] == 1 << (j % 8) and c.sum() == 1 << (j % 8)
    # FAISS's own distances equal the number of differing bits
    idx = faiss.IndexBinaryFlat(48)
    idx.add(codes)
    D, I = idx.search(codes[:5], 50)
    for qi in range(5):
        exp = (bits[I[qi]] != bits[qi]).sum(1)
        assert np.array_equal(D[qi], exp)
    # h > 0.5 binarisation of probabilities
    h = np.array([[0.9, 0.1, 0.51, 0.5, 0.0, 1.0, 0.7, 0.2]])
    assert pack_codes(h)[0, 0] == 0b01100101


@pytest.mark.parametrize("nbytes", [1, 2, 6, 8])
@pytest.mark.parametrize("pad", [True, False])
def test_bcs_equals_stable_bruteforce_with_ties(nbytes, pad):
    rng = np.random.default_rng(nbytes)
    db = clustered(rng, 600, nbytes)
    db = np.vstack([db, db[:100]])  # exact duplicates later in id order
    q = np.vstack([clustered(rng, 30, nbytes), db[:5]])
    idx = BinaryIndex.build(db, IndexSpec("flat"), pad=pad)
    for k in (1, 7, 50, 700):
        D, I = idx.search(q, k)
        D0, I0 = brute_knn(q, db, k)
        assert np.array_equal(D, D0) and np.array_equal(I, I0), k


def test_k_larger_than_n_pads_with_minus_one():
    rng = np.random.default_rng(1)
    db = rng.integers(0, 256, (5, 6), dtype=np.uint8)
    idx = BinaryIndex.build(db)
    D, I = idx.search(db[:2], 8)
    assert I.shape == (2, 8) and (I[:, 5:] == -1).all() and (D[:, 5:] == np.iinfo(np.int32).max).all()
    assert sorted(I[0, :5]) == list(range(5))
    empty = BinaryIndex.build(np.zeros((0, 6), np.uint8))
    D, I = empty.search(db[:2], 3)
    assert (I == -1).all()


def test_padding_widths_and_identical_results():
    assert [padded_nbytes(b) for b in (1, 4, 6, 8, 12, 16, 20, 24, 32, 40, 64, 72, 96)] == \
        [4, 4, 8, 8, 16, 16, 20, 32, 32, 64, 64, 72, 96]
    c = np.arange(12, dtype=np.uint8).reshape(2, 6)
    p = pad_codes(c, 8)
    assert p.shape == (2, 8) and np.array_equal(p[:, :6], c) and not p[:, 6:].any()
    rng = np.random.default_rng(2)
    db = clustered(rng, 2000, 6, classes=8, flips=4)
    q = clustered(rng, 40, 6, classes=8, flips=4)
    a = BinaryIndex.build(db, pad=True)
    b = BinaryIndex.build(db, pad=False)
    assert a.index.d == 64 and b.index.d == 48 and a.bits == b.bits == 48
    for k in (1, 10, 300):
        assert all(np.array_equal(x, y) for x, y in zip(a.search(q, k), b.search(q, k)))
    for r in range(6):
        assert all(np.array_equal(x, y) for x, y in zip(a.range_search(q, r), b.range_search(q, r)))


@pytest.mark.parametrize("spec", [
    IndexSpec("flat"),
    IndexSpec("hash", hash_bits=16, nflip=2),     # exact for r <= 3
    IndexSpec("hash", hash_bits=12, nflip=3),     # exact for r <= 4
    IndexSpec("multihash", hash_bits=16, nhash=3, nflip=1),  # exact for r <= 4
    IndexSpec("multihash", hash_bits=24, nhash=2, nflip=1),  # exact for r <= 4
])
@pytest.mark.parametrize("pad", [True, False])
def test_radius_equals_bruteforce_with_exact_settings(spec, pad):
    rng = np.random.default_rng(3)
    db = clustered(rng, 1500, 6, classes=6, flips=4)
    q = np.vstack([clustered(rng, 25, 6, classes=6, flips=4), db[:3]])
    idx = BinaryIndex.build(db, spec, pad=pad)
    if spec.kind == "flat":
        rmax = 6
    elif spec.kind == "hash":
        rmax = spec.nflip + 1
    else:
        rmax = spec.nflip * spec.nhash + 1
    for r in range(0, rmax + 1):
        lims, D, I = idx.range_search(q, r)
        exp = brute_range(q, db, r)
        got = split(lims, I)
        assert all(np.array_equal(g, e) for g, e in zip(got, exp)), (spec, r)
        dd = hamming_numpy(q, db)
        assert all(np.array_equal(d_, dd[i, g]) for i, (d_, g) in enumerate(zip(split(lims, D), got)))


def test_max_candidates_keeps_nearest_first():
    rng = np.random.default_rng(4)
    db = clustered(rng, 3000, 2, classes=3, flips=3)
    q = clustered(rng, 20, 2, classes=3, flips=3)
    idx = BinaryIndex.build(db)
    for cap in (1, 5, 100, 10_000):
        lims, D, I = idx.range_search(q, 5, max_candidates=cap)
        exp = brute_range(q, db, 5, cap)
        assert all(np.array_equal(g, e) for g, e in zip(split(lims, I), exp))
        assert np.diff(lims).max() <= cap


def test_sort_and_cap_orders_and_drops_deleted():
    lims = np.array([0, 4, 6])
    D = np.array([3, 1, 1, 0, 2, 2], np.int32)
    I = np.array([9, 7, 2, 5, 4, 1], np.int64)
    deleted = np.zeros(10, bool)
    deleted[2] = True
    l2, D2, I2 = sort_and_cap(lims, D, I, max_candidates=2, deleted=deleted)
    assert list(l2) == [0, 2, 4] and list(I2) == [5, 7, 1, 4] and list(D2) == [0, 1, 2, 2]


def test_save_load_roundtrip_padded_and_legacy(tmp_path):
    rng = np.random.default_rng(5)
    db = clustered(rng, 500, 6)
    q = clustered(rng, 10, 6)
    a = BinaryIndex.build(db)
    p = str(tmp_path / "codes.index")
    a.save(p)
    b = BinaryIndex.load(p, IndexSpec("flat"), 48)
    assert b.bits == 48 and b.ntotal == 500
    assert all(np.array_equal(x, y) for x, y in zip(a.search(q, 20), b.search(q, 20)))
    legacy = BinaryIndex.build(db, pad=False)  # an unpadded 48-bit file is re-padded on load
    legacy.save(p)
    c = BinaryIndex.load(p, IndexSpec("flat"), 48)
    assert c.index.d == 64 and c.bits == 48
    assert all(np.array_equal(x, y) for x, y in zip(a.search(q, 20), c.search(q, 20)))
    h = BinaryIndex.build(db, IndexSpec("hash", hash_bits=16, nflip=2))
    h.save(p)
    h2 = BinaryIndex.load(p, IndexSpec("hash", hash_bits=16, nflip=2), 48)
    assert all(np.array_equal(x, y) for x, y in zip(h.range_search(q, 3), h2.range_search(q, 3)))


def test_deleted_rows_hidden():
    rng = np.random.default_rng(6)
    db = clustered(rng, 200, 6)
    idx = BinaryIndex.build(db)
    idx.deleted = np.zeros(200, bool)
    idx.deleted[::3] = True
    D, I = idx.search(db[:4], 10)
    assert not np.isin(I, np.arange(0, 200, 3)).any()
    lims, D, I = idx.range_search(db[:4], 4)
    assert not np.isin(I, np.arange(0, 200, 3)).any()
