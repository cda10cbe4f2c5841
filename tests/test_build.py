"""The build pipeline and the on-disk contract (deephash_faiss.pipeline, layout, stream, gpudecode).

References are independent: images decoded one by one with ``data.decode_image`` and encoded
with ``extract.encode_array`` (the pre-streaming path), numpy's packbits, hand-made JPEG
headers.
"""

from __future__ import annotations

import io
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from clihelp import one_error, run  # noqa: E402

from deephash_faiss import api, gpudecode, layout, maintain, pipeline  # noqa: E402
from deephash_faiss.data import decode_image, scan_images  # noqa: E402
from deephash_faiss.extract import encode_array, pack_codes_torch  # noqa: E402
from deephash_faiss.index import pack_codes  # noqa: E402
from deephash_faiss.model import load_model  # noqa: E402
from deephash_faiss.stream import encode_stream  # noqa: E402


def _reference(model, paths, batch_size):
    """One image at a time through decode_image, then encode_array in the same batches."""
    size = model.config.load_size
    codes, feats, pos = [], [], []
    for lo in range(0, len(paths), batch_size):
        imgs, ok = [], []
        for i in range(lo, min(len(paths), lo + batch_size)):
            try:
                imgs.append(decode_image(paths[i], size))
                ok.append(i)
            except Exception:  # noqa: BLE001
                pass
        if imgs:
            c, f, _ = encode_array(model, np.stack(imgs), torch.device("cpu"), batch_size)
            codes.append(c)
            feats.append(f)
            pos += ok
    return np.concatenate(codes), np.concatenate(feats), np.asarray(pos)


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_stream_equals_one_by_one_reference(image_folder, trained_model, kind):
    model = load_model(trained_model)
    paths = scan_images(image_folder).paths + ["/nonexistent.png"]
    rc, rf, rp = _reference(model, paths, 16)
    got = list(encode_stream(model, paths, torch.device("cpu"), 16, "float32", "pil", workers=2, decode_kind=kind,
                             prefetch=3))
    pos = np.concatenate([g[2] for g in got])
    assert np.array_equal(pos, rp)  # in order
    assert np.array_equal(np.concatenate([g[3] for g in got]), rc)
    assert np.array_equal(np.concatenate([g[4] for g in got]), rf)
    bad = [b for g in got for b in g[5]]
    assert [i for i, _ in bad] == [len(paths) - 1] and "not found" in bad[0][1]


def test_stream_segments_never_share_a_batch(image_folder, trained_model):
    model = load_model(trained_model)
    paths = scan_images(image_folder).paths[:40]
    got = list(encode_stream(model, paths, torch.device("cpu"), 16, segments=[(0, 10), (10, 40)]))
    assert [(g[0], g[1], len(g[2])) for g in got] == [(0, True, 10), (1, False, 16), (1, True, 14)]


def test_pack_codes_torch_equals_numpy():
    h = torch.rand(37, 48)
    h[0, :8] = 0.5  # the threshold is strict
    assert np.array_equal(pack_codes_torch(h).numpy(), pack_codes(h.numpy()))


# ---------------------------------------------------------------- the GPU decoder's host-side logic

def _jpeg(arr, **kw):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", **kw)
    return buf.getvalue()


def test_gpu_screening():
    rgb = np.random.default_rng(0).integers(0, 255, (40, 60, 3), np.uint8)
    j = _jpeg(rgb, quality=90)
    assert gpudecode.jpeg_header(j)["width"] == 60 and gpudecode.jpeg_header(j)["height"] == 40
    assert gpudecode.gpu_decodable(j, 32)
    assert gpudecode.gpu_decodable(_jpeg(rgb, progressive=True), 32)
    gray = io.BytesIO()
    Image.fromarray(rgb[..., 0]).save(gray, format="JPEG")
    assert gpudecode.gpu_decodable(gray.getvalue(), 32)
    cmyk = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk, format="JPEG")
    assert not gpudecode.gpu_decodable(cmyk.getvalue(), 32)  # 4 components: the CPU path
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, format="PNG")
    assert not gpudecode.gpu_decodable(png.getvalue(), 32)
    assert not gpudecode.gpu_decodable(j[:20], 32)  # truncated before the frame header
    assert not gpudecode.gpu_decodable(b"", 32)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: PIL's path applies (or not) the orientation, not nvjpeg
    assert not gpudecode.gpu_decodable(_jpeg(rgb, exif=exif.tobytes()), 32)
    exif[0x0112] = 1
    assert gpudecode.gpu_decodable(_jpeg(rgb, exif=exif.tobytes()), 32)
    assert not gpudecode.gpu_decodable(_jpeg(np.zeros((2, 200, 3), np.uint8)), 32)  # extreme aspect ratio


def test_square_tensor_matches_pil_geometry():
    rgb = np.random.default_rng(1).integers(0, 255, (48, 80, 3), np.uint8)
    out = gpudecode.square_tensor(torch.from_numpy(rgb).permute(2, 0, 1), 24).numpy()
    ref = decode_image(io.BytesIO(_png(rgb)).getvalue(), 24)
    assert out.shape == ref.shape == (24, 24, 3)
    assert np.abs(out.astype(int) - ref.astype(int)).mean() < 3  # resampling differs slightly, geometry not


def test_decode_jpegs_equals_torchvisions_decoder():
    """gpudecode's own operator call gives torchvision.io.decode_jpeg's pixels (RGB mode,
    grayscale converted), and a corrupt file raises as there."""
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from torchvision.io import ImageReadMode, decode_jpeg

    rng = np.random.default_rng(3)
    gray = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20, 30), np.uint8), "L").save(gray, format="JPEG")
    datas = [_jpeg(rng.integers(0, 255, (40, 60, 3), np.uint8)),
             _jpeg(rng.integers(0, 255, (33, 17, 3), np.uint8), progressive=True), gray.getvalue()]
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    ours = gpudecode.decode_jpegs(tensors, "cpu")
    ref = decode_jpeg(tensors, mode=ImageReadMode.RGB)
    assert len(ours) == 3 and all(torch.equal(a, b) for a, b in zip(ours, ref))
    assert ours[2].shape == (3, 20, 30)
    with pytest.raises(Exception):
        gpudecode.decode_jpegs([torch.frombuffer(bytearray(datas[0][:200]), dtype=torch.uint8)], "cpu")


def test_jpeg_decoding_does_not_import_torchvision(tmp_path):
    """The nvjpeg path loads torchvision's operator library, not the package (whose import pulls
    in torch._dynamo: seconds of the first batch on the H200, issue 12)."""
    import glob
    import importlib.util
    import subprocess
    import sys

    root = os.path.dirname(importlib.util.find_spec("torchvision").origin)
    if not glob.glob(os.path.join(root, "image*.so")) + glob.glob(os.path.join(root, "image*.pyd")):
        pytest.skip("this torchvision has no image*.so: gpudecode falls back to importing the package")
    p = tmp_path / "a.jpg"
    p.write_bytes(_jpeg(np.random.default_rng(4).integers(0, 255, (30, 50, 3), np.uint8)))
    code = ("import sys; from deephash_faiss import gpudecode; "
            f"x, failed = gpudecode.decode_batch([open({str(p)!r}, 'rb').read()], 16, 'cpu'); "
            "assert tuple(x.shape) == (1, 16, 16, 3) and failed == [], (x.shape, failed); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchvision'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def nvjpeg_on_cpu(monkeypatch):
    monkeypatch.setattr(pipeline, "ALLOW_NVJPEG_ON_CPU", True)


def _mixed_folder(root):
    """JPEGs (RGB, progressive, CMYK), PNGs and a corrupt JPEG, in two classes."""
    rng = np.random.default_rng(2)
    for c in ("a", "b"):
        os.makedirs(os.path.join(root, c))
        for i in range(9):
            a = rng.integers(0, 255, (30, 40, 3), np.uint8)
            p = os.path.join(root, c, f"{i:02d}")
            img = Image.fromarray(a)
            if i % 4 == 0:
                img.save(p + ".png")
            elif i % 4 == 1:
                img.convert("CMYK").save(p + ".jpg")
            else:
                img.save(p + ".jpg", progressive=i % 4 == 3)
    open(os.path.join(root, "a", "zz-corrupt.jpg"), "wb").write(_jpeg(np.zeros((30, 30, 3), np.uint8))[:300])
    return root


def test_nvjpeg_path_falls_back_and_keeps_order(tmp_path, trained_model, nvjpeg_on_cpu):
    """The nvjpeg code path (torchvision's decoder on CPU tensors here) keeps the PIL path's
    positions and skip reasons; what it decodes itself is close to PIL's pixels."""
    model = load_model(trained_model)
    paths = scan_images(_mixed_folder(str(tmp_path / "m"))).paths
    cpu = torch.device("cpu")
    pil = list(encode_stream(model, paths, cpu, 8, decoder="pil", decode_kind="thread"))
    nv = list(encode_stream(model, paths, cpu, 8, decoder="nvjpeg", decode_kind="thread"))
    assert [g[2].tolist() for g in pil] == [g[2].tolist() for g in nv]
    assert [g[5] for g in pil] == [g[5] for g in nv]
    assert len([b for g in nv for b in g[5]]) == 1  # the corrupt file, with the CPU path's reason
    fp, fn = np.concatenate([g[4] for g in pil]), np.concatenate([g[4] for g in nv])
    cos = (fp * fn).sum(1) / np.linalg.norm(fp, axis=1) / np.linalg.norm(fn, axis=1)
    assert cos.min() > 0.9
    # PNG and CMYK went through PIL in both: identical rows
    nonjpeg = [i for i, p in enumerate(np.concatenate([g[2] for g in pil])) if paths[p].endswith(".png")]
    assert np.array_equal(fp[nonjpeg], fn[nonjpeg])


def test_manifest_records_the_decoder(tmp_path, image_folder, trained_model, nvjpeg_on_cpu):
    d1, d2 = str(tmp_path / "pil"), str(tmp_path / "nv")
    api.build_index(image_folder, d1, trained_model, device="cpu", progress=False)
    assert api.read_manifest(d1)["decoder"] == "pil"
    rep = api.build_index(image_folder, d2, trained_model, device="cpu", progress=False, decoder="nvjpeg")
    assert rep.decoder == "nvjpeg" and api.read_manifest(d2)["decoder"] == "nvjpeg"
    assert maintain.verify(d2) == []


def test_nvjpeg_needs_cuda(tmp_path, image_folder, trained_model):
    with pytest.raises(api.DhfError, match="needs --device cuda"):
        api.build_index(image_folder, str(tmp_path / "x"), trained_model, device="cpu", progress=False,
                        decoder="nvjpeg")
    assert pipeline.resolve_decoder("auto", "cpu") == "pil"


def test_auto_decoder_picks_by_image_size_and_job_size(tmp_path):
    small, big = tmp_path / "s.jpg", tmp_path / "b.jpg"
    small.write_bytes(_jpeg(np.zeros((32, 32, 3), np.uint8)))
    big.write_bytes(_jpeg(np.zeros((480, 640, 3), np.uint8)))
    png = tmp_path / "p.png"
    png.write_bytes(_png(np.zeros((480, 640, 3), np.uint8)))
    assert pipeline.typical_pixels([str(big)]) == 640 * 480
    many = pipeline.NVJPEG_MIN_IMAGES
    assert pipeline.resolve_decoder("auto", "cuda", [str(small)] * many) == "pil"  # tiny: CPU workers keep up
    assert pipeline.resolve_decoder("auto", "cuda", [str(big)] * many) == "nvjpeg"  # photos, a big job
    # a small job does not win back nvjpeg's initialisation
    assert pipeline.resolve_decoder("auto", "cuda", [str(big)] * (many - 1)) == "pil"
    assert pipeline.resolve_decoder("nvjpeg", "cuda", [str(big)]) == "nvjpeg"
    assert pipeline.resolve_decoder("auto", "cuda", [str(png)] * many) == "pil"
    assert pipeline.resolve_decoder("auto", "cpu", [str(big)] * many) == "pil"


# ---------------------------------------------------------------- the on-disk contract (issue 11)

def test_build_refuses_a_foreign_non_empty_folder(tmp_path, image_folder, trained_model):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("my notes")
    (d / "model_v2_best.pt").write_bytes(b"weights")
    r = run("build-index", image_folder, "--model", trained_model, "-o", str(d), "-q", "--device", "cpu")
    assert "is not empty and is not a dhf index" in one_error(r, code=1, stream="output")
    assert sorted(os.listdir(d)) == ["model_v2_best.pt", "notes.txt"]  # nothing written, nothing removed
    # an empty folder, or one holding only a killed build's leftovers, is fine
    e = tmp_path / "empty"
    (e / ".partial-0123456789abcdef").mkdir(parents=True)
    (e / "shards").mkdir()
    api.build_index(image_folder, str(e), trained_model, device="cpu", progress=False)
    assert maintain.verify(str(e)) == []


def test_rebuilds_never_delete_files_the_index_did_not_write(tmp_path, image_folder, trained_model):
    d = str(tmp_path / "idx")
    api.build_index(image_folder, d, trained_model, device="cpu", progress=False, shard_size=30)
    user = ["model_v2_best.pt", "codes_backup.index", "skipped_mine.tsv", os.path.join("shards", "part-00099x.h5"),
            "model.pt.bak"]
    for u in user:
        with open(os.path.join(d, u), "wb") as f:
            f.write(b"user data")
    first = layout.manifest_files(api.read_manifest(d))
    for _ in range(3):  # three generations: the first one's files are collected
        api.build_index(image_folder, d, trained_model, device="cpu", progress=False, shard_size=40)
    maintain.remove(d, ids=[0])
    for u in user:
        assert open(os.path.join(d, u), "rb").read() == b"user data", u
    live = layout.manifest_files(api.read_manifest(d))
    for f in first - live:
        assert not os.path.exists(os.path.join(d, f)), f  # the index's own old files are gone
    assert maintain.verify(d) == []


def test_stale_partials_are_collected_under_the_lock(tmp_path, image_folder, trained_model):
    d = str(tmp_path / "idx")
    api.build_index(image_folder, d, trained_model, device="cpu", progress=False)
    stale = os.path.join(d, ".partial-deadbeefdeadbeef")
    os.makedirs(stale)
    open(os.path.join(stale, "part-00000.skip.json"), "w").write("[]")
    os.makedirs(os.path.join(d, ".partial-add-0000000000000000"))
    api.build_index(image_folder, d, trained_model, device="cpu", progress=False, shard_size=20)
    assert not [n for n in os.listdir(d) if n.startswith(".partial-")]


def test_a_rebuild_resumes_its_own_partial(tmp_path, image_folder, trained_model):
    """The partial of the job being resumed is reused, not collected."""
    d = str(tmp_path / "idx")
    api.build_index(image_folder, d, trained_model, device="cpu", progress=False)
    images = scan_images(image_folder)
    from deephash_faiss.model import file_sha256

    key = pipeline.build_key(file_sha256(trained_model), images.paths, 20, "float32", "pil")
    api.encode_shards(load_model(trained_model), images.paths, images.labels, layout.partial_dir(d, key), 20, 8,
                      torch.device("cpu"), "float32", progress=False, shard_range=range(0, 2))
    rep = api.build_index(image_folder, d, trained_model, device="cpu", progress=False, shard_size=20)
    assert rep.shards_reused == 2 and rep.shards_written == len(images) // 20 + 1 - 2


def test_trace_reports_the_encoders_start(tmp_path, image_folder, trained_model, nvjpeg_on_cpu, monkeypatch, capfd):
    """DHF_TRACE=1: the build's phases and the encoder's start-up events on stderr, in order,
    with the thread; silent otherwise."""
    from deephash_faiss import stream

    api.build_index(image_folder, str(tmp_path / "quiet"), trained_model, device="cpu", progress=False,
                    decoder="nvjpeg")
    assert "dhf-trace" not in capfd.readouterr().err
    monkeypatch.setenv(stream.TRACE_ENV, "1")
    api.build_index(image_folder, str(tmp_path / "nv"), trained_model, device="cpu", progress=False,
                    decoder="nvjpeg", batch_size=4)
    lines = [x for x in capfd.readouterr().err.splitlines() if x.startswith("[dhf-trace")]
    events = [x.split("] ", 1)[1] for x in lines]
    # the build's phases around the encoder's start-up events
    assert events[:5] == ["build starts", f"prepared: {len(api.scan_images(image_folder).paths)} images",
                          "job key done", "model loaded", "model on cpu"]
    assert events[-4:] == ["last batch back", "shard 0 written", "encoded", "finalized"]
    events = events[5:]
    assert events[0].startswith("encode starts") and events[1].startswith("decode pool ready")
    # nvjpeg: few reading threads (their header parsing holds the GIL the decoding thread needs)
    assert events[1] == f"decode pool ready: {min(stream.NVJPEG_READERS, os.cpu_count())} thread workers"
    for want in ("GPU half: files at 0 read and screened", "batch 0 decoded"):
        assert want in events
    assert any(e.startswith("batch 0 queued on the model") for e in events)
    assert events.index("batch 0 decoded") < events.index("batch 1 decoded")
    assert any("dhf-gpu-decode" in x for x in lines)  # the thread that ran it
    times = [float(x.split()[1]) for x in lines]
    assert times == sorted(times)


def test_publish_shards_in_parallel_equals_one_at_a_time(tmp_path):
    """Copies made in threads give the same files (sha256), ids and codes as one at a time."""
    import h5py

    rng = np.random.default_rng(5)
    part = str(tmp_path / "part")
    sizes = [7, 0, 12, 5]
    for s, n in enumerate(sizes):
        layout.write_part(part, s, rng.integers(0, 256, (n, 6), dtype=np.uint8),
                          rng.standard_normal((n, 4)).astype(np.float32), np.arange(n),
                          [f"p{s}-{i}" for i in range(n)], np.zeros(n, np.int32), [])
    out = {}
    for w in (1, 3):
        ix = tmp_path / f"ix{w}"
        ix.mkdir()
        out[w] = layout.publish_shards(str(ix), part, range(4), 100, 1, workers=w)
        for entry in out[w][0]:
            with h5py.File(ix / "shards" / entry["file"], "r") as f:
                assert f["ids"][()].tolist() == list(range(entry["start"], entry["start"] + entry["rows"]))
        assert not [p for p in os.listdir(ix / "shards") if p.startswith(".tmp-")]
    (s1, c1, _, n1), (s3, c3, _, n3) = out[1], out[3]
    assert s1 == s3 and n1 == n3 == 100 + sum(sizes)
    assert [e["start"] for e in s1] == [100, 107, 107, 119]
    assert all(np.array_equal(a, b) for a, b in zip(c1, c3))


def _write_parts(part, sizes, seed=6):
    rng = np.random.default_rng(seed)
    paths = [f"p{i}" for i in range(sum(sizes))]
    for s, n in enumerate(sizes):
        layout.write_part(part, s, rng.integers(0, 256, (n, 6), dtype=np.uint8),
                          rng.standard_normal((n, 4)).astype(np.float32), np.arange(n) + sum(sizes[:s]),
                          paths, np.zeros(len(paths), np.int32), [])


def test_publish_links_shards_whose_ids_are_final_and_copies_the_rest(tmp_path):
    """A partial shard whose ids already are its final row numbers (a build without skips) is
    hard-linked, with the hash noted at write time; one whose ids must change is copied and
    renumbered, and the partial file keeps its ids. Every published file's sha256 is the
    one a fresh hash of its bytes gives."""
    import hashlib

    import h5py

    part = str(tmp_path / "part")
    _write_parts(part, [5, 3])  # ids 0..4 and 5..7: final from start 0
    ix = tmp_path / "ix"
    ix.mkdir()
    shards, codes, _, n = layout.publish_shards(str(ix), part, range(2), 0, 1)
    assert n == 8
    for s, e in enumerate(shards):
        pub, src = ix / "shards" / e["file"], layout.part_files(part, s)[0]
        assert os.stat(pub).st_ino == os.stat(src).st_ino  # linked, not copied
        assert e["sha256"] == hashlib.sha256(pub.read_bytes()).hexdigest()
    ix2 = tmp_path / "ix2"
    ix2.mkdir()
    shards2, codes2, _, _ = layout.publish_shards(str(ix2), part, range(2), 100, 1)  # as `dhf add` does
    for s, e in enumerate(shards2):
        pub, src = ix2 / "shards" / e["file"], layout.part_files(part, s)[0]
        assert os.stat(pub).st_ino != os.stat(src).st_ino
        with h5py.File(pub, "r") as f:
            assert f["ids"][()].tolist() == list(range(e["start"], e["start"] + e["rows"]))
        with h5py.File(src, "r") as f:  # the partial shard is not modified
            assert f["ids"][()].tolist() == list(range(sum([5, 3][:s]), sum([5, 3][:s + 1])))
        assert e["sha256"] == hashlib.sha256(pub.read_bytes()).hexdigest()
    assert all(np.array_equal(a, b) for a, b in zip(codes, codes2))


def test_publish_copies_when_the_hash_note_is_stale_or_links_fail(tmp_path, monkeypatch):
    """No link from a note that no longer describes the file (touched since), and a copy where
    the file system refuses hard links; the hash is then computed from the bytes."""
    import hashlib

    part = str(tmp_path / "part")
    _write_parts(part, [4, 4])
    src0 = layout.part_files(part, 0)[0]
    st = os.stat(src0)
    os.utime(src0, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    real_link = os.link
    calls = []

    def no_link(a, b):
        calls.append(a)
        raise PermissionError("no hard links here")

    monkeypatch.setattr(os, "link", no_link)
    ix = tmp_path / "ix"
    ix.mkdir()
    shards, _, _, _ = layout.publish_shards(str(ix), part, range(2), 0, 1)
    monkeypatch.setattr(os, "link", real_link)
    assert calls == [layout.part_files(part, 1)[0]]  # shard 0's note is stale: not even tried
    for s, e in enumerate(shards):
        pub = ix / "shards" / e["file"]
        assert os.stat(pub).st_ino != os.stat(layout.part_files(part, s)[0]).st_ino
        assert e["sha256"] == hashlib.sha256(pub.read_bytes()).hexdigest()


def test_a_shards_job_keeps_its_position_and_size_in_the_whole_job(tmp_path, monkeypatch):
    """EncodeJob.for_shard (what a Ray actor gets) tells the encoder where its paths sit in the
    whole job and how big the job is: each batch's CUDA layout depends on those alone, so the
    local build, a Ray actor and a resume encode every batch alike."""
    from deephash_faiss import pipeline, stream

    job = pipeline.EncodeJob("m.pt", [f"p{i}" for i in range(25)], np.zeros(25, np.int32), str(tmp_path / "part"),
                             10, 4, "float32")
    assert (job.start, job.job_images) == (0, 25)
    for s in range(job.nshards):
        one = job.for_shard(s)
        assert (one.start, one.job_images, one.bounds(s)) == (job.bounds(s)[0], 25, (0, len(one.paths)))
        assert one.paths == job.paths[slice(*job.bounds(s))]
    seen = []

    def fake_stream(model, paths, device, *a, offset=0, job_size=None, **k):
        seen.append((len(paths), offset, job_size))
        return iter(())

    monkeypatch.setattr(stream, "encode_stream", fake_stream)

    class M:
        class config:
            bits, feature_dim = 48, 4

    pipeline.encode_local(M, job.for_shard(2), [2], "cpu")
    assert seen == [(5, 20, 25)]


def test_model_thread_is_one_per_process_and_remade_after_fork():
    """stream.model_thread: the same executor on every call in a process; a forked child (where
    the parent's thread does not exist) gets its own, and work submitted there runs."""
    import multiprocessing as mp

    from deephash_faiss.stream import model_thread

    assert model_thread() is model_thread()
    assert model_thread().submit(lambda: 7).result(timeout=10) == 7
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_model_thread, args=(q,))
    p.start()
    p.join(30)
    assert p.exitcode == 0 and q.get(timeout=5) == (True, 7)


def _child_model_thread(q):
    from deephash_faiss import stream

    inherited = stream._MODEL_THREADS.get("dhf-model")  # the parent's, copied by the fork (held: no id reuse)
    q.put((inherited is not None and stream.model_thread() is not inherited,
           stream.model_thread().submit(lambda: 7).result(timeout=10)))


def test_shards_are_written_batch_by_batch_while_encoding(tmp_path, monkeypatch):
    """encode_local hands the batches to the writer thread every WRITE_BYTES of features, which
    appends them to the shard's file, so a shard's rows are on their way to disk before its last
    batch; the shards read
    back equal to what the encoder yielded, in order, with the skipped rows left out; a failing
    encoder leaves no temporary file behind."""
    import threading

    from deephash_faiss import store, stream

    rng = np.random.default_rng(4)
    n, dim = 23, 4
    codes, feats = rng.integers(0, 256, (n, 6), dtype=np.uint8), rng.standard_normal((n, dim)).astype(np.float32)
    appended = []
    real_append = store.ShardFile.append

    def spy_append(self, c, f):
        real_append(self, c, f)
        appended.append((threading.current_thread().name, len(c)))

    monkeypatch.setattr(store.ShardFile, "append", spy_append)
    monkeypatch.setattr(pipeline, "WRITE_BYTES", 40)  # every 3 batches of 4 rows x 4 float32
    job = pipeline.EncodeJob("m.pt", [f"p{i}" for i in range(n)], np.arange(n, dtype=np.int32),
                             str(tmp_path / "part"), 10, 4, "float32")
    skipped = {3, 17}
    waited = []

    def fake_stream(model, paths, device, *a, segments=None, fail_at=None, **k):
        for si, (lo, hi) in enumerate(segments):
            for b in range(lo, hi, 4):
                e = min(hi, b + 4)
                if e == hi:  # before a shard's last batch: its first rows were appended already
                    for _ in range(1000):
                        if len(appended) > len(waited):
                            break
                        threading.Event().wait(0.01)
                    waited.append(len(appended))
                if b == fail_at:
                    raise RuntimeError("encoder failed")
                ok = np.array([i for i in range(b, e) if i not in skipped], np.int64)
                yield si, e == hi, ok, codes[ok], feats[ok], [(i, "bad") for i in range(b, e) if i in skipped]

    monkeypatch.setattr(stream, "encode_stream", fake_stream)

    class M:
        class config:
            bits, feature_dim = 48, dim

    assert pipeline.encode_local(M, job, [0, 1, 2], "cpu") == (3, 0)
    assert waited and all(w > 0 for w in waited)
    assert {name for name, _ in appended} == {"dhf-shard-writer_0"}
    for s in range(3):
        lo, hi = job.bounds(s)
        ok = [i for i in range(lo, hi) if i not in skipped]
        got = store.read_shard(layout.part_files(job.part_dir, s)[0])
        assert list(got["ids"]) == ok and np.array_equal(got["codes"], codes[ok])
        assert np.array_equal(got["features"], feats[ok]) and list(got["labels"]) == ok
        assert layout.read_part_skips(job.part_dir, s) == [(f"p{i}", "bad") for i in range(lo, hi) if i in skipped]

    job2 = pipeline.EncodeJob("m.pt", job.paths, job.labels, str(tmp_path / "part2"), 10, 4, "float32")
    monkeypatch.setattr(stream, "encode_stream", lambda *a, **k: fake_stream(*a, **k, fail_at=14))
    with pytest.raises(RuntimeError, match="encoder failed"):
        pipeline.encode_local(M, job2, [0, 1, 2], "cpu")
    left = sorted(os.listdir(job2.part_dir))
    assert not [f for f in left if f.startswith(".tmp-")]
    assert layout.part_complete(job2.part_dir, 0) and not layout.part_complete(job2.part_dir, 1)
