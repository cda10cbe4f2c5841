"""Bad input never crashes dhf: bad images are skipped with a reason, bad queries, index
directories, models and arguments give one ``Error:`` line and a non-zero exit."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import zipfile

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import corpus  # noqa: E402
from clihelp import one_error, run  # noqa: E402

from deephash_faiss import api, maintain  # noqa: E402
from deephash_faiss.data import decode_image  # noqa: E402


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A corpus of valid-but-odd images, its model, an index without bad files, then
    the bad files added to the same folders and a second index built with them."""
    root = tmp_path_factory.mktemp("rel")
    imgs = str(root / "imgs")
    good = corpus.make_good(imgs)
    model = corpus.train_tiny_model(imgs, str(root / "model.pt"))
    clean = str(root / "idx_clean")
    api.build_index(imgs, clean, model, shard_size=8, progress=False, device="cpu")
    bad = corpus.make_bad(imgs)
    dirty = str(root / "idx_dirty")
    r = run("build-index", imgs, "--model", model, "-o", dirty, "--shard-size", 5, "-q", "--device", "cpu", ok=True)
    return dict(root=root, imgs=imgs, good=good, bad=bad, model=model, clean=clean, dirty=dirty, build_out=r)


# ---------------------------------------------------------------- bad images

def test_bad_files_are_skipped_with_one_line_reasons(env):
    bad, dirty = env["bad"], env["dirty"]
    m = json.load(open(os.path.join(dirty, "manifest.json")))
    report = api.read_skip_report(dirty, m)
    reasons = dict(report)
    assert len(bad.bad) >= 15
    for path, kind in bad.bad.items():
        assert path in reasons, f"{kind} ({path}) not in the skip report"
        assert reasons[path] and "\n" not in reasons[path] and "\t" not in reasons[path]
    assert set(reasons) == set(bad.bad), set(reasons) ^ set(bad.bad)
    raw = open(os.path.join(dirty, m["skipped_file"]), "rb").read().split(b"\n")
    assert len([ln for ln in raw if ln]) == len(bad.bad)  # one line per bad file
    assert all(ln.count(b"\t") == 1 for ln in raw if ln)
    out = env["build_out"].output
    assert f"skipped {len(bad.bad)} bad files" in out and "Traceback" not in out
    assert "loop" in reasons[[p for p, k in bad.bad.items() if k == "symlink loop (file)"][0]]
    assert "bomb" in reasons[[p for p, k in bad.bad.items() if k == "decompression bomb (warning)"][0]]


def test_valid_images_identical_with_and_without_bad_files(env):
    a, b = corpus.read_index(env["clean"]), corpus.read_index(env["dirty"])
    assert a["count"] == b["count"] == len(env["good"].good)
    assert sorted(a["paths"]) == sorted(env["good"].good)
    assert a["paths"] == b["paths"]
    np.testing.assert_array_equal(a["codes"], b["codes"])
    # features: equal up to float32 rounding. The bad files change how the good ones are
    # batched, and CPU convolution kernels are not bit-identical across batch sizes.
    np.testing.assert_allclose(a["features"], b["features"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a["labels"], b["labels"])
    q = slice(0, len(a["codes"]), 3)
    qf = a["features"][q].astype(np.float32)
    assert corpus.search_all(env["clean"], a["codes"][q], qf, 7) == corpus.search_all(env["dirty"], a["codes"][q], qf, 7)
    # searching by an image through the CLI gives the same JSON in both indexes
    qimg = env["good"].good[3]
    ra = json.loads(run("search", "--query", qimg, "--index", env["clean"], "--json", "--device", "cpu",
                        ok=True).stdout)[0]
    rb = json.loads(run("search", "--query", qimg, "--index", env["dirty"], "--json", "--device", "cpu",
                        ok=True).stdout)[0]
    assert [r["path"] for r in ra["results"]] == [r["path"] for r in rb["results"]]
    assert maintain.verify(env["dirty"]) == []


def test_odd_but_valid_images_decode(env):
    for p in env["good"].good:
        arr = decode_image(p, 24)
        assert arr.shape == (24, 24, 3) and arr.dtype == np.uint8


def test_extreme_aspect_ratio_does_not_blow_memory(tmp_path):
    from PIL import Image

    p = str(tmp_path / "strip.png")
    Image.new("RGB", (200_000, 1), (10, 200, 30)).save(p)
    arr = decode_image(p, 224)  # resize-then-crop would need 44.8 M pixels
    assert arr.shape == (224, 224, 3) and tuple(arr[0, 0]) == (10, 200, 30)


def test_unreadable_file(tmp_path, monkeypatch):
    """chmod 000: as root permissions do not block reads, so the real case is skipped and
    the PermissionError path is exercised by simulation."""
    from PIL import Image

    p = str(tmp_path / "x.png")
    Image.new("RGB", (8, 8)).save(p)
    real_open = Image.open

    def deny(path, *a, **kw):
        if os.fspath(path) == p:
            raise PermissionError(13, "Permission denied", p)
        return real_open(path, *a, **kw)

    from deephash_faiss import data

    monkeypatch.setattr(data, "_AS_IS", [False])  # PIL opens the path itself
    monkeypatch.setattr(Image, "open", deny)
    with pytest.raises(Exception, match="permission denied"):
        decode_image(p, 8)

    # where decode_image reads the file itself (the as-is JPEG path), the same message
    monkeypatch.setattr(data, "_AS_IS", [True])
    real_builtin_open = open

    def deny_read(path, *a, **kw):
        if os.fspath(path) == p:
            raise PermissionError(13, "Permission denied", p)
        return real_builtin_open(path, *a, **kw)

    monkeypatch.setattr(data, "open", deny_read, raising=False)
    with pytest.raises(Exception, match="permission denied"):
        decode_image(p, 8)


@pytest.mark.skipif(corpus.running_as_root(), reason="running as root: chmod 000 does not block reads")
def test_unreadable_file_real(tmp_path):
    from PIL import Image

    p = str(tmp_path / "x.png")
    Image.new("RGB", (8, 8)).save(p)
    os.chmod(p, 0)
    try:
        with pytest.raises(Exception, match="permission denied"):
            decode_image(p, 8)
    finally:
        os.chmod(p, 0o644)


# ---------------------------------------------------------------- bad queries

def test_bad_queries(env, tmp_path):
    idx = env["clean"]
    corrupt = [p for p, k in env["bad"].bad.items() if k == "truncated JPEG"][0]
    one_error(run("search", "--query", corrupt, "--index", idx), "truncated")
    text = [p for p, k in env["bad"].bad.items() if k == "text named .jpg"][0]
    one_error(run("search", "--query", text, "--index", idx), "not an image")
    one_error(run("search", "--query", str(tmp_path / "nope.jpg"), "--index", idx), "no such file")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    one_error(run("search", "--query", str(tmp_path / "empty"), "--index", idx), "no images")
    bomb = [p for p, k in env["bad"].bad.items() if k == "decompression bomb (error)"][0]
    one_error(run("search", "--query", bomb, "--index", idx), "too large")


def test_bad_arguments(env):
    idx, q = env["clean"], env["good"].good[0]
    one_error(run("search", "--query", q, "--index", idx, "-k", 0), "k must be at least 1")
    one_error(run("search", "--query", q, "--index", idx, "-k", -3), "k must be at least 1")
    one_error(run("search", "--query", q, "--index", idx, "--radius", -1), "radius")
    one_error(run("search", "--query", q, "--index", idx, "-k", 10_000), "larger than the index")
    one_error(run("search", "--query", q, "--index", idx, "--max-candidates", 0), "max-candidates")
    one_error(run("build-index", env["imgs"], "--model", env["model"], "-o", str(env["root"] / "x"),
                  "--shard-size", 0), "shard-size")
    one_error(run("remove", idx), "--paths or --ids")


# ---------------------------------------------------------------- bad index directories

@pytest.fixture()
def idx_copy(env, tmp_path):
    d = str(tmp_path / "idx")
    shutil.copytree(env["clean"], d)
    return d


def _manifest(d):
    return json.load(open(os.path.join(d, "manifest.json")))


def _search(env, d, *extra):
    return run("search", "--query", env["good"].good[0], "--index", d, "--device", "cpu", *extra)


def test_missing_index_dir(env, tmp_path):
    one_error(_search(env, str(tmp_path / "nope")), "no such index directory")
    (tmp_path / "empty").mkdir()
    one_error(_search(env, str(tmp_path / "empty")), "not a dhf index")
    one_error(run("info", str(tmp_path / "nope")), "no such index directory")
    r = run("verify", str(tmp_path / "nope"))
    assert r.exit_code == 1 and "no such index directory" in r.output


def test_truncated_shard(env, idx_copy):
    f = os.path.join(idx_copy, "shards", _manifest(idx_copy)["shards"][0]["file"])
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 3])
    one_error(_search(env, idx_copy), "shard")
    r = run("verify", idx_copy)
    assert r.exit_code == 1 and "checksum mismatch" in r.output


def test_tampered_shard_detected_by_verify(env, idx_copy):
    f = os.path.join(idx_copy, "shards", _manifest(idx_copy)["shards"][1]["file"])
    data = bytearray(open(f, "rb").read())
    data[-100] ^= 0xFF  # a feature value changes: HDF5 still reads it
    open(f, "wb").write(bytes(data))
    r = run("verify", idx_copy)
    assert r.exit_code == 1 and "checksum mismatch" in r.output and "Traceback" not in r.output


def test_missing_shard(env, idx_copy):
    os.unlink(os.path.join(idx_copy, "shards", _manifest(idx_copy)["shards"][-1]["file"]))
    one_error(_search(env, idx_copy), "shard")
    assert "missing" in run("verify", idx_copy).output


def test_truncated_code_index(env, idx_copy):
    f = os.path.join(idx_copy, _manifest(idx_copy)["index"]["file"])
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 2])
    one_error(_search(env, idx_copy), "code index")
    assert "code index" in run("verify", idx_copy).output


def test_newer_manifest_version(env, idx_copy):
    m = _manifest(idx_copy)
    m["version"] = 99
    json.dump(m, open(os.path.join(idx_copy, "manifest.json"), "w"))
    one_error(_search(env, idx_copy), "version 99")
    one_error(run("add", idx_copy, env["imgs"]), "version 99")
    # a build into it refuses to overwrite what it cannot read
    one_error(run("build-index", env["imgs"], "--model", env["model"], "-o", idx_copy, "-q"), "refusing")
    assert run("verify", idx_copy).exit_code == 1


def test_garbage_manifest(env, idx_copy):
    open(os.path.join(idx_copy, "manifest.json"), "w").write("{not json")
    one_error(_search(env, idx_copy), "cannot read")


def test_model_bit_mismatch(env, idx_copy, tmp_path):
    other = corpus.train_tiny_model(env["imgs"], str(tmp_path / "m32.pt"), bits=32)
    one_error(_search(env, idx_copy, "--model", other), "bit")
    one_error(run("add", idx_copy, env["imgs"], "--model", other), "not the model")


def test_features_of_wrong_dimension(env, tmp_path):
    d = str(tmp_path / "arr")
    rng = np.random.default_rng(0)
    api.index_from_arrays(d, rng.integers(0, 256, (20, 2), dtype=np.uint8), rng.random((20, 7), np.float32),
                          model_path=env["model"])
    one_error(_search(env, d), "feature")
    assert any("feature" in p for p in maintain.verify(d))


def test_model_replaced_in_index(env, idx_copy):
    m = _manifest(idx_copy)
    open(os.path.join(idx_copy, m["model"]["file"]), "wb").write(b"not a model")
    one_error(_search(env, idx_copy), "model.pt", "replaced")  # refused before it is unpickled
    assert "sha256 differs" in run("verify", idx_copy).output


# ---------------------------------------------------------------- bad models

def test_bad_model_files(env, tmp_path):
    txt = tmp_path / "model.txt"
    txt.write_text("hello")
    zp = tmp_path / "random.zip"
    with zipfile.ZipFile(zp, "w") as z:
        z.writestr("a/data.pkl", b"\x80\x04garbage")
    for bad in (txt, zp, tmp_path / "missing.pt"):
        one_error(run("search", "--query", env["good"].good[0], "--index", env["clean"], "--model", bad))
        one_error(run("build-index", env["imgs"], "--model", bad, "-o", str(tmp_path / "o"), "-q"))


def test_checkpoint_of_another_backbone(env, tmp_path):
    obj = torch.load(env["model"], weights_only=True)
    obj["config"]["backbone"] = "alexnet"  # smallcnn weights claiming to be alexnet
    p = str(tmp_path / "alex.pt")
    torch.save(obj, p)
    one_error(run("build-index", env["imgs"], "--model", p, "-o", str(tmp_path / "o"), "-q"), "alexnet")
    obj["config"]["backbone"] = "nonexistent_net"
    torch.save(obj, p)
    one_error(run("search", "--query", env["good"].good[0], "--index", env["clean"], "--model", p), "backbone")


class _Evil:
    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_refused(env, tmp_path, idx_copy):
    marker = str(tmp_path / "PWNED")
    evil = _Evil()
    evil.marker = marker
    p = str(tmp_path / "evil.pt")
    torch.save({"format": "x", "payload": evil}, p)
    assert not os.path.exists(marker)
    one_error(run("search", "--query", env["good"].good[0], "--index", env["clean"], "--model", p),
              "not a loadable dhf model")
    one_error(run("build-index", env["imgs"], "--model", p, "-o", str(tmp_path / "o"), "-q"))
    one_error(run("train", env["imgs"], "--resume", p, "-o", str(tmp_path / "t.pt"), "--backbone", "smallcnn",
                  "--weights", "none", "-q"))
    shutil.copyfile(p, os.path.join(idx_copy, _manifest(idx_copy)["model"]["file"]))  # planted in an index
    one_error(_search(env, idx_copy))
    assert not os.path.exists(marker), "unpickling ran code"


def test_debug_shows_traceback(env, tmp_path):
    r = run("--debug", "search", "--query", str(tmp_path / "nope.jpg"), "--index", env["clean"])
    assert r.exit_code == 1 and "Traceback" in r.stderr and "Error: no such file" in r.stderr


# ---------------------------------------------------------------- verify, add, remove, compact

def test_verify_ok(env):
    r = run("verify", env["clean"], ok=True)
    assert r.output.startswith("OK")


def test_add_remove_compact_cycle(env, tmp_path):
    d = str(tmp_path / "idx")
    shutil.copytree(env["clean"], d)
    before = corpus.read_index(d)
    more = str(tmp_path / "more")
    new = corpus.plain_images(more, 3, seed=7)
    corpus.make_bad(more)  # bad files in the added folder are skipped too
    r = run("add", d, more, "--shard-size", 4, "-q", "--device", "cpu", ok=True)
    assert f"added {len(new)} images" in r.output and "0 already indexed" in r.output
    after = corpus.read_index(d)
    assert after["count"] == before["count"] + len(new)
    np.testing.assert_array_equal(after["codes"][: before["count"]], before["codes"])
    assert after["paths"][before["count"]:] == new
    assert run("verify", d, ok=True).output.startswith("OK")
    # again: nothing new, every path already indexed
    r = run("add", d, more, "-q", "--device", "cpu", ok=True)
    assert "added 0 images" in r.output and f"{len(new)} already indexed" in r.output
    # the same images encoded by a fresh build give the same codes as the added rows
    solo = str(tmp_path / "solo")
    api.build_index(more, solo, env["model"], progress=False, device="cpu")
    np.testing.assert_array_equal(corpus.read_index(solo)["codes"], after["codes"][before["count"]:])
    # remove by path and id: hidden from all modes
    gone_path, gone_id = new[0], 2
    r = run("remove", d, "--paths", gone_path, "--ids", gone_id, ok=True)
    assert "removed 2 rows" in r.output
    gone = {after["paths"].index(gone_path), gone_id}
    q = after["codes"][sorted(gone)]
    qf = after["features"][sorted(gone)].astype(np.float32)
    res = corpus.search_all(d, q, qf, k=after["count"])
    gone_paths = {after["paths"][i] for i in gone}
    for mode, lists in res.items():
        for lst in lists:
            assert not gone_paths & set(lst), mode
            assert len(lst) == after["count"] - 2
    one_error(run("remove", d, "--ids", gone_id), "already removed")
    one_error(run("remove", d, "--paths", str(tmp_path / "never.png")), "not in the index")
    one_error(run("remove", d, "--ids", 10_000), "not in the index")
    # a removed path can be added again
    assert "added 1 image " in run("add", d, more, "-q", "--device", "cpu", ok=True).output
    run("remove", d, "--paths", gone_path, ok=True)
    # compact drops them physically, results by path are unchanged
    before_compact = corpus.search_all(d, q, qf, k=after["count"] - 2)
    r = run("compact", d, ok=True)
    assert "dropped 3" in r.output
    c = corpus.read_index(d)
    assert c["count"] == after["count"] + 1 - 3 and c["deleted"] == []
    assert gone_paths.isdisjoint(c["paths"])
    assert corpus.search_all(d, q, qf, k=after["count"] - 2) == before_compact
    assert run("verify", d, ok=True).output.startswith("OK")


def test_writer_lock(env, idx_copy):
    with api.IndexLock(idx_copy):
        one_error(run("remove", idx_copy, "--ids", 0), "lock")
    run("remove", idx_copy, "--ids", 0, ok=True)
