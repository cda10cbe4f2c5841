"""The HDS fine index as part of an index directory (``dhf fine-index``, manifest ``fine``):
saved and loaded through the on-disk contract, kept correct by add / remove / compact, checked
by verify and on open, reached from the CLI and the service.

Reference everywhere: brute-force numpy exact HDS (every live row at Hamming distance <
radius, ranked by squared L2, ties by id)."""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest

from deephash_faiss import api
from deephash_faiss.errors import DhfError
from deephash_faiss.fine import FineIndex, FineParams, default_probe
from deephash_faiss.index import BinaryIndex, IndexSpec
from deephash_faiss.maintain import add_images, build_fine, compact, remove, verify
from deephash_faiss.search import Searcher
from deephash_faiss.store import read_manifest, write_manifest

sys.path.insert(0, os.path.dirname(__file__))
from clihelp import run  # noqa: E402
from reference import exact_hds  # noqa: E402

RECALL_BOUND = 0.95  # recall@10 of ivf HDS at nprobe 8 x cell 256 against exact HDS on _data(seed 0)
ALL = 10**6  # nprobe that probes every list


def _data(seed=0, n=20_000, dim=32, nq=40):
    """Supervised-like codes (6 frequent codes + a tail of neighbours) and clustered features."""
    rng = np.random.default_rng(seed)
    codes_u = rng.integers(0, 256, (6, 2), dtype=np.uint8)
    lab = rng.choice(6, n, p=[0.4, 0.3, 0.15, 0.1, 0.04, 0.01])
    codes = codes_u[lab].copy()
    codes[rng.random(n) < 0.05, 0] ^= 1
    centres = rng.standard_normal((6, 40, dim)).astype(np.float32) * 2
    feats = centres[lab, rng.integers(0, 40, n)] + rng.standard_normal((n, dim)).astype(np.float32)
    qi = rng.integers(0, n, nq)
    qf = feats[qi] + 0.3 * rng.standard_normal((nq, dim)).astype(np.float32)
    return codes, feats, codes[qi], qf


def assert_same_topk(ref, results, k):
    """Same ids as the reference top k where the k-th distance is not tied with the next."""
    checked = 0
    for (ids, d), r in zip(ref, results):
        if len(ids) < k:
            continue
        if len(ids) > k and d[k] - d[k - 1] < 1e-3 * d[k] + 1e-4:  # float32 L2 error
            continue
        checked += 1
        assert set(ids[:k].tolist()) == set(np.asarray(r.ids).tolist())
        np.testing.assert_allclose(np.sort(r.distance), d[:k], rtol=1e-3, atol=1e-4)
    assert checked >= len(ref) // 2


def recall(ref, results, k=10):
    return float(np.mean([len(np.intersect1d(ids[:k], r.ids)) / min(k, len(ids)) for (ids, _), r in zip(ref, results)]))


@pytest.fixture
def ivf_everywhere(monkeypatch):
    """Rank every pool with the fine index (no small-pool exact path) so the tests reach it."""
    monkeypatch.setattr(FineParams, "exact_max", 0)


@pytest.fixture
def arrays_index(tmp_path):
    codes, feats, qc, qf = _data()
    d = str(tmp_path / "idx")
    api.index_from_arrays(d, codes, feats, shard_size=7000)
    return d, codes, feats, qc, qf


def test_saved_fine_index_round_trip(arrays_index, ivf_everywhere):
    d, codes, feats, qc, qf = arrays_index
    rep = build_fine(d, cell_size=256)
    m = read_manifest(d)
    fe = m["fine"]
    assert fe["file"] == rep.file and fe["rows"] == len(codes) and fe["lists"] == rep.lists > 6
    assert fe["size"] == os.path.getsize(os.path.join(d, fe["file"]))
    assert fe["index_sha256"] == m["index"]["sha256"]
    with open(os.path.join(d, ".dhf-files")) as f:
        assert fe["file"] in f.read().split()
    assert verify(d) == []
    none = np.zeros(len(codes), bool)
    ref = exact_hds(codes, feats, none, qc, qf, 3)
    s = Searcher(d)
    b = s.hds(qc, qf, 10, 3)  # auto: the saved fine index
    assert b.extra["hds_mode"] == "ivf" and set(b.extra["query_modes"]) == {"ivf"}
    assert (b.extra["nprobe"], b.extra["refine"]) == default_probe(len(codes))  # 20,000 rows: the small-index rule
    assert recall(ref, b.results) >= RECALL_BOUND
    # the same index built in memory gives the same results (what was saved is what is searched)
    s2 = Searcher(d, hds_mode="ivf")
    s2._fine_tried = True
    s2.build_fine_index(cell_size=256)
    b2 = s2.hds(qc, qf, 10, 3)
    assert all(np.array_equal(x.ids, y.ids) for x, y in zip(b.results, b2.results))
    # probing everything and refining the whole pool is exact HDS
    full = s.hds(qc, qf, 10, 3, nprobe=ALL, refine=len(codes))
    assert_same_topk(ref, full.results, 10)
    assert s.hds(qc, qf, 10, 3, hds_mode="exact").extra["hds_mode"] == "exact"


def test_fine_index_tampered_is_refused(arrays_index):
    d, codes, feats, qc, qf = arrays_index
    build_fine(d, cell_size=256)
    path = os.path.join(d, read_manifest(d)["fine"]["file"])
    with open(path, "r+b") as f:  # same size, one byte changed
        f.seek(os.path.getsize(path) - 5)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(DhfError, match="fine index .* checksum"):
        Searcher(d)
    assert any("fine index" in p and "checksum" in p for p in verify(d))
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(DhfError, match="fine index .* bytes"):
        Searcher(d)


def test_stale_fine_index_never_served(arrays_index):
    d, codes, feats, qc, qf = arrays_index
    build_fine(d, cell_size=256)
    m = read_manifest(d)
    m["fine"]["index_sha256"] = "0" * 64  # made for another code index (e.g. an older dhf rewrote it)
    write_manifest(d, m)
    s = Searcher(d)
    b = s.hds(qc, qf, 10, 3)
    assert b.extra["hds_mode"] == "exact" and "not used" in b.extra["fine"]
    with pytest.raises(DhfError, match="not usable"):
        s.hds(qc, qf, 10, 3, hds_mode="ivf")
    assert any("another code index" in p for p in verify(d))


def test_fine_index_after_remove_and_compact(arrays_index, ivf_everywhere):
    d, codes, feats, qc, qf = arrays_index
    build_fine(d, cell_size=256)
    gone = np.arange(0, len(codes), 3)
    remove(d, ids=gone.tolist())
    deleted = np.zeros(len(codes), bool)
    deleted[gone] = True
    assert verify(d) == []
    s = Searcher(d)
    full = s.hds(qc, qf, 10, 3, nprobe=ALL, refine=len(codes))
    assert full.extra["hds_mode"] == "ivf"
    assert not any(deleted[r.ids].any() for r in full.results)
    assert_same_topk(exact_hds(codes, feats, deleted, qc, qf, 3), full.results, 10)
    assert recall(exact_hds(codes, feats, deleted, qc, qf, 3), s.hds(qc, qf, 10, 3).results) >= RECALL_BOUND
    logs = []
    compact(d, log=logs.append)
    assert any("fine index: renumbered" in x for x in logs)
    m = read_manifest(d)
    assert m["fine"]["rows"] == m["count"] == int((~deleted).sum())
    assert verify(d) == []
    keep = ~deleted
    s = Searcher(d)
    full = s.hds(qc, qf, 10, 3, nprobe=ALL, refine=len(codes))
    assert full.extra["hds_mode"] == "ivf"
    assert_same_topk(exact_hds(codes[keep], feats[keep], np.zeros(keep.sum(), bool), qc, qf, 3),
                     full.results, 10)


@pytest.fixture(scope="module")
def two_class_index(image_folder, trained_model, tmp_path_factory):
    """An index of two classes of ``image_folder`` (the third is added by the test)."""
    base = tmp_path_factory.mktemp("fineadd")
    first = base / "first"
    for c in ("red", "green"):
        shutil.copytree(os.path.join(image_folder, c), first / c)
    d = str(base / "idx")
    api.build_index(str(first), d, trained_model, shard_size=20, device="cpu", progress=False)
    return d, os.path.join(image_folder, "blue")


def _reference_from_index(d, qc, qf, k, radius):
    s = Searcher(d)
    codes, feats = s.codes(), s.store.load_features().astype(np.float32)
    deleted = s.index.deleted if s.index.deleted is not None else np.zeros(len(codes), bool)
    return exact_hds(codes, feats, deleted, qc, qf, radius)


def test_fine_index_after_add(two_class_index, tmp_path, ivf_everywhere):
    src, blue = two_class_index
    d = str(tmp_path / "idx")
    shutil.copytree(src, d)
    build_fine(d, cell_size=8)
    n0 = read_manifest(d)["count"]
    logs = []
    add_images(d, blue, device="cpu", progress=False, log=logs.append)
    m = read_manifest(d)
    assert m["count"] == n0 + 24 and m["fine"]["rows"] == m["count"]
    assert any("fine index: 24 row(s) added" in x for x in logs)
    assert verify(d) == []
    s = Searcher(d)
    codes, feats = s.codes(), s.store.load_features().astype(np.float32)
    qi = np.arange(0, m["count"], 5)
    qc, qf = codes[qi], feats[qi] + 0.01
    full = s.hds(qc, qf, 5, 3, nprobe=ALL, refine=m["count"])
    assert full.extra["hds_mode"] == "ivf"
    assert_same_topk(_reference_from_index(d, qc, qf, 5, 3), full.results, 5)


def test_add_drops_an_unreadable_fine_index(two_class_index, tmp_path):
    src, blue = two_class_index
    d = str(tmp_path / "idx")
    shutil.copytree(src, d)
    build_fine(d, cell_size=8)
    with open(os.path.join(d, read_manifest(d)["fine"]["file"]), "r+b") as f:
        f.write(b"garbage!")
    logs = []
    add_images(d, blue, device="cpu", progress=False, log=logs.append)
    assert "fine" not in read_manifest(d)
    assert any(x.startswith("fine index dropped:") for x in logs)
    assert verify(d) == []


# ---------------------------------------------------------------- CLI


def fine_line(d):
    (line,) = [x for x in run("info", d).output.splitlines() if x.startswith("fine ")]
    return line


def test_cli_fine_index_search_info_verify(two_class_index, image_folder, tmp_path, ivf_everywhere):
    src, _ = two_class_index
    d = str(tmp_path / "idx")
    shutil.copytree(src, d)
    q = os.path.join(image_folder, "red", "000.png")
    r = run("search", "--index", d, "--query", q, "--hds-mode", "ivf", "--device", "cpu", "-q")
    assert r.exit_code == 1 and "has no usable fine index" in r.output and "dhf fine-index" in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert "none" in fine_line(d)
    r = run("fine-index", d, "--cell-size", "8", "--storage", "fp16")
    assert r.exit_code == 0 and "built the fine index" in r.output and "fp16" in r.output, r.output
    assert "fp16 lists" in fine_line(d) and "cell size 8" in fine_line(d)
    assert run("verify", d).output.startswith("OK")
    r = run("search", "--index", d, "--query", q, "--json", "--device", "cpu", "-q", "-k", "5",
            "--nprobe", "2", "--refine", "20", "--max-candidates", "10")
    assert r.exit_code == 0, r.output
    (o,) = json.loads(r.stdout)
    assert o["hds_mode"] == "ivf" and o["truncated"] is True and o["examined"] <= 48 and len(o["results"]) == 5
    r = run("search", "--index", d, "--query", q, "--json", "--device", "cpu", "-q", "-k", "5", "--hds-mode", "exact")
    (o,) = json.loads(r.stdout)
    assert o["hds_mode"] == "exact" and o["truncated"] is False
    for opt, msg in (("--nprobe", "nprobe must be at least 1 (--nprobe)"),
                     ("--refine", "refine must be at least 1 (--refine)")):
        r = run("search", "--index", d, "--query", q, opt, "0", "--device", "cpu", "-q")
        assert r.exit_code == 1 and r.output.strip() == f"Error: {msg}", r.output
    r = run("fine-index", d, "--cell-size", "0")
    assert r.exit_code == 1 and r.output.strip() == "Error: the cell size must be at least 1 (--cell-size)"
    assert run("fine-index", d, "--drop").exit_code == 0
    assert "none" in fine_line(d)
    assert run("verify", d).output.startswith("OK")


# ---------------------------------------------------------------- service


def test_service_hds_parameters(two_class_index, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from deephash_faiss.serve import create_app

    src, _ = two_class_index
    d = str(tmp_path / "idx")
    shutil.copytree(src, d)
    with TestClient(create_app(d, device="cpu"), base_url="http://127.0.0.1") as c:
        r = c.post("/search", json={"id": 0, "mode": "hds", "hds_mode": "ivf"})
        assert r.status_code == 422 and "needs a fine index" in r.json()["detail"]
        body = c.post("/search", json={"id": 0, "mode": "hds", "k": 5}).json()
        assert body["hds_mode"] == "exact"
    build_fine(d, cell_size=8)
    with TestClient(create_app(d, device="cpu"), base_url="http://127.0.0.1") as c:
        assert c.get("/info").json()["fine_index"] is True
        body = c.post("/search", json={"id": 0, "mode": "hds", "k": 5, "hds_mode": "ivf", "nprobe": 2,
                                       "refine": 20}).json()
        assert body["hds_mode"] in ("ivf", "exact") and body["nprobe"] == 2 and body["refine"] == 20
        assert "truncated" in body and len(body["results"]) == 5
        for key, val, msg in (("nprobe", 0, "nprobe must be at least 1"), ("refine", -1, "refine must be at least 1"),
                              ("hds_mode", "fast", "unknown hds_mode")):
            r = c.post("/search", json={"id": 0, "mode": "hds", key: val})
            assert r.status_code == 422 and r.json()["detail"].startswith(msg), r.json()


def _small_pools_index(tmp_path, seed, n_codes, nq):
    """An index of 4,000 rows over ``n_codes`` distinct 16-bit codes with a fine index of 16-row
    cells, and ``nq`` queries near its rows: (index dir, codes (nq, 2) uint8, features (nq, 16) float32)."""
    rng = np.random.default_rng(seed)
    n, dim = 4000, 16
    base = rng.integers(0, 256, (n_codes, 2), dtype=np.uint8)
    codes = base[rng.integers(0, n_codes, n)]
    feats = rng.standard_normal((n, dim)).astype(np.float32)
    d = str(tmp_path / "idx")
    api.index_from_arrays(d, codes, feats, shard_size=1500)
    build_fine(d, cell_size=16)
    qi = rng.integers(0, n, nq)
    return d, codes[qi], feats[qi] + 0.1 * rng.standard_normal((nq, dim)).astype(np.float32)


def test_ivf_small_pools_equal_the_exact_path(tmp_path):
    """In ivf mode, pools of at most exact_max rows are ranked whole (reported as exact): the
    same ids, Hamming and L2 as exact HDS, pools of fewer than k rows topped up to k."""
    d, qc, qf = _small_pools_index(tmp_path, 3, 400, 60)  # many codes: pools of a few dozen rows
    s = Searcher(d, features_in_memory=True)
    k = 8
    raw = s.fine_index().search(qc, qf, k, 2, s.store.features_in_ram())
    assert sum(o[2] < k for o in raw) >= 10  # pools of fewer than k rows
    ivf = s.hds(qc, qf, k, 2, hds_mode="ivf")
    exact = s.hds(qc, qf, k, 2, hds_mode="exact")
    modes = ivf.extra["query_modes"]
    assert modes.count("exact") > 30  # most pools are small here
    for m_, a, b in zip(modes, ivf.results, exact.results):
        if m_ == "exact":
            np.testing.assert_array_equal(a.ids, b.ids)
            np.testing.assert_array_equal(a.hamming, b.hamming)
            np.testing.assert_allclose(a.distance, b.distance, rtol=1e-5, atol=1e-5)
            assert len(a.ids) == k  # topped up where the pool held fewer than k rows


def test_cpu_searcher_splits_large_ivf_batches_over_threads(tmp_path, monkeypatch):
    """A CPU Searcher with its features in RAM hands large ivf HDS batches to search.hds_ivf
    without the GPU callback, so they are split over threads; the results are those of one call."""
    from deephash_faiss import search as search_mod

    d, qc, qf = _small_pools_index(tmp_path, 4, 40, 80)
    s = Searcher(d, device="cpu", features_in_memory=True)
    calls = []
    one = search_mod._hds_ivf_one
    monkeypatch.setattr(search_mod, "_hds_ivf_one", lambda f, c, *a: calls.append(len(c)) or one(f, c, *a))
    monkeypatch.setattr(search_mod, "HDS_THREAD_MIN_QUERIES", 10 ** 9)
    whole = s.hds(qc, qf, 10, 2, hds_mode="ivf", nprobe=ALL)
    assert calls == [80]
    monkeypatch.setattr(search_mod, "HDS_THREAD_MIN_QUERIES", 20)
    import faiss

    monkeypatch.setattr(faiss, "omp_get_max_threads", lambda: 2)  # two threads on any machine
    split = s.hds(qc, qf, 10, 2, hds_mode="ivf", nprobe=ALL)
    assert len(calls) == 3 and sum(calls[1:]) == 80
    assert whole.extra["query_modes"] == split.extra["query_modes"]
    for a, b in zip(whole.results, split.results):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.distance, b.distance)


@pytest.mark.parametrize("max_candidates", [None, 40])
def test_fine_search_of_a_batch_equals_single_query_searches(max_candidates):
    """FineIndex.search of a batch (queries sharing collapsed codes, a GEMM per block of codes,
    each query's reached lists sorted by centroid distance) gives every query what it gets
    searched alone and with one distinct code a block: the same ids, distances, pool and
    examined rows, truncated and exact flags."""
    codes, feats, qc, qf = _data(n=6000, nq=40)
    qc, qf = np.concatenate([qc, qc[:10]]), np.concatenate([qf, qf[:10] + 0.5])  # repeated codes
    fine = FineIndex.build(BinaryIndex.build(codes, IndexSpec("buckets")), feats, cell_size=32)
    p = FineParams(nprobe=3, refine=30, exact_max=0)
    batch = fine.search(qc, qf, 10, 3, feats, p, max_candidates=max_candidates)
    tiny = fine.search(qc, qf, 10, 3, feats, p, max_candidates=max_candidates, block_elems=1)
    alone = [fine.search(qc[i:i + 1], qf[i:i + 1], 10, 3, feats, p, max_candidates=max_candidates)[0]
             for i in range(len(qc))]
    assert 1 < len(np.unique(qc, axis=0)) < len(qc) // 4  # few distinct codes, shared
    assert sum(o[3] < o[2] for o in batch) > len(qc) // 2  # most pools are cut by the probing
    assert any(o[4] for o in batch) == (max_candidates is not None)
    for o, t, a in zip(batch, tiny, alone):
        for other in (t, a):
            np.testing.assert_array_equal(o[0], other[0])
            np.testing.assert_array_equal(o[1], other[1])
            assert o[2:] == other[2:]
