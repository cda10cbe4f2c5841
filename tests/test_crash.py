"""kill -9 during build-index / add / compact: the previous index stays intact and
searchable, a rerun resumes (reusing complete shards) and ends with the same index as
an uninterrupted run. Readers during `dhf add` see the old or the new generation.

Kill points come from the ``DHF_TEST_CRASH_AT`` hook (:func:`deephash_faiss.api.crash_point`,
a real SIGKILL of the process at that line); one test kills from outside at a random time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import corpus  # noqa: E402
from clihelp import run  # noqa: E402

from deephash_faiss import api, maintain  # noqa: E402
from deephash_faiss.search import Searcher  # noqa: E402

SHARD = 6


def dhf_subprocess(args, crash_at=None, wait=True):
    env = dict(os.environ)
    env.pop(api.CRASH_ENV, None)
    if crash_at:
        env[api.CRASH_ENV] = crash_at
    cmd = [sys.executable, "-m", "deephash_faiss.cli", *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    imgs = str(root / "imgs")
    good = corpus.make_good(imgs)
    model = corpus.train_tiny_model(imgs, str(root / "model.pt"))
    prev_imgs = str(root / "prev_imgs")
    corpus.plain_images(prev_imgs, 4, seed=3)
    prev = str(root / "prev_idx")
    api.build_index(prev_imgs, prev, model, shard_size=3, progress=False, device="cpu")
    ref = str(root / "ref_idx")
    api.build_index(imgs, ref, model, shard_size=SHARD, progress=False, device="cpu")
    r = corpus.read_index(ref)
    q = np.arange(0, r["count"], 4)
    qc, qf = r["codes"][q], r["features"][q].astype(np.float32)
    nshards = -(-len(good.good) // SHARD)
    return dict(root=root, imgs=imgs, model=model, prev=prev, ref=ref, qc=qc, qf=qf, nshards=nshards,
                prev_res=corpus.search_all(prev, qc, qf), ref_res=corpus.search_all(ref, qc, qf), ref_data=r)


def assert_same_index(d, ref, exact=True):
    a, b = corpus.read_index(d), corpus.read_index(ref)
    assert a["count"] == b["count"] and a["paths"] == b["paths"] and a["deleted"] == b["deleted"]
    np.testing.assert_array_equal(a["codes"], b["codes"])
    np.testing.assert_array_equal(a["labels"], b["labels"])
    if exact:
        np.testing.assert_array_equal(a["features"], b["features"])
    else:
        np.testing.assert_allclose(a["features"], b["features"], rtol=1e-5, atol=1e-6)


def assert_clean_dir(d):
    names = os.listdir(d) + os.listdir(os.path.join(d, "shards"))
    assert not [n for n in names if n.startswith((".tmp-", ".partial-"))], names


def expected_reused(point, nshards):
    kind, _, num = point.rpartition("-")
    if point.startswith("shard-"):
        return int(num) + 1
    if point.startswith("mid-shard-"):
        return int(num)
    return nshards  # finalize-*, before-/after-manifest: every shard was complete


POINTS = ["shard-1", "mid-shard-2", "finalize-shard-2", "before-manifest", "after-manifest"]


@pytest.mark.parametrize("point", POINTS)
def test_build_killed_then_resumed(env, tmp_path, point):
    d = str(tmp_path / "idx")
    shutil.copytree(env["prev"], d)  # a previous index lives in the target directory
    args = ["build-index", env["imgs"], "--model", env["model"], "-o", d, "--shard-size", SHARD, "-q",
            "--device", "cpu"]
    r = dhf_subprocess(args, crash_at=point)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
    # the index in d is whole: the previous one, or (killed after the commit) the new one
    assert maintain.verify(d) == []
    res = corpus.search_all(d, env["qc"], env["qf"])
    assert res == (env["ref_res"] if point == "after-manifest" else env["prev_res"])
    out = run(*args, ok=True).output
    assert f"{expected_reused(point, env['nshards'])} reused" in out, out
    assert_same_index(d, env["ref"])
    assert corpus.search_all(d, env["qc"], env["qf"]) == env["ref_res"]
    assert maintain.verify(d) == []
    assert_clean_dir(d)


def test_build_killed_at_random_time(env, tmp_path):
    """kill -9 from outside (a separate process), as soon as a shard exists: whatever the
    state, the index is whole and the rerun completes and matches."""
    d = str(tmp_path / "idx")
    shutil.copytree(env["prev"], d)
    args = ["build-index", env["imgs"], "--model", env["model"], "-o", d, "--shard-size", SHARD, "-q",
            "--device", "cpu"]
    p = dhf_subprocess(args, wait=False)
    deadline = time.time() + 60
    while time.time() < deadline and p.poll() is None:
        parts = [n for n in os.listdir(d) if n.startswith(".partial-")]
        if parts and [f for f in os.listdir(os.path.join(d, parts[0])) if f.endswith(".h5")]:
            break
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert maintain.verify(d) == []
    assert corpus.search_all(d, env["qc"], env["qf"]) in (env["prev_res"], env["ref_res"])
    run(*args, ok=True)
    assert_same_index(d, env["ref"])
    assert corpus.search_all(d, env["qc"], env["qf"]) == env["ref_res"]
    assert_clean_dir(d)


@pytest.mark.parametrize("point", ["shard-1", "finalize-shard-0"])
def test_add_killed_then_resumed(env, tmp_path, point):
    more = str(tmp_path / "more")
    corpus.plain_images(more, 3, seed=9)  # 6 images, 3 shards of 2
    want = str(tmp_path / "want")
    shutil.copytree(env["ref"], want)
    maintain.add_images(want, more, shard_size=2, progress=False, device="cpu")
    d = str(tmp_path / "idx")
    shutil.copytree(env["ref"], d)
    args = ["add", d, more, "--shard-size", 2, "-q", "--device", "cpu"]
    r = dhf_subprocess(args, crash_at=point)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert maintain.verify(d) == []
    assert_same_index(d, env["ref"])  # untouched
    out = run(*args, ok=True).output
    assert f"{2 if point == 'shard-1' else 3} reused" in out and "added 6 images" in out, out
    assert_same_index(d, want)
    assert maintain.verify(d) == []
    assert_clean_dir(d)


@pytest.mark.parametrize("cmd", ["compact", "remove"])
def test_compact_and_remove_killed(env, tmp_path, cmd):
    d = str(tmp_path / "idx")
    shutil.copytree(env["ref"], d)
    maintain.remove(d, ids=[1, 5])
    before = corpus.read_index(d)
    args = ["compact", d] if cmd == "compact" else ["remove", d, "--ids", 7]
    r = dhf_subprocess(args, crash_at="before-manifest")
    assert r.returncode == -signal.SIGKILL
    assert maintain.verify(d) == []
    after = corpus.read_index(d)
    assert after["deleted"] == before["deleted"] == [1, 5] and after["paths"] == before["paths"]
    run(*args, ok=True)
    assert maintain.verify(d) == []
    assert corpus.read_index(d)["deleted"] == ([] if cmd == "compact" else [1, 5, 7])


def test_readers_see_old_or_new_during_add(env, tmp_path):
    d = str(tmp_path / "idx")
    shutil.copytree(env["ref"], d)
    more = str(tmp_path / "more")
    corpus.plain_images(more, 4, seed=11)
    qc, qf = env["qc"], env["qf"]
    old = env["ref_res"]
    old_files = api.manifest_files(json.load(open(os.path.join(d, "manifest.json"))))
    seen, errors, stop = [], [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                s = Searcher(d, device="cpu")
                paths = s.store.paths()
                got = {}
                for mode in ("bcs", "hds", "es"):
                    b = s.search(mode, qc, qf, k=5)
                    got[mode] = [[paths[i] for i in r.ids] for r in b.results]
                seen.append((s.manifest.get("generation"), s.count, got))
            except Exception as err:  # noqa: BLE001 - any error is a failure
                errors.append(repr(err))

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    maintain.add_images(d, more, shard_size=3, progress=False, device="cpu")
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join()
    new = corpus.search_all(d, qc, qf)
    assert not errors, errors[:3]
    gens = {g for g, _, _ in seen}
    assert len(gens) == 2, gens  # both generations were observed
    for g, count, got in seen:
        assert got == (old if count == env["ref_data"]["count"] else new)
    # the old generation's files are kept one generation...
    assert all(os.path.exists(os.path.join(d, f)) for f in old_files)
    s_old_gen = Searcher(env["ref"], device="cpu")  # (a reader holding gen 1 would still work)
    assert s_old_gen.count == env["ref_data"]["count"]
    # ...and removed after the next commit
    maintain.remove(d, ids=[0])
    live = api.manifest_files(json.load(open(os.path.join(d, "manifest.json"))))
    for f in old_files - live:
        assert not os.path.exists(os.path.join(d, f)), f


# ---------------------------------------------------------------- Ctrl-C at the commit; a killed `dhf shard`

def _interrupted_at(point, args):
    from deephash_faiss.layout import INTERRUPT_ENV

    env = dict(os.environ, **{INTERRUPT_ENV: point})
    env.pop(api.CRASH_ENV, None)
    return subprocess.run([sys.executable, "-m", "deephash_faiss.cli", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=120)


def test_ctrl_c_after_the_manifest_rename_finishes_the_command(env, tmp_path):
    """SIGINT once the manifest is renamed: the change is made, so the command says so and
    exits 0 (a retry on 130 would find the row already removed); before the rename: 130, old index."""
    idx = str(tmp_path / "idx")
    shutil.copytree(env["ref"], idx)
    r = _interrupted_at("before-manifest", ["remove", idx, "--ids", "1"])
    assert r.returncode == 130 and "Interrupted" in r.stderr
    assert corpus.read_index(idx)["deleted"] == []
    r = _interrupted_at("after-manifest", ["remove", idx, "--ids", "1"])
    assert r.returncode == 0, r.stderr
    assert "interrupted after the commit: the change is saved" in r.stderr
    assert corpus.read_index(idx)["deleted"] == [1]
    assert maintain.verify(idx) == []
    assert_clean_dir(idx)


def test_killed_shard_leaves_nothing_and_reruns(env, tmp_path):
    from deephash_faiss.distributed import ShardedSearcher, split_index
    from deephash_faiss.errors import DhfError

    out = tmp_path / "parts"
    r = dhf_subprocess(["shard", env["ref"], "-n", "3", "-o", out], crash_at="split-part-1")
    assert r.returncode == -signal.SIGKILL
    assert not out.exists()  # the parts went to a temporary folder, renamed only when all were written
    r = dhf_subprocess(["shard", env["ref"], "-n", "3", "-o", out])
    assert r.returncode == 0, r.stderr
    parts = sorted(str(p) for p in out.iterdir())
    assert [os.path.basename(p) for p in parts] == ["shard-000", "shard-001", "shard-002"]
    assert all(maintain.verify(p) == [] for p in parts)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-split")]
    with pytest.raises(DhfError, match=r"part\(s\) \[2\] missing"):
        ShardedSearcher(parts[:2], use_ray=False)
    with pytest.raises(DhfError, match="not empty"):
        split_index(env["ref"], str(out), 2)
