"""Ray: extraction over many workers (and GPUs), and sharded search with fan-out and merge.

Nothing here is a home-made cluster: scheduling, placement, restarts and retries are
Ray's. ``ray`` is imported lazily (``pip install deephash-faiss[ray]``).

**Build** (:func:`build_index_ray`): the one build pipeline of :mod:`deephash_faiss.pipeline`
with its Ray executor. The image list is cut into the same shards as the single-process
build (``shard_size`` images each). Each Ray actor loads the model once and encodes one
shard per task with :func:`deephash_faiss.pipeline.encode_local` into the same
``<index>/.partial-<key>/`` directory the local build uses, so a Ray build and a local
build resume each other; the driver holds the index's writer lock throughout. Shards are renamed into place when
complete and skipped when present, so a task that Ray retries after a worker died (actors
are created with ``max_restarts`` / ``max_task_retries``) never writes a shard twice. The
driver then calls :func:`deephash_faiss.api.finalize_build` (row numbering, code index,
manifest). Workers read the images and write the shards through the file system: on a
multi-node cluster, the images, the model and the index directory must be on a shared
file system mounted at the same path everywhere (workers ``chdir`` to the driver's cwd, so
relative paths work as on the driver). On CPU the result is bit for bit the local build's.

**Sharded search** (:func:`split_index`, :class:`ShardedSearcher`). An index is split into
``n`` index directories of consecutive rows; each is a valid dhf index whose manifest
records ``id_offset`` (its first global id). A :class:`ShardedSearcher` holds one Ray actor
per shard (``scheduling_strategy="SPREAD"``: on a cluster, on different nodes), fans each
query batch out and merges. The merged results equal the unsharded index's:

* BCS: each shard returns its k nearest by (Hamming, id); the driver keeps the k smallest
  (Hamming, global id) pairs.
* HDS: round 1, each shard returns its radius pool capped at ``max_candidates`` (nearest
  first) as (Hamming, global id) pairs, plus its Hamming k-NN when its pool is shorter than
  k. The driver merges the pools by (Hamming, global id) and applies the *global* cap
  (the unsharded pool is the ``max_candidates`` nearest of the whole database: a shard's
  own cap can never cut one of those), and tops a pool shorter than k up with the merged
  k-NN, exactly as :meth:`deephash_faiss.search.Searcher.pools`. Round 2, the rerank,
  two placements (``rerank=``):

  - ``"driver"`` (default, exact): the driver fetches the final pools' feature rows from the
    shards (one sorted gather per shard per batch) and ranks them with the same function as
    the unsharded :meth:`Searcher.hds`: ids, Hamming and L2 values bit for bit equal.
  - ``"shards"`` (scalable): each shard ranks its part of the final pool by L2 (one GEMM:
    values independent of the other rows in the call) and returns its k best; the driver
    merges by (L2, position in the pool), the position being (Hamming, global id) order --
    the unsharded stable sort. Only ids and distances cross the network. Equal to the
    unsharded result except where two distances are within float rounding: the unsharded CPU
    rerank picks GEMM or GEMV by how much a batch's pools overlap, and GEMV rounds
    differently (1 ulp).
* ES: each shard returns its exact L2 k-NN; the driver merges by (L2, global id).

ES caveat: for a batch of *one* query, ``faiss.knn`` takes a single-query kernel whose
rounding depends on how the database is cut into blocks, so ES distances may differ in the
last bit from the unsharded index (and neighbours within an ulp may swap); batches of two
or more queries are exact (tested). Everything here is about the CPU backend.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from typing import Any, Callable, Sequence

import numpy as np

from .errors import DhfError

from .pipeline import FAIL_ONCE_ENV, _node_ip  # noqa: F401  (FAIL_ONCE_ENV: a worker dies once, a test hook)

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def _ray():
    try:
        import ray
    except ImportError:  # pragma: no cover - depends on the environment
        raise DhfError("Ray is not installed: pip install 'deephash-faiss[ray]'") from None
    return ray


def init_ray(address: str | None = None, log: Log = _quiet, **kwargs) -> bool:
    """Connect to Ray; returns True when this call started/connected it (and should shut it down).

    ``address`` None: reuse an initialised session, else let Ray connect to a running local
    instance or start one; otherwise ``"HOST:PORT"`` (or ``"auto"``) of a running cluster.
    """
    ray = _ray()
    if ray.is_initialized():
        return False
    opts = dict(kwargs)
    opts.setdefault("include_dashboard", False)
    opts.setdefault("log_to_driver", True)
    if address is None:
        # Ray would dial the cluster named in /tmp/ray/ray_current_cluster (and wait a long
        # time if it is gone, e.g. after its processes were killed): start a local one then
        if not os.environ.get("RAY_ADDRESS") and not _current_cluster_alive():
            ray.init(address="local", **opts)
        else:
            ray.init(**opts)
    else:
        opts.pop("num_cpus", None)
        opts.pop("num_gpus", None)
        ray.init(address=address, **opts)
    res = ray.cluster_resources()
    log(f"ray: {len([n for n in ray.nodes() if n.get('Alive')])} node(s), {res.get('CPU', 0):g} CPU(s), "
        f"{res.get('GPU', 0):g} GPU(s)" + (f" at {address}" if address else " (local)"))
    return True


def _current_cluster_alive(timeout: float = 2.0) -> bool:
    """Whether the cluster Ray recorded in ``/tmp/ray/ray_current_cluster`` accepts connections."""
    import socket
    import tempfile

    path = os.path.join(os.environ.get("RAY_TMPDIR", os.path.join(tempfile.gettempdir(), "ray")),
                        "ray_current_cluster")
    try:
        with open(path) as f:
            host, _, port = f.read().strip().rpartition(":")
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------------- build

def build_index_ray(
    images_dir: str,
    index_dir: str = "dhf-index",
    model_path: str | None = None,
    spec=None,
    batch_size: int = 128,
    shard_size: int = 50_000,
    feature_dtype: str = "float32",
    address: str | None = None,
    num_workers: int | None = None,
    num_gpus_per_worker: float = 0,
    num_cpus_per_worker: float = 1,
    max_retries: int = 3,
    progress: bool = True,
    log: Log = _quiet,
    train_options: dict[str, Any] | None = None,
    decoder: str = "auto",
):
    """:func:`deephash_faiss.api.build_index` with the encoding spread over Ray actors: the
    one build pipeline (:func:`deephash_faiss.pipeline.build`) with a
    :class:`~deephash_faiss.pipeline.RayExecutor` (same lock, job key, skip report and
    finalize as the local build).

    Args:
        address: a running Ray cluster ("HOST:PORT" or "auto"); None: the current session,
            a running local instance, or a new local one.
        num_workers: actors (default: cluster CPUs // ``num_cpus_per_worker``, or GPUs //
            ``num_gpus_per_worker`` when GPUs are asked for; never more than the shards).
        num_gpus_per_worker: > 0 encodes on CUDA in each actor (1: one actor per GPU).
        num_cpus_per_worker: CPUs reserved per actor; its torch thread count.
        max_retries: actor restarts and task retries after a worker dies.
    Returns:
        :class:`deephash_faiss.api.BuildReport`.
    """
    from .pipeline import RayExecutor, build

    executor = RayExecutor(address, num_workers, num_gpus_per_worker, num_cpus_per_worker, max_retries)
    if model_path is None:
        log("training is not distributed: a model is fine-tuned on this machine first")
    return build(images_dir, index_dir, model_path, spec, batch_size, shard_size, feature_dtype, executor, decoder,
                 progress, log, train_options)


# ---------------------------------------------------------------------------------- split

def split_index(index_dir: str, out_dir: str, n: int, log: Log = _quiet) -> list[str]:
    """Split an index into ``n`` index directories ``out_dir/shard-000`` ... of consecutive rows.

    Each is a complete dhf index (manifest, model, code index of the same type, HDF5 shards)
    whose rows have local ids 0..rows-1; its manifest's ``id_offset`` is the global id of
    its first row (global id = local id + id_offset) and ``split`` records the source.
    Deleted ids carry over. Memory: one source shard's rows at a time.

    All or nothing: the parts are written into ``.tmp-split-<name>`` beside ``out_dir`` and
    renamed to ``out_dir`` when all are complete (a killed split leaves no ``out_dir``, and
    its rerun starts afresh); the source's writer lock is held throughout, so no ``add`` or
    ``compact`` changes it meanwhile.
    """
    from .store import check_output_path, read_manifest

    if n < 1:
        raise DhfError("-n must be at least 1")
    read_manifest(index_dir)  # a clear error for a folder that is not an index
    check_output_path(out_dir, "-o", folder=True)
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise DhfError(f"{out_dir} exists and is not empty")
    out_dir = os.path.normpath(out_dir)
    tmp = os.path.join(os.path.dirname(os.path.abspath(out_dir)), f".tmp-split-{os.path.basename(out_dir)}")
    with _source_lock(index_dir):
        shutil.rmtree(tmp, ignore_errors=True)  # a killed split's leftovers
        os.makedirs(tmp)
        try:
            names = _write_split(index_dir, tmp, n, log)
            if os.path.isdir(out_dir):
                os.rmdir(out_dir)  # empty (checked above)
            os.rename(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return [os.path.join(out_dir, name) for name in names]


@contextlib.contextmanager
def _source_lock(index_dir: str):
    """Hold the source index's writer lock; none when its folder is read-only (no dhf writes it then)."""
    from .layout import IndexLock

    try:
        lock = IndexLock(index_dir, probe=False).__enter__()
    except OSError as err:
        if err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        lock = None
    try:
        yield
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


def _write_split(index_dir: str, tmp: str, n: int, log: Log) -> list[str]:
    """Write the ``n`` parts of :func:`split_index` under ``tmp``; their folder names."""
    import h5py

    from .index import BinaryIndex, IndexSpec
    from .layout import crash_point
    from .store import FeatureStore, _decode_path, atomic_write_bytes, read_manifest, write_manifest, write_shard

    m = read_manifest(index_dir)
    store = FeatureStore(index_dir, m)
    count = store.count
    if n > max(1, count):
        raise DhfError(f"cannot split {count} images into {n} shards")
    out_dir = tmp
    spec = IndexSpec.from_dict(m["index"])
    if m.get("fine"):
        log("the fine index is not split: build one per shard with `dhf fine-index` if wanted")
    deleted = np.asarray(m.get("deleted") or [], dtype=np.int64)
    bounds = [int(round(i * count / n)) for i in range(n + 1)]
    model_src = os.path.join(index_dir, m["model"]["file"]) if m["model"].get("file") else None
    out = []
    for i in range(n):
        lo, hi = bounds[i], bounds[i + 1]
        d = os.path.join(out_dir, f"shard-{i:03d}")
        os.makedirs(os.path.join(d, "shards"), exist_ok=True)
        shards, codes = [], []
        for sv in store.shards:
            a, b = max(lo, sv.start), min(hi, sv.start + sv.rows)
            if a >= b:
                continue
            with h5py.File(sv.file, "r") as f:
                sl = slice(a - sv.start, b - sv.start)
                c, feats, labels = f["codes"][sl], f["features"][sl], f["labels"][sl]
                paths = [_decode_path(p) for p in f["paths"][sl]]
            name = f"part-{len(shards):05d}.h5"
            info = write_shard(os.path.join(d, "shards", name), c, feats, np.arange(a - lo, b - lo, dtype=np.int64),
                               paths, labels)
            shards.append({**info, "start": a - lo})
            codes.append(c)
        nb = int(m["bits"]) // 8
        all_codes = np.concatenate(codes) if codes else np.zeros((0, nb), np.uint8)
        index = BinaryIndex.build(all_codes, spec)
        tmp = os.path.join(d, ".tmp-codes.index")
        index.save(tmp)
        os.replace(tmp, os.path.join(d, "codes.index"))
        if model_src:  # an index built from arrays has no model
            tmp = os.path.join(d, ".tmp-model.pt")
            shutil.copyfile(model_src, tmp)
            os.replace(tmp, os.path.join(d, "model.pt"))
        atomic_write_bytes(os.path.join(d, "skipped.tsv"), b"")
        local_del = deleted[(deleted >= lo) & (deleted < hi)] - lo
        man = {**m, "created": m.get("created"), "count": hi - lo, "shards": shards,
               "model": {**m["model"], "file": "model.pt" if model_src else None},
               # a new code index: its sha256 and size are recorded by write_manifest
               "index": {**{k: v for k, v in m["index"].items() if k not in ("sha256", "size")},
                         "file": "codes.index"},
               "skipped": 0, "skipped_file": "skipped.tsv", "deleted": [int(x) for x in local_del],
               "id_offset": lo,
               "split": {"source": os.path.abspath(index_dir), "part": i, "parts": n, "total_count": count}}
        man.pop("fine", None)  # not split: each shard can build its own (`dhf fine-index`)
        write_manifest(d, man)
        crash_point(f"split-part-{i}")
        log(f"shard-{i:03d}: ids {lo}..{hi - 1} ({hi - lo} rows)")
        out.append(os.path.basename(d))
    return out


# ---------------------------------------------------------------------------------- merge

def merge_knn(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard k-NN lists of one query: [(dist [k_i], global ids [k_i])] -> the k
    smallest (dist, id) pairs, in that order. Ids < 0 (padding) are dropped."""
    D = np.concatenate([np.asarray(p[0]) for p in parts]) if parts else np.zeros(0)
    I = np.concatenate([np.asarray(p[1], np.int64) for p in parts]) if parts else np.zeros(0, np.int64)
    ok = I >= 0
    D, I = D[ok], I[ok]
    order = np.lexsort((I, D))[:k]
    return D[order], I[order]


def merge_knn_batch(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Batched :func:`merge_knn`: parts [(D [m, k_i], I [m, k_i] global)] -> (D [m, k], I [m, k]),
    ordered by (dist, id); short rows are padded with id -1 (and the dtype's max distance)."""
    D = np.concatenate([p[0] for p in parts], axis=1)
    I = np.concatenate([np.asarray(p[1], np.int64) for p in parts], axis=1)
    big = np.iinfo(D.dtype).max if np.issubdtype(D.dtype, np.integer) else np.inf
    D = np.where(I >= 0, D, big)
    # rows with id -1 go last: sort by (pad flag, dist, id)
    order = np.lexsort((I, D, I < 0), axis=1)[:, :k]
    D, I = np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)
    if D.shape[1] < k:
        pad = k - D.shape[1]
        D = np.hstack([D, np.full((len(D), pad), big, D.dtype)])
        I = np.hstack([I, np.full((len(I), pad), -1, np.int64)])
    return D, I


# ---------------------------------------------------------------------------------- search

class ShardWorker:
    """One shard of a sharded index: a :class:`~deephash_faiss.search.Searcher` plus its id
    offset. Runs in-process or as a Ray actor; every id it returns is global."""

    def __init__(self, index_dir: str, device: str = "cpu", features_in_memory: bool = False,
                 num_threads: int | None = None):
        from .search import Searcher

        if num_threads:
            import faiss
            import torch

            torch.set_num_threads(int(num_threads))
            faiss.omp_set_num_threads(int(num_threads))
        self.searcher = Searcher(index_dir, device=device, features_in_memory=features_in_memory)
        self.offset = int(self.searcher.manifest.get("id_offset", 0))

    def info(self) -> dict[str, Any]:
        m = self.searcher.manifest
        return {"dir": self.searcher.index_dir, "count": self.searcher.count, "live": self.searcher.live_count(),
                "offset": self.offset, "bits": self.searcher.bits, "feature_dim": int(m["feature_dim"]),
                "model_sha256": m["model"]["sha256"], "split": m.get("split"), "node": _node_ip(),
                "pid": os.getpid()}

    def knn(self, qcodes: np.ndarray, k: int):
        """Hamming k-NN: (D int32 [m, k'], global ids int64 [m, k']), by (Hamming, id)."""
        live = self.searcher.live_count()
        if live == 0:
            return np.zeros((len(qcodes), 0), np.int32), np.zeros((len(qcodes), 0), np.int64)
        D, I = self.searcher.code_index(len(qcodes)).search(qcodes, min(k, live))
        return D, np.where(I >= 0, I + self.offset, -1)

    def range(self, qcodes: np.ndarray, radius: int, max_candidates: int | None):
        """Radius search capped at max_candidates: (lims, hamming int32, global ids int64)."""
        lims, D, I = self.searcher.code_index(len(qcodes)).range_search(qcodes, radius, max_candidates)
        return lims, D, I + self.offset

    def pools(self, qcodes: np.ndarray, k: int, radius: int, max_candidates: int | None):
        """HDS round 1: (lims, hamming, global ids) of the radius pools capped at max_candidates,
        and {query: (D, I)} Hamming k-NN for the queries whose pool here is shorter than k."""
        s = self.searcher
        lims, D, I = s.index.range_search(qcodes, radius, max_candidates)
        need = [i for i in range(len(qcodes)) if lims[i + 1] - lims[i] < k]
        knn = {}
        if need and s.live_count():
            Dk, Ik = self.knn(qcodes[need], k)
            knn = {q: (Dk[j], Ik[j]) for j, q in enumerate(need)}
        return lims, D, I + self.offset, knn

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """Feature rows for global ids (HDS ``rerank="driver"``)."""
        return self.searcher.store.gather(np.asarray(ids, np.int64) - self.offset)

    def rerank(self, qfeats: np.ndarray, cands: list[np.ndarray], k: int):
        """HDS round 2 (``rerank="shards"``): rank each query's candidates (global ids, in pool
        order) by squared L2 with :func:`deephash_faiss.rerank.rank_pools_cpu` (the one CPU L2
        formula). Returns per query (positions into its candidate list, distances float32),
        k best, ties by position."""
        from .rerank import rank_pools_cpu

        local = [np.asarray(c, np.int64) - self.offset for c in cands]
        return rank_pools_cpu(qfeats, local, self.searcher.store.gather, k)

    def es(self, qfeats: np.ndarray, qcodes: np.ndarray | None, k: int):
        """Exact L2 k-NN: per query (global ids, hamming, distances), by (L2, id)."""
        s = self.searcher
        live = s.live_count()
        if live == 0:
            return [(np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32))] * len(qfeats)
        b = s.es(qfeats, qcodes, min(k, live))
        return [(r.ids + self.offset, r.hamming, r.distance) for r in b.results]


class ShardedCodeIndex:
    """The shards' code indexes as one code index (the interface of
    :class:`~deephash_faiss.index.BinaryIndex` that :func:`~deephash_faiss.search.hamming_pools`
    and the BCS of :class:`~deephash_faiss.search.Searcher` use): fan-out, then one merge.

    k-NN: every shard's k nearest by (Hamming, global id), merged (:func:`merge_knn_batch`).
    Radius: every shard's pool capped at ``max_candidates`` (a shard's own cap never cuts one
    of the global ``max_candidates`` nearest), merged by (Hamming, global id) and cut at the
    global cap (:func:`deephash_faiss.index.sort_and_cap`). Deleted rows stay hidden in the
    shards, so ``deleted`` is None here."""

    deleted = None

    def __init__(self, searcher: "ShardedSearcher"):
        self.s = searcher

    @property
    def ntotal(self) -> int:
        return self.s.count

    def search(self, q: np.ndarray, k: int):
        return merge_knn_batch(self.s._call("knn", q, k), k)

    def range_search(self, q: np.ndarray, radius: int, max_candidates: int | None = None):
        from .index import sort_and_cap

        parts = self.s._call("range", q, radius, max_candidates)
        m = len(q)
        Ds, Is, counts = [], [], np.zeros(m, np.int64)
        for qi in range(m):
            for lims, D, I in parts:
                Ds.append(D[lims[qi]:lims[qi + 1]])
                Is.append(I[lims[qi]:lims[qi + 1]])
                counts[qi] += lims[qi + 1] - lims[qi]
        lims = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        D = np.concatenate(Ds).astype(np.int32) if Ds else np.zeros(0, np.int32)
        I = np.concatenate(Is).astype(np.int64) if Is else np.zeros(0, np.int64)
        return sort_and_cap(lims, D, I, max_candidates)


class ShardedSearcher:
    """Search shards written by :func:`split_index` as one index.

    Args:
        shard_dirs: the shard index directories (any order; sorted by ``id_offset``).
        use_ray: one Ray actor per shard (``scheduling_strategy="SPREAD"``), calls fanned out
            in parallel; False: the same fan-out in-process, one shard after another.
        address: Ray cluster address (see :func:`init_ray`); ignored without Ray.
        num_cpus_per_shard: CPUs reserved per actor (default: min(1, cluster CPUs / shards)).
        rerank: HDS rerank placement, "driver" (exact) or "shards" (see :meth:`hds`).
        devices: one device per shard, cycled (e.g. ``["cuda:0", ..., "cuda:7"]``: shard i's
            codes and features on GPU i; with Ray each such actor reserves one GPU); default
            ``device`` for every shard.
    Results are :class:`~deephash_faiss.search.SearchBatch` objects with global ids, equal
    to the unsharded index's (see the module docstring for the merge semantics).
    """

    def __init__(self, shard_dirs: Sequence[str], use_ray: bool = True, device: str = "cpu",
                 features_in_memory: bool = False, address: str | None = None,
                 num_cpus_per_shard: float | None = None, rerank: str = "driver",
                 devices: Sequence[str] | None = None):
        self.rerank_mode = rerank
        if not shard_dirs:
            raise DhfError("no shard directories given")
        self.use_ray = use_ray
        self._owns_ray = False
        devs = list(devices) if devices else [device]
        self.devices = [str(devs[i % len(devs)]) for i in range(len(shard_dirs))]
        if use_ray:
            ray = _ray()
            self._owns_ray = init_ray(address)
            n = len(shard_dirs)
            cpus = num_cpus_per_shard
            if cpus is None:
                cpus = min(1.0, ray.cluster_resources().get("CPU", 1) / n)
            threads = max(1, int(cpus))
            self.workers = []
            for d, dev in zip(shard_dirs, self.devices):
                gpus = 1 if dev.startswith("cuda") else 0  # Ray gives the actor its own GPU
                Actor = ray.remote(ShardWorker).options(num_cpus=cpus, num_gpus=gpus, scheduling_strategy="SPREAD",
                                                        max_restarts=1, max_task_retries=1)
                # under Ray the actor sees only its GPU, as cuda:0
                self.workers.append(Actor.remote(os.path.abspath(d), "cuda" if gpus else dev,
                                                 features_in_memory, threads))
        else:
            self.workers = [ShardWorker(d, dev, features_in_memory) for d, dev in zip(shard_dirs, self.devices)]
        infos = self._call("info")
        order = np.argsort([i["offset"] for i in infos], kind="stable")
        self.workers = [self.workers[i] for i in order]
        self.infos = [infos[i] for i in order]
        self._check()
        self.offsets = np.array([i["offset"] for i in self.infos], np.int64)
        self.bits = self.infos[0]["bits"]
        self.count = int(sum(i["count"] for i in self.infos))
        self.shard_dirs = [i["dir"] for i in self.infos]
        self._model = None

    def _check(self) -> None:
        first = self.infos[0]
        expect = 0
        for inf in self.infos:
            for key in ("bits", "feature_dim", "model_sha256"):
                if inf[key] != first[key]:
                    raise DhfError(f"shard {inf['dir']} has another {key} than {first['dir']}")
            if inf["offset"] != expect:
                raise DhfError(f"shard {inf['dir']} starts at id {inf['offset']}, expected {expect} "
                               f"(a shard is missing or repeated)")
            expect += inf["count"]
        splits = [inf.get("split") for inf in self.infos]
        if all(splits) and len({(sp.get("source"), sp.get("parts")) for sp in splits}) == 1:
            parts, have = int(splits[0]["parts"]), sorted(int(sp["part"]) for sp in splits)
            if have != list(range(parts)):  # `dhf shard` wrote `parts`: a set without all of them is not the index
                missing = sorted(set(range(parts)) - set(have))
                raise DhfError(f"the shards are parts {have} of a split into {parts}; part(s) {missing} missing "
                               f"(a search over them would miss those rows)")

    def _call(self, method: str, *args, per_shard: Sequence[tuple] | None = None) -> list:
        """Call ``method`` on every shard (same args, or ``per_shard[i]``) and gather the replies."""
        argv = per_shard if per_shard is not None else [args] * len(self.workers)
        if self.use_ray:
            ray = _ray()
            return ray.get([getattr(w, method).remote(*a) for w, a in zip(self.workers, argv)])
        return [getattr(w, method)(*a) for w, a in zip(self.workers, argv)]

    def live_count(self) -> int:
        return int(sum(i["live"] for i in self.infos))

    def _checked(self, k: int, radius: int | None = None, max_candidates: int | None = None) -> None:
        from .search import check_search_args

        check_search_args(k, radius, max_candidates, self.live_count(), self.bits)

    # -- encoding (on the driver, with the shards' common model) ------------------------
    def encode(self, paths: Sequence[str], batch_size: int = 128, device: str = "cpu"):
        from .extract import encode_paths
        from .model import load_model, resolve_device
        from .store import read_manifest

        dev = resolve_device(device)
        if self._model is None:
            m = read_manifest(self.shard_dirs[0])
            self._model = load_model(os.path.join(self.shard_dirs[0], m["model"]["file"]), dev)
        codes, feats, bad = [], [], []
        for _, c, f, b in encode_paths(self._model, list(paths), dev, batch_size):
            codes.append(c)
            feats.append(f)
            bad.extend(b)
        if bad:
            raise DhfError(f"cannot use query {paths[bad[0][0]]}: {bad[0][1]}")
        return np.concatenate(codes), np.concatenate(feats).astype(np.float32), bad

    # -- modes --------------------------------------------------------------------------
    def code_index(self, batch: int = 1) -> ShardedCodeIndex:
        """The shards' code indexes behind one interface (fan-out + merge)."""
        return ShardedCodeIndex(self)

    def bcs(self, qcodes: np.ndarray, k: int):
        """BCS, the same implementation as :meth:`Searcher.bcs` over :class:`ShardedCodeIndex`."""
        from .search import bcs_batch

        self._checked(k)
        return bcs_batch(self.code_index(), qcodes, k, self.live_count(), {"shards": len(self.workers)})

    def pools(self, qcodes: np.ndarray, k: int, radius: int, max_candidates: int | None):
        """The global HDS pools, equal to :meth:`Searcher.pools`: list of (ids, hamming, truncated)."""
        from .search import hamming_pools

        return hamming_pools(self.code_index(), qcodes, k, radius, max_candidates, self.live_count())

    def hds(self, qcodes: np.ndarray, qfeats: np.ndarray, k: int, radius: int = 3,
            max_candidates: int | None = 10_000, rerank: str | None = None):
        """HDS over the shards. ``rerank`` (default: the constructor's):

        * ``"driver"`` -- exact: the final pools' feature rows are fetched from the shards
          (one sorted gather per shard for the batch's union) and ranked on the driver by the
          same code as :meth:`Searcher.hds`, so ids, Hamming and L2 values are bit for bit the
          unsharded ones. Moves |union of pools| x D feature values per batch.
        * ``"shards"`` -- scalable: each shard ranks its part of the pools and returns its k
          best (ids and distances only); the driver merges by (L2, position in the pool).
          Same pools, same ids except where two distances are within float rounding (the
          unsharded CPU rerank picks GEMM or GEMV by batch overlap; they round differently).
        """
        from .search import QueryResult, SearchBatch

        mode = rerank or self.rerank_mode
        if mode not in ("driver", "shards"):
            raise DhfError(f"unknown rerank mode {mode!r} (driver or shards)")
        self._checked(k, radius, max_candidates)
        t0 = time.perf_counter()
        pools = self.pools(qcodes, k, radius, max_candidates)
        t1 = time.perf_counter()
        nsh = len(self.workers)
        if mode == "driver":
            from .search import hds_results

            ranked = self._rerank_on_driver(qfeats, [ids for ids, _, _ in pools], k)
            t2 = time.perf_counter()
            return SearchBatch("hds", hds_results(pools, ranked), (t2 - t0) * 1e3,
                               {"pool_ms": (t1 - t0) * 1e3, "rerank_ms": (t2 - t1) * 1e3, "shards": nsh})
        # which pool positions go to which shard
        per_shard_pos = [[None] * len(pools) for _ in range(nsh)]
        for qi, (ids, _, _) in enumerate(pools):
            sh = np.searchsorted(self.offsets, ids, side="right") - 1
            for s in range(nsh):
                per_shard_pos[s][qi] = np.flatnonzero(sh == s)
        args = [(qfeats, [pools[qi][0][per_shard_pos[s][qi]] for qi in range(len(pools))], k) for s in range(nsh)]
        ranked = self._call("rerank", per_shard=args)
        res = []
        for qi, (ids, ham, trunc) in enumerate(pools):
            pos = np.concatenate([per_shard_pos[s][qi][ranked[s][qi][0]] for s in range(nsh)]).astype(np.int64)
            dist = np.concatenate([ranked[s][qi][1] for s in range(nsh)]).astype(np.float32)
            order = np.lexsort((pos, dist))[:k]  # (L2, position in the pool) = the unsharded stable sort
            pos, dist = pos[order], dist[order]
            res.append(QueryResult(ids[pos], ham[pos].astype(np.int32), dist, len(ids), trunc))
        t2 = time.perf_counter()
        return SearchBatch("hds", res, (t2 - t0) * 1e3,
                           {"pool_ms": (t1 - t0) * 1e3, "rerank_ms": (t2 - t1) * 1e3, "shards": nsh})

    def _rerank_on_driver(self, qfeats: np.ndarray, ids_list: list[np.ndarray], k: int):
        """The unsharded CPU rerank (:func:`deephash_faiss.rerank.rank_pools_cpu`) over the
        batch's union of pool rows, fetched once (one sorted gather per shard)."""
        from .rerank import rank_pools_cpu

        allids = np.concatenate(ids_list) if ids_list else np.zeros(0, np.int64)
        union = np.unique(allids)
        sh = np.searchsorted(self.offsets, union, side="right") - 1
        parts = self._call("gather", per_shard=[(union[sh == s],) for s in range(len(self.workers))])
        rows = np.concatenate(parts) if len(union) else np.zeros((0, 1), np.float32)

        def gather(ids):
            return rows[np.searchsorted(union, np.asarray(ids, np.int64))]

        return rank_pools_cpu(qfeats, ids_list, gather, k)

    def es(self, qfeats: np.ndarray, qcodes: np.ndarray | None, k: int):
        from .search import QueryResult, SearchBatch

        self._checked(k)
        t0 = time.perf_counter()
        kk = min(k, self.live_count())
        parts = self._call("es", qfeats, qcodes, kk)
        res = []
        for qi in range(len(qfeats)):
            ids = np.concatenate([p[qi][0] for p in parts]).astype(np.int64)
            ham = np.concatenate([p[qi][1] for p in parts]).astype(np.int32)
            dist = np.concatenate([p[qi][2] for p in parts]).astype(np.float32)
            order = np.lexsort((ids, dist))[:kk]
            res.append(QueryResult(ids[order], ham[order], dist[order], self.live_count()))
        return SearchBatch("es", res, (time.perf_counter() - t0) * 1e3, {"shards": len(self.workers)})

    def search(self, mode: str, qcodes: np.ndarray, qfeats: np.ndarray, k: int = 10, radius: int = 3,
               max_candidates: int | None = 10_000):
        """Dispatch to :meth:`bcs`, :meth:`hds` or :meth:`es` (as :meth:`Searcher.search`)."""
        from .search import dispatch_mode

        return dispatch_mode(self, mode, qcodes, qfeats, k, radius, max_candidates)

    def close(self) -> None:
        if self.use_ray:
            ray = _ray()
            for w in self.workers:
                try:
                    ray.kill(w)
                except Exception:  # noqa: BLE001
                    pass
            if self._owns_ray:
                ray.shutdown()
        self.workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
