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


def _rows(n, dim=8, dtype=np.float32, seed=3):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 6), dtype=np.uint8), rng.standard_normal((n, dim)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_shard_file_appended_in_batches_reads_back_contiguous(tmp_path, dtype):
    """Rows streamed batch by batch read back equal to the arrays (numpy), the features stay one
    contiguous uncompressed block, the sha256 is the file's, and no temporary file is left."""
    from deephash_faiss.model import file_sha256
    from deephash_faiss.store import ShardFile

    codes, feats = _rows(37, dtype=dtype)
    p = str(tmp_path / "part-00000.h5")
    sf = ShardFile(p, 37, 6, 8, dtype)
    for a, b in [(0, 0), (0, 5), (5, 6), (6, 30), (30, 37)]:  # an empty batch too
        sf.append(codes[a:b], feats[a:b])
    assert not os.path.exists(p)  # the final name appears only at commit
    info = sf.commit(np.arange(100, 137), [f"{i}.jpg" for i in range(37)], np.arange(37, dtype=np.int32))
    assert info == {"file": "part-00000.h5", "rows": 37, "sha256": file_sha256(p)}
    s = read_shard(p)
    assert np.array_equal(s["codes"], codes) and np.array_equal(s["features"], feats)
    assert s["features"].dtype == dtype and list(s["ids"]) == list(range(100, 137))
    with h5py.File(p, "r") as f:
        assert f["features"].chunks is None and f["features"].compression is None
        assert f["features"].id.get_offset() is not None
    assert os.listdir(tmp_path) == ["part-00000.h5"]


def test_shard_file_with_skipped_rows_is_rewritten_at_its_true_size(tmp_path, monkeypatch):
    import deephash_faiss.store as store

    monkeypatch.setattr(store, "_COPY_ROWS", 4)  # the copy in several pieces
    codes, feats = _rows(11)
    p = str(tmp_path / "part-00001.h5")
    sf = store.ShardFile(p, 20, 6, 8, np.float32)  # 20 expected, 11 came
    sf.append(codes[:7], feats[:7])
    sf.append(codes[7:], feats[7:])
    info = sf.commit(np.arange(11), [f"{i}.jpg" for i in range(11)], np.zeros(11, np.int32))
    assert info["rows"] == 11 and info["sha256"] == store.file_sha256(p)
    s = read_shard(p)
    assert s["codes"].shape == (11, 6) and np.array_equal(s["features"], feats)
    with h5py.File(p, "r") as f:
        assert f["features"].shape == (11, 8) and f["features"].chunks is None
    assert os.listdir(tmp_path) == ["part-00001.h5"]


def test_shard_file_refuses_extra_rows_and_abort_leaves_nothing(tmp_path):
    from deephash_faiss.store import ShardFile

    codes, feats = _rows(5)
    p = str(tmp_path / "part-00002.h5")
    sf = ShardFile(p, 4, 6, 8, np.float32)
    with pytest.raises(ValueError, match="more than its 4 rows"):
        sf.append(codes, feats)
    with pytest.raises(ValueError, match="differ in length"):
        sf.append(codes[:2], feats[:3])
    sf.append(codes[:2], feats[:2])
    with pytest.raises(ValueError, match="differ in length"):
        sf.commit(np.arange(3), ["a", "b", "c"], np.zeros(3, np.int32))
    sf.abort()
    assert os.listdir(tmp_path) == []


def test_written_files_get_the_ordinary_mode(tmp_path):
    """mkstemp makes 0600 files: an index or model renamed from one could not be read by
    another account (a service user). They get 0666 less the umask, like any new file."""
    import stat

    import torch

    from deephash_faiss.model import _atomic_torch_save
    from deephash_faiss.store import atomic_write_bytes, write_shard

    old = os.umask(0o022)
    try:
        import deephash_faiss.model as model_mod

        model_mod._FILE_MODE = None
        atomic_write_bytes(str(tmp_path / "a.json"), b"{}")
        write_shard(str(tmp_path / "s.h5"), np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.float32),
                    np.arange(2), ["a", "b"], np.zeros(2, np.int32))
        _atomic_torch_save({"x": torch.zeros(1)}, str(tmp_path / "m.pt"))
    finally:
        os.umask(old)
        model_mod._FILE_MODE = None
    for name in ("a.json", "s.h5", "m.pt"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name
