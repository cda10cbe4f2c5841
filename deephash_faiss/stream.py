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

import os
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np

DECODERS = ("pil", "nvjpeg")
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


def pick_decode_kind(kind: str, n: int) -> str:
    if kind not in ("auto", "thread", "process"):
        raise ValueError(f"decode workers must be auto, thread or process, not {kind!r}")
    if kind == "auto":
        return "process" if n >= PROCESS_MIN_IMAGES and (os.cpu_count() or 1) >= PROCESS_MIN_CPUS else "thread"
    return kind


class DecodePool:
    """Decodes whole batches in worker threads or processes; ``submit`` returns a Future."""

    def __init__(self, kind: str, workers: int):
        self.kind = kind
        self.workers = workers
        if kind == "process":
            import multiprocessing as mp

            self.pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
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

    def push(self, x, meta) -> list:
        from .extract import forward_batch
        from .index import pack_codes

        if len(x) == 0:
            return [(meta, None, None)]
        import torch

        fc7, h = forward_batch(self.model, torch.as_tensor(x), self.device)
        return [(meta, pack_codes(h.numpy()), fc7.numpy().astype(self.dtype, copy=False))]

    def flush(self) -> list:
        return []


class _CudaRunner:
    """The model on CUDA: H2D copies on a side stream from pinned memory, compute on the
    current stream, D2H into pinned buffers; results are collected ``depth`` batches later
    so the host never waits for the batch it just queued."""

    def __init__(self, model, device, feature_dtype: str, depth: int = 2):
        import torch

        self.torch = torch
        self.model, self.device, self.depth = model, device, depth
        self.tdtype = {"float32": torch.float32, "float16": torch.float16}[feature_dtype]
        self.copy = torch.cuda.Stream(device)
        self.inflight: deque = deque()

    def push(self, x, meta) -> list:
        from .extract import forward_batch, pack_codes_torch

        torch = self.torch
        if len(x) == 0:
            self.inflight.append((meta, None))
            return self._drain(self.depth)
        compute = torch.cuda.current_stream(self.device)
        if isinstance(x, np.ndarray):
            host = torch.from_numpy(x).pin_memory()
            with torch.cuda.stream(self.copy):
                xd = host.to(self.device, non_blocking=True)
            compute.wait_stream(self.copy)
            xd.record_stream(compute)
        else:
            xd = x
        fc7, h = forward_batch(self.model, xd, self.device, to_host=False)
        codes = pack_codes_torch(h)
        feats = fc7.to(self.tdtype)
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

    def flush(self) -> list:
        return self._drain(0)


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
) -> Iterator[tuple[int, bool, np.ndarray, np.ndarray, np.ndarray, list[tuple[int, str]]]]:
    """Decode and encode ``paths`` batch by batch, stages overlapped, in order.

    Args:
        device: torch.device the model is on. ``decoder``: "pil" (CPU) or "nvjpeg"
            (torchvision ``decode_jpeg`` on ``device``, CPU fallback for what it can't decode).
        workers: decode workers (default: the CPU count, at most 16).
        segments: [(lo, hi)] position ranges to encode (default: all); batches never cross one.
        prefetch: batches decoded ahead (default: 2 x workers + 2).
        pool: a :class:`DecodePool` to use (and leave open), e.g. one kept by a Ray actor
            across its tasks; default: a new one for this call.
    Yields:
        (segment index, last batch of the segment, positions int64 [b] into ``paths`` that
        encoded, codes uint8 [b, bits / 8], features [b, D] of ``feature_dtype``,
        bad [(position, reason)] of files that could not be decoded).
    """
    import torch

    from .data import ImageDecodeError, decode_image, default_workers

    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, not {decoder!r}")
    size = model.config.load_size
    segments = [(0, len(paths))] if segments is None else [tuple(s) for s in segments]
    plan = batches_of(segments, batch_size)
    total = sum(hi - lo for lo, hi in segments)
    own_pool = pool is None
    if pool is None:
        workers = workers or default_workers()
        # nvjpeg: the workers only read files and parse headers (the GIL is released on reads):
        # threads, no pickling of the encoded bytes
        pool = DecodePool("thread" if decoder == "nvjpeg" else pick_decode_kind(decode_kind, total), workers)
    prefetch = prefetch or (2 * pool.workers + 2)
    model.eval()
    cuda = torch.device(device).type == "cuda"
    runner = _CudaRunner(model, device, feature_dtype) if cuda else _CpuRunner(model, device, feature_dtype)
    fn = read_screen_chunk if decoder == "nvjpeg" else decode_chunk
    pending: deque = deque()
    it = iter(plan)

    def fill() -> None:
        while len(pending) < prefetch:
            b = next(it, None)
            if b is None:
                return
            pending.append((b, pool.submit(fn, list(paths[b[1]:b[2]]), size)))

    def finish(done):
        for (si, last, pos, bad), codes, feats in done:
            if codes is None:
                codes = np.zeros((0, model.config.bits // 8), np.uint8)
                feats = np.zeros((0, model.config.feature_dim), feature_dtype)
            yield si, last, pos, codes, feats, bad

    try:
        fill()
        while pending:
            (si, lo, hi, last), fut = pending.popleft()
            fill()
            if decoder == "nvjpeg":
                from .gpudecode import decode_batch

                gpu, (cpu_arr, cpu_pos), bad = fut.result()
                gimgs, failed = decode_batch([d for _, d in gpu], size, device)
                gpos = [j for k, (j, _) in enumerate(gpu) if k not in set(failed)]
                extra, extra_pos = [], []
                for k in failed:  # nvjpeg refused it: the CPU path decides (same skip reasons)
                    j = gpu[k][0]
                    try:
                        extra.append(decode_image(paths[lo + j], size))
                        extra_pos.append(j)
                    except ImageDecodeError as err:
                        bad.append((j, str(err)))
                host = np.concatenate([cpu_arr, np.stack(extra)]) if extra else cpu_arr
                hpos = np.concatenate([cpu_pos, np.asarray(extra_pos, np.int64)])
                allpos = np.concatenate([np.asarray(gpos, np.int64), hpos])
                order = np.argsort(allpos, kind="stable")
                if len(hpos):
                    ht = torch.from_numpy(host)
                    if cuda:
                        ht = ht.pin_memory().to(device, non_blocking=True)
                    x = torch.cat([gimgs, ht.to(gimgs.device)])[torch.as_tensor(order, device=gimgs.device)]
                else:
                    x = gimgs
                ok = allpos[order]
                if not cuda:
                    x = x.cpu().numpy()
            else:
                x, ok, bad = fut.result()
            meta = (si, last, ok + lo, sorted((j + lo, r) for j, r in bad))
            yield from finish(runner.push(x, meta))
        yield from finish(runner.flush())
    finally:
        for _, f in pending:
            f.cancel()
        if own_pool:
            pool.close()
