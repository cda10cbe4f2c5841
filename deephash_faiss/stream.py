"""The streaming encoder: image files -> (codes, fc7 features), every stage overlapped.

Stages, each bounded::

    decode workers (threads or processes, ``prefetch`` batches ahead)
        -> [nvjpeg: screened JPEG bytes decoded + squared on the GPU, the rest on the CPU]
        -> pinned host staging -> host-to-device copy on its own CUDA stream
        -> model on the compute stream (bf16 autocast), codes packed on the device
        -> device-to-host copy into pinned buffers, collected ``depth`` batches later
        -> the caller (shard assembly; shards are written in a background thread by
           :func:`deephash_faiss.pipeline.encode_local`)

Order and results are deterministic: batches are decoded ahead but consumed in order, and
a batch is always the same images (positions ``[lo + j * batch_size, ...)`` of a segment, a
segment being one shard), whatever runs it -- the local build, a Ray actor or a resume --
so results do not depend on how shards are spread over workers. On CPU the model runs the
same function on the same batches as :func:`deephash_faiss.extract.encode_array`.

Decode workers: ``"thread"`` or ``"process"`` (spawned, no torch in them); ``"auto"``
picks processes for big jobs on machines with 4 or more cores (with many threads the GIL
makes decoding tiny JPEGs slower than one thread: 16 threads 2,234 img/s vs 1 thread 4,267
on the H200 host, issue 12) and threads otherwise (no start-up cost; on 2 cores threads
measured faster: ``benchmarks/results/build/``).
``benchmarks/bench_build.py`` measures both.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np

DECODERS = ("pil", "nvjpeg")
TRACE_ENV = "DHF_TRACE"  # =1: the encoder's start-up events, timestamped, on stderr
_T0 = [0.0]


def start_trace_clock() -> None:
    """Count :func:`_trace`'s seconds from now, a build's start, until :func:`stop_trace_clock`
    (outside a build each encode counts from its own start)."""
    _T0[0] = time.perf_counter()


def stop_trace_clock() -> None:
    _T0[0] = 0.0


def _trace(event: str) -> None:
    """With ``DHF_TRACE=1``: one line on stderr, seconds since the build (or the encode) started
    and the thread (the start-up of a CUDA build overlaps several threads: which one waits is the
    question)."""
    if os.environ.get(TRACE_ENV) == "1":
        # one write per line: lines from several threads do not interleave
        sys.stderr.write(f"[dhf-trace {time.perf_counter() - _T0[0]:8.3f} s {threading.current_thread().name}] "
                         f"{event}\n")
        sys.stderr.flush()


PROCESS_MIN_IMAGES = 4096  # "auto": processes pay a start-up of about a second
PROCESS_MIN_CPUS = 4  # "auto": on 2 cores threads measured faster (benchmarks/results/build/)


def decode_chunk(paths: Sequence[str], size: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """Decode files on the CPU (:func:`deephash_faiss.data.decode_image`).

    Returns:
        (uint8 [m, size, size, 3], local positions int64 [m] that decoded, bad [(local position, reason)]).
    """
    from .data import ImageDecodeError, decode_image

    imgs, ok, bad = [], [], []
    for j, p in enumerate(paths):
        try:
            imgs.append(decode_image(p, size))
            ok.append(j)
        except ImageDecodeError as err:
            bad.append((j, str(err)))
    arr = np.stack(imgs) if imgs else np.zeros((0, size, size, 3), np.uint8)
    return arr, np.asarray(ok, np.int64), bad


def read_screen_chunk(paths: Sequence[str], size: int):
    """nvjpeg front half on the host: read the files, keep the GPU-decodable JPEG bytes,
    decode the rest on the CPU.

    Returns:
        (gpu: [(local position, bytes)], cpu: (uint8 [m, size, size, 3], local positions [m]),
        bad [(local position, reason)]).
    """
    from .gpudecode import gpu_decodable, read_bytes

    gpu, rest = [], []
    for j, p in enumerate(paths):
        data = read_bytes(p)
        if data and gpu_decodable(data, size):
            gpu.append((j, data))
        else:
            rest.append(j)
    arr, ok, bad = decode_chunk([paths[j] for j in rest], size)
    rest = np.asarray(rest, np.int64)
    return gpu, (arr, rest[ok]), [(int(rest[i]), why) for i, why in bad]


class _Chunks:
    """One batch decoded as several tasks (its first images do not wait for one worker to
    decode the whole batch: 256 photo-sized JPEGs are ~2 s on one core); ``result()`` merges
    them in order, as one :func:`decode_chunk` / :func:`read_screen_chunk` call would return."""

    def __init__(self, futures: list, offsets: list[int], screened: bool):
        self.futures, self.offsets, self.screened = futures, offsets, screened

    def result(self):
        parts = [f.result() for f in self.futures]
        if self.screened:
            gpu = [(j + o, d) for (g, _, _), o in zip(parts, self.offsets) for j, d in g]
            arrs = [a for _, (a, _), _ in parts]
            pos = np.concatenate([np.asarray(p, np.int64) + o for (_, (_, p), _), o in zip(parts, self.offsets)])
            bad = [(j + o, r) for (_, _, b), o in zip(parts, self.offsets) for j, r in b]
            return gpu, (np.concatenate(arrs), pos), bad
        arr = np.concatenate([a for a, _, _ in parts])
        ok = np.concatenate([np.asarray(k, np.int64) + o for (_, k, _), o in zip(parts, self.offsets)])
        bad = [(j + o, r) for (_, _, b), o in zip(parts, self.offsets) for j, r in b]
        return arr, ok, bad

    def cancel(self) -> None:
        for f in self.futures:
            f.cancel()


def submit_chunks(pool: "DecodePool", fn, paths: Sequence[str], size: int, chunk: int) -> _Chunks:
    """``fn(paths, size)`` as tasks of at most ``chunk`` paths each."""
    offs = list(range(0, len(paths), chunk)) or [0]
    return _Chunks([pool.submit(fn, list(paths[o:o + chunk]), size) for o in offs], offs,
                   fn is read_screen_chunk)


#: "auto" decodes images already at the load size (:func:`deephash_faiss.data.at_load_size`:
#: JPEGs the as-is path decodes without resampling, e.g. CIFAR-10 at 32 px) in this many
#: threads. Measured (CIFAR-10 train, 50,000 files, Lite0 at 32 px, ``dhf build-index``): on an
#: H100 host of 16 cores (benchmarks/device/h200_thread_workers.sh, 2026-12-06) one thread gave
#: 7.4-9.1 s a build against 8.6-11.5 s with the 16 processes, 7 of 7 pairs, either order (a
#: spawned worker does not import torch, so it decodes with PIL: 16 of them 44,051 img/s, one
#: as-is thread 20,577, more threads slower under the GIL); on 2 cores 26.3-28.6 s against
#: 27.7-29.3 s with 2 threads (bench_decode_threads.py, ``cpu_decode_threads_cifar50k.json``).
AT_SIZE_THREADS = 1


def decode_pool_plan(decoder: str, kind: str, workers: int | None, n: int, paths: Sequence[str] = (),
                     size: int | None = None) -> tuple[str, int]:
    """(kind, workers) of the decode pool for ``n`` images: "nvjpeg" reads in threads
    (:func:`pool_workers`); with ``kind`` "auto" and no ``workers`` given, images at the load
    size (``paths`` sampled, ``size`` the model's) get :data:`AT_SIZE_THREADS` thread(s);
    otherwise :func:`pick_decode_kind` and one worker a core (at most 16)."""
    from .data import at_load_size, default_workers

    if decoder == "nvjpeg":
        return "thread", workers or pool_workers(decoder, default_workers())
    if kind == "auto" and workers is None and size is not None and at_load_size(paths, size):
        return "thread", AT_SIZE_THREADS
    return pick_decode_kind(kind, n), workers or pool_workers(decoder, default_workers())


def pick_decode_kind(kind: str, n: int) -> str:
    if kind not in ("auto", "thread", "process"):
        raise ValueError(f"decode workers must be auto, thread or process, not {kind!r}")
    if kind == "auto":
        return "process" if n >= PROCESS_MIN_IMAGES and (os.cpu_count() or 1) >= PROCESS_MIN_CPUS else "thread"
    return kind


@contextlib.contextmanager
def _main_hidden():
    """Spawned children run the parent's main module first (as ``__mp_main__``): for
    ``dhf build-index`` that is the CLI, i.e. torch and the whole package, seconds per worker
    and 16 at once on the H200 host. The decode workers need only this module (the tasks are
    pickled by reference), so the main module is hidden while they start."""
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__spec__", "__file__") if main is not None and k in main.__dict__}
    try:
        if main is not None:
            main.__dict__["__spec__"] = None
            main.__dict__.pop("__file__", None)
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)


class DecodePool:
    """Decodes whole batches in worker threads or processes; ``submit`` returns a Future."""

    def __init__(self, kind: str, workers: int):
        self.kind = kind
        self.workers = workers
        if kind == "process":
            import multiprocessing as mp

            self.pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
            with _main_hidden():  # every worker starts now, without re-importing the main module
                for f in [self.pool.submit(os.getpid) for _ in range(workers)]:
                    f.result()
        else:
            self.pool = ThreadPoolExecutor(workers, thread_name_prefix="dhf-decode")

    def submit(self, fn, *args) -> Future:
        return self.pool.submit(fn, *args)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _CpuRunner:
    """The model on the CPU, synchronously (the decode workers still run ahead)."""

    def __init__(self, model, device, feature_dtype: str):
        self.model, self.device, self.dtype = model, device, feature_dtype

    def push(self, x, meta, layout: str | None = None) -> list:
        """One batch now (``layout`` is ignored: the CPU runs channels_last)."""
        from .extract import forward_batch
        from .index import pack_codes

        if len(x) == 0:
            return [(meta, None, None)]
        import torch

        fc7, h = forward_batch(self.model, torch.as_tensor(x), self.device)
        return [(meta, pack_codes(h.numpy()), fc7.numpy().astype(self.dtype, copy=False))]

    def flush(self) -> list:
        return []


_MODEL_THREADS: dict = {}  # {name: executor} of this process
_MODEL_THREADS_PID = [None]  # the pid that made them
_MODEL_THREAD_LOCK = threading.Lock()


def model_thread(layout: str = "") -> ThreadPoolExecutor:
    """The thread this process runs its CUDA models in for ``layout`` (``dhf-model``, or
    ``dhf-model-<layout>``; made at first use; a forked child makes its own): cuDNN's execution
    plans, kept per thread by torch, are built once per process and layout instead of once per
    thread (:class:`_CudaRunner`). A "hybrid" job uses two, one per layout, so one layout's
    plans can be built while the other's batches run."""
    name = f"dhf-model-{layout}" if layout else "dhf-model"
    with _MODEL_THREAD_LOCK:
        if _MODEL_THREADS_PID[0] != os.getpid():
            _MODEL_THREADS.clear()
            _MODEL_THREADS_PID[0] = os.getpid()
        if name not in _MODEL_THREADS:
            _MODEL_THREADS[name] = ThreadPoolExecutor(1, thread_name_prefix=name)
        return _MODEL_THREADS[name]


def warm_pass(model, device, shape: tuple[int, ...], layout: str) -> None:
    """One forward pass of ``model`` on zeros uint8 ``shape`` ([b, S, S, 3]) in ``layout``, in
    the calling thread, outputs discarded: it builds this thread's cuDNN plans for that shape."""
    import torch

    from .extract import forward_batch

    with torch.cuda.device(device):
        x = torch.zeros(shape, dtype=torch.uint8, device=device)
        _trace(f"model warm-up starts ({layout})")
        forward_batch(model, x, device, to_host=False, layout=layout)
        torch.cuda.synchronize(device)
    _trace(f"model warm-up done ({layout})")


def prewarm(model, device, batch: int) -> Future:
    """Start the warm-up of a job's first layout now, in its model thread: a build does it while
    it scans the folder and computes the job key, before the job's size (and so its
    :class:`_CudaRunner`) is known. A depthwise model's first batch is NCHW whatever the job's
    size (:func:`deephash_faiss.extract.stream_layout`), another model's NHWC. The runner's own
    warm-up of that layout then queues behind this one in the same thread and finds the plans
    built (a second pass: ~0.02 s)."""
    from .extract import batch_layout, stream_layout

    lay = batch_layout(stream_layout(model, 1), 0)
    size = model.config.load_size
    return model_thread(lay).submit(warm_pass, model, device, (batch, size, size, 3), lay)


class _CudaRunner:
    """The model on CUDA: H2D copies on a side stream from pinned memory, compute on the
    current stream, D2H into pinned buffers; results are collected ``depth`` batches later
    so the host never waits for the batch it just queued.

    Every batch runs at the one shape ``[batch, S, S, 3]``: a short batch (a segment's last)
    is padded with zeros and its outputs cut back. A new input shape costs the first call's
    cuDNN plan building again -- seconds for EfficientNet at 224 px on the H200, more than the
    whole encode of 4,000 images (issue 12) -- and padding costs at most one batch of compute.

    The warm-up and every batch of a layout run in the process's one model thread for that
    layout (:func:`model_thread`): torch keeps cuDNN's execution plans per thread, so a plan
    built in one thread is built again at its first use in any other. Measured on the H200
    (``benchmarks/bench_first_batch.py``, NHWC at 224 px, batch 256): after every convolution had
    run once in other threads, the first forward pass in the main thread still took 2.2-3.1 s,
    against 2.8-3.4 s with no warm-up and 0.014 s for a second pass in the same thread. One
    thread per layout for the process keeps the plans for every later job too (a Ray actor's
    next shard, a service's next query). A "hybrid" job (:func:`deephash_faiss.extract.stream_layout`)
    warms both layouts at once, each in its thread: its first batches run NCHW while NHWC's
    plans are built. :meth:`push` and :meth:`flush` wait for the thread.
    """

    def __init__(self, model, device, feature_dtype: str, depth: int = 2, batch: int | None = None,
                 layout: str | None = None, warm_shape: tuple[int, ...] | None = None,
                 layouts: Sequence[str] | None = None):
        """``layouts``: the CUDA layouts the job's batches use, the first batch's first
        (default: ``[layout]``); each is warmed up in its thread when ``warm_shape`` is given."""
        import torch

        self.torch = torch
        self.model, self.device, self.depth, self.batch, self.layout = model, device, depth, batch, layout
        self.tdtype = {"float32": torch.float32, "float16": torch.float16}[feature_dtype]
        self.copy = torch.cuda.Stream(device)
        self.inflight: deque = deque()
        used = list(layouts or [layout])
        self._first = used[0]
        self._threads = {lay: model_thread(lay or "") for lay in used}
        self._warm: dict = {}
        if warm_shape is not None:
            # the first forward pass at the batch shape pays cuDNN's plan building and CUDA's
            # kernel loading (0.5-7 s, extract.cuda_layout): done on zeros, in the layout's
            # thread, while the decode workers start and decode the first batches (and, for a
            # second layout, while the first one's batches run); its outputs are discarded
            for lay in used:
                self._warm[lay] = self._threads[lay].submit(warm_pass, model, device, warm_shape, lay)

    def warming(self) -> bool:
        """Whether the warm-up pass of the first batch's layout (on zeros, at the batch shape)
        is still running."""
        warm = self._warm.get(self._first)  # the model thread drops it at its first batch
        return warm is not None and not warm.done()

    def push(self, x, meta, layout: str | None = None) -> list:
        """Queue one batch, uint8 [b, S, S, 3] (numpy, or torch on the device), with ``meta``, in
        ``layout`` (one of the runner's ``layouts``; default the first); returns
        [(meta, codes uint8 [b, bits / 8], features [b, D])] of the batches done, in order."""
        lay = self._first if layout is None else layout
        return self._threads[lay].submit(self._push, x, meta, lay).result()

    def flush(self) -> list:
        """Wait for every queued batch; returns their results as :meth:`push` does."""
        return self._threads[self._first].submit(self._drain, 0).result()

    def _push(self, x, meta, layout) -> list:
        from .extract import forward_batch, pack_codes_torch

        torch = self.torch
        warm = self._warm.pop(layout, None)
        if warm is not None:
            if not warm.done():
                _trace(f"waiting for the {layout} warm-up")
            warm.result()
        n = len(x)
        if n == 0:
            self.inflight.append((meta, None))
            return self._drain(self.depth)
        full = max(n, self.batch or n)
        compute = torch.cuda.current_stream(self.device)
        if isinstance(x, np.ndarray):
            host = torch.empty((full, *x.shape[1:]), dtype=torch.uint8, pin_memory=True)
            host[:n].copy_(torch.from_numpy(x))
            host[n:].zero_()
            with torch.cuda.stream(self.copy):
                xd = host.to(self.device, non_blocking=True)
            compute.wait_stream(self.copy)
            xd.record_stream(compute)
        else:
            xd = x if n == full else torch.cat([x, x.new_zeros((full - n, *x.shape[1:]))])
        fc7, h = forward_batch(self.model, xd, self.device, to_host=False, layout=layout)
        codes = pack_codes_torch(h[:n])
        feats = fc7[:n].to(self.tdtype)
        codes_h = torch.empty(codes.shape, dtype=codes.dtype, pin_memory=True)
        feats_h = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True)
        codes_h.copy_(codes, non_blocking=True)
        feats_h.copy_(feats, non_blocking=True)
        done = torch.cuda.Event()
        done.record(compute)
        self.inflight.append((meta, (done, codes_h, feats_h)))
        return self._drain(self.depth)

    def _drain(self, keep: int) -> list:
        out = []
        while len(self.inflight) > keep:
            meta, res = self.inflight.popleft()
            if res is None:
                out.append((meta, None, None))
                continue
            done, codes_h, feats_h = res
            done.synchronize()
            out.append((meta, codes_h.numpy().copy(), feats_h.numpy().copy()))
        return out


DECODE_CHUNK_MIN = 16  # images per decode task, at least (task overhead)
GPU_AHEAD = 3  # nvjpeg: batches decoded on the GPU ahead of the model
#: nvjpeg: threads reading and screening the files (their header parsing is Python and holds the
#: GIL that the decoding thread needs). Measured on the H200 (benchmarks/diag_decode_threads.py,
#: 30,000 photo-sized JPEGs, two runs, results/build/h200_decode_threads_*.json): decode fed by 2 /
#: 4 / 8 / 16 readers 10,094 / 9,649 / 8,517 / 8,500 and 12,332 / 7,801 / 7,084 / 4,665 img/s
#: (decode_batch alone on bytes read beforehand 15,900-19,000).
NVJPEG_READERS = 2


def pool_workers(decoder: str, cpus: int) -> int:
    """Decode workers for ``decoder`` given ``cpus`` cores: one a core for "pil", at most
    :data:`NVJPEG_READERS` reading threads for "nvjpeg"."""
    return max(1, min(NVJPEG_READERS, cpus) if decoder == "nvjpeg" else cpus)


# While the model's first pass warms up (0.4-1 s NCHW, ~5 s NHWC on the H200) decoding runs
# further ahead, into at most this many bytes of decoded images (host memory for PIL; device
# memory for nvjpeg, at most a quarter of what is free): the warm-up is otherwise idle time
# for the decoders (issue 12: 200,000 photos, first batch 4.4-7.5 s of a 44-46 s build).
WARM_AHEAD_BYTES = {"pil": 1 << 30, "nvjpeg": 4 << 30}
GIL_SWITCH_S = 1e-4  # the interpreter's switch interval while a CUDA encode runs


class _GpuHalf:
    """nvjpeg's device half, in one background thread with its own CUDA stream: the screened
    JPEG bytes decoded and squared on the GPU, merged in position order with what the CPU
    decoded. The consumer waits on the batch's event, so the model never waits for decoding
    it does not need yet."""

    def __init__(self, paths, size: int, device, cuda: bool):
        import torch

        self.paths, self.size, self.device, self.cuda = paths, size, device, cuda
        self.stream = torch.cuda.Stream(device) if cuda else None
        self._runs = 0
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="dhf-gpu-decode")
        if cuda:  # nvjpeg's handle and first kernels, before the first batch needs them
            self.pool.submit(self._warmup)

    def _warmup(self) -> None:
        import io

        import torch
        from PIL import Image

        from .gpudecode import decode_batch

        buf = io.BytesIO()
        Image.new("RGB", (2 * self.size, self.size + 8)).save(buf, format="JPEG")
        _trace("nvjpeg warm-up starts")
        with torch.cuda.stream(self.stream):
            decode_batch([buf.getvalue()] * 2, self.size, self.device)
        self.stream.synchronize()
        _trace("nvjpeg warm-up done")

    def submit(self, read_future: Future, lo: int) -> Future:
        return self.pool.submit(self._run, read_future, lo)

    def _run(self, read_future: Future, lo: int):
        import torch

        screened = read_future.result()
        first = self._runs < 3
        self._runs += 1
        if first:
            _trace(f"GPU half: files at {lo} read and screened")
        if not self.cuda:
            return self._assemble(screened, lo), None
        with torch.cuda.stream(self.stream):
            out = self._assemble(screened, lo)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        if first:
            _trace(f"GPU half: batch at {lo} queued")
        return out, ev

    def result(self, fut: Future):
        """(x: uint8 [m, S, S, 3] on the device (a numpy array on CPU), ok positions, bad)."""
        import torch

        (x, ok, bad), ev = fut.result()
        if ev is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(ev)
            x.record_stream(compute)
        return x, ok, bad

    def _assemble(self, screened, lo: int):
        import torch

        from .data import ImageDecodeError, decode_image
        from .gpudecode import decode_batch

        size, device = self.size, self.device
        gpu, (cpu_arr, cpu_pos), bad = screened
        gimgs, failed = decode_batch([d for _, d in gpu], size, device)
        failed_set = set(failed)
        gpos = [j for k, (j, _) in enumerate(gpu) if k not in failed_set]
        extra, extra_pos = [], []
        for k in failed:  # nvjpeg refused it: the CPU path decides (same skip reasons)
            j = gpu[k][0]
            try:
                extra.append(decode_image(self.paths[lo + j], size))
                extra_pos.append(j)
            except ImageDecodeError as err:
                bad.append((j, str(err)))
        host = np.concatenate([cpu_arr, np.stack(extra)]) if extra else cpu_arr
        hpos = np.concatenate([cpu_pos, np.asarray(extra_pos, np.int64)])
        allpos = np.concatenate([np.asarray(gpos, np.int64), hpos])
        order = np.argsort(allpos, kind="stable")
        if len(hpos):
            ht = torch.from_numpy(host)
            if self.cuda:
                ht = ht.pin_memory().to(device, non_blocking=True)
            x = torch.cat([gimgs, ht.to(gimgs.device)])[torch.as_tensor(order, device=gimgs.device)]
        else:
            x = gimgs
        if not self.cuda:
            x = x.cpu().numpy()
        return x, allpos[order], bad

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def batches_of(segments: Sequence[tuple[int, int]], batch_size: int) -> list[tuple[int, int, int, bool]]:
    """(segment index, lo, hi, last batch of its segment) for every batch, in order."""
    out = []
    for si, (lo, hi) in enumerate(segments):
        starts = list(range(lo, hi, batch_size))
        for j, b in enumerate(starts):
            out.append((si, b, min(hi, b + batch_size), j == len(starts) - 1))
    return out


def encode_stream(
    model,
    paths: Sequence[str],
    device,
    batch_size: int = 128,
    feature_dtype: str = "float32",
    decoder: str = "pil",
    workers: int | None = None,
    decode_kind: str = "auto",
    segments: Sequence[tuple[int, int]] | None = None,
    prefetch: int | None = None,
    pool: "DecodePool | None" = None,
    offset: int = 0,
    job_size: int | None = None,
) -> Iterator[tuple[int, bool, np.ndarray, np.ndarray, np.ndarray, list[tuple[int, str]]]]:
    """Decode and encode ``paths`` batch by batch, stages overlapped, in order.

    Args:
        device: torch.device the model is on. ``decoder``: "pil" (CPU) or "nvjpeg"
            (torchvision ``decode_jpeg`` on ``device``, CPU fallback for what it can't decode).
        workers: decode workers (default: :func:`decode_pool_plan`: the CPU count, at most 16;
            one thread for images already at the load size; for "nvjpeg" :data:`NVJPEG_READERS`).
        segments: [(lo, hi)] position ranges to encode (default: all); batches never cross one.
        prefetch: batches decoded ahead (default: 2 x workers + 2).
        pool: a :class:`DecodePool` to use (and leave open), e.g. one kept by a Ray actor
            across its tasks; default: a new one for this call.
        offset, job_size: ``paths[0]``'s position in the whole job and the job's size (default
            0 and ``len(paths)``; a Ray actor gets one shard's paths): on CUDA they choose each
            batch's layout (:func:`deephash_faiss.extract.stream_layout`, ``batch_layout``).
    Yields:
        (segment index, last batch of the segment, positions int64 [b] into ``paths`` that
        encoded, codes uint8 [b, bits / 8], features [b, D] of ``feature_dtype``,
        bad [(position, reason)] of files that could not be decoded).
    """
    import torch

    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, not {decoder!r}")
    if not _T0[0]:
        start_trace_clock()
    _trace(f"encode starts: {len(paths)} paths, decoder {decoder}")
    size = model.config.load_size
    segments = [(0, len(paths))] if segments is None else [tuple(s) for s in segments]
    plan = batches_of(segments, batch_size)
    total = sum(hi - lo for lo, hi in segments)
    model.eval()
    cuda = torch.device(device).type == "cuda"
    # the model warms up (CUDA) and nvjpeg initialises while the decode workers start
    layouts: list = [None] * len(plan)
    if cuda:
        from .extract import batch_layout, stream_layout

        job_layout = stream_layout(model, len(paths) if job_size is None else job_size)  # the whole job's
        layouts = [batch_layout(job_layout, offset + lo) for _, lo, _, _ in plan]
        runner = _CudaRunner(model, device, feature_dtype, batch=batch_size, layout=job_layout,
                             warm_shape=(batch_size, size, size, 3) if plan else None,
                             layouts=list(dict.fromkeys(layouts)) or [batch_layout(job_layout, offset)])
    else:
        runner = _CpuRunner(model, device, feature_dtype)
    fn = read_screen_chunk if decoder == "nvjpeg" else decode_chunk
    # nvjpeg: the GPU half (decode_jpeg, resize, merge with the CPU fallbacks) runs in its own
    # thread on its own CUDA stream, GPU_AHEAD batches ahead of the model
    gpu_half = _GpuHalf(paths, size, device, cuda) if decoder == "nvjpeg" else None
    own_pool = pool is None
    if pool is None:
        # nvjpeg: the workers only read files and parse headers (the GIL is released on reads):
        # threads, no pickling of the encoded bytes, and few of them (NVJPEG_READERS)
        pool = DecodePool(*decode_pool_plan(decoder, decode_kind, workers, total, paths, size))
    _trace(f"decode pool ready: {pool.workers} {pool.kind} workers")
    prefetch = prefetch or (2 * pool.workers + 2)
    # a batch is split over the workers (at least DECODE_CHUNK_MIN images a task)
    chunk = max(DECODE_CHUNK_MIN, -(-batch_size // pool.workers))
    pending: deque = deque()  # [batch, decode future, GPU-half future or None], in order
    it = iter(plan)

    def fill(ahead: int = prefetch, gpu_ahead: int = GPU_AHEAD) -> None:
        while len(pending) < ahead:
            b = next(it, None)
            if b is None:
                break
            pending.append([b, submit_chunks(pool, fn, paths[b[1]:b[2]], size, chunk), None])
        if gpu_half is not None:
            for entry in list(pending)[:gpu_ahead]:
                if entry[2] is None:
                    entry[2] = gpu_half.submit(entry[1], entry[0][1])

    def warm_ahead() -> int:
        """Batches to decode ahead while the model warms up (:data:`WARM_AHEAD_BYTES`)."""
        budget = WARM_AHEAD_BYTES[decoder]
        if decoder == "nvjpeg" and cuda:
            budget = min(budget, torch.cuda.mem_get_info(device)[0] // 4)
        return max(prefetch, budget // max(1, batch_size * size * size * 3))

    def finish(done):
        for (si, last, pos, bad), codes, feats in done:
            if codes is None:
                codes = np.zeros((0, model.config.bits // 8), np.uint8)
                feats = np.zeros((0, model.config.feature_dim), feature_dtype)
            yield si, last, pos, codes, feats, bad

    # the model's thread launches hundreds of kernels per batch, each releasing the GIL: with
    # decode threads busy in Python it waits up to the switch interval (5 ms) to get it back
    # each time. 0.1 ms: the H200 CIFAR-10 build took 10.9 s instead of 14.5 (issue 12).
    switch = sys.getswitchinterval()
    if cuda:
        sys.setswitchinterval(GIL_SWITCH_S)
    try:
        fill()
        if cuda and runner.warming():
            n_warm = warm_ahead()
            _trace(f"model warming: decoding up to {n_warm} batches ahead")
            while runner.warming():
                fill(n_warm, n_warm if gpu_half is not None else GPU_AHEAD)
                time.sleep(0.01)
            _trace(f"model warm: {len(pending)} batches decoded or in flight")
        batch_no = 0
        while pending:
            (si, lo, hi, last), fut, gfut = pending.popleft()
            fill()
            if gpu_half is not None:
                x, ok, bad = gpu_half.result(gfut)
            else:
                x, ok, bad = fut.result()
            meta = (si, last, ok + lo, sorted((j + lo, r) for j, r in bad))
            if batch_no < 3:
                _trace(f"batch {batch_no} decoded")
            done = runner.push(x, meta, layouts[batch_no])
            if batch_no < 3:
                _trace(f"batch {batch_no} queued on the model, {len(done)} result(s) back")
            batch_no += 1
            yield from finish(done)
        yield from finish(runner.flush())
        _trace("last batch back")
    finally:
        sys.setswitchinterval(switch)
        for _, f, g in pending:
            f.cancel()
            if g is not None:
                g.cancel()
        if gpu_half is not None:
            gpu_half.close()
        if own_pool:
            pool.close()
