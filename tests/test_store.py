"""HDF5 shards and FeatureStore gathers; CPU pool ranking."""
from __future__ import annotations

import os

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")

from deephash_faiss.rerank import rank_pool, rank_pools_cpu  # noqa: E402
from deephash_faiss.store import FeatureStore, read_shard, write_shard  # noqa: E402


def make_store(tmp_path, sizes, dim=16, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    d = tmp_path / "idx dir"
    feats, shards, start = [], [], 0
    for si, n in enumerate(sizes):
        f = rng.standard_normal((n, dim)).astype(dtype)
        codes = rng.integers(0, 256, (n, 6), dtype=np.uint8)
        paths = [f"img {start + i}.jpg" for i in range(n)]
        meta = write_shard(str(d / "shards" / f"part-{si:05d}.h5"), codes, f, np.arange(start, start + n),
                           paths, np.zeros(n, np.int32))
        shards.append(meta)
        feats.append(f)
        start += n
    manifest = {"count": start, "feature_dim": dim, "feature_dtype": np.dtype(dtype).name, "bits": 48,
                "shards": shards}
    return FeatureStore(str(d), manifest), np.concatenate(feats)


def test_shard_roundtrip_odd_paths(tmp_path):
    rng = np.random.default_rng(1)
    bad = b"caf\xe9 \xff.jpg".decode("utf-8", "surrogateescape")  # non-UTF-8 bytes
    paths = ["a b/c d.jpg", bad, "ünïcødé/ö.png"]
    codes = rng.integers(0, 256, (3, 6), dtype=np.uint8)
    feats = rng.standard_normal((3, 8)).astype(np.float16)
    p = tmp_path / "dir with spaces" / "part 0.h5"
    meta = write_shard(str(p), codes, feats, np.arange(3), paths, np.array([1, 2, 3], np.int32))
    assert meta["rows"] == 3 and len(meta["sha256"]) == 64
    s = read_shard(str(p))
    assert s["paths"] == paths
    assert s["paths"][1].encode("utf-8", "surrogateescape") == b"caf\xe9 \xff.jpg"
    assert np.array_equal(s["codes"], codes) and s["features"].dtype == np.float16
    assert np.array_equal(s["features"], feats) and list(s["labels"]) == [1, 2, 3]
    assert not [f for f in os.listdir(p.parent) if f.startswith(".tmp-")]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_gather_matches_array_across_shards(tmp_path, dtype):
    store, feats = make_store(tmp_path, [50, 1, 120, 33], dtype=dtype)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, len(feats), 500)  # random order, many repeats, every shard
    ids[:4] = [0, 50, 51, 203]  # shard boundaries
    g = store.gather(ids)
    assert g.dtype == dtype and np.array_equal(g, feats[ids])
    assert store.gather(np.zeros(0, np.int64)).shape == (0, 16)
    assert all(s.memmap is not None for s in store.shards if s.rows)
    store.load_features()
    assert np.array_equal(store.gather(ids), feats[ids])


def test_gather_chunked_fallback(tmp_path):
    store, feats = make_store(tmp_path, [40, 30])
    # rewrite shard 1 with a chunked, compressed feature dataset: h5py path
    s = store.shards[1]
    with h5py.File(s.file, "a") as f:
        del f["features"]
        f.create_dataset("features", data=feats[40:], chunks=(8, 16), compression="gzip")
    ids = np.array([69, 3, 45, 45, 0, 41, 69])
    assert np.array_equal(store.gather(ids), feats[ids])
    assert store.shards[1].memmap is None


def test_gather_out_of_range(tmp_path):
    from deephash_faiss.errors import DhfError
    store, feats = make_store(tmp_path, [10])
    with pytest.raises(DhfError):
        store.gather(np.array([10]))


@pytest.mark.parametrize("k", [None, 1, 5, 1000])
def test_rank_pools_cpu_matches_rank_pool(k):
    rng = np.random.default_rng(3)
    X = rng.standard_normal((2000, 32)).astype(np.float32)
    X[100:110] = X[5]  # exact ties
    Q = rng.standard_normal((9, 32)).astype(np.float32)
    pools = [rng.integers(0, 2000, rng.integers(0, 400)) for _ in range(8)] + [np.arange(100, 111)]
    got = rank_pools_cpu(Q, pools, lambda u: X[u], k)
    for i, p in enumerate(pools):
        o, d = rank_pool(Q[i], X[p], k)
        go, gd = got[i]
        assert len(go) == len(o)
        np.testing.assert_allclose(gd, d, rtol=1e-4, atol=1e-3)
        # same rows (ties may only swap rows of equal features)
        assert np.allclose(X[p][go], X[p][o], atol=0) or np.allclose(gd, d, rtol=1e-5)
    o, d = got[-1]  # identical rows tie: lower local index first
    tied = [int(j) for j in o if j < 10]  # local 0..9 are the identical rows X[5]
    assert tied == sorted(tied)
    # float16 features give float32 distances
    got16 = rank_pools_cpu(Q, pools, lambda u: X[u].astype(np.float16), k)
    assert all(gd.dtype == np.float32 for _, gd in got16)
