"""One build pipeline for ``dhf build-index``, ``dhf add`` and the Ray build.

    prepare (check arguments, scan, check the target folder)
      -> lock (``INDEX/.lock``)
      -> job key (model sha256, image list, shard size, dtype, decoder, file stamps, [base generation])
      -> encode the missing shards of ``INDEX/.partial-<key>/`` through an *executor*
      -> finalize (publish shards, code index, skip report, manifest commit: :mod:`deephash_faiss.layout`)

The executor is the only thing that differs:

* :class:`LocalExecutor`: this process (its GPU or CPU), the streaming encoder
  (:func:`deephash_faiss.stream.encode_stream`) over all missing shards, shards written in a
  background thread.
* :class:`RayExecutor`: Ray actors (one per GPU with ``num_gpus=1`` each, or one per CPU
  group), each running the same :func:`encode_local` on one shard per task.

Because the lock, the key and the skip report are the pipeline's, a Ray build and a local
build behave the same under a racing ``dhf add``, an image changed in place, and odd file
names; and because batches are fixed by shard (see :mod:`deephash_faiss.stream`), their
results are bit for bit equal on CPU (at equal torch thread counts).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from . import layout
from .errors import DhfError

Log = Callable[[str], None]

FAIL_ONCE_ENV = "DHF_RAY_FAIL_ONCE"  # testing hook: a marker path; a worker dies once after its first shard


def _quiet(_: str) -> None:
    pass


@dataclass
class BuildReport:
    index_dir: str
    count: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    shards_written: int = 0
    shards_reused: int = 0
    seconds: float = 0.0
    trained: bool = False
    decoder: str = "pil"
    phases: dict[str, float] = field(default_factory=dict)  # seconds: prepare, key, encode, first_batch, finalize


@dataclass
class EncodeJob:
    """What an executor encodes: ``paths`` cut into shards of ``shard_size`` in ``part_dir``."""

    model_path: str
    paths: list[str]
    labels: np.ndarray
    part_dir: str
    shard_size: int
    batch_size: int
    feature_dtype: str
    decoder: str = "pil"
    first_shard: int = 0  # paths[0] is the first image of shard ``first_shard`` (see :meth:`for_shard`)
    start: int = 0  # paths[0]'s position in the whole job (:meth:`for_shard`)
    total: int | None = None  # images of the whole job (default: len(paths))

    @property
    def job_images(self) -> int:
        """Images of the whole job this one is (a part of)."""
        return len(self.paths) if self.total is None else self.total

    @property
    def nshards(self) -> int:
        """One past the last shard number."""
        return self.first_shard + (len(self.paths) + self.shard_size - 1) // self.shard_size

    def bounds(self, s: int) -> tuple[int, int]:
        """Positions in ``paths`` of shard ``s``."""
        lo = (s - self.first_shard) * self.shard_size
        return lo, min(len(self.paths), lo + self.shard_size)

    def missing(self) -> list[int]:
        return [s for s in range(self.first_shard, self.nshards) if not layout.part_complete(self.part_dir, s)]

    def for_shard(self, s: int) -> "EncodeJob":
        """The job of shard ``s`` alone (what a Ray task receives: one shard's paths, not all)."""
        lo, hi = self.bounds(s)
        return EncodeJob(self.model_path, self.paths[lo:hi], self.labels[lo:hi], self.part_dir, self.shard_size,
                         self.batch_size, self.feature_dtype, self.decoder, s, self.start + lo, self.job_images)


def _custom_stream(encode, model, job: EncodeJob, todo: Sequence[int], device):
    """``encode`` (the signature of :func:`deephash_faiss.extract.encode_paths`, e.g. the cached
    fc7 encoder of a frozen-backbone build) shard by shard, as :func:`encode_stream` yields."""
    for si, s in enumerate(todo):
        lo, hi = job.bounds(s)
        for pos, codes, feats, bad in encode(model, job.paths[lo:hi], device, job.batch_size, job.feature_dtype):
            yield si, False, np.asarray(pos, np.int64) + lo, codes, feats, [(i + lo, r) for i, r in bad]
        yield (si, True, np.zeros(0, np.int64), np.zeros((0, model.config.bits // 8), np.uint8),
               np.zeros((0, model.config.feature_dim), job.feature_dtype), [])


def encode_local(model, job: EncodeJob, shards: Sequence[int], device, progress=None, workers: int | None = None,
                 decode_kind: str = "auto", pool=None, encode=None) -> tuple[int, int]:
    """Encode ``shards`` of ``job`` in this process (the streaming encoder); shard files are
    written by a background thread, one at a time, in order. A shard already complete is reused.

    ``progress``: called with the number of images done after every batch. ``pool``: a
    :class:`deephash_faiss.stream.DecodePool` to reuse (default: one for this call).
    ``encode``: another encoder with :func:`deephash_faiss.extract.encode_paths`'s signature
    (default: the streaming encoder).
    Returns (shards written, shards reused).
    """
    from .stream import encode_stream

    todo = [s for s in shards if not layout.part_complete(job.part_dir, s)]
    reused = len(shards) - len(todo)
    if progress:
        progress(sum(np.subtract(*job.bounds(s)[::-1]) for s in shards if s not in todo))
    if not todo:
        return 0, reused
    os.makedirs(job.part_dir, exist_ok=True)
    writer = _PartWriter(job, model.config.bits // 8, model.config.feature_dim)
    pos_acc: list[np.ndarray] = []
    bad_acc: list[tuple[int, str]] = []
    ok = False
    try:
        stream = (_custom_stream(encode, model, job, todo, device) if encode is not None else encode_stream(
            model, job.paths, device, job.batch_size, job.feature_dtype, job.decoder, workers, decode_kind,
            segments=[job.bounds(s) for s in todo], pool=pool, offset=job.start, job_size=job.job_images))
        for si, last, pos, codes, feats, bad in stream:
            pos_acc.append(pos)
            bad_acc.extend(bad)
            writer.append(todo[si], codes, feats)
            if progress:
                progress(len(pos) + len(bad))
            if last:
                writer.commit(todo[si], np.concatenate(pos_acc) if pos_acc else np.zeros(0, np.int64), bad_acc)
                pos_acc, bad_acc = [], []
        ok = True
    finally:
        writer.close(ok)
    return len(todo), reused


WRITE_QUEUE = 8  # tasks waiting for the shard writer (bounds the memory of a slow disk)
WRITE_BYTES = 16 << 20  # batches are handed to the writer this many feature bytes at a time


class _PartWriter:
    """The partial shards of one :func:`encode_local` call, written on one background thread in
    the order the batches come: batches are appended to their shard's :class:`ShardFile`
    (:func:`layout.open_part`) every :data:`WRITE_BYTES` of features (one wake-up of the writer
    per 16 MB, not per batch: on 2 cores per-batch writes slowed the encoder), and the last batch
    of a shard commits it (:func:`layout.commit_part`). A writer error is raised by the next
    call; at most :data:`WRITE_QUEUE` tasks wait."""

    def __init__(self, job: EncodeJob, code_bytes: int, dim: int):
        from concurrent.futures import ThreadPoolExecutor

        self.job, self.code_bytes, self.dim = job, code_bytes, dim
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="dhf-shard-writer")
        self.tasks: deque = deque()
        self.file = None  # the open ShardFile; touched only by the writer thread
        self.held: list[tuple[np.ndarray, np.ndarray]] = []  # batches not yet handed over
        self.held_bytes = 0

    def append(self, s: int, codes: np.ndarray, feats: np.ndarray) -> None:
        self.held.append((codes, feats))
        self.held_bytes += feats.nbytes
        if self.held_bytes >= WRITE_BYTES:
            self._hand_over(s)

    def commit(self, s: int, pos: np.ndarray, bad: list[tuple[int, str]]) -> None:
        self._hand_over(s)
        self._submit(self._commit, s, pos, list(bad))

    def _hand_over(self, s: int) -> None:
        if self.held:
            self._submit(self._append, s, self.held)
            self.held, self.held_bytes = [], 0

    def close(self, ok: bool) -> None:
        """Wait for every task (raising the first error when ``ok``); an unfinished shard's
        temporary file is removed."""
        try:
            while self.tasks:
                fut = self.tasks.popleft()
                if ok:
                    fut.result()
                else:
                    fut.exception()
        finally:
            self.pool.shutdown(wait=True)
            if self.file is not None:
                self.file.abort()
                self.file = None

    def _submit(self, fn, *args) -> None:
        self.tasks.append(self.pool.submit(fn, *args))
        while len(self.tasks) > WRITE_QUEUE or (self.tasks and self.tasks[0].done()):
            self.tasks.popleft().result()

    def _open(self, s: int):
        if self.file is None:
            lo, hi = self.job.bounds(s)
            self.file = layout.open_part(self.job.part_dir, s, hi - lo, self.code_bytes, self.dim,
                                         self.job.feature_dtype)
        return self.file

    def _append(self, s: int, batches: list[tuple[np.ndarray, np.ndarray]]) -> None:
        shard = self._open(s)
        for codes, feats in batches:
            shard.append(codes, feats)

    def _commit(self, s: int, pos: np.ndarray, bad: list[tuple[int, str]]) -> None:
        from .stream import _trace

        shard, self.file = self._open(s), None
        layout.commit_part(self.job.part_dir, s, shard, pos, self.job.paths, self.job.labels, bad)
        _trace(f"shard {s} written")


class LocalExecutor:
    """Encode in this process, on ``device`` ("auto", "cpu", "cuda")."""

    name = "local"

    def __init__(self, device: str = "auto", workers: int | None = None, decode_kind: str = "auto", encode=None):
        from .model import resolve_device

        self.device = resolve_device(device)
        self.workers = workers
        self.decode_kind = decode_kind
        self.encode = encode  # another encoder (the cached fc7 of a frozen-backbone build), or None
        self._early: tuple[str, Any] | None = None  # (model path, Future of the model on the device)

    def start(self, model_path: str, batch_size: int) -> None:
        """Called by :func:`build` before it scans the folder: on CUDA, load the model onto the
        device and warm up its first layout in the background (:func:`deephash_faiss.stream.prewarm`),
        so CUDA's start and cuDNN's first plans overlap the scan and the job key. :meth:`run`
        takes that model when the job's model is the same file."""
        if self.device.type != "cuda" or self.encode is not None:
            return
        from concurrent.futures import ThreadPoolExecutor

        def load():
            from .model import load_model
            from .stream import _trace, prewarm

            model = load_model(model_path)
            model.to(self.device).eval()
            _trace(f"model on {self.device} (early)")
            prewarm(model, self.device, batch_size)
            return model

        ex = ThreadPoolExecutor(1, thread_name_prefix="dhf-early")
        self._early = (os.path.abspath(model_path), ex.submit(load))
        ex.shutdown(wait=False)  # the thread ends after its one task

    @property
    def device_type(self) -> str:
        return self.device.type

    def run(self, job: EncodeJob, todo: list[int], progress: bool, log: Log) -> tuple[int, int]:
        from tqdm.auto import tqdm

        from .model import load_model
        from .stream import _trace

        early, self._early = self._early, None
        model = None
        if early is not None and early[0] == os.path.abspath(job.model_path):
            try:
                model = early[1].result()
            except Exception:  # noqa: BLE001 -- loaded again below, where its error is reported
                model = None
        if model is None:
            model = load_model(job.model_path)
            _trace("model loaded")
            model.to(self.device)
            _trace(f"model on {self.device}")
        n = sum(job.bounds(s)[1] - job.bounds(s)[0] for s in todo)
        log(f"encoding {n} images in {len(todo)} shard(s) with {model.config.backbone} ({model.config.bits} bits) "
            f"on {self.device}, decoder {job.decoder}")
        t0 = time.perf_counter()
        self.first_batch_s = None

        def update(k: int) -> None:
            if self.first_batch_s is None and k:
                self.first_batch_s = time.perf_counter() - t0
            bar.update(k)

        with tqdm(total=n, desc="encode", unit="img", disable=not progress) as bar:
            return encode_local(model, job, todo, self.device, update, self.workers, self.decode_kind,
                                encode=self.encode)


class _ShardWorker:
    """One Ray actor: loads the model once, encodes one shard per task with :func:`encode_local`."""

    def __init__(self, model_path: str, cwd: str, num_threads: int, device: str, fail_once_marker: str | None = None,
                 decode_share: int | None = None):
        import torch

        from .model import load_model

        if os.path.isdir(cwd):
            os.chdir(cwd)
        torch.set_num_threads(max(1, int(num_threads)))
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(0)  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU(s)
        self.model = load_model(model_path, self.device)
        self.fail_once_marker = fail_once_marker
        self.num_threads = torch.get_num_threads()
        # decode workers of their own, kept across tasks: on a CPU worker as many threads as
        # its CPUs (they share them with torch); on a GPU worker the host's share of cores
        from .stream import DecodePool, pick_decode_kind

        self._pools: dict[tuple[str, int], DecodePool] = {}
        if self.device.type == "cpu":
            self._decode = ("thread", max(1, int(num_threads)))
        else:
            share = max(1, decode_share or 1)
            self._decode = (pick_decode_kind("auto", 1 << 30), max(1, min(16, (os.cpu_count() or 1) // share)))

    def _pool(self, decoder: str, paths=()):
        from .data import at_load_size
        from .stream import AT_SIZE_THREADS, DecodePool, pool_workers

        kind = "thread" if decoder == "nvjpeg" else self._decode[0]  # nvjpeg: threads only read files
        key = (kind, pool_workers(decoder, self._decode[1]))  # a PIL thread pool is not nvjpeg's 2 readers
        if decoder != "nvjpeg" and at_load_size(paths, self.model.config.load_size):
            key = ("thread", AT_SIZE_THREADS)  # as stream.decode_pool_plan decides for a local build
        if key not in self._pools:
            self._pools[key] = DecodePool(*key)
        return self._pools[key]

    def encode(self, job: EncodeJob, shard: int):
        t0 = time.perf_counter()
        lo, hi = job.bounds(shard)
        written, reused = encode_local(self.model, job, [shard], self.device,
                                       pool=self._pool(job.decoder, job.paths[lo:hi]))
        marker = self.fail_once_marker
        if marker and written and not os.path.exists(marker):
            with open(marker, "w") as f:  # die once, after the shard is in place, before replying
                f.write(f"{os.getpid()} shard {shard}\n")
            os._exit(1)
        return {"shard": shard, "written": written, "reused": reused, "seconds": time.perf_counter() - t0,
                "pid": os.getpid(), "node": _node_ip(), "threads": self.num_threads}


def _node_ip() -> str:
    """``IP/node-id prefix`` of the Ray node this runs on (several raylets may share an IP)."""
    try:
        import ray

        return f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()[:8]}"
    except Exception:  # noqa: BLE001
        return "?"


class RayExecutor:
    """Encode on Ray actors: ``num_gpus_per_worker`` > 0 puts one actor on each GPU (or
    fraction) and encodes on CUDA there; otherwise one actor per ``num_cpus_per_worker`` CPUs.

    Args:
        address: a running Ray cluster ("HOST:PORT" or "auto"); None: the current session,
            a running local instance, or a new local one.
        num_workers: actors (default: as many as the cluster's GPUs or CPUs allow; never more
            than the shards to do).
        max_retries: actor restarts and task retries after a worker dies.
    """

    name = "ray"

    def __init__(self, address: str | None = None, num_workers: int | None = None, num_gpus_per_worker: float = 0,
                 num_cpus_per_worker: float = 1, max_retries: int = 3):
        if num_workers is not None and num_workers < 1:
            raise DhfError("--workers must be at least 1")
        self.address = address
        self.num_workers = num_workers
        self.num_gpus_per_worker = num_gpus_per_worker
        self.num_cpus_per_worker = num_cpus_per_worker
        self.max_retries = max_retries

    @property
    def device_type(self) -> str:
        return "cuda" if self.num_gpus_per_worker > 0 else "cpu"

    def run(self, job: EncodeJob, todo: list[int], progress: bool, log: Log) -> tuple[int, int]:
        from tqdm.auto import tqdm

        from .distributed import _ray, init_ray

        ray = _ray()
        owns = init_ray(self.address, log=log)
        written = reused = 0
        try:
            res = ray.cluster_resources()
            if self.num_gpus_per_worker > 0:
                if res.get("GPU", 0) < self.num_gpus_per_worker:
                    raise DhfError(f"the Ray cluster has {res.get('GPU', 0):g} GPU(s); asked for "
                                   f"{self.num_gpus_per_worker:g} per worker")
                auto = int(res.get("GPU", 0) // self.num_gpus_per_worker)
            else:
                auto = int(res.get("CPU", 1) // max(self.num_cpus_per_worker, 1e-9))
            nw = max(1, min(self.num_workers or auto or 1, len(todo)))
            threads = max(1, int(round(self.num_cpus_per_worker)))
            Actor = ray.remote(_ShardWorker).options(
                num_cpus=self.num_cpus_per_worker, num_gpus=self.num_gpus_per_worker,
                max_restarts=self.max_retries, max_task_retries=self.max_retries)
            fail = os.environ.get(FAIL_ONCE_ENV) or None
            # GPU actors split the node's cores for decoding: workers on one node share them
            share = nw if self.num_gpus_per_worker > 0 and len(ray.nodes()) == 1 else None
            actors = [Actor.remote(os.path.abspath(job.model_path), os.getcwd(), threads, self.device_type, fail, share)
                      for _ in range(nw)]
            log(f"encoding {sum(job.bounds(s)[1] - job.bounds(s)[0] for s in todo)} images in {len(todo)} shard(s) "
                f"on {nw} Ray worker(s), {self.num_cpus_per_worker:g} CPU / {self.num_gpus_per_worker:g} GPU each, "
                f"decoder {job.decoder}")
            queue = deque(todo)
            pending: dict[Any, tuple[int, int]] = {}

            def submit(a: int) -> None:
                s = queue.popleft()
                pending[actors[a].encode.remote(job.for_shard(s), s)] = (s, a)

            for _ in range(2):  # two in flight per actor: the next shard is queued while one runs
                for a in range(nw):
                    if queue:
                        submit(a)
            nodes: dict[str, int] = {}
            with tqdm(total=len(todo), desc="encode shards", unit="shard", disable=not progress) as bar:
                while pending:
                    done, _ = ray.wait(list(pending), num_returns=1)
                    s, a = pending.pop(done[0])
                    try:
                        out = ray.get(done[0])
                    except ray.exceptions.RayError as err:
                        msg = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
                        raise DhfError(f"Ray worker failed on shard {s} after {self.max_retries} retries: {msg}; "
                                       f"complete shards are kept, run the same command again to resume") from None
                    written += out["written"]
                    reused += out["reused"]
                    nodes[out["node"]] = nodes.get(out["node"], 0) + 1
                    bar.update(1)
                    if queue:
                        submit(a)
            log(f"shards per node: {json.dumps(nodes)}")
            for a in actors:
                ray.kill(a)
        finally:
            if owns:
                ray.shutdown()
        return written, reused


# ---------------------------------------------------------------- the pipeline


def typical_pixels(paths: Sequence[str], sample: int = 16) -> int | None:
    """Median width x height of the first ``sample`` JPEGs among ``paths`` (None: no JPEG)."""
    from .gpudecode import jpeg_header

    px = []
    for p in paths[:4 * sample]:
        try:
            with open(p, "rb") as f:
                h = jpeg_header(f.read(1 << 16))
        except OSError:
            continue
        if h:
            px.append(h["width"] * h["height"])
        if len(px) >= sample:
            break
    return int(np.median(px)) if px else None


NVJPEG_MIN_PIXELS = 200_000  # "auto": nvjpeg only for photo-sized JPEGs (about 500 x 400 and up)
NVJPEG_MIN_IMAGES = 30_000  # "auto": ... in jobs of at least this many (measured faster there; below: not re-measured)


def resolve_decoder(decoder: str, device_type: str, paths: Sequence[str] | None = None) -> str:
    """"auto" -> "nvjpeg" for big jobs of photo-sized JPEGs on CUDA, "pil" otherwise.

    Measured on the H200 through `dhf build-index` on 640x480 JPEGs (docs/scaling.md,
    ``benchmarks/results/build/h200_photos200k_product.txt``, 2026-12-03): since nvjpeg's
    operators load without the torchvision package (:func:`deephash_faiss.gpudecode.image_ops`)
    its first batch takes 1.0-1.2 s against PIL's 1.5 s, and at 30,000 photos the whole build
    takes 9.1-9.4 s against 12.0 s (6,300 img/s after the first batch against 4,100 with PIL in
    16 processes). Before that change nvjpeg's first batch took 6.5-9.5 s and it lost at 30,000.
    "auto" picks nvjpeg from :data:`NVJPEG_MIN_IMAGES` images whose typical size
    (:func:`typical_pixels`) is at least :data:`NVJPEG_MIN_PIXELS`; smaller jobs were not
    re-measured since and stay on PIL, as do small images (CIFAR-10's 32 px: 50,000-67,000 img/s
    on the CPU).
    """
    if decoder not in ("auto", "pil", "nvjpeg"):
        raise DhfError(f"--decoder must be auto, pil or nvjpeg, not {decoder!r}")
    if decoder == "auto":
        if device_type != "cuda" or paths is None or len(paths) < NVJPEG_MIN_IMAGES:
            return "pil"
        px = typical_pixels(paths)
        return "nvjpeg" if px is not None and px >= NVJPEG_MIN_PIXELS else "pil"
    if decoder == "nvjpeg" and device_type != "cuda" and not ALLOW_NVJPEG_ON_CPU:
        raise DhfError("--decoder nvjpeg decodes on the GPU: it needs --device cuda")
    return decoder


ALLOW_NVJPEG_ON_CPU = False  # tests: run the nvjpeg path with torchvision's CPU decoder


def encode(job: EncodeJob, executor, progress: bool = True, log: Log = _quiet) -> tuple[int, int]:
    """Encode the missing shards of ``job`` through ``executor``; returns (written, reused).

    Raises DhfError if a shard is still missing afterwards."""
    todo = job.missing()
    reused = job.nshards - len(todo)
    written = 0
    if reused:
        log(f"resumed: {reused} of {job.nshards} shard(s) already complete")
    if todo:
        written, again = executor.run(job, todo, progress, log)
        reused += again
    missing = job.missing()
    if missing:
        raise DhfError(f"shards {missing[:5]} missing after encoding; run the same command again")
    return written, reused


def prepare_build(images_dir: str, index_dir: str, spec, feature_dtype: str, shard_size: int, batch_size: int):
    """Check build arguments, scan the images and create or check ``index_dir``: (spec, images)."""
    from .data import scan_images
    from .index import IndexSpec

    if feature_dtype not in ("float32", "float16"):
        raise DhfError("--feature-dtype must be float32 or float16")
    if shard_size < 1 or batch_size < 1:
        raise DhfError("--shard-size and --batch-size must be at least 1")
    images = scan_images(images_dir)
    if len(images) == 0:
        raise DhfError(f"no images found under {images_dir}")
    layout.prepare_target(index_dir)
    return spec or IndexSpec(), images


def build(
    images_dir: str,
    index_dir: str,
    model_path: str | None,
    spec=None,
    batch_size: int = 128,
    shard_size: int = 50_000,
    feature_dtype: str = "float32",
    executor=None,
    decoder: str = "auto",
    progress: bool = True,
    log: Log = _quiet,
    train_options: dict[str, Any] | None = None,
) -> BuildReport:
    """The build: prepare -> lock -> (train) -> job key -> encode via ``executor`` -> finalize.
    See :func:`deephash_faiss.api.build_index`. A build that fails before it wrote anything
    removes the ``index_dir`` it created (an interrupted one keeps its work, to resume)."""
    with layout.removed_if_unused_on_failure(index_dir):
        from .model import file_sha256, load_model
        from .stream import _trace, start_trace_clock, stop_trace_clock

        t0 = time.perf_counter()
        start_trace_clock()
        _trace("build starts")
        executor = executor or LocalExecutor()
        if model_path is not None and hasattr(executor, "start"):
            executor.start(model_path, batch_size)  # CUDA: model onto the GPU, first warm-up, while we scan
        spec, images = prepare_build(images_dir, index_dir, spec, feature_dtype, shard_size, batch_size)
        phases = {"prepare": time.perf_counter() - t0}
        _trace(f"prepared: {len(images.paths)} images")
        with layout.IndexLock(index_dir):
            layout.current_manifest(index_dir)  # refuses to overwrite an index of a newer format
            trained = False
            if model_path is None:
                # training is not distributed: it runs here (INDEX/.train-<key>/, resumable); a
                # frozen-backbone model comes with an encoder reading the fc7 cached while training
                from .api import _train_for_build
                from .model import resolve_device

                dev = getattr(executor, "device", None) or resolve_device("auto")
                model_path, _, cached = _train_for_build(images, images_dir, index_dir, dev, progress, log,
                                                         dict(train_options or {}))
                trained = True
                if cached is not None:
                    log("encoding from the fc7 cached while training (no second decode)"
                        + ("; --ray is not used: no images are left to decode or encode"
                           if not isinstance(executor, LocalExecutor) else ""))
                    executor, decoder = LocalExecutor(str(dev), encode=cached), "pil"
            t1 = time.perf_counter()
            model = load_model(model_path)  # config and a check that it loads, before any worker starts
            spec.check(model.config.bits)
            dec = resolve_decoder(decoder, executor.device_type, images.paths)
            key = build_key(file_sha256(model_path), images.paths, shard_size, feature_dtype, dec)
            job = EncodeJob(os.path.abspath(model_path), list(images.paths), np.asarray(images.labels),
                            layout.partial_dir(index_dir, key), shard_size, batch_size, feature_dtype, dec)
            t2 = time.perf_counter()
            phases["key"] = t2 - t1
            _trace("job key done")
            written, reused = encode(job, executor, progress, log)
            bad = [b for s in range(job.nshards) for b in layout.read_part_skips(job.part_dir, s)]
            if job.paths and len(bad) >= len(job.paths):  # an index of no rows would replace the current one
                shutil.rmtree(job.part_dir, ignore_errors=True)
                raise DhfError(f"none of the {len(job.paths)} images under {images_dir} could be decoded "
                               f"({bad[0][0]}: {bad[0][1]}); {index_dir} was not changed")
            t3 = time.perf_counter()
            phases["encode"] = t3 - t2
            _trace("encoded")
            if getattr(executor, "first_batch_s", None) is not None:
                phases["first_batch"] = executor.first_batch_s
            manifest = layout.finalize_build(index_dir, job.part_dir, job.nshards, model_path, model.config, spec,
                                             feature_dtype, images.classes, images_dir, images.skipped, decoder=dec)
            shutil.rmtree(job.part_dir, ignore_errors=True)
            if trained:
                from .api import _remove_train_dirs

                _remove_train_dirs(index_dir)
            skipped = layout.read_skip_report(index_dir, manifest)
            phases["finalize"] = time.perf_counter() - t3
            _trace("finalized")
        stop_trace_clock()
        return BuildReport(index_dir, manifest["count"], skipped, written, reused, time.perf_counter() - t0, trained,
                           dec, phases)


def build_key(model_sha: str, paths: list[str], shard_size: int, feature_dtype: str, decoder: str) -> str:
    """The job key of a build: model, image list, shard size, dtype, decoder and file stamps."""
    return layout.job_key(model_sha, paths, shard_size, feature_dtype,
                          (f"decoder:{decoder}\n" if decoder != "pil" else "") + layout.file_stamps(paths))


def add_job(index_dir: str, old: dict[str, Any], paths: list[str], labels: np.ndarray, shard_size: int,
            batch_size: int) -> EncodeJob:
    """The encoding job of ``dhf add``: the index's model, dtype and decoder; the key adds the
    base generation and row count (an add on top of another generation is another job)."""
    dtype = old["feature_dtype"]
    dec = old.get("decoder", "pil")
    key = layout.job_key(old["model"]["sha256"], paths, shard_size, dtype,
                         f"add:{old.get('generation', 1)}:{old['count']}\n"
                         + (f"decoder:{dec}\n" if dec != "pil" else "") + layout.file_stamps(paths))
    return EncodeJob(os.path.abspath(os.path.join(index_dir, old["model"]["file"])), list(paths),
                     np.asarray(labels, np.int32), layout.partial_dir(index_dir, key, "add"), shard_size, batch_size,
                     dtype, dec)


def check_executor_decoder(executor, decoder: str) -> None:
    """An index encoded with nvjpeg is extended with nvjpeg only (codes stay comparable)."""
    if decoder == "nvjpeg" and executor.device_type != "cuda" and not ALLOW_NVJPEG_ON_CPU:
        raise DhfError("this index was encoded with the GPU JPEG decoder (manifest decoder: nvjpeg): "
                       "add images with --device cuda")
