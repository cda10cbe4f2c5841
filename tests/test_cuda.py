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


# ---------------------------------------------------------------- build on CUDA (issue 12)

def _jpeg_folder(root, n=40, size=(48, 64)):
    import os

    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(n // 2):
            a = rng.integers(0, 255, (*size, 3), np.uint8)
            img = Image.fromarray(a)
            if i == 3:
                img.save(os.path.join(root, c, f"{i:03d}.png"))  # not a JPEG: the CPU path
            elif i == 4:
                img.convert("CMYK").save(os.path.join(root, c, f"{i:03d}.jpg"))  # CMYK: the CPU path
            else:
                img.save(os.path.join(root, c, f"{i:03d}.jpg"), quality=90)
    with open(os.path.join(root, "a", "zzz-corrupt.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0" + b"\x00" * 50)
    return root


@pytest.fixture(scope="module")
def cuda_model(tmp_path_factory):
    from deephash_faiss.model import build_model, save_checkpoint

    p = str(tmp_path_factory.mktemp("m") / "m.pt")
    save_checkpoint(build_model("smallcnn", 48, ["a", "b"], weights="none", load_size=32, seed=0), p)
    return p


@pytest.mark.parametrize("backbone", ["smallcnn", "efficientnet_lite0"])
def test_cuda_stream_equals_encode_array(tmp_path, backbone):
    """The overlapped CUDA encoder (warm-up forward in a thread, pinned H2D on a side stream,
    codes packed on the device, deferred D2H) returns what the plain batch function returns on
    the same batches (efficientnet_lite0: depthwise, NCHW for this small job)."""
    from deephash_faiss.data import load_images, scan_images
    from deephash_faiss.extract import encode_array
    from deephash_faiss.model import build_model
    from deephash_faiss.stream import encode_stream

    paths = scan_images(_jpeg_folder(str(tmp_path / "i"))).paths
    dev = torch.device("cuda")
    model = build_model(backbone, 48, ["a", "b"], weights="none", load_size=32, seed=0).to(dev)
    got = list(encode_stream(model, paths, dev, 8, "float32", "pil", decode_kind="thread"))
    pos = np.concatenate([g[2] for g in got])
    imgs, rpos, bad = load_images(paths, model.config.load_size)
    assert np.array_equal(pos, rpos) and [b for g in got for b in g[5]] == bad
    codes, feats = [], []
    for lo in range(0, len(paths), 8):  # the same batches: positions [lo, lo + 8) that decoded
        sel = (rpos >= lo) & (rpos < lo + 8)
        if sel.any():  # the stream runs every batch at the full shape: a short one is zero-padded
            m = int(sel.sum())
            padded = np.concatenate([imgs[sel], np.zeros((8 - m, *imgs.shape[1:]), np.uint8)])
            c, f, _ = encode_array(model, padded, dev, 8)
            codes.append(c[:m])
            feats.append(f[:m])
    assert np.array_equal(np.concatenate([g[3] for g in got]), np.concatenate(codes))
    np.testing.assert_allclose(np.concatenate([g[4] for g in got]), np.concatenate(feats), rtol=1e-3, atol=1e-3)


def test_cuda_nvjpeg_build_falls_back_and_records_decoder(tmp_path, cuda_model):
    from deephash_faiss import maintain
    from deephash_faiss.gpudecode import nvjpeg_available

    if not nvjpeg_available():
        pytest.skip("torchvision cannot decode JPEGs on this GPU")
    imgs = _jpeg_folder(str(tmp_path / "i"))
    a, b = str(tmp_path / "pil"), str(tmp_path / "nv")
    ra = api.build_index(imgs, a, cuda_model, device="cuda", decoder="pil", progress=False, batch_size=8)
    rb = api.build_index(imgs, b, cuda_model, device="cuda", decoder="nvjpeg", progress=False, batch_size=8)
    assert rb.decoder == "nvjpeg" and api.read_manifest(b)["decoder"] == "nvjpeg"
    assert api.read_manifest(a)["decoder"] == "pil"
    assert ra.count == rb.count and ra.skipped == rb.skipped and len(rb.skipped) == 1
    sa, sb = Searcher(a, device="cuda"), Searcher(b, device="cuda")
    assert sa.store.paths() == sb.store.paths()
    fa, fb = sa.store.load_features(), sb.store.load_features()
    cos = (fa * fb).sum(1) / np.linalg.norm(fa, axis=1) / np.linalg.norm(fb, axis=1)
    assert cos.min() > 0.9
    nonjpeg = [i for i, p in enumerate(sa.store.paths()) if p.endswith(".png") or p.endswith("004.jpg")]
    np.testing.assert_allclose(fa[nonjpeg], fb[nonjpeg], rtol=1e-3, atol=1e-3)  # the CPU path in both
    q = [p for p in sb.store.paths()[:3]]
    codes, feats, _ = sb.encode(q)  # queries decoded with the index's decoder: themselves first
    res = sb.search("hds", codes, feats, k=1)
    assert [r.ids[0] for r in res.results] == [0, 1, 2]
    assert maintain.verify(b) == []
    rep = maintain.add_images(b, imgs, device="cuda", progress=False)  # nothing new: all already indexed
    assert rep.added == 0


def test_cuda_ray_build_one_gpu_equals_local(tmp_path, cuda_model):
    """The N-GPU code path (one Ray actor per GPU, num_gpus=1) with N = the GPUs here."""
    ray = pytest.importorskip("ray")
    from deephash_faiss.distributed import build_index_ray
    from deephash_faiss.store import FeatureStore

    imgs = _jpeg_folder(str(tmp_path / "i"))
    a, b = str(tmp_path / "local"), str(tmp_path / "ray")
    api.build_index(imgs, a, cuda_model, device="cuda", progress=False, batch_size=8, shard_size=10)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        rep = build_index_ray(imgs, b, cuda_model, batch_size=8, shard_size=10, num_gpus_per_worker=1,
                              progress=False)
    finally:
        ray.shutdown()
    ma, mb = api.read_manifest(a), api.read_manifest(b)
    assert ma["decoder"] == mb["decoder"] and rep.count == ma["count"]
    ca, cb = FeatureStore(a, ma).codes(), FeatureStore(b, mb).codes()
    assert np.array_equal(ca, cb)


def test_cuda_layouts_agree():
    """NCHW and NHWC give the same fc7 and H up to rounding (float32, no autocast)."""
    from deephash_faiss.extract import forward_batch
    from deephash_faiss.model import build_model

    dev = torch.device("cuda")
    m = build_model("efficientnet_lite0", 48, ["a", "b"], weights="none", load_size=32, seed=0).to(dev).eval()
    x = torch.as_tensor(np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8))
    a = forward_batch(m, x, dev, amp=False, layout="channels_last")
    b = forward_batch(m, x, dev, amp=False, layout="contiguous")
    cos = torch.nn.functional.cosine_similarity(a[0], b[0]).min().item()
    assert cos > 0.9999
    np.testing.assert_allclose(a[1].numpy(), b[1].numpy(), atol=2e-3)


def test_cuda_stream_runs_every_forward_pass_in_the_one_model_thread(tmp_path, monkeypatch):
    """Warm-up and batches of two encode jobs all run in one thread ("dhf-model"): torch keeps
    cuDNN's execution plans per thread, so any other thread would build them again."""
    import threading

    from deephash_faiss import extract
    from deephash_faiss.data import scan_images
    from deephash_faiss.model import build_model
    from deephash_faiss.stream import encode_stream

    paths = scan_images(_jpeg_folder(str(tmp_path / "i"))).paths
    dev = torch.device("cuda")
    model = build_model("smallcnn", 48, ["a", "b"], weights="none", load_size=32, seed=0).to(dev)
    threads = []
    real = extract.forward_batch

    def spy(*a, **k):
        threads.append(threading.current_thread())
        return real(*a, **k)

    monkeypatch.setattr(extract, "forward_batch", spy)
    for _ in range(2):
        list(encode_stream(model, paths, dev, 8, "float32", "pil", decode_kind="thread"))
    assert len(threads) >= 4 and len(set(threads)) == 1
    assert threads[0].name.startswith("dhf-model") and threads[0] is not threading.main_thread()


def test_cuda_hybrid_job_runs_each_batch_in_its_layouts_thread(tmp_path, monkeypatch):
    """A "hybrid" job: both layouts warm up, each in its own model thread; batches starting
    below HYBRID_NCHW_IMAGES run NCHW, the rest NHWC, and each returns what the plain batch
    function returns in that layout on the same batch, in order."""
    import threading

    from deephash_faiss import extract
    from deephash_faiss.data import load_images, scan_images
    from deephash_faiss.index import pack_codes
    from deephash_faiss.model import build_model
    from deephash_faiss.stream import encode_stream

    paths = scan_images(_jpeg_folder(str(tmp_path / "i"))).paths
    monkeypatch.setattr(extract, "HYBRID_NCHW_IMAGES", 16)
    monkeypatch.delenv("DHF_CUDA_LAYOUT", raising=False)
    dev = torch.device("cuda")
    model = build_model("efficientnet_lite0", 48, ["a", "b"], weights="none", load_size=32, seed=0).to(dev)
    calls = []
    real = extract.forward_batch

    def spy(m, xb, *a, layout=None, **k):
        calls.append((threading.current_thread().name, layout, bool(xb.any().item())))
        return real(m, xb, *a, layout=layout, **k)

    monkeypatch.setattr(extract, "forward_batch", spy)
    got = list(encode_stream(model, paths, dev, 8, "float32", "pil", decode_kind="thread"))
    monkeypatch.setattr(extract, "forward_batch", real)
    warm = sorted((t, lay) for t, lay, nonzero in calls if not nonzero)
    assert warm == [("dhf-model-channels_last_0", "channels_last"), ("dhf-model-contiguous_0", "contiguous")]
    batches = [(t, lay) for t, lay, nonzero in calls if nonzero]
    # 41 paths (one corrupt): batches start at 0, 8 | 16, 24, 32, 40
    assert [lay for _, lay in batches] == ["contiguous"] * 2 + ["channels_last"] * 4, calls
    assert all(t.startswith(f"dhf-model-{lay}") for t, lay in batches)
    imgs, rpos, _ = load_images(paths, model.config.load_size)
    assert np.array_equal(np.concatenate([g[2] for g in got]), rpos)
    codes, feats = [], []
    for lo in range(0, len(paths), 8):
        sel = (rpos >= lo) & (rpos < lo + 8)
        m = int(sel.sum())
        padded = np.concatenate([imgs[sel], np.zeros((8 - m, *imgs.shape[1:]), np.uint8)])
        fc7, h = real(model, torch.as_tensor(padded), dev, layout="contiguous" if lo < 16 else "channels_last")
        codes.append(pack_codes(h.numpy()[:m]))
        feats.append(fc7.numpy()[:m])
    assert np.array_equal(np.concatenate([g[3] for g in got]), np.concatenate(codes))
    np.testing.assert_allclose(np.concatenate([g[4] for g in got]), np.concatenate(feats), rtol=1e-3, atol=1e-3)


def test_cuda_build_takes_the_model_it_loaded_and_warmed_while_scanning(tmp_path, cuda_model, monkeypatch, capfd):
    """A CUDA build loads its model onto the GPU and warms up the first layout before it scans
    the folder, then encodes with that model: same codes and features as the model loaded the
    plain way (the early path patched off)."""
    from deephash_faiss import pipeline, stream
    from deephash_faiss.store import read_shard

    imgs = _jpeg_folder(str(tmp_path / "i"))
    monkeypatch.setenv(stream.TRACE_ENV, "1")
    api.build_index(imgs, str(tmp_path / "a"), cuda_model, device="cuda", decoder="pil", progress=False, batch_size=8)
    err = capfd.readouterr().err
    assert "model on cuda (early)" in err and "] model loaded" not in err
    monkeypatch.setattr(pipeline.LocalExecutor, "start", lambda self, *a: None)
    api.build_index(imgs, str(tmp_path / "b"), cuda_model, device="cuda", decoder="pil", progress=False, batch_size=8)
    assert "] model loaded" in capfd.readouterr().err
    ra, rb = (read_shard(str(tmp_path / x / "shards" / "part-00000.h5")) for x in "ab")
    assert np.array_equal(ra["codes"], rb["codes"]) and ra["paths"] == rb["paths"]
    np.testing.assert_allclose(ra["features"], rb["features"], rtol=1e-3, atol=1e-3)
