"""Index safety (issue 11): checksums checked on open and before rewriting, one canonical
path form for ``add``/``remove``, ``verify``'s cross-checks, and a validated manifest.

Each test fails on the code before the fix (noted per test)."""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import corpus  # noqa: E402
from clihelp import one_error, run  # noqa: E402

from deephash_faiss import api, maintain  # noqa: E402
from deephash_faiss.errors import DhfError  # noqa: E402
from deephash_faiss.search import Searcher  # noqa: E402


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Images, the index's model, a second model of the same width (other weights), and
    an index built from a *relative* images path (cwd = root), 3 shards."""
    root = tmp_path_factory.mktemp("safety")
    imgs = root / "imgs"
    paths = corpus.plain_images(str(imgs), 5)
    model = corpus.train_tiny_model(str(imgs), str(root / "model.pt"))
    other = corpus.train_tiny_model(str(imgs), str(root / "other.pt"), seed=1)
    idx = str(root / "idx")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        api.build_index("imgs", idx, model, shard_size=4, progress=False, device="cpu")
    finally:
        os.chdir(cwd)
    return dict(root=root, imgs=str(imgs), paths=paths, model=model, other=other, idx=idx)


@pytest.fixture()
def idx(env, tmp_path):
    d = str(tmp_path / "idx")
    shutil.copytree(env["idx"], d)
    return d


def manifest(d):
    return json.load(open(os.path.join(d, "manifest.json")))


def write_manifest(d, m):
    json.dump(m, open(os.path.join(d, "manifest.json"), "w"))


def flip_byte(path, pos):
    data = bytearray(open(path, "rb").read())
    data[pos] ^= 0xFF
    open(path, "wb").write(bytes(data))


def search(env, d, *extra):
    return run("search", "--query", env["paths"][0], "--index", d, "--device", "cpu", "--mode", "bcs", *extra)


def code_index_path(d):
    return os.path.join(d, manifest(d)["index"]["file"])


def flip_a_code(d, row=1):
    """Flip one bit of row ``row``'s code inside the FAISS file: the file still reads and
    has the same size, the results change."""
    from deephash_faiss.index import BinaryIndex, IndexSpec

    m = manifest(d)
    idx = BinaryIndex.load(code_index_path(d), IndexSpec.from_dict(m["index"]), m["bits"])
    stored = maintain.stored_codes(idx)
    raw = open(code_index_path(d), "rb").read()
    # the codes are stored contiguously at the end of an IndexBinaryFlat file
    off = len(raw) - stored.size + row * stored.shape[1]
    assert raw[off:off + stored.shape[1]] == stored[row].tobytes()
    flip_byte(code_index_path(d), off)


# ---------------------------------------------------------------- 1. checks on open

def test_search_refuses_flipped_code_index(env, idx):
    """Before: exit 0 with changed Hamming distances."""
    flip_a_code(idx)
    one_error(search(env, idx), "code index", "checksum", "dhf verify", code=1)
    with pytest.raises(DhfError, match="code index"):
        Searcher(idx, device="cpu")


def test_search_refuses_replaced_model_same_size(env, idx):
    """A model.pt with other weights of the same size: before, exit 0 with other codes."""
    m = manifest(idx)
    target = os.path.join(idx, m["model"]["file"])
    assert os.path.getsize(env["other"]) == os.path.getsize(target)
    shutil.copyfile(env["other"], target)
    one_error(search(env, idx), "model.pt", "not the model the index was built with", code=1)
    s = Searcher(idx, device="cpu")  # searching by codes needs no model: still works
    s.bcs(s.codes()[:2], 3)
    with pytest.raises(DhfError, match="sha256"):
        s.model


def test_search_refuses_resized_shard_and_index(env, idx):
    m = manifest(idx)
    with open(os.path.join(idx, "shards", m["shards"][1]["file"]), "ab") as f:
        f.write(b"\0" * 16)  # HDF5 still reads it
    one_error(search(env, idx), "shard", m["shards"][1]["file"], "bytes", code=1)
    ipath = code_index_path(idx)
    data = open(ipath, "rb").read()
    open(ipath, "wb").write(data + b"\0")
    with pytest.raises(DhfError, match="bytes"):
        Searcher(idx, device="cpu")


def test_full_check_catches_flipped_shard(env, idx):
    m = manifest(idx)
    f = os.path.join(idx, "shards", m["shards"][0]["file"])
    flip_byte(f, -100)  # a feature value: same size, readable
    Searcher(idx, device="cpu")  # the default open does not read shards (documented)
    with pytest.raises(DhfError, match="shard"):
        Searcher(idx, device="cpu", full_check=True)


def test_search_other_model_refused_unless_allowed(env, idx):
    """Before: `--model OTHER.pt` of the same width returned garbage, exit 0."""
    one_error(search(env, idx, "--model", env["other"]), "not the model this index was built with",
              "--allow-other-model", code=1)
    r = search(env, idx, "--model", env["other"], "--allow-other-model")
    assert r.exit_code == 0, r.output
    assert search(env, idx, "--model", env["model"]).exit_code == 0  # the same file elsewhere: fine
    with pytest.raises(DhfError, match="not the model"):
        Searcher(idx, device="cpu", model_path=env["other"])
    s = Searcher(idx, device="cpu", model_path=env["other"], allow_other_model=True)
    assert s.model.config.bits == 16
    from deephash_faiss.model import load_model

    s = Searcher(idx, device="cpu")
    with pytest.raises(DhfError, match="weights differ"):
        s.set_model(load_model(env["other"]))
    s.set_model(load_model(env["model"]))  # same weights
    s.set_model(load_model(env["other"]), allow_other_model=True)


def test_old_manifest_without_sizes_still_opens(env, idx):
    """Indexes written before sizes were recorded keep working (sha256 checks still apply)."""
    m = manifest(idx)
    for e in m["shards"] + [m["index"], m["model"]]:
        e.pop("size", None)
    write_manifest(idx, m)
    assert search(env, idx).exit_code == 0
    assert maintain.verify(idx) == []
    flip_a_code(idx)
    one_error(search(env, idx), "code index", code=1)


# ---------------------------------------------------------------- 2. verify before rewriting

def test_compact_refuses_tampered_shard(env, idx):
    """Before: compact rewrote from the tampered shard and `verify` said OK afterwards."""
    run("remove", idx, "--ids", 0, ok=True)
    f = os.path.join(idx, "shards", manifest(idx)["shards"][1]["file"])
    flip_byte(f, -100)
    gen = manifest(idx)["generation"]
    one_error(run("compact", idx), "shard", "checksum", code=1)
    assert manifest(idx)["generation"] == gen  # nothing committed
    assert any("checksum mismatch" in p for p in maintain.verify(idx))


def test_add_refuses_tampered_code_index(env, idx, tmp_path):
    """Before: add appended to the flipped code index and committed it with a fresh sha256."""
    more = str(tmp_path / "more")
    corpus.plain_images(more, 2, seed=5)
    flip_a_code(idx)
    gen = manifest(idx)["generation"]
    one_error(run("add", idx, more, "-q", "--device", "cpu"), "code index", "checksum", code=1)
    assert manifest(idx)["generation"] == gen
    assert any("code index" in p for p in maintain.verify(idx))


def test_add_refuses_truncated_shard(env, idx, tmp_path):
    more = str(tmp_path / "more")
    corpus.plain_images(more, 2, seed=5)
    f = os.path.join(idx, "shards", manifest(idx)["shards"][0]["file"])
    data = open(f, "rb").read()
    open(f, "wb").write(data[:-10])
    one_error(run("add", idx, more, "-q", "--device", "cpu"), "shard", "bytes", code=1)


# ---------------------------------------------------------------- 3. one path form

def test_paths_stored_absolute_whatever_the_cwd(env):
    """The fixture built from the relative path "imgs": rows hold absolute paths."""
    paths = corpus.read_index(env["idx"])["paths"]
    assert sorted(paths) == sorted(os.path.abspath(p) for p in env["paths"])
    assert all(os.path.isabs(p) for p in paths)


def test_add_from_another_directory_adds_nothing_again(env, idx, tmp_path, monkeypatch):
    """Before: 20 -> 40 rows (every image indexed a second time)."""
    n = manifest(idx)["count"]
    sub = tmp_path / "elsewhere"
    sub.mkdir()
    monkeypatch.chdir(sub)
    rel = os.path.relpath(env["imgs"], sub)
    r = run("add", idx, rel, "-q", "--device", "cpu", ok=True)
    assert "added 0 image" in r.output and f"{n} already indexed" in r.output
    assert manifest(idx)["count"] == n
    # a relative path given to remove is resolved the same way
    gone = os.path.relpath(env["paths"][0], sub)
    assert "removed 1 row" in run("remove", idx, "--paths", gone, ok=True).output


def test_legacy_relative_paths_are_recognised(env, tmp_path, monkeypatch):
    """An index of an older dhf stored paths relative to the build's cwd: `add` from
    another directory still finds them (resolved through the manifest's ``source``)."""
    root = tmp_path / "legacy"
    shutil.copytree(env["imgs"], root / "data" / "imgs")
    rel_paths = [os.path.relpath(p, env["root"]) for p in env["paths"]]  # "imgs/<class>/<file>"
    monkeypatch.chdir(root / "data")
    d = str(tmp_path / "lidx")
    rows = corpus.read_index(env["idx"])
    order = np.argsort(rows["paths"])
    api.index_from_arrays(d, rows["codes"][order], rows["features"][order], labels=rows["labels"][order],
                          paths=sorted(rel_paths), model_path=env["model"])
    m = manifest(d)
    m["source"] = str(root / "data" / "imgs")
    write_manifest(d, m)
    monkeypatch.chdir(tmp_path)
    r = run("add", d, str(root / "data" / "imgs"), "-q", "--device", "cpu", ok=True)
    assert "added 0 image" in r.output and f"{len(rel_paths)} already indexed" in r.output
    assert maintain._legacy_resolve("/h/x/imgs", "../x/imgs/a/1.png") == "/h/x/imgs/a/1.png"
    assert maintain._legacy_resolve("/a/imgs", "imgs/imgs/x.png") == "/a/imgs/imgs/x.png"
    assert maintain._legacy_resolve("/d/p", "../c/x.png") == "/d/p/c/x.png"


# ---------------------------------------------------------------- 4. verify cross-checks

def test_verify_ok_on_a_fresh_index(env):
    assert maintain.verify(env["idx"]) == []


def test_split_shards_verify_and_open(env, tmp_path):
    """`dhf shard` copied the source's code-index sha256 into each part (verify failed on
    every part, and the recorded size made the parts unopenable)."""
    from deephash_faiss.distributed import split_index

    for d in split_index(env["idx"], str(tmp_path / "parts"), 2):
        assert maintain.verify(d) == [], d
        Searcher(d, device="cpu")


def _rewrite_manifest_checksums(d):
    """After a deliberate edit: record the new files' sha256 and sizes, as if a writer made them."""
    from deephash_faiss.model import file_sha256

    m = manifest(d)
    for s in m["shards"]:
        p = os.path.join(d, "shards", s["file"])
        s.update(sha256=file_sha256(p), size=os.path.getsize(p))
    p = os.path.join(d, m["index"]["file"])
    m["index"].update(sha256=file_sha256(p), size=os.path.getsize(p))
    write_manifest(d, m)


def test_verify_cross_checks_code_index_against_shards(env, idx):
    """A code index whose checksum is consistent but whose codes differ from the shards'
    (before: `verify` OK)."""
    flip_a_code(idx, row=5)
    _rewrite_manifest_checksums(idx)
    problems = maintain.verify(idx)
    assert len(problems) == 1 and "1 code(s) differ" in problems[0] and "id 5" in problems[0], problems


@pytest.mark.parametrize("kind", ["hash", "multihash", "buckets"])
def test_verify_cross_checks_every_index_kind(env, tmp_path, kind):
    from deephash_faiss.index import BinaryIndex, IndexSpec

    rows = corpus.read_index(env["idx"])
    d = str(tmp_path / kind)
    spec = IndexSpec(kind=kind, hash_bits=4 if kind == "multihash" else 8)
    api.index_from_arrays(d, rows["codes"], rows["features"], spec=spec, shard_size=7)
    assert maintain.verify(d) == []
    bad = rows["codes"].copy()
    bad[3, 0] ^= 1
    BinaryIndex.build(bad, spec).save(os.path.join(d, "codes.index"))
    _rewrite_manifest_checksums(d)
    problems = maintain.verify(d)
    assert len(problems) == 1 and "differ" in problems[0] and "id 3" in problems[0], problems


def _rewrite_shard(d, j, **changes):
    from deephash_faiss.store import read_shard, write_shard

    m = manifest(d)
    p = os.path.join(d, "shards", m["shards"][j]["file"])
    rows = read_shard(p)
    rows.update(changes)
    write_shard(p, rows["codes"], rows["features"], rows["ids"], rows["paths"], rows["labels"])
    _rewrite_manifest_checksums(d)


def test_verify_cross_checks_ids_and_labels(env, idx):
    """Shard ids not matching the shard's start, labels outside the class list (before: OK)."""
    m = manifest(idx)
    _rewrite_shard(idx, 1, ids=np.arange(m["shards"][1]["rows"], dtype=np.int64))  # starts at 0, not 4
    lab = np.zeros(m["shards"][2]["rows"], np.int32)
    lab[1] = 7
    _rewrite_shard(idx, 2, labels=lab)
    problems = maintain.verify(idx)
    assert any("ids differ from its start 4" in p for p in problems), problems
    assert any("label(s) outside -1..1" in p for p in problems), problems
    assert len(problems) == 2, problems


def test_verify_checks_skip_count(env, idx):
    m = manifest(idx)
    m["skipped"] = 3
    write_manifest(idx, m)
    assert any("skip report" in p and "says 3" in p for p in maintain.verify(idx))


# ---------------------------------------------------------------- 5. validated manifest

@pytest.mark.parametrize("edit, needle", [
    (lambda m: m.update(deleted=[10_000]), "'deleted' holds id 10000, out of range"),
    (lambda m: m.update(deleted=[-1]), "'deleted' holds id -1"),
    (lambda m: m.update(deleted="3"), "'deleted' must be a list"),
    (lambda m: m.pop("shards"), "missing key 'shards'"),
    (lambda m: m["shards"][1].pop("rows"), "missing key 'shards'[1].rows"),
    (lambda m: m["shards"][0].update(file="../../etc/passwd"), "'shards'[0].file"),
    (lambda m: m["shards"][2].update(start=0), "'shards'[2].start"),
    (lambda m: m["index"].pop("file"), "missing key 'index'.file"),
    (lambda m: m.update(index=[]), "key 'index' must be an object"),
    (lambda m: m.update(bits="16"), "key 'bits' must be a positive multiple of 8"),
    (lambda m: m.update(count=-1), "key 'count'"),
    (lambda m: m.update(count=m["count"] + 1), "the shards hold"),
    (lambda m: m.update(feature_dtype="int8"), "'feature_dtype'"),
    (lambda m: m.pop("model"), "missing key 'model'"),
    (lambda m: m["model"].pop("sha256"), "'model'.sha256"),
    (lambda m: m.update(classes=[1, 2]), "'classes'"),
    (lambda m: m.update(version="1"), "'version' must be an integer"),
])
def test_malformed_manifest_is_one_clear_line(env, idx, edit, needle):
    """Before: `unexpected KeyError` / `unexpected IndexError` (or worse, a path outside the index)."""
    m = manifest(idx)
    edit(m)
    write_manifest(idx, m)
    one_error(search(env, idx), "malformed manifest", needle, code=1)
    one_error(run("compact", idx), needle, code=1)
    problems = maintain.verify(idx)
    assert problems and any(needle.lower() in p.lower() for p in problems), problems


def test_verify_lists_every_manifest_problem(env, idx):
    m = manifest(idx)
    m["deleted"] = [99_999]
    m["shards"][0]["rows"] = "x"
    write_manifest(idx, m)
    problems = maintain.verify(idx)
    assert len(problems) == 2 and all(p.startswith("manifest: ") for p in problems), problems
