"""GPU search kernels: exact Hamming k-NN / radius search and flat L2 search.

Everything here runs on CUDA through torch and (when importable) Triton, and
falls back to plain torch on any device, so the same functions work on a
CPU-only machine. Neither CUDA nor Triton is needed to import this module.

Code convention (as everywhere in ``deephash_faiss``): binary codes are
``uint8`` arrays ``[n, nbytes]`` packed with
``np.packbits(bits, axis=1, bitorder="little")`` (FAISS's bit order).

Hamming search design (measurements: ``docs/benchmarks.md``, "GPU (H200)")
--------------------------------------------------------------------------
The database is held as ``int8`` rows of +-1 (one byte per bit, zero padded to
a multiple of 32 columns), so that ``<a, b> = bits - 2 * hamming(a, b)`` is an
int8 tensor-core product. A query's result is the set of *keys*
``(distance << 40) | id`` below a per-query key threshold; keys are unique, so
selecting by key stays exact under any amount of ties, and the final ``topk``
over the selected keys returns exactly the faiss ``IndexBinaryFlat`` result with
ties broken by ascending id. The ``[m, n]`` distance matrix never reaches memory:

1. the threshold is estimated from a strided sample of the database (the
   sample's j-th smallest key: one float32 ``addmm`` and a ``topk``);
2. ``hamming_count`` scans ``[BM queries x BN codes]`` tiles and only marks the
   tiles that hold a selected key (one max-reduction per tile, a plain store for
   the few marked ones), which keeps the hot loop small;
3. ``hamming_emit`` runs one small program per marked tile: it recomputes the
   tile, counts each query's selections and writes their keys into a per-query
   buffer (an atomic slot per selected element);
4. queries whose count falls outside ``[k, capacity]`` get a corrected key
   threshold (a per-query search over the key space) and go again.

Radius search is the same with the threshold ``distance < radius``: one marking
scan, one counting visit of the marked tiles (to size the CSR output), one
emitting visit.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = [
    "GpuBinaryIndex",
    "l2_knn",
    "l2_rerank",
    "l2_rerank_ids",
    "squared_norms",
    "has_cuda",
    "has_triton",
]

_ID_BITS = 40
_ID_MASK = (1 << _ID_BITS) - 1
_KEY_MAX = torch.iinfo(torch.int64).max
_FAISS_DIST_MAX = 2**31 - 1  # faiss fills missing binary results with INT_MAX
_ROW_PAD = 1024  # database storage is padded to a multiple of this many rows

ArrayLike = Union[np.ndarray, torch.Tensor]


# --------------------------------------------------------------------------
# capabilities
# --------------------------------------------------------------------------
def has_cuda() -> bool:
    """True when torch sees a CUDA device."""
    return torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    """True when ``triton`` and ``triton.language`` import."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------
# Triton kernel (built lazily, so importing this module never needs triton)
# --------------------------------------------------------------------------
_KERNELS: dict = {}


def _kernels():
    """Return the jitted Triton kernels (cached per interpreter mode)."""
    interp = _interpreting()
    if interp in _KERNELS:
        return _KERNELS[interp]
    global triton, tl, _hits, _query_block  # module globals: jitted kernels resolve names there
    import triton
    import triton.language as tl

    @triton.jit
    def _hits(acc, start, thr_a, thr_b, cap_id, n, BN: tl.constexpr, USE_CAP: tl.constexpr):
        # bool [BM, BN]: key (d, id) of code start + j below row r's key threshold
        ids = start + tl.arange(0, BN)
        hit = acc >= thr_a[:, None]
        if USE_CAP:
            hit = hit | ((acc >= thr_b[:, None]) & (ids[None, :] < cap_id[:, None]))
        return hit & (ids[None, :] < n)

    @triton.jit
    def _query_block(Q, THR_A, THR_B, CAP_ID, pid_m, KP: tl.constexpr, BM: tl.constexpr,
                     USE_CAP: tl.constexpr):
        # query block pid_m: row ids, column ids, +-1 codes [BM, KP] and key thresholds
        rm = pid_m * BM + tl.arange(0, BM)
        rk = tl.arange(0, KP)
        q = tl.load(Q + rm[:, None] * KP + rk[None, :])
        thr_a = tl.load(THR_A + rm)
        thr_b = thr_a
        cap_id = rm.to(tl.int64) * 0
        if USE_CAP:
            thr_b = tl.load(THR_B + rm)
            cap_id = tl.load(CAP_ID + rm)
        return rm, rk, q, thr_a, thr_b, cap_id

    @triton.jit
    def hamming_count(
        Q, X, THR_A, THR_B, CAP_ID, CNT, FLAGS,
        n, tiles_per_prog, num_tiles_all,
        KP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
        USE_CAP: tl.constexpr, FLAG: tl.constexpr, COUNT: tl.constexpr,
    ):
        # Q: int8 [m_pad, KP] +-1 queries; X: int8 [n_pad, KP] +-1 codes.
        # Row r selects code j iff dot >= THR_A[r] or (USE_CAP and dot >= THR_B[r] and
        # j < CAP_ID[r]), i.e. key (d, j) below the key threshold (t, cap). CNT[r] counts
        # selections (with COUNT). Tiles without a selected element cost one
        # max-reduction; with FLAG the others are marked (FLAGS[pid_m * num_tiles + t] = 1,
        # a plain store) for the emitting kernel, which keeps this hot loop small.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm, rk, q, thr_a, thr_b, cap_id = _query_block(Q, THR_A, THR_B, CAP_ID, pid_m, KP, BM, USE_CAP)
        x_offs = tl.arange(0, BN)[:, None] * KP + rk[None, :]
        num_tiles = tl.cdiv(n, BN)
        t0 = pid_n * tiles_per_prog
        t1 = tl.minimum(t0 + tiles_per_prog, num_tiles)
        for t in range(t0, t1):
            start = t * BN
            x = tl.load(X + start.to(tl.int64) * KP + x_offs)
            acc = tl.dot(q, tl.trans(x), out_dtype=tl.int32)
            if USE_CAP:
                thr = tl.where(start < cap_id, thr_b, thr_a)
            else:
                thr = thr_a
            rowmax = tl.max(acc, axis=1)
            if tl.max(rowmax - thr, axis=0) >= 0:
                if COUNT:
                    hit = _hits(acc, start, thr_a, thr_b, cap_id, n, BN, USE_CAP)
                    row_cnt = tl.sum(hit.to(tl.int32), axis=1)
                    tl.atomic_add(CNT + rm, row_cnt, mask=row_cnt > 0)
                if FLAG:
                    tl.store(FLAGS + pid_m.to(tl.int64) * num_tiles_all + t, 1)

    @triton.jit
    def hamming_emit(
        Q, X, THR_A, THR_B, CAP_ID, CAP_OUT, ROW_OFF, CNT, OUT, TM, TT, n,
        BITS: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
        USE_CAP: tl.constexpr, EMIT: tl.constexpr, SLOTS: tl.constexpr,
    ):
        # One program per tile marked by hamming_count (query block TM[i], code tile
        # TT[i]): count query r's selections in CNT[r] and (EMIT) write each selected key
        # (d << 40 | j) to OUT[ROW_OFF[r] + slot] while slot < CAP_OUT[r]. SLOTS = 1 (the
        # default, measured faster): an atomic per selected element; SLOTS = 0: one per
        # query row and a prefix sum. Many small programs hide the atomics' latency.
        pid = tl.program_id(0)
        pid_m = tl.load(TM + pid)
        t = tl.load(TT + pid)
        rm, rk, q, thr_a, thr_b, cap_id = _query_block(Q, THR_A, THR_B, CAP_ID, pid_m, KP, BM, USE_CAP)
        cap_out = tl.load(CAP_OUT + rm)
        off = tl.load(ROW_OFF + rm)
        start = t * BN
        x = tl.load(X + start.to(tl.int64) * KP + tl.arange(0, BN)[:, None] * KP + rk[None, :])
        acc = tl.dot(q, tl.trans(x), out_dtype=tl.int32)
        hit = _hits(acc, start, thr_a, thr_b, cap_id, n, BN, USE_CAP)
        h = hit.to(tl.int32)
        if SLOTS == 0 or not EMIT:
            row_cnt = tl.sum(h, axis=1)
            base = tl.atomic_add(CNT + rm, row_cnt, mask=row_cnt > 0)
        if EMIT:  # else CNT only counts (the radius search sizes its output first)
            if SLOTS == 0:  # one atomic per row, slots by prefix sum
                slot = base[:, None] + tl.cumsum(h, axis=1) - h
            else:  # one atomic per selected element (few per tile)
                slot = tl.atomic_add(CNT + rm[:, None] + tl.zeros([BM, BN], dtype=tl.int32),
                                     h, mask=hit)
            ids = start + tl.arange(0, BN)
            d = ((BITS - acc) >> 1).to(tl.int64)
            key = (d << 40) | ids[None, :].to(tl.int64)
            tl.store(OUT + off[:, None] + slot, key, mask=hit & (slot < cap_out[:, None]))

    _KERNELS[interp] = {"count": hamming_count, "emit": hamming_emit}
    return _KERNELS[interp]


# Kernel launch parameters; the CUDA defaults were picked by benchmarks/bench_gpu.py
# on an H200 (see docs/gpu.md). ``progs_per_sm`` sets the persistent grid size.
DEFAULT_CONFIG = {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 4, "progs_per_sm": 16,
                  "emit_warps": 4, "slots": 1}
INTERPRET_CONFIG = {"BM": 16, "BN": 32, "num_warps": 1, "num_stages": 1, "progs_per_sm": 1}


# --------------------------------------------------------------------------
# code layout helpers
# --------------------------------------------------------------------------
def _as_uint8_codes(codes: ArrayLike, nbytes: Optional[int] = None) -> torch.Tensor:
    """uint8 [n, nbytes] array or tensor -> uint8 tensor [n, nbytes] (no copy if possible)."""
    if isinstance(codes, np.ndarray):
        if codes.dtype != np.uint8:
            raise TypeError(f"codes must be uint8, got {codes.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(codes))
    elif isinstance(codes, torch.Tensor):
        if codes.dtype != torch.uint8:
            raise TypeError(f"codes must be uint8, got {codes.dtype}")
        t = codes
    else:
        raise TypeError(f"codes must be a numpy array or torch tensor, got {type(codes)}")
    if t.ndim != 2:
        raise ValueError(f"codes must be 2-D [n, nbytes], got shape {tuple(t.shape)}")
    if nbytes is not None and t.shape[1] != nbytes:
        raise ValueError(f"codes have {t.shape[1]} bytes per row, index has {nbytes}")
    return t


def _unpack_pm1(codes: torch.Tensor, kp: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Packed uint8 [n, nbytes] (little bit order) -> int8 [n, kp] of +-1, zero padded.

    If ``out`` (int8 [n, kp]) is given it is filled and returned.
    """
    n, nbytes = codes.shape
    shifts = torch.arange(8, device=codes.device, dtype=torch.uint8)
    bits = (codes.unsqueeze(2) >> shifts).bitwise_and_(1).reshape(n, nbytes * 8)
    if out is None:
        out = torch.zeros((n, kp), dtype=torch.int8, device=codes.device)
    out[:, : nbytes * 8] = bits.to(torch.int8) * 2 - 1
    if kp > nbytes * 8:
        out[:, nbytes * 8:] = 0
    return out


def _pm1_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """+-1 int8 [m, kp] x int8 [c, kp] -> exact int32 dot products [m, c]."""
    if a.is_cuda:
        # integers |v| <= 128 are exact in fp16 products and fp32 accumulation
        return torch.mm(a.half(), b.half().t()).to(torch.int32)
    return torch.mm(a.float(), b.float().t()).to(torch.int32)


def _split_keys(keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """int64 keys (d << 40 | id), KEY_MAX for 'none' -> (D int32, I int64) faiss-style."""
    empty = keys == _KEY_MAX
    d = (keys >> _ID_BITS).to(torch.int32)
    i = keys & _ID_MASK
    d = torch.where(empty, torch.full_like(d, _FAISS_DIST_MAX), d)
    i = torch.where(empty, torch.full_like(i, -1), i)
    return d, i


def _to_out(x: torch.Tensor, numpy_out: bool):
    return x.cpu().numpy() if numpy_out else x


# --------------------------------------------------------------------------
# the index
# --------------------------------------------------------------------------
class GpuBinaryIndex:
    """Exact Hamming index over packed binary codes held on a torch device.

    Results are identical to faiss ``IndexBinaryFlat`` with ties broken by
    ascending database id (numpy ``argsort(kind="stable")``).

    Args:
        codes: uint8 [n, nbytes] codes (numpy or torch), or None for an empty index
            (then ``nbytes`` is required).
        device: torch device; "cuda" falls back to "cpu" when CUDA is absent.
        nbytes: bytes per code, only needed when ``codes`` is None.
        use_triton: None = Triton kernel on CUDA when triton imports (or on any
            device under TRITON_INTERPRET=1), True/False to force.
        config: optional overrides of the kernel launch parameters (DEFAULT_CONFIG).
    """

    def __init__(self, codes: Optional[ArrayLike] = None, device: Union[str, torch.device] = "cuda",
                 nbytes: Optional[int] = None, use_triton: Optional[bool] = None,
                 config: Optional[dict] = None):
        dev = torch.device(device)
        if dev.type == "cuda" and not has_cuda():
            dev = torch.device("cpu")
        self.device = dev
        if codes is None and nbytes is None:
            raise ValueError("give codes or nbytes")
        self.nbytes = int(nbytes if nbytes is not None else codes.shape[1])
        self.bits = 8 * self.nbytes
        self.kp = ((self.bits + 31) // 32) * 32  # int8 dot needs K % 32 == 0
        if use_triton is None:
            use_triton = has_triton() and (dev.type == "cuda" or _interpreting())
        self.use_triton = bool(use_triton)
        base = INTERPRET_CONFIG if (_interpreting() or dev.type != "cuda") else DEFAULT_CONFIG
        self.config = dict(base, **(config or {}))
        self.ntotal = 0
        self._x = torch.zeros((0, self.kp), dtype=torch.int8, device=dev)
        # Threshold estimate from a strided sample of S rows (see docs/benchmarks.md,
        # "GPU k-NN", for the H200 measurements behind these settings). The estimate
        # costs about S * m and the selected codes cost about T * m, with
        # T = max(target_factor * k, min_rank * n / S) codes aimed at (so the aimed-at rank
        # in the sample is >= min_rank, relative noise about 1 / sqrt(min_rank)); the sum
        # is least at S = sqrt(sample_coef * min_rank * n), sample_coef being the measured
        # ratio of the two unit costs. sample_size = an int fixes S instead. T is capped
        # at capacity / 4 (the per-query result buffer, >= 8 k).
        self.sample_size: Optional[int] = None
        self.sample_coef = 600.0
        self.target_factor = 3.0
        self.min_rank = 3
        self.capacity = 16384
        self.small_n = 1 << 15 if dev.type == "cuda" else 0  # exact torch path below this
        self._sample_cache = None
        self.last_stats: dict = {}
        if codes is not None:
            self.add(codes)

    # ---- storage -------------------------------------------------------
    def add(self, codes: ArrayLike) -> None:
        """Append uint8 [n, nbytes] codes (numpy or torch); ids continue from ntotal."""
        c = _as_uint8_codes(codes, self.nbytes)
        n_new = self.ntotal + c.shape[0]
        if n_new > self._x.shape[0]:
            cap = max(n_new, int(self._x.shape[0] * 1.25))
            cap = -(-cap // _ROW_PAD) * _ROW_PAD
            x = torch.zeros((cap, self.kp), dtype=torch.int8, device=self.device)
            x[: self.ntotal] = self._x[: self.ntotal]
            self._x = x
        chunk = 1 << 22
        for s in range(0, c.shape[0], chunk):
            part = c[s: s + chunk].to(self.device, non_blocking=True)
            lo = self.ntotal + s
            _unpack_pm1(part, self.kp, out=self._x[lo: lo + part.shape[0]])
        self.ntotal = n_new
        self._sample_cache = None

    def reset(self) -> None:
        """Remove all codes."""
        self.ntotal = 0
        self._x = torch.zeros((0, self.kp), dtype=torch.int8, device=self.device)
        self._sample_cache = None

    def _queries(self, q: ArrayLike) -> Tuple[torch.Tensor, bool]:
        numpy_out = isinstance(q, np.ndarray)
        qt = _as_uint8_codes(q, self.nbytes).to(self.device)
        return _unpack_pm1(qt, self.kp), numpy_out

    # ---- k-NN ------------------------------------------------------------
    def search(self, q: ArrayLike, k: int):
        """Hamming k-NN.

        Args:
            q: uint8 [m, nbytes] query codes (numpy array or torch tensor).
            k: neighbours per query (>= 1).
        Returns:
            D int32 [m, k] Hamming distances, I int64 [m, k] ids, sorted by
            (distance, id); where k > ntotal the tail is D=2**31-1, I=-1.
            numpy arrays when q is numpy, else tensors on the index's device.
        """
        if k < 1:
            raise ValueError("k must be >= 1")
        qp, numpy_out = self._queries(q)
        keys = torch.full((qp.shape[0], k), _KEY_MAX, dtype=torch.int64, device=self.device)
        step = 4096
        for s in range(0, qp.shape[0], step):
            keys[s: s + step] = self._knn_keys(qp[s: s + step], k)
        d, i = _split_keys(keys)
        return _to_out(d, numpy_out), _to_out(i, numpy_out)

    def _knn_keys(self, qp: torch.Tensor, k: int) -> torch.Tensor:
        """+-1 queries int8 [m, kp] -> sorted keys int64 [m, k] (KEY_MAX where none)."""
        m, n = qp.shape[0], self.ntotal
        out = torch.full((m, k), _KEY_MAX, dtype=torch.int64, device=self.device)
        if m == 0 or n == 0:
            return out
        if self.use_triton and n > self.small_n:
            keys = self._knn_keys_triton(qp, k)
        else:
            keys = self._knn_keys_torch(qp, k)
        out[:, : keys.shape[1]] = keys
        return out

    def _knn_keys_torch(self, qp: torch.Tensor, k: int) -> torch.Tensor:
        """Exact fallback: chunked dot products, running top-k over unique keys."""
        m, n = qp.shape[0], self.ntotal
        kk = min(k, n)
        chunk = max(1024, min(n, (1 << 27) // max(m, 1)))
        best = None
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            dot = _pm1_dot(qp, self._x[s:e])
            d = ((self.bits - dot) >> 1).to(torch.int64)
            ids = torch.arange(s, e, device=self.device, dtype=torch.int64)
            keys = (d << _ID_BITS) | ids[None, :]
            kc = min(kk, e - s)
            part = torch.topk(keys, kc, dim=1, largest=False, sorted=True).values
            best = part if best is None else torch.topk(
                torch.cat([best, part], 1), min(kk, best.shape[1] + kc), dim=1,
                largest=False, sorted=True).values
        return best

    # -- Triton path --
    def _count_pass(self, qp, s_key, flag, count=True):
        """One counting pass over the whole database.

        qp: int8 [mq, kp] queries; s_key: int64 [mq] key thresholds s = t * n + cap
        (select keys (d, id) with d < t or d == t and id < cap). With ``flag`` the tiles
        holding selections are marked for :meth:`_emit_pass`; without ``count`` the
        counts are left at 0 (the emitting pass counts). Returns (int32 counts [mq],
        the pass's state)."""
        cfg = self.config
        bm, bn = cfg["BM"], cfg["BN"]
        mq, n = qp.shape[0], self.ntotal
        if n >= 2**31 - 2 * bn:
            raise ValueError("the Triton path supports fewer than 2**31 codes per index")
        dev = self.device
        m_pad = -(-mq // bm) * bm
        q = torch.zeros((m_pad, self.kp), dtype=torch.int8, device=dev)
        q[:mq] = qp
        t = torch.div(s_key, n, rounding_mode="floor")
        cap = s_key - t * n
        never = self.bits + 1
        thr_a = torch.full((m_pad,), never, dtype=torch.int32, device=dev)
        thr_b = torch.full((m_pad,), never, dtype=torch.int32, device=dev)
        cap_id = torch.zeros((m_pad,), dtype=torch.int64, device=dev)
        thr_a[:mq] = (self.bits - 2 * (t - 1)).clamp(max=never).to(torch.int32)
        thr_b[:mq] = (self.bits - 2 * t).clamp(max=never).to(torch.int32)
        cap_id[:mq] = cap
        use_cap = bool((cap > 0).any())
        cnt = torch.zeros((m_pad,), dtype=torch.int32, device=dev)
        num_tiles = -(-n // bn)
        m_blocks = m_pad // bm
        flags = (torch.zeros((m_blocks * num_tiles,), dtype=torch.int8, device=dev) if flag
                 else cnt)
        sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1
        n_progs = max(1, min(num_tiles, -(-sms * cfg["progs_per_sm"] // m_blocks)))
        tiles_per = -(-num_tiles // n_progs)
        n_progs = -(-num_tiles // tiles_per)
        kw = {} if _interpreting() else {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
        _kernels()["count"][(m_blocks, n_progs)](
            q, self._x, thr_a, thr_b, cap_id, cnt, flags, n, tiles_per, num_tiles,
            KP=self.kp, BM=bm, BN=bn, USE_CAP=use_cap, FLAG=bool(flag), COUNT=bool(count), **kw)
        ctx = {"q": q, "thr_a": thr_a, "thr_b": thr_b, "cap_id": cap_id, "use_cap": use_cap,
               "flags": flags, "num_tiles": num_tiles, "mq": mq}
        return cnt[:mq], ctx

    def _emit_pass(self, ctx, out=None, row_off=None, cap_out=None, emit=True):
        """Revisit the tiles marked by ``_count_pass(flag=True)``: count each query's
        selections and (``emit``) write query r's keys to out[row_off[r] + slot] for
        slot < cap_out[r] (any order). Returns the int32 counts [mq]."""
        cfg = self.config
        bm, bn = cfg["BM"], cfg["BN"]
        dev = self.device
        q, mq = ctx["q"], ctx["mq"]
        m_pad = q.shape[0]
        slots = torch.zeros((m_pad,), dtype=torch.int32, device=dev)
        marked = torch.nonzero(ctx["flags"].view(m_pad // bm, ctx["num_tiles"]))
        ctx["marked_tiles"] = marked.shape[0]
        if marked.shape[0] == 0:
            return slots[:mq]
        tm = marked[:, 0].to(torch.int32).contiguous()
        tt = marked[:, 1].to(torch.int32).contiguous()
        ro = torch.zeros((m_pad,), dtype=torch.int64, device=dev)
        co = torch.zeros((m_pad,), dtype=torch.int32, device=dev)
        if emit:
            ro[:mq] = row_off
            co[:mq] = cap_out
        kw = {} if _interpreting() else {"num_warps": cfg.get("emit_warps", cfg["num_warps"]),
                                         "num_stages": 1}
        _kernels()["emit"][(marked.shape[0],)](
            q, self._x, ctx["thr_a"], ctx["thr_b"], ctx["cap_id"], co, ro, slots,
            out if emit else slots, tm, tt, self.ntotal, BITS=self.bits, KP=self.kp, BM=bm,
            BN=bn, USE_CAP=ctx["use_cap"], EMIT=bool(emit), SLOTS=int(cfg.get("slots", 0)), **kw)
        return slots[:mq]

    def _launch(self, qp, s_key, emit, out=None, row_off=None, cap_out=None):
        """Count (and with ``emit`` write) the selections of key thresholds s_key int64
        [mq]; returns int32 counts [mq] (see :meth:`_count_pass`, :meth:`_emit_pass`)."""
        if not emit:
            return self._count_pass(qp, s_key, False)[0]
        _, ctx = self._count_pass(qp, s_key, True, count=False)
        return self._emit_pass(ctx, out, row_off, cap_out)

    def _sample(self, S: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """S strided database rows as float16/float32 +-1 [S, kp] and their ids int64 [S]
        (cached until the index changes)."""
        c = self._sample_cache
        if c is not None and c[0] == S:
            return c[1], c[2]
        n = self.ntotal
        ids = torch.arange(S, device=self.device, dtype=torch.int64) * n // S
        dt = torch.float16 if self.device.type == "cuda" else torch.float32
        xs = self._x[ids].to(dt)  # +-1 and 0: dot products <= bits are exact in fp16
        self._sample_cache = (S, xs, ids)
        return xs, ids

    def _plan(self, kk: int, C: int) -> Tuple[int, float]:
        """(sample rows S, aimed-at number of selected codes T) for k = kk."""
        n = self.ntotal
        if self.sample_size is None:
            S = min(n, max(1 << 12, int(math.sqrt(self.sample_coef * self.min_rank * n))))
        else:
            S = min(n, int(self.sample_size))
        T = max(self.target_factor * kk, self.min_rank * n / S)
        T = max(float(kk), min(T, C / 4.0))
        S = int(min(n, max(S, math.ceil(self.min_rank * n / T))))
        return S, T

    def _estimate_key(self, qp: torch.Tensor, kk: int, C: int) -> torch.Tensor:
        """Per-query key threshold s (int64 [m]) selecting about T codes (see ``_plan``).

        The j-th smallest *key* (distance, id) of a strided sample estimates the key
        below which j * n / S database codes lie; because keys are unique this also
        splits a tied distance level by id (no retry for thousands of equal codes).
        Exact (count == k) when the sample is the whole database."""
        n = self.ntotal
        S, T = self._plan(kk, C)
        if S == n:
            j = kk
        else:
            j = int(min(S, max(self.min_rank, round(T * S / n))))
        xs, ids = self._sample(S)
        shift = max(1, int(S - 1).bit_length())
        out = []
        step = max(1, (1 << 27) // S)
        if (self.bits + 1) << shift <= 1 << 24:
            # key = d * 2**shift + col = bits * h + col - h * dot (h = 2**(shift-1)): one
            # float32 addmm, exact (integers below 2**24, +-1 products, power-of-2 alpha)
            h = float(1 << (shift - 1))
            base = torch.arange(S, device=self.device, dtype=torch.float32) + self.bits * h
            xf = xs.float()
            for s in range(0, qp.shape[0], step):
                key = torch.addmm(base[None, :], qp[s: s + step].float(), xf.t(), alpha=-h)
                out.append(torch.topk(key, j, dim=1, largest=False, sorted=True).values[:, -1])
        else:
            kdt = torch.int64 if (self.bits + 1) << shift >= 2**31 else torch.int32
            cols = torch.arange(S, device=self.device, dtype=kdt)
            for s in range(0, qp.shape[0], step):
                dot = torch.mm(qp[s: s + step].to(xs.dtype), xs.t())
                d = torch.div(self.bits - dot.to(kdt), 2, rounding_mode="floor")
                key = (d << shift) | cols[None, :]
                out.append(torch.topk(key, j, dim=1, largest=False, sorted=True).values[:, -1])
        kj = torch.cat(out).to(torch.int64)
        dj, cj = kj >> shift, kj & ((1 << shift) - 1)
        return dj * n + ids[cj] + 1

    def _knn_keys_triton(self, qp: torch.Tensor, k: int) -> torch.Tensor:
        m, n = qp.shape[0], self.ntotal
        kk = min(k, n)
        C = max(self.capacity, 8 * k)
        dev = self.device
        buf = torch.full((m, C), _KEY_MAX, dtype=torch.int64, device=dev)
        row_off_all = torch.arange(m, device=dev, dtype=torch.int64) * C
        # key threshold s = t * n + cap (keys (d, id) < s); counts are monotone in s
        s_key = self._estimate_key(qp, kk, C)
        s_max = (self.bits + 1) * n  # selects everything
        # per-query search state (host side, small arrays)
        s_lo = np.zeros(m, dtype=np.int64)  # s = 0 selects nothing: always too small
        c_lo = np.zeros(m, dtype=np.int64)
        s_hi = np.full(m, -1, dtype=np.int64)
        c_hi = np.zeros(m, dtype=np.int64)
        cur = s_key.clamp(1, s_max).cpu().numpy().astype(np.int64)
        todo = np.arange(m)
        final_cnt = np.zeros(m, dtype=np.int64)
        passes = []
        for it in range(64):
            sub = torch.from_numpy(todo).to(dev)
            if it > 0:
                buf[sub] = _KEY_MAX
            # mark the tiles holding selections, then count and write them (a query
            # whose count ends outside [k, C] is searched again below)
            _, ctx = self._count_pass(qp[sub] if len(todo) < m else qp,
                                      torch.from_numpy(cur[todo]).to(dev), True, count=False)
            cnt = self._emit_pass(ctx, buf, row_off_all[sub],
                                  torch.full((len(todo),), C, dtype=torch.int32, device=dev))
            c = cnt.cpu().numpy().astype(np.int64)
            passes.append(len(todo))
            low = c < kk
            high = c > C
            bad = low | high
            final_cnt[todo] = np.where(bad, 0, c)
            if not bad.any():
                break
            q_bad = todo[bad]
            cs, cc = cur[q_bad], c[bad]
            lo_upd = cc < kk
            s_lo[q_bad[lo_upd]] = cs[lo_upd]
            c_lo[q_bad[lo_upd]] = cc[lo_upd]
            s_hi[q_bad[~lo_upd]] = cs[~lo_upd]
            c_hi[q_bad[~lo_upd]] = cc[~lo_upd]
            nxt = np.empty(len(q_bad), dtype=np.int64)
            for r, qi in enumerate(q_bad):
                nxt[r] = self._next_key(s_lo[qi], c_lo[qi], s_hi[qi], c_hi[qi], kk, C, n, s_max,
                                        it)
            cur[q_bad] = nxt
            todo = q_bad
        else:  # pragma: no cover - search did not converge: exact fallback
            sub = torch.from_numpy(todo).to(dev)
            keys = self._knn_keys_torch(qp[sub], k)
            buf[sub] = _KEY_MAX
            buf[sub, : keys.shape[1]] = keys
            final_cnt[todo] = keys.shape[1]
        self.last_stats = {"passes": passes, "capacity": C}
        used = int(min(C, max(kk, int(final_cnt.max()))))  # columns past every count are empty
        return torch.topk(buf[:, :used], kk, dim=1, largest=False, sorted=True).values

    @staticmethod
    def _next_key(s_lo, c_lo, s_hi, c_hi, kk, C, n, s_max, it):
        """Next key threshold between a too-small (s_lo) and a too-large (s_hi) one."""
        if s_hi < 0:  # only too-small seen: one distance level up
            return min(s_max, (s_lo // n + 1) * n)
        if s_lo < 0:  # only too-large seen: one distance level down
            t = s_hi // n
            return (t - 1) * n if s_hi % n == 0 else t * n
        t_lo, t_hi = s_lo // n, s_hi // n
        if s_hi % n == 0:
            t_hi -= 1  # (t, 0) == (t - 1, n)
        if t_hi > t_lo:  # a whole distance level lies between: bisect levels
            return ((t_lo + t_hi + 1) // 2) * n
        # same distance level t: search the id cap (ties at distance t)
        target = (2 * kk + C) // 3 if C >= 2 * kk else (kk + C) // 2
        if it % 2 == 0 and c_hi > c_lo:
            frac = (target - c_lo) / (c_hi - c_lo)
            s = s_lo + int((s_hi - s_lo) * frac)
        else:
            s = (s_lo + s_hi) // 2
        return min(max(s, s_lo + 1), s_hi - 1)

    # ---- radius ---------------------------------------------------------
    def range_search(self, q: ArrayLike, radius: int, max_candidates: Optional[int] = None):
        """All codes at Hamming distance < radius (faiss semantics), CSR layout.

        Args:
            q: uint8 [m, nbytes] query codes (numpy or torch).
            radius: int, keeps distances strictly below it.
            max_candidates: optional int; keep at most this many per query, nearest
                first by (distance, id).
        Returns:
            lims int64 [m + 1], D int32 [lims[-1]], I int64 [lims[-1]]; query i's
            results are D[lims[i]:lims[i+1]], sorted by (distance, id).
        """
        qp, numpy_out = self._queries(q)
        m, n = qp.shape[0], self.ntotal
        dev = self.device
        r = int(radius)
        if m == 0 or n == 0 or r <= 0:
            lims = torch.zeros(m + 1, dtype=torch.int64, device=dev)
            e = torch.zeros(0, dtype=torch.int64, device=dev)
            return (_to_out(lims, numpy_out), _to_out(e.to(torch.int32), numpy_out),
                    _to_out(e, numpy_out))
        if self.use_triton:
            lims, keys = self._range_keys_triton(qp, min(r, self.bits + 1), max_candidates)
        else:
            lims, keys = self._range_keys_torch(qp, min(r, self.bits + 1), max_candidates)
        d, i = _split_keys(keys)
        return _to_out(lims, numpy_out), _to_out(d, numpy_out), _to_out(i, numpy_out)

    @staticmethod
    def _csr_sort(qid: torch.Tensor, keys: torch.Tensor, m: int, cap: Optional[int]):
        """Sort (query, key) pairs into CSR order, optionally keep cap per query."""
        if m < (1 << 15):  # one sort on (query << 48 | key); keys use 48 bits
            keys = torch.sort((qid.to(torch.int64) << 48) | keys).values
            qid = keys >> 48
            keys = keys & ((1 << 48) - 1)
        else:
            o = torch.argsort(keys, stable=True)
            qid, keys = qid[o], keys[o]
            o = torch.argsort(qid, stable=True)
            qid, keys = qid[o], keys[o]
        cnt = torch.bincount(qid, minlength=m)
        if cap is not None:
            start = torch.cumsum(cnt, 0) - cnt
            rank = torch.arange(len(qid), device=qid.device) - start[qid]
            keep = rank < cap
            qid, keys = qid[keep], keys[keep]
            cnt = cnt.clamp(max=cap)
        lims = torch.zeros(m + 1, dtype=torch.int64, device=qid.device)
        lims[1:] = torch.cumsum(cnt, 0)
        return lims, keys

    def _range_keys_torch(self, qp, r, cap):
        m, n = qp.shape[0], self.ntotal
        chunk = max(1024, min(n, (1 << 26) // max(m, 1)))
        qids, keys = [], []
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            d = (self.bits - _pm1_dot(qp, self._x[s:e])) >> 1
            qi, col = torch.nonzero(d < r, as_tuple=True)
            keys.append((d[qi, col].to(torch.int64) << _ID_BITS) | (col.to(torch.int64) + s))
            qids.append(qi)
        return self._csr_sort(torch.cat(qids), torch.cat(keys), m, cap)

    def _range_keys_triton(self, qp, r, cap):
        m, n = qp.shape[0], self.ntotal
        dev = self.device
        s_r = torch.full((m,), r * n, dtype=torch.int64, device=dev)  # d < r
        _, ctx = self._count_pass(qp, s_r, True, count=False)  # marks the tiles with results
        cnt = self._emit_pass(ctx, emit=False).to(torch.int64)  # counts them
        capped = torch.zeros(m, dtype=torch.bool, device=dev)
        if cap is not None:
            capped = cnt > cap
        emit_cnt = torch.where(capped, torch.zeros_like(cnt), cnt)
        offs = torch.cumsum(emit_cnt, 0) - emit_cnt
        total = int(emit_cnt.sum())
        out = torch.full((max(total, 1),), _KEY_MAX, dtype=torch.int64, device=dev)
        if total:  # capped queries get no room (cap_out 0): their results come from k-NN
            self._emit_pass(ctx, out, offs, emit_cnt.to(torch.int32))
            if bool((out[:total] == _KEY_MAX).any()):  # pragma: no cover - kernel bug guard
                raise RuntimeError("range_search: emitted fewer results than counted")
        qids = [torch.repeat_interleave(torch.arange(m, device=dev), emit_cnt)]
        keys = [out[:total]]
        if bool(capped.any()):
            ci = torch.nonzero(capped).flatten()
            kk = self._knn_keys(qp[ci], int(cap))
            qids.append(ci[:, None].expand(-1, kk.shape[1]).reshape(-1))
            keys.append(kk.reshape(-1))
        return self._csr_sort(torch.cat(qids), torch.cat(keys), m, cap)


# --------------------------------------------------------------------------
# L2
# --------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _mm_out_dtype_ok(device_type: str) -> bool:
    try:
        a = torch.ones((2, 2), dtype=torch.float16, device=device_type)
        torch.mm(a, a, out_dtype=torch.float32)
        return True
    except Exception:
        return False


def _ip_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [m, D] @ b[c, D]^T as float32 [m, c]; fp16/bf16 inputs accumulate in fp32."""
    if a.dtype == torch.float32:
        return a @ b.t()
    if a.dtype in (torch.float16, torch.bfloat16) and a.is_cuda and _mm_out_dtype_ok("cuda"):
        return torch.mm(a, b.t(), out_dtype=torch.float32)
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        return (a @ b.t()).float()
    return a.float() @ b.float().t()


def l2_knn(xq: torch.Tensor, xb: torch.Tensor, k: int, chunk: Optional[int] = None):
    """Exact flat L2 k-NN (the "GPU flat L2 search"), tiled over the database.

    Computes ``|q|^2 - 2 q.x + |x|^2`` for database chunks and merges a running
    top-k, so ``[m, n]`` is never materialised. Works on any device.

    Args:
        xq: float tensor [m, D] (float32, float16 or bfloat16).
        xb: float tensor [n, D], same device and dtype as xq.
        k: neighbours per query.
        chunk: database rows per tile (default: about 2**27 / m).
    Returns:
        D float32 [m, k] squared L2 distances (ascending), I int64 [m, k] row ids;
        +inf / -1 where k > n.
    """
    if xq.ndim != 2 or xb.ndim != 2 or xq.shape[1] != xb.shape[1]:
        raise ValueError("xq [m, D] and xb [n, D] must share D")
    xq = xq.to(device=xb.device, dtype=xb.dtype)  # never copy the database
    m, n = xq.shape[0], xb.shape[0]
    dev = xq.device
    Dout = torch.full((m, k), math.inf, dtype=torch.float32, device=dev)
    Iout = torch.full((m, k), -1, dtype=torch.int64, device=dev)
    if m == 0 or n == 0:
        return Dout, Iout
    q2 = xq.float().pow(2).sum(1)
    chunk = chunk or max(1024, (1 << 27) // max(m, 1))
    bestD = bestI = None
    for s in range(0, n, chunk):
        xc = xb[s: s + chunk]
        d = _ip_f32(xq, xc).mul_(-2).add_(q2[:, None]).add_(xc.float().pow(2).sum(1)[None, :])
        d.clamp_(min=0)
        kc = min(k, xc.shape[0])
        v, i = torch.topk(d, kc, dim=1, largest=False, sorted=True)
        i = i + s
        if bestD is None:
            bestD, bestI = v, i
        else:
            v = torch.cat([bestD, v], 1)
            i = torch.cat([bestI, i], 1)
            v, o = torch.sort(v, dim=1, stable=True)
            kk = min(k, v.shape[1])
            bestD, bestI = v[:, :kk], torch.gather(i, 1, o[:, :kk])
    Dout[:, : bestD.shape[1]] = bestD
    Iout[:, : bestI.shape[1]] = bestI
    return Dout, Iout


def _pad_pools(pools: Sequence[torch.Tensor], device) -> Tuple[torch.Tensor, torch.Tensor]:
    m = len(pools)
    P = max((p.shape[0] for p in pools), default=0)
    D = pools[0].shape[1] if m else 0
    out = torch.zeros((m, P, D), dtype=pools[0].dtype if m else torch.float32, device=device)
    lens = torch.zeros(m, dtype=torch.int64, device=device)
    for i, p in enumerate(pools):
        out[i, : p.shape[0]] = p.to(device)
        lens[i] = p.shape[0]
    return out, lens


def l2_rerank(xq: torch.Tensor, cand: Union[torch.Tensor, Sequence[torch.Tensor]], k: int,
              lengths: Optional[torch.Tensor] = None):
    """Rerank each query's own candidate pool by exact squared L2 (batched, padded).

    Args:
        xq: float tensor [m, D].
        cand: either a padded float tensor [m, P, D] (then ``lengths`` int64 [m]
            gives the valid rows of each pool; default all P), or a list of m
            float tensors [n_i, D].
        k: results per query.
        lengths: int tensor [m], only with a padded ``cand``.
    Returns:
        D float32 [m, k] squared L2 (ascending), I int64 [m, k] positions inside
        each query's pool (ties by position); +inf / -1 past the pool's end.
        Map back to database ids with ``torch.gather(pool_ids, 1, I.clamp(min=0))``.
    """
    dev = xq.device
    if not isinstance(cand, torch.Tensor):
        cand, lengths = _pad_pools(list(cand), dev)
    cand = cand.to(dev)
    m, P = cand.shape[0], cand.shape[1]
    if lengths is None:
        lengths = torch.full((m,), P, dtype=torch.int64, device=dev)
    lengths = lengths.to(dev)
    Dout = torch.full((m, k), math.inf, dtype=torch.float32, device=dev)
    Iout = torch.full((m, k), -1, dtype=torch.int64, device=dev)
    if m == 0 or P == 0:
        return Dout, Iout
    Dim = max(1, cand.shape[2])
    step = max(1, (1 << 26) // (P * Dim))
    valid_all = torch.arange(P, device=dev)[None, :] < lengths[:, None]
    qf_all = xq.float()
    kk = min(k, P)
    for s in range(0, m, step):
        v, o = _rank_block(cand[s: s + step].float(), qf_all[s: s + step], valid_all[s: s + step], kk)
        Dout[s: s + step, :kk] = v
        Iout[s: s + step, :kk] = o
    return Dout, Iout


def _rank_block(X: torch.Tensor, qf: torch.Tensor, valid: torch.Tensor, kk: int,
                xn: Optional[torch.Tensor] = None):
    """Rank pools X float32 [c, P, D] against queries qf float32 [c, D] by squared L2,
    |x|^2 - 2 x.q + |q|^2 (the CPU rerank's formula, rerank.rank_pools_cpu); valid bool
    [c, P] marks pool rows, xn optional float32 [c, P] |x|^2. Returns the kk nearest:
    distances float32 [c, kk] (+inf past the pool), positions int64 [c, kk] (-1 there),
    ties by position."""
    dots = torch.bmm(X, qf[:, :, None])[..., 0]
    if xn is None:
        xn = (X * X).sum(-1)
    d = (xn - 2 * dots + (qf * qf).sum(1)[:, None]).clamp_(min=0)
    d = torch.where(valid, d, torch.full_like(d, math.inf))
    v, o = torch.sort(d, dim=1, stable=True)
    v, o = v[:, :kk], o[:, :kk]
    return v, torch.where(valid.gather(1, o), o, torch.full_like(o, -1))


def squared_norms(xb: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """Squared L2 norms float32 [n] of the rows of xb [n, D] (computed in float32)."""
    out = torch.empty(xb.shape[0], dtype=torch.float32, device=xb.device)
    for s in range(0, xb.shape[0], chunk):
        x = xb[s: s + chunk].float()
        out[s: s + chunk] = (x * x).sum(1)
    return out


def l2_rerank_ids(xq: torch.Tensor, xb: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor,
                  k: int, xb_norms: Optional[torch.Tensor] = None, budget_bytes: int = 1 << 31):
    """Rank each query's pool of database rows by squared L2, gathering rows by id.

    Args:
        xq: float [m, D]; xb: float32/float16 [n, D] (the database, on xq's device).
        ids: int64 [m, P] row ids, query i's pool in ids[i, :lengths[i]] (the rest is
            ignored); lengths: int64 [m].
        xb_norms: optional float32 [n] squared norms of xb (:func:`squared_norms`), so
            that only one product per pool row is computed.
        budget_bytes: bound on one gathered [chunk, P, D] block.
    Returns:
        D float32 [m, min(k, P)] squared distances (ascending, +inf past the pool),
        O int64 [m, min(k, P)] positions in the pool (ties by position; -1 past it).
    """
    m, P = ids.shape
    dev = xb.device
    kk = min(k, P)
    Dout = torch.full((m, kk), math.inf, dtype=torch.float32, device=dev)
    Oout = torch.full((m, kk), -1, dtype=torch.int64, device=dev)
    if m == 0 or P == 0:
        return Dout, Oout
    qf = xq.to(device=dev, dtype=torch.float32)
    valid = torch.arange(P, device=dev)[None, :] < lengths.to(dev)[:, None]
    safe = torch.where(valid, ids, torch.zeros_like(ids))
    c = max(1, budget_bytes // max(1, P * xb.shape[1] * 4))
    for s in range(0, m, c):
        sid = safe[s: s + c]
        xn = xb_norms[sid] if xb_norms is not None else None
        Dout[s: s + c], Oout[s: s + c] = _rank_block(xb[sid].float(), qf[s: s + c], valid[s: s + c], kk, xn)
    return Dout, Oout
