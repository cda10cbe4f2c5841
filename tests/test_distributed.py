"""Ray extraction and sharded search (deephash_faiss.distributed).

One module-scoped local Ray session (2 CPUs, no dashboard). Tiny labelled images
(3 classes, with exact duplicates to make L2 ties) and a smallcnn trained for one
epoch; 8-bit codes so that Hamming ties are everywhere.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from deephash_faiss import api  # noqa: E402
from deephash_faiss.distributed import (FAIL_ONCE_ENV, ShardedSearcher, build_index_ray, merge_knn_batch,  # noqa: E402
                                        split_index)
from deephash_faiss.index import BinaryIndex, IndexSpec  # noqa: E402
from deephash_faiss.pipeline import build_key  # noqa: E402
from deephash_faiss.store import FeatureStore, read_manifest  # noqa: E402

SHARD = 16


@pytest.fixture(scope="module")
def ray_session():
    started = not ray.is_initialized()
    if started:
        # "local": always a fresh instance (a stale /tmp/ray/ray_current_cluster would be dialled otherwise)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("dist")
    imgs = root / "images"
    rng = np.random.default_rng(0)
    base = [np.array([200, 30, 30]), np.array([30, 200, 30]), np.array([30, 30, 200])]
    n = 0
    for c in range(3):
        d = imgs / f"class{c}"
        d.mkdir(parents=True)
        for j in range(34):
            a = np.clip(base[c] + rng.normal(0, 40, (20, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(d / f"img{j:03d}.png")
            n += 1
        for j in range(3):  # exact duplicates: equal codes and features
            shutil.copy(d / f"img{j:03d}.png", d / f"dup{j:03d}.png")
    (imgs / "class0" / "broken.png").write_bytes(b"not a png")
    model = str(root / "model.pt")
    api.train_model(str(imgs), model, backbone="smallcnn", bits=8, weights="none", epochs=1, progress=False,
                    batch_size=32, val_fraction=0.0)
    # oneDNN picks CPU kernels by thread count, so "bit for bit" means: same torch thread
    # count as the Ray workers (1 CPU each here)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = str(root / "local-index")
        api.build_index(str(imgs), local, model, batch_size=8, shard_size=SHARD, device="cpu", progress=False)
        local2 = str(root / "local-index-2threads")
        torch.set_num_threads(2)
        api.build_index(str(imgs), local2, model, batch_size=8, shard_size=SHARD, device="cpu", progress=False)
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "images": str(imgs), "model": model, "local": local, "local2": local2}


def _rows(index_dir):
    m = read_manifest(index_dir)
    st = FeatureStore(index_dir, m)
    return st.codes(), st.load_features(), st.labels(), st.paths(), m


def _same_index(a, b):
    ca, fa, la, pa, ma = _rows(a)
    cb, fb, lb, pb, mb = _rows(b)
    assert ma["count"] == mb["count"]
    assert np.array_equal(ca, cb)
    assert fa.dtype == fb.dtype and np.array_equal(fa.view(np.uint8), fb.view(np.uint8))  # bit for bit
    assert np.array_equal(la, lb)
    assert pa == pb
    ids_a = np.concatenate([api.shard_rows(a, s["file"])["ids"] for s in ma["shards"]])
    ids_b = np.concatenate([api.shard_rows(b, s["file"])["ids"] for s in mb["shards"]])
    assert np.array_equal(ids_a, ids_b) and np.array_equal(ids_a, np.arange(ma["count"]))
    assert [s["rows"] for s in ma["shards"]] == [s["rows"] for s in mb["shards"]]
    assert ma["skipped"] == mb["skipped"] == 1


def test_ray_build_equals_local_build(ray_session, data, tmp_path):
    out = str(tmp_path / "ray-index")
    rep = build_index_ray(data["images"], out, data["model"], batch_size=8, shard_size=SHARD, num_workers=2,
                          progress=False)
    nshards = len(read_manifest(out)["shards"])
    assert rep.shards_written == nshards and rep.shards_reused == 0
    _same_index(data["local"], out)
    assert not [p for p in os.listdir(out) if p.startswith(".partial-")]


def test_ray_build_two_cpu_worker_equals_two_thread_local_build(ray_session, data, tmp_path):
    out = str(tmp_path / "ray-index-2cpu")
    build_index_ray(data["images"], out, data["model"], batch_size=8, shard_size=SHARD, num_workers=1,
                    num_cpus_per_worker=2, progress=False)
    _same_index(data["local2"], out)


def test_crashed_worker_is_retried_and_nothing_written_twice(ray_session, data, tmp_path, monkeypatch):
    marker = tmp_path / "crashed"
    monkeypatch.setenv(FAIL_ONCE_ENV, str(marker))
    out = str(tmp_path / "ray-index-crash")
    rep = build_index_ray(data["images"], out, data["model"], batch_size=8, shard_size=SHARD, num_workers=2,
                          progress=False)
    assert marker.exists()  # a worker did die (after putting its shard in place)
    nshards = len(read_manifest(out)["shards"])
    # every shard written exactly once: the crashed worker wrote its shard but died before
    # replying (so that write is not counted), its retried task found the shard complete
    assert rep.shards_written == nshards - 1
    assert rep.shards_reused == 1
    _same_index(data["local"], out)


def test_ray_build_resumes_local_partial(ray_session, data, tmp_path):
    """A Ray build picks up the shards a local build left in .partial-<key>."""
    from deephash_faiss.data import scan_images
    from deephash_faiss.model import file_sha256, load_model

    out = str(tmp_path / "mixed")
    images = scan_images(data["images"])
    key = build_key(file_sha256(data["model"]), images.paths, SHARD, "float32", "pil")
    part = os.path.join(out, f".partial-{key[:16]}")
    model = load_model(data["model"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers
    try:
        api.encode_shards(model, images.paths, images.labels, part, SHARD, 8, torch.device("cpu"), "float32",
                          progress=False, shard_range=range(0, 3))
    finally:
        torch.set_num_threads(threads)
    rep = build_index_ray(data["images"], out, data["model"], batch_size=8, shard_size=SHARD, num_workers=2,
                          progress=False)
    assert rep.shards_reused == 3
    _same_index(data["local"], out)


def _queries(data):
    s = api.open_index(data["local"], device="cpu")
    paths = s.store.paths()
    qi = np.arange(0, len(paths), 7)
    codes = s.codes()[qi]
    feats = s.store.load_features()[qi].astype(np.float32)
    feats = feats + np.float32(0.01) * np.random.default_rng(1).standard_normal(feats.shape).astype(np.float32)
    return s, codes, feats


def _same_results(a, b):
    assert len(a.results) == len(b.results)
    for ra, rb in zip(a.results, b.results):
        assert np.array_equal(ra.ids, rb.ids), (ra.ids, rb.ids)
        assert np.array_equal(ra.hamming, rb.hamming)
        assert np.array_equal(ra.distance, rb.distance, equal_nan=True)
        assert ra.candidates == rb.candidates and ra.truncated == rb.truncated


@pytest.mark.parametrize("n", [2, 3, 4])
def test_sharded_search_equals_unsharded(ray_session, data, tmp_path, n):
    s, codes, feats = _queries(data)
    dirs = split_index(data["local"], str(tmp_path / "split"), n)
    assert len(dirs) == n
    offs = [read_manifest(d)["id_offset"] for d in dirs]
    assert offs[0] == 0 and sorted(offs) == offs
    assert sum(read_manifest(d)["count"] for d in dirs) == s.count
    for d in dirs:  # each shard is a valid index on its own
        api.open_index(d, device="cpu").bcs(codes[:1], 1)
    configs = [(5, 3, 10_000), (10, 2, 7), (30, 1, 25), (12, 0, 100), (40, 3, 3), (s.count, 8, 50)]  # 8 = the code length, the largest radius
    use_rays = [False, True] if n == 3 else [False]
    for use_ray in use_rays:
        with ShardedSearcher(list(reversed(dirs)), use_ray=use_ray) as ss:
            assert ss.count == s.count
            for k, radius, mc in configs:
                _same_results(s.bcs(codes, k), ss.bcs(codes, k))
                _same_results(s.hds(codes, feats, k, radius, mc), ss.hds(codes, feats, k, radius, mc))
                _same_results(s.es(feats, codes, k), ss.es(feats, codes, k))
            # rerank on the shards: the same pools; distances equal up to float rounding
            for k, radius, mc in configs[:3]:
                a, b = s.hds(codes, feats, k, radius, mc), ss.hds(codes, feats, k, radius, mc, rerank="shards")
                for ra, rb in zip(a.results, b.results):
                    assert ra.candidates == rb.candidates and ra.truncated == rb.truncated
                    assert np.allclose(ra.distance, rb.distance, rtol=1e-5, atol=1e-6)
                    assert set(ra.ids[ra.distance < ra.distance[-1] * (1 - 1e-5)]) <= set(rb.ids)
            # many ties: 8-bit codes of 3 clustered classes
            b = s.bcs(codes, 20)
            assert any(len(np.unique(r.hamming)) < len(r.hamming) // 2 for r in b.results)


def test_sharded_deleted_rows(data, tmp_path):
    from deephash_faiss.store import write_manifest

    idx = str(tmp_path / "with-deleted")
    shutil.copytree(data["local"], idx)
    m = read_manifest(idx)
    m["deleted"] = [0, 5, 17, 40, 41, 99]
    write_manifest(idx, m)
    s, codes, feats = _queries(data)
    s = api.open_index(idx, device="cpu")
    dirs = split_index(idx, str(tmp_path / "split"), 3)
    ss = ShardedSearcher(dirs, use_ray=False)
    assert ss.live_count() == s.live_count()
    for k, radius, mc in [(5, 3, 10_000), (10, 2, 7)]:
        _same_results(s.bcs(codes, k), ss.bcs(codes, k))
        _same_results(s.hds(codes, feats, k, radius, mc), ss.hds(codes, feats, k, radius, mc))
        _same_results(s.es(feats, codes, k), ss.es(feats, codes, k))


def test_million_codes_sharded_bcs_equals_flat():
    """1e6 clustered 16-bit codes (huge ties), 4 shards: merged BCS == unsharded flat index."""
    rng = np.random.default_rng(0)
    n, nq, k = 1_000_000, 64, 100
    centers = rng.integers(0, 256, (8, 2), dtype=np.uint8)
    codes = centers[rng.integers(0, 8, n)]
    flips = (rng.random((n, 16)) < 0.05)
    codes = codes ^ np.packbits(flips, axis=1, bitorder="little")
    q = codes[rng.integers(0, n, nq)]
    full = BinaryIndex.build(codes, IndexSpec())
    D, I = full.search(q, k)
    bounds = [0, 250_000, 500_001, 750_000, n]
    parts = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        d, i = BinaryIndex.build(codes[lo:hi], IndexSpec()).search(q, k)
        parts.append((d, np.where(i >= 0, i + lo, -1)))
    D2, I2 = merge_knn_batch(parts, k)
    assert np.array_equal(D, D2) and np.array_equal(I, I2)
    # radius pools too: merged by (hamming, id) and capped == unsharded capped pools
    lims, Dr, Ir = full.range_search(q[:8], 2, 5000)
    for qi in range(8):
        pd, pi = [], []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            l2, d2, i2 = BinaryIndex.build(codes[lo:hi], IndexSpec()).range_search(q[qi:qi + 1], 2, 5000)
            pd.append(d2)
            pi.append(i2 + lo)
        pd, pi = np.concatenate(pd), np.concatenate(pi)
        o = np.lexsort((pi, pd))[:5000]
        assert np.array_equal(pi[o], Ir[lims[qi]:lims[qi + 1]])


def test_cli_shard_and_ray_flag(ray_session, data, tmp_path):
    from click.testing import CliRunner

    from deephash_faiss.cli import main

    r = CliRunner().invoke(main, ["shard", data["local"], "-n", "2", "-o", str(tmp_path / "cli-split")])
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(tmp_path / "cli-split")) == ["shard-000", "shard-001"]
    out = str(tmp_path / "cli-ray")
    r = CliRunner().invoke(main, ["build-index", data["images"], "--model", data["model"], "-o", out, "--ray",
                                  "--workers", "2", "--shard-size", str(SHARD), "--batch-size", "8", "-q"])
    assert r.exit_code == 0, r.output
    _same_index(data["local"], out)


# ---------------------------------------------------------------- one pipeline: the three drifts are gone

def test_ray_build_takes_the_writer_lock(ray_session, data, tmp_path):
    """A Ray build racing a writer (`dhf add` holds the lock) refuses instead of losing its rows;
    and a `dhf add` during a Ray build is refused while the build runs."""
    import subprocess
    import sys
    import threading
    import time

    from deephash_faiss.errors import DhfError
    from deephash_faiss.layout import IndexLock

    out = str(tmp_path / "locked")
    shutil.copytree(data["local"], out)
    with IndexLock(out):
        with pytest.raises(DhfError, match="lock held"):
            build_index_ray(data["images"], out, data["model"], batch_size=8, shard_size=SHARD, num_workers=2,
                            progress=False)
    more = tmp_path / "more"
    more.mkdir()
    from PIL import Image

    for j in range(4):
        Image.fromarray(np.full((20, 20, 3), 40 * j, np.uint8)).save(more / f"new{j}.png")
    errors = []

    def ray_build():
        try:
            build_index_ray(data["images"], out, data["model"], batch_size=8, shard_size=SHARD // 2, num_workers=2,
                            progress=False)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    t = threading.Thread(target=ray_build)
    t.start()
    deadline = time.time() + 60
    while time.time() < deadline and not [n for n in os.listdir(out) if n.startswith(".partial-")]:
        time.sleep(0.005)
    r = subprocess.run([sys.executable, "-m", "deephash_faiss.cli", "add", out, str(more), "-q", "--device", "cpu"],
                       capture_output=True, text=True, timeout=120)
    t.join()
    assert not errors, errors
    m = read_manifest(out)
    paths = FeatureStore(out, m).paths()
    if r.returncode == 0:  # the add ran first (or after): its rows are in the index
        assert all(str(more / f"new{j}.png") in paths for j in range(4)), r.stdout
    else:
        assert "lock held" in r.stderr + r.stdout
    from deephash_faiss.maintain import verify

    assert verify(out) == []


def test_ray_resume_reencodes_an_image_changed_in_place(ray_session, data, tmp_path):
    from PIL import Image

    from deephash_faiss.data import scan_images
    from deephash_faiss.model import file_sha256, load_model

    imgs = str(tmp_path / "images")
    shutil.copytree(data["images"], imgs)
    out = str(tmp_path / "idx")
    images = scan_images(imgs)
    key = build_key(file_sha256(data["model"]), images.paths, SHARD, "float32", "pil")
    part = os.path.join(out, f".partial-{key[:16]}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        api.encode_shards(load_model(data["model"]), images.paths, images.labels, part, SHARD, 8,
                          torch.device("cpu"), "float32", progress=False)
    finally:
        torch.set_num_threads(threads)
    changed = [p for p in images.paths if "img0" in p][0]
    Image.fromarray(np.full((20, 20, 3), 250, np.uint8)).save(changed)  # same name, new pixels
    st = os.stat(changed)
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    rep = build_index_ray(imgs, out, data["model"], batch_size=8, shard_size=SHARD, num_workers=2, progress=False)
    assert rep.shards_reused == 0  # the stale partial belongs to another job (file stamps differ)
    ref = str(tmp_path / "ref")
    torch.set_num_threads(1)
    try:
        api.build_index(imgs, ref, data["model"], batch_size=8, shard_size=SHARD, device="cpu", progress=False)
    finally:
        torch.set_num_threads(threads)
    _same_index(ref, out)


def test_ray_skip_report_is_unescaped(ray_session, data, tmp_path):
    imgs = str(tmp_path / "images")
    shutil.copytree(data["images"], imgs)
    odd = os.path.join(imgs, "class1", "bad\tname\\with\nnewline.png")
    open(odd, "wb").write(b"not a png either")
    out = str(tmp_path / "idx")
    rep = build_index_ray(imgs, out, data["model"], batch_size=8, shard_size=SHARD, num_workers=2, progress=False)
    assert odd in dict(rep.skipped)
    assert rep.skipped == api.read_skip_report(out, read_manifest(out))
