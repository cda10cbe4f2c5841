"""BCS, HDS and ES over an index directory.

* **BCS** (binary code search): Hamming k-NN over the codes, ties by id.
* **HDS** (Hamming distance search + rerank, the paper's coarse-to-fine search): the pool
  is every database code at Hamming distance < ``radius`` from the query, nearest first,
  capped at ``max_candidates``; if that holds fewer than k images it is topped up with
  the Hamming k-NN. The pool is ranked by squared L2 on fc7 and the top k returned.
* **ES** (exhaustive search): exact L2 k-NN over all fc7 features.

HDS has two modes (``hds_mode``): ``"exact"`` ranks the whole pool (``max_candidates`` cuts
it, nearest codes first: a reported safety limit), ``"ivf"`` ranks inside the pool with
:class:`deephash_faiss.fine.FineIndex` (lists keyed by (code, k-means cell of fc7), the
cells nearest the query probed, exact refine) so that no pool is ever cut at random;
``"auto"`` takes ``ivf`` when a fine index is at hand (given, built by :meth:`Searcher.build_fine_index`,
or saved with the index by ``dhf fine-index``: loaded on first use) and ``exact`` otherwise. A
saved fine index that does not match the index (:func:`deephash_faiss.layout.fine_entry_problem`)
is never used: ``auto`` runs exact and says why in ``extra["fine"]``; ``ivf`` refuses.

Routing (:func:`deephash_faiss.routing.route`): per call the Searcher picks the code path
(``"dict"``: the code dictionary, ``"flat"``: the FAISS index's scan, ``"gpu"``: the CUDA
kernels) from the live rows, the distinct codes, the batch size and the device, with the
measured thresholds of ``routing.json``; every path returns the same results (tested).
One validated :class:`SearchParams` carries k, radius, max_candidates and the HDS mode.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .errors import DhfError
from .index import BinaryIndex, BucketIndex, IndexSpec
from .rerank import exhaustive_knn, pick_backend, rank_pools_cpu
from .store import FeatureStore, check_open, checked_model_path, is_index_model, other_model_error, read_manifest

MODES = ("bcs", "hds", "es")
DEFAULT_RADIUS = 3
DEFAULT_MAX_CANDIDATES = 10_000


@dataclass
class QueryResult:
    """One query's results, best first.

    ids int64 [k'], hamming int32 [k'] (Hamming distance to the query's code), distance
    float32 [k'] (squared L2 on fc7; NaN in BCS mode), candidates (HDS pool size or the
    number of rows scanned), truncated (HDS pool hit ``max_candidates``).
    """

    ids: np.ndarray
    hamming: np.ndarray
    distance: np.ndarray
    candidates: int
    truncated: bool = False


@dataclass
class SearchBatch:
    mode: str
    results: list[QueryResult]
    timing_ms: float
    extra: dict[str, Any] = field(default_factory=dict)


def _popcount_rows(q: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Hamming distances of one query uint8 [B] (or one per row, uint8 [n, B]) to codes
    uint8 [n, B] -> int32 [n]."""
    x = np.bitwise_xor(codes, q if q.ndim == 2 else q[None])
    return np.unpackbits(x, axis=1).sum(1, dtype=np.int32) if len(x) else np.zeros(0, np.int32)


def dispatch_mode(searcher, mode: str, qcodes, qfeats, k: int, radius: int, max_candidates: int | None,
                  **hds_kw):
    """Run ``mode`` ("bcs", "hds" or "es") on any object with ``bcs``/``hds``/``es`` methods
    (:class:`Searcher`, :class:`deephash_faiss.distributed.ShardedSearcher`); ``hds_kw``
    (hds_mode, nprobe, refine: :meth:`Searcher.hds`) go to ``hds``, those set to None are
    left out."""
    if mode == "bcs":
        return searcher.bcs(qcodes, k)
    if mode == "hds":
        return searcher.hds(qcodes, qfeats, k, radius, max_candidates,
                            **{kk: v for kk, v in hds_kw.items() if v is not None})
    if mode == "es":
        return searcher.es(qfeats, qcodes, k)
    raise DhfError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")


HDS_MODES = ("exact", "ivf", "auto")
MAX_CANDIDATES_LIMIT = 2**31 - 1  # the largest pool cap every backend (faiss, torch, Triton) takes


@dataclass(frozen=True)
class SearchParams:
    """The settings of one search call, validated once (:meth:`check`) for every searcher
    (:class:`Searcher`, ``ShardedSearcher``), the CLI and the service.

    k: results per query; radius: HDS pools hold distance < radius (0 to the code length
    + 1, which pools every code);
    max_candidates: HDS safety limit (exact: pool rows kept, nearest codes first; ivf: rows
    examined), reported as ``truncated``, 1 to ``MAX_CANDIDATES_LIMIT`` or None; mode:
    "bcs", "hds" or "es"; hds_mode: "exact", "ivf" or "auto"; nprobe / refine: ivf probing
    (x cell size rows) and candidates re-ranked exactly, None = the default for the index's
    size (:func:`deephash_faiss.fine.default_probe`)."""

    k: int = 10
    radius: int | None = DEFAULT_RADIUS
    max_candidates: int | None = DEFAULT_MAX_CANDIDATES
    mode: str = "hds"
    hds_mode: str = "auto"
    nprobe: int | None = None  # None: by index size (fine.default_probe)
    refine: int | None = None

    def check(self, live: int, bits: int | None = None) -> "SearchParams":
        """Refuse what no backend can honour, with one :class:`DhfError` line; returns self.

        live: live (not deleted) rows, 0 is refused; bits: the code length (None skips
        the upper bound on ``radius``)."""
        # messages name the API argument, then the CLI option: "k must be at least 1 (-k)"
        for name, opt, v in (("k", "-k", self.k), ("radius", "--radius", self.radius),
                             ("max_candidates", "--max-candidates", self.max_candidates),
                             ("nprobe", "--nprobe", self.nprobe), ("refine", "--refine", self.refine)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
                raise DhfError(f"{name} must be an integer, not {type(v).__name__} ({opt})")
        if self.mode not in MODES:
            raise DhfError(f"unknown mode {self.mode!r}; choose from {', '.join(MODES)}")
        if self.hds_mode not in HDS_MODES:
            raise DhfError(f"unknown HDS mode {self.hds_mode!r}; choose from {', '.join(HDS_MODES)}")
        if self.k < 1:
            raise DhfError("k must be at least 1 (-k)")
        if self.radius is not None:
            if self.radius < 0:
                raise DhfError("radius must be >= 0 (--radius)")
            if bits is not None and self.radius > bits + 1:
                raise DhfError(f"radius {self.radius} is above the code length: it must be between 0 and "
                               f"{bits + 1} (pools hold distances < radius; {bits + 1} pools every code) (--radius)")
        if self.max_candidates is not None and not 1 <= self.max_candidates <= MAX_CANDIDATES_LIMIT:
            raise DhfError(f"max_candidates must be between 1 and {MAX_CANDIDATES_LIMIT} (--max-candidates)")
        if self.nprobe is not None and self.nprobe < 1:
            raise DhfError("nprobe must be at least 1 (--nprobe)")
        if self.refine is not None and self.refine < 1:
            raise DhfError("refine must be at least 1 (--refine)")
        if live == 0:
            raise DhfError("the index is empty")
        return self


def check_search_args(k: int, radius: int | None, max_candidates: int | None, live: int,
                      bits: int | None = None) -> None:
    """Refuse search parameters no backend can honour (:meth:`SearchParams.check`).

    Args:
        k: results per query, at least 1.
        radius: HDS pool radius (Hamming distance < radius), 0 to ``bits + 1`` (which
            pools every code); None when the mode takes none.
        max_candidates: HDS pool cap, 1 to ``MAX_CANDIDATES_LIMIT``; None for no cap.
        live: live (not deleted) rows of the index; 0 is refused.
        bits: code length; None skips the upper bound on ``radius``.
    """
    SearchParams(k, radius, max_candidates).check(live, bits)


def hamming_pools(code_index, qcodes: np.ndarray, k: int, radius: int, max_candidates: int | None,
                  live: int, ranged=None):
    """HDS candidate pools from a code index (:class:`BinaryIndex` or :class:`GpuCodeIndex`).

    Each query's pool is every code at Hamming distance < ``radius``, nearest first by
    (distance, id), cut at ``max_candidates``; a pool of fewer than k codes is topped up
    with the Hamming k-NN (``live``: the number of live codes bounds that k).

    Args:
        qcodes: uint8 [m, B].
        ranged: the queries' ``range_search(qcodes, radius, max_candidates)`` when the caller
            has it already (lims int64 [m + 1], D int32, I int64), else None.
    Returns:
        list of m (ids int64 [p], hamming int32 [p], truncated bool).
    """
    lims, D, I = ranged if ranged is not None else code_index.range_search(qcodes, radius, max_candidates)
    out = []
    need_topup = [i for i in range(len(qcodes)) if lims[i + 1] - lims[i] < k]
    top = {}
    if need_topup:
        Dk, Ik = code_index.search(qcodes[need_topup], min(k, live))
        top = {q: (Dk[j], Ik[j]) for j, q in enumerate(need_topup)}
    for i in range(len(qcodes)):
        ids, ham = I[lims[i]:lims[i + 1]], D[lims[i]:lims[i + 1]]
        truncated = max_candidates is not None and len(ids) >= max_candidates
        if i in top:
            d2, i2 = top[i]
            ok = i2 >= 0
            # a whole pool holds every live row at distance < radius, so the k-NN rows it lacks
            # are those at radius or beyond; a cut pool is checked row by row
            extra = d2[ok] >= radius if not truncated else ~np.isin(i2[ok], ids)
            ids = np.concatenate([ids, i2[ok][extra]])
            ham = np.concatenate([ham, d2[ok][extra]])
        out.append((ids, ham.astype(np.int32), truncated))
    return out


def bcs_batch(code_index, qcodes: np.ndarray, k: int, live: int, extra: dict | None = None) -> SearchBatch:
    """BCS over any code index (:class:`BinaryIndex`, :class:`BucketIndex`,
    :class:`GpuCodeIndex`, :class:`deephash_faiss.distributed.ShardedCodeIndex`)."""
    t0 = time.perf_counter()
    D, I = code_index.search(qcodes, min(k, live))
    ms = (time.perf_counter() - t0) * 1e3
    res = []
    for d, i in zip(D, I):
        ok = i >= 0
        res.append(QueryResult(i[ok], d[ok], np.full(ok.sum(), np.nan, np.float32), live))
    return SearchBatch("bcs", res, ms, dict(extra or {}))


def hds_results(pools, ranked) -> list[QueryResult]:
    """HDS results from pools [(ids, hamming, truncated)] and their L2 ranking
    [(local order, distances)] (:func:`deephash_faiss.rerank.rank_pools_cpu`)."""
    return [QueryResult(ids[order], ham[order].astype(np.int32), dist, len(ids), trunc)
            for (ids, ham, trunc), (order, dist) in zip(pools, ranked)]


#: :func:`hds_ivf` splits a batch over threads, one part of at least this many queries each
#: (so from twice this many), when the features are in RAM and no ``exact`` callback is given.
#: Measured by ``benchmarks/bench_hds_batches.py`` (docs/benchmarks.md, "HDS batches over
#: threads"); 250 against 500 (ad hoc, 2026-12-07, 2-core AMD EPYC host, real smallcnn statistics,
#: 10,000 queries, medians of 3 alternating rounds): batches of 500 / 800 queries 39.2 / 32.5
#: against 41.3 / 34.6 us a query at 1e5 rows, 50.7 / 47.9 against 53.4 / 50.8 at 2e5; parts of
#: 100 were no faster than one call at batches of 200 (51.2 against 52.4 us).
HDS_THREAD_MIN_QUERIES = 250

#: :func:`hds_ivf` runs a batch whose probe budget (queries x ``nprobe`` x the fine index's
#: ``cell_size`` rows) is at most this many rows on one OpenMP thread: the package sets
#: OMP_WAIT_POLICY=PASSIVE (torch and faiss pools), so each of a small batch's many short faiss
#: regions (list scan, centroid and refine distances, Hamming scans) would wake a sleeping worker
#: for little work; the work of a region grows with the rows probed. Measured by
#: ``benchmarks/bench_hds_small_batches.py`` (2-core AMD EPYC host, real smallcnn statistics,
#: 2,000 queries, medians of 4 rounds; ``results/scale/hds_small_batches_smallcnn_n1e{5,6}_*.json``),
#: us a query in one batch call on one / two threads: 1e5 rows (1,536 rows a query) batch 8
#: 186 / 241, 16 134 / 170, 24 113 / 123, 32 103 / 103, 48 96 / 94; 1e6 rows (4,096 a query)
#: batch 4 595 / 610, 8 478 / 443, 12 426 / 376, 16 412 / 370. (Before: at most 16 queries,
#: whatever the index's size.)
HDS_ONE_THREAD_MAX_ROWS = 24576

#: :func:`hds_ivf` searches a batch of at most this many queries one query at a time through
#: the fine index's single-query path (and its per-code memo) instead of the batch machinery,
#: whose fixed cost (~0.4 ms a call) is more than a few single queries. Measured (same script,
#: host and runs), us a query, one query at a time / the best batch call: 1e5 rows batch 2
#: 213 / 388, 4 202 / 271, 8 209 / 186; 1e6 rows batch 2 426 / 811, 4 407 / 595, 8 415 / 443,
#: 12 419 / 376.
HDS_SINGLE_LOOP_MAX_QUERIES = 4


def hds_ivf(fine, qcodes: np.ndarray, qfeats: np.ndarray, k: int, radius: int, gather, params,
            max_candidates: int | None, live: int, exact=None, threads: int | None = None):
    """Approximate HDS through a :class:`~deephash_faiss.fine.FineIndex`, its small pools
    ranked exactly: the one implementation behind :meth:`Searcher.hds` (``ivf``) and the
    benchmarks.

    Pools of at most ``params.exact_max`` rows are ranked whole, as the exact path ranks them
    (:func:`hamming_pools` on the fine index's dictionary, topped up to k by the Hamming k-NN,
    then :func:`~deephash_faiss.rerank.rank_pools_cpu`), from the radius reach the fine
    search already resolved; or by ``exact`` when given and it answers (indices int64 [s] ->
    s :class:`QueryResult`, or None for the CPU path here: the Searcher's GPU path).

    A batch of 2 to ``HDS_SINGLE_LOOP_MAX_QUERIES`` queries is searched one query at a time
    (the single-query path, whose lists are the batch path's up to the float rounding of the
    centroid distances). A batch whose probe budget (queries x ``nprobe`` x ``cell_size`` rows)
    is at most ``HDS_ONE_THREAD_MAX_ROWS`` runs on one OpenMP thread (the caller's setting
    restored after). A batch of at least ``2 x HDS_THREAD_MIN_QUERIES`` queries, features in
    RAM (``gather`` an array) and no ``exact`` is split by query code into ``threads`` parts
    (default: faiss's OpenMP threads), each searched in a thread of its own with one OpenMP
    thread: the numpy work between faiss's kernels runs in parallel too. Each query's result is
    computed as in one call for the whole batch, up to the float rounding of the centroid GEMMs.

    Args:
        qcodes: uint8 [m, B]; qfeats: float32 [m, D]; gather: as :meth:`FineIndex.search`;
        params: :class:`~deephash_faiss.fine.FineParams`; live: live rows of the index.
    Returns:
        (m :class:`QueryResult`, rows examined int list [m], modes list [m]: "ivf" or "exact").
    """
    qcodes = np.ascontiguousarray(qcodes, np.uint8)
    m = len(qcodes)
    if 1 < m <= HDS_SINGLE_LOOP_MAX_QUERIES:
        return _hds_ivf_loop(fine, qcodes, qfeats, k, radius, gather, params, max_candidates, live, exact)
    from .fine import FineParams

    nprobe = (params or FineParams()).nprobe
    if m * nprobe * fine.cell_size <= HDS_ONE_THREAD_MAX_ROWS:
        with _omp_threads(1):
            return _hds_ivf_one(fine, qcodes, qfeats, k, radius, gather, params, max_candidates, live, exact)
    parts = _thread_parts(qcodes, threads) if exact is None and isinstance(gather, np.ndarray) else []
    if len(parts) < 2:
        return _hds_ivf_one(fine, qcodes, qfeats, k, radius, gather, params, max_candidates, live, exact)
    from concurrent.futures import ThreadPoolExecutor

    import faiss

    qfeats = np.ascontiguousarray(qfeats, np.float32)
    fine.warm()

    def part(ix):
        faiss.omp_set_num_threads(1)  # this thread's OpenMP regions (the others run beside it)
        return _hds_ivf_one(fine, qcodes[ix], qfeats[ix], k, radius, gather, params, max_candidates, live, None)

    res: list = [None] * len(qcodes)
    examined, modes = [0] * len(qcodes), [""] * len(qcodes)
    with ThreadPoolExecutor(len(parts), thread_name_prefix="dhf-hds") as ex:
        for ix, (r, e, md) in zip(parts, ex.map(part, parts)):
            for j, i in enumerate(ix.tolist()):
                res[i], examined[i], modes[i] = r[j], e[j], md[j]
    return res, examined, modes


def _hds_ivf_loop(fine, qcodes: np.ndarray, qfeats: np.ndarray, k: int, radius: int, gather, params,
                  max_candidates: int | None, live: int, exact=None):
    """:func:`hds_ivf` of a few queries, one at a time on one OpenMP thread (each the single
    query's search, its ``exact`` indices mapped back to the batch's)."""
    qfeats = np.asarray(qfeats)
    res, examined, modes = [], [], []
    with _omp_threads(1):
        for i in range(len(qcodes)):
            ex = None if exact is None else (lambda si, i=i: exact(np.asarray(si, np.int64) + i))
            r, e, md = _hds_ivf_one(fine, qcodes[i:i + 1], qfeats[i:i + 1], k, radius, gather, params,
                                    max_candidates, live, ex)
            res += r
            examined += e
            modes += md
    return res, examined, modes


@contextmanager
def _omp_threads(n: int):
    """faiss's OpenMP regions started by this thread run on ``n`` threads inside the block (the
    setting is the calling thread's own; restored after)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _thread_parts(qcodes: np.ndarray, threads: int | None) -> list:
    """The parts :func:`hds_ivf` splits a batch into: query indices int64 arrays, queries of
    one code in one part (the fine search resolves a code's radius once), about equal; one
    part (or none) below ``2 x HDS_THREAD_MIN_QUERIES`` queries or with one thread."""
    from .index import _row_keys

    if threads is None:
        import faiss

        threads = faiss.omp_get_max_threads()
    t = min(int(threads), len(qcodes) // HDS_THREAD_MIN_QUERIES)
    if t < 2:
        return []
    code = np.unique(_row_keys(qcodes), return_inverse=True)[1].ravel()  # each query's code number
    order = np.argsort(code, kind="stable")
    cuts = [int(c) for c in np.linspace(0, len(order), t + 1)[1:-1]]
    sk = code[order]
    cuts = sorted({int(np.searchsorted(sk, sk[c])) for c in cuts} - {0})  # at a code's first query
    return [p for p in np.split(order, cuts) if len(p)]


def _hds_ivf_one(fine, qcodes: np.ndarray, qfeats: np.ndarray, k: int, radius: int, gather, params,
                 max_candidates: int | None, live: int, exact=None):
    """:func:`hds_ivf` of one batch in this thread."""
    out, (si, sl, sD, sI) = fine.search(qcodes, qfeats, k, radius, gather, params, max_candidates, small_pools=True)
    res: list = [None] * len(out)
    if len(si):
        got = exact(si) if exact is not None else None
        if got is None:
            memo = fine.code_memo(qcodes[0], radius) if len(qcodes) == 1 else {}  # (the code's pool, kept)
            pools = memo.get(("pools", k, max_candidates, live))
            if pools is None:
                pools = memo[("pools", k, max_candidates, live)] = hamming_pools(
                    fine.buckets, qcodes[si], k, radius, max_candidates, live, ranged=(sl, sD, sI))
            got = hds_results(pools, rank_pools_cpu(np.asarray(qfeats)[si], [ids for ids, _, _ in pools], gather, k))
        for i, r in zip(si.tolist(), got):
            res[i] = r
    ivf = [i for i in range(len(out)) if res[i] is None]
    if len(out) == 1 and ivf:  # one query (the per-row pass below costs it a dozen calls)
        ids, dist, pool, _, trunc, _ = out[0]
        d = fine.buckets
        res[0] = QueryResult(ids, _popcount_rows(qcodes[0], np.asarray(d.dict_codes)[d.bucket_of_rows()[ids]]),
                             dist, pool, trunc)
    elif ivf:  # Hamming distances of every result row, one vectorized pass over the batch
        d = fine.buckets
        lens = np.array([len(out[i][0]) for i in ivf], np.int64)
        rows = np.concatenate([out[i][0] for i in ivf])
        own = np.repeat(np.asarray(ivf, np.int64), lens)
        ham = _popcount_rows(qcodes[own], np.asarray(d.dict_codes)[d.bucket_of_rows()[rows]])
        at = np.concatenate([[0], np.cumsum(lens)]).tolist()
        for j, i in enumerate(ivf):
            ids, dist, pool, _, trunc, _ = out[i]
            res[i] = QueryResult(ids, ham[at[j]:at[j + 1]], dist, pool, trunc)
    modes = ["exact" if o[5] else "ivf" for o in out]
    return res, [int(o[3]) for o in out], modes


def hds_device(gindex, feats, qcodes: np.ndarray, qfeats, k: int, radius: int,
               max_candidates: int | None, norms=None, budget_bytes: int = 1 << 31):
    """HDS with the pools kept on the features' device (no deleted rows).

    Pools as :func:`hamming_pools` (radius < ``radius`` nearest first, cut at
    ``max_candidates``; a pool of fewer than k codes becomes the Hamming k-NN, which holds
    it), ranked by :func:`deephash_faiss.gpu.l2_rerank_ids`.

    Args:
        gindex: :class:`deephash_faiss.gpu.GpuBinaryIndex` on feats' device.
        feats: torch float [n, D]; norms: optional float32 [n] squared norms.
        qcodes: uint8 [m, B]; qfeats: float32 [m, D] (numpy or torch).
    Returns:
        list of m (ids int64 [k_i], hamming int32 [k_i], squared L2 float32 [k_i],
        pool size, truncated), numpy.
    """
    import torch

    from .gpu import l2_rerank_ids

    dev = feats.device
    m, n = len(qcodes), gindex.ntotal
    qc = torch.as_tensor(np.ascontiguousarray(qcodes, dtype=np.uint8), device=dev)
    lims, D, I = gindex.range_search(qc, int(radius), max_candidates)
    lens = lims[1:] - lims[:-1]
    truncated = (lens >= max_candidates) if max_candidates is not None else torch.zeros_like(lens, dtype=torch.bool)
    kk = min(k, n)
    P = int(max(int(lens.max()) if m else 0, kk))
    ar = torch.arange(P, device=dev)
    ids = torch.full((m, P), -1, dtype=torch.int64, device=dev)
    ham = torch.zeros((m, P), dtype=torch.int32, device=dev)
    if len(I):
        valid = ar[None, :] < lens[:, None]
        pos = (lims[:-1, None] + ar[None, :]).clamp(max=len(I) - 1)
        ids = torch.where(valid, I[pos], ids)
        ham = torch.where(valid, D[pos], ham)
    short = torch.nonzero(lens < kk).flatten()
    if len(short) and kk > 0:  # the pool is a prefix of the Hamming k-NN: take the k-NN
        Dk, Ik = gindex.search(qc[short], kk)
        ids[short] = -1
        ids[short, :kk] = Ik
        ham[short, :kk] = Dk
        lens = lens.clone()
        lens[short] = (Ik >= 0).sum(1)
    qf = torch.as_tensor(qfeats, device=dev)
    dist, order = l2_rerank_ids(qf, feats, ids, lens, k, norms, budget_bytes)
    ok = order >= 0
    o = order.clamp(min=0)
    rid, rham = ids.gather(1, o), ham.gather(1, o)
    dist, ok, rid, rham = dist.cpu().numpy(), ok.cpu().numpy(), rid.cpu().numpy(), rham.cpu().numpy()
    lens_np, trunc_np = lens.cpu().numpy(), truncated.cpu().numpy()
    return [(rid[i][ok[i]], rham[i][ok[i]].astype(np.int32), dist[i][ok[i]].astype(np.float32),
             int(lens_np[i]), bool(trunc_np[i])) for i in range(m)]


class CompletedHashIndex:
    """The saved hash / multihash index, whose k-NN (faiss's IndexBinaryHash / MultiHash)
    probes only ``nflip`` bit flips and may find fewer than k rows, or none: a query that
    comes back short gets its k-NN from the exact flat scan (``flat()``, built on first
    need) instead, so a list is never short while live rows exist. Full lists stay the hash
    index's (approximate: it may miss nearer codes). Everything else passes through.

    Args:
        index: the :class:`BinaryIndex` of kind hash or multihash.
        flat: returns the exact :class:`BinaryIndex` over the same codes and deletions.
    """

    def __init__(self, index: BinaryIndex, flat: Callable[[], BinaryIndex]):
        self.index, self._flat = index, flat
        self.completed = 0  # queries answered by the flat scan so far

    def __getattr__(self, name):
        return getattr(self.index, name)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(D int32 [m, k], I int64 [m, k]), as :meth:`BinaryIndex.search`."""
        D, I = self.index.search(q, k)
        if not (I < 0).any():  # every list full: nothing to complete (the common case, no O(n) count)
            return D, I
        deleted = self.index.deleted
        live = self.index.ntotal - (int(deleted.sum()) if deleted is not None else 0)
        short = np.flatnonzero((I >= 0).sum(1) < min(k, live))
        if len(short):
            flat = self._flat()
            flat.deleted = deleted
            D2, I2 = flat.search(np.asarray(q)[short], k)
            D, I = D.copy(), I.copy()
            D[short], I[short] = D2, I2
            self.completed += len(short)
        return D, I


class GpuCodeIndex:
    """The database codes on a torch device (:class:`deephash_faiss.gpu.GpuBinaryIndex`:
    Triton int8 tensor-core kernels on CUDA), with :class:`BinaryIndex`'s semantics:
    (distance, id) order, strict radius, the cap, and the owner's ``deleted`` mask.
    Exact whatever the index type on disk (flat, hash or multihash)."""

    def __init__(self, codes: np.ndarray, owner: BinaryIndex, device):
        from .gpu import GpuBinaryIndex

        self.owner = owner
        self.gpu = GpuBinaryIndex(codes, device=device)

    def search(self, q: np.ndarray, k: int):
        from .index import _finish_knn

        deleted = self.owner.deleted
        n_del = int(deleted.sum()) if deleted is not None else 0
        kk = min(self.gpu.ntotal, k + n_del)
        D, I = self.gpu.search(np.ascontiguousarray(q, dtype=np.uint8), kk)
        return _finish_knn(np.asarray(D, np.int32), np.asarray(I, np.int64), k, deleted)

    def range_search(self, q: np.ndarray, radius: int, max_candidates: int | None = None):
        from .index import sort_and_cap

        if radius < 0:
            raise DhfError("radius must be >= 0")
        deleted = self.owner.deleted
        live_only = deleted is None or not deleted.any()
        cap = max_candidates if live_only else None
        lims, D, I = self.gpu.range_search(np.ascontiguousarray(q, dtype=np.uint8), int(radius), cap)
        lims, D, I = np.asarray(lims, np.int64), np.asarray(D, np.int32), np.asarray(I, np.int64)
        if live_only:  # already ordered by (distance, id) and capped on the device
            return lims, D, I
        return sort_and_cap(lims, D, I, max_candidates, deleted)


class Searcher:
    """Search an index directory.

    Args:
        index_dir: a directory written by :func:`deephash_faiss.api.build_index`.
        device: "auto", "cpu" or "cuda": where queries are encoded and L2 is computed.
        features_in_memory: load all features into RAM (or GPU memory on CUDA) at start;
            otherwise they are memory-mapped from the shards and gathered per query.
        code_backend: "auto" (routed per call: :func:`deephash_faiss.routing.route` picks the
            code dictionary, the FAISS scan or, on CUDA, the GPU kernels), "faiss" (the index
            as saved), "dict" (the code dictionary), "flat" (a FAISS flat scan) or "gpu" (the
            torch path of :mod:`deephash_faiss.gpu`, also on CPU).
        hds_mode: default HDS mode ("exact", "ivf" or "auto"; see the module docstring).
        fine: an optional :class:`deephash_faiss.fine.FineIndex` for ``hds_mode="ivf"``
            (else :meth:`build_fine_index` builds one).
        model_path: encode queries with this checkpoint instead of the index's model; it
            must be the index's model (same sha256) unless ``allow_other_model``.
        allow_other_model: accept a ``model_path`` (or :meth:`set_model`) with other weights
            of the same width: its codes are generally not comparable with the index's.
        full_check: check every file's sha256 on open (reads the whole index once); by
            default only sizes and the code index's sha256 (when small) are checked, and
            the model's sha256 when it is loaded (:func:`deephash_faiss.store.check_open`).

    Raises:
        DhfError: a missing, truncated or replaced file (one line; ``dhf verify`` lists all).
    """

    CODE_BACKENDS = ("auto", "faiss", "dict", "flat", "gpu")

    def __init__(self, index_dir: str, device: str = "auto", features_in_memory: bool = False,
                 code_backend: str = "auto", hds_mode: str = "auto", fine=None, model_path: str | None = None,
                 allow_other_model: bool = False, full_check: bool = False):
        from .model import resolve_device

        self.index_dir = index_dir
        self.manifest = read_manifest(index_dir)
        check_open(index_dir, self.manifest, full=full_check)
        self.allow_other_model = allow_other_model
        self.bits = int(self.manifest["bits"])
        self.device = resolve_device(device)
        self.store = FeatureStore(index_dir, self.manifest)
        spec = IndexSpec.from_dict(self.manifest["index"])
        self.index = BinaryIndex.load(os.path.join(index_dir, self.manifest["index"]["file"]), spec, self.bits)
        if self.index.ntotal != self.store.count:
            raise DhfError(
                f"{index_dir}: code index holds {self.index.ntotal} codes, the manifest {self.store.count}"
            )
        if self.index.bits != self.bits:
            raise DhfError(f"{index_dir}: code index has {self.index.bits} bits, the manifest {self.bits}")
        deleted = self.manifest.get("deleted")
        if deleted:
            mask = np.zeros(self.store.count, bool)
            mask[np.asarray(deleted, dtype=np.int64)] = True
            self.index.deleted = mask
        self._codes: np.ndarray | None = None
        self._model = None
        self._gpu_feats = None
        self._gpu_norms_t = None
        self._gpu_index = None
        self._dict = self.index if isinstance(self.index, BucketIndex) else None
        # the saved index is the flat scan when it is one; a dictionary or a hash index gets one built on need
        self._flat = self.index if not isinstance(self.index, BucketIndex) and self.index.spec.kind == "flat" else None
        self._hash_index: CompletedHashIndex | None = None
        self.backend = pick_backend(str(self.device))
        if code_backend not in self.CODE_BACKENDS:
            raise DhfError(f"unknown code backend {code_backend!r} ({', '.join(self.CODE_BACKENDS)})")
        if hds_mode not in HDS_MODES:
            raise DhfError(f"unknown HDS mode {hds_mode!r}; choose from {', '.join(HDS_MODES)}")
        self.code_backend = code_backend
        self.hds_mode = hds_mode
        self.fine = fine
        self.fine_problem: str | None = None  # why the saved fine index is not used (None: no problem)
        self._fine_tried = fine is not None
        self.last_path: str | None = None
        self._routes: dict = {}  # (live, distinct codes, batch) -> code path (code_path)
        if features_in_memory:
            self.store.load_features()
            if self.device.type == "cuda":
                self._gpu_features()
        if model_path is not None:
            self.use_model_file(model_path)

    # -- code paths (routing) ---------------------------------------------------------
    def dictionary(self) -> BucketIndex:
        """The code dictionary: the saved one, or built from the codes once (in memory)."""
        if self._dict is None:
            self._dict = BucketIndex.build(self.codes())
            self._dict.deleted = self.index.deleted
        return self._dict

    def flat(self) -> BinaryIndex:
        """A FAISS scan over the codes: the saved index, or an IndexBinaryFlat built once."""
        if self._flat is None:
            self._flat = BinaryIndex.build(self.codes(), IndexSpec("flat"))
            self._flat.deleted = self.index.deleted
        return self._flat

    def gpu_index(self) -> "GpuCodeIndex":
        """The codes on the device (built on first use: a one-shot CPU-routed search never pays it)."""
        if self._gpu_index is None:
            self._gpu_index = GpuCodeIndex(self.codes(), self.index, self.device)
        return self._gpu_index

    def code_path(self, batch: int) -> str:
        """"dict", "flat" or "gpu" for a batch of ``batch`` queries (:func:`routing.route`)."""
        from .routing import route

        cb = self.code_backend
        if cb == "faiss":
            return "dict" if isinstance(self.index, BucketIndex) else "flat"
        if cb in ("dict", "flat", "gpu"):
            return cb
        distinct = self._dict.n_codes if self._dict is not None else None
        key = (self.live_count(), distinct, batch)
        path = self._routes.get(key)
        if path is None:  # the rule is pure in its inputs: decided once per (live, distinct, batch)
            if len(self._routes) > 4096:
                self._routes.clear()
            path = self._routes[key] = route(key[0], distinct, batch, self.device.type,
                                             saved="dict" if isinstance(self.index, BucketIndex) else self.index.spec.kind)
        return path

    def hds_path(self, batch: int) -> str:
        """The code path of exact HDS: :meth:`code_path`, except that the GPU takes HDS batches
        only from ``cuda_hds_min_batch`` queries (measured: pools + rerank on the GPU were
        slower than the CPU at batches of 1 and 16, ``benchmarks/bench_searcher_cuda.py``)."""
        from .routing import route, thresholds

        path = self.code_path(batch)
        mb = thresholds().get("cuda_hds_min_batch")
        if path == "gpu" and self.code_backend == "auto" and (mb is None or batch < int(mb)):
            distinct = self._dict.n_codes if self._dict is not None else None
            path = route(self.live_count(), distinct, batch, "cpu",
                         saved="dict" if isinstance(self.index, BucketIndex) else self.index.spec.kind)
        return path

    def code_index(self, batch: int, path: str | None = None):
        """The code index for a batch, on ``path`` (default :meth:`code_path`; records ``last_path``)."""
        path = path or self.code_path(batch)
        self.last_path = path
        if path == "gpu":
            return self.gpu_index()
        if path == "dict":
            return self.dictionary()
        if path == "flat":
            return self.flat()
        if self._hash_index is None or self._hash_index.index is not self.index:
            self._hash_index = CompletedHashIndex(self.index, self.flat)
        return self._hash_index  # "faiss": the saved hash / multihash index, short lists completed

    @property
    def _codes_index(self):  # the index the CPU/GPU choice of the constructor used to fix
        return self.code_index(1)

    def fine_index(self):
        """The :class:`~deephash_faiss.fine.FineIndex`: given, built, or the one saved with the
        index (manifest ``fine``, loaded on the first call, its size and checksum checked like
        the code index's on open); None when there is none or the saved one does not match
        this index (``fine_problem`` says why)."""
        if self.fine is None and not self._fine_tried:
            self._fine_tried = True
            entry = self.manifest.get("fine")
            if entry:
                from .fine import FineIndex
                from .layout import fine_entry_problem

                self.fine_problem = fine_entry_problem(self.manifest)
                if self.fine_problem is None:
                    try:
                        self.fine = FineIndex.load(os.path.join(self.index_dir, entry["file"])).attach(
                            self.dictionary())
                    except DhfError as err:
                        self.fine_problem = str(err)
        return self.fine

    def build_fine_index(self, cell_size: int | None = None, storage: str = "auto", **kw):
        """Build the HDS fine index over this index's dictionary and features (k-means per big
        code; minutes at 1e7 rows on 2 cores) and use it for ``hds_mode`` "ivf" / "auto"."""
        from .fine import FineIndex

        self.fine = FineIndex.build(self.dictionary(), self.store.load_features(), cell_size=cell_size,
                                    storage=storage, **kw)
        self._fine_tried, self.fine_problem = True, None
        return self.fine

    # -- metadata -----------------------------------------------------------------------
    @property
    def count(self) -> int:
        return self.store.count

    def live_count(self) -> int:
        d = self.index.deleted
        return self.count - (int(d.sum()) if d is not None else 0)

    def codes(self) -> np.ndarray:
        if self._codes is None:
            self._codes = self.store.codes()
        return self._codes

    @property
    def model(self):
        if self._model is None:
            from .model import load_model

            model = load_model(checked_model_path(self.index_dir, self.manifest), self.device)
            self._check_width(model)
            self._model = model
        return self._model

    def _check_width(self, model) -> None:
        if model.config.bits != self.bits:
            raise DhfError(f"model has {model.config.bits}-bit codes but the index has {self.bits}-bit codes")
        if model.config.feature_dim != self.store.dim:
            raise DhfError(f"model has {model.config.feature_dim}-d features but the index {self.store.dim}-d")

    def use_model_file(self, model_path: str, allow_other_model: bool | None = None) -> None:
        """Encode queries with the checkpoint ``model_path``. It must produce the index's bits
        and feature size, and be the index's model (same sha256) unless ``allow_other_model``
        (default: the Searcher's): other weights give codes that are not comparable."""
        from .model import load_model

        allow = self.allow_other_model if allow_other_model is None else allow_other_model
        same = is_index_model(self.manifest, model_path)
        model = load_model(model_path, self.device)  # weights_only: safe to read before refusing
        self._check_width(model)
        if not same and not allow:
            raise other_model_error(self.manifest, model_path)
        self._model = model.eval()

    def set_model(self, model, allow_other_model: bool | None = None) -> None:
        """Use a model object for queries (it must produce the index's bits and feature size).
        Without ``allow_other_model`` (default: the Searcher's) its weights must equal the
        index's model's: other weights give codes that are not comparable."""
        from .model import load_model

        self._check_width(model)
        allow = self.allow_other_model if allow_other_model is None else allow_other_model
        if not allow and not _same_weights(model, load_model(checked_model_path(self.index_dir, self.manifest))):
            raise DhfError("this model's weights differ from the index's model: its codes would not be "
                           "comparable; pass allow_other_model=True to use it anyway")
        self._model = model.to(self.device).eval()

    # -- encoding -----------------------------------------------------------------------
    def encode(self, paths: Sequence[str], batch_size: int = 128, skip_bad: bool = False,
               progress: bool = False):
        """Encode query images: (codes uint8 [m, B], features float32 [m, D], bad [(pos, reason)]).

        A file that cannot be decoded raises :class:`DhfError`, or with ``skip_bad`` is
        left out: the rows then belong to the paths whose positions are not in ``bad``
        (in order), and only all files failing raises. ``progress``: a tqdm bar on stderr.
        """
        from tqdm import tqdm

        from .extract import encode_paths

        codes, feats, bad = [], [], []
        with tqdm(total=len(paths), desc="encoding queries", unit="img", disable=not progress,
                  leave=False) as bar:
            # queries are decoded like the database (manifest "decoder"; nvjpeg needs CUDA, else PIL)
            for p, c, f, b in encode_paths(self.model, list(paths), self.device, batch_size,
                                           decoder=self.manifest.get("decoder", "pil")):
                codes.append(c)
                feats.append(f)
                bad.extend(b)
                bar.update(len(p) + len(b))
        bad.sort()
        if bad and (not skip_bad or len(bad) == len(paths)):
            i, reason = bad[0]
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise DhfError(f"cannot use query {paths[i]}: {reason}{more}")
        return np.concatenate(codes), np.concatenate(feats).astype(np.float32), bad

    # -- modes --------------------------------------------------------------------------
    def _check(self, k: int, radius: int | None = None, max_candidates: int | None = None) -> None:
        check_search_args(k, radius, max_candidates, self.live_count(), self.bits)

    def bcs(self, qcodes: np.ndarray, k: int) -> SearchBatch:
        """Hamming k-NN. qcodes uint8 [m, B]."""
        self._check(k)
        ci = self.code_index(len(qcodes))
        return bcs_batch(ci, qcodes, k, self.live_count(), {"path": self.last_path})

    def pools(self, qcodes: np.ndarray, k: int, radius: int, max_candidates: int | None):
        """HDS candidate pools: list of (ids int64 [p], hamming int32 [p], truncated)."""
        return hamming_pools(self.code_index(len(qcodes), self.hds_path(len(qcodes))), qcodes, k, radius,
                             max_candidates, self.live_count())

    def hds(self, qcodes: np.ndarray, qfeats: np.ndarray, k: int, radius: int = DEFAULT_RADIUS,
            max_candidates: int | None = DEFAULT_MAX_CANDIDATES, hds_mode: str | None = None,
            nprobe: int | None = None, refine: int | None = None) -> SearchBatch:
        """Pool by Hamming radius, rank the pool by L2 on fc7. qfeats float32 [m, D].

        ``hds_mode`` (default: the Searcher's): "exact" ranks the whole pool (cut at
        ``max_candidates``), "ivf" ranks inside it with the fine index (``nprobe`` x cell size
        rows probed, ``refine`` exact re-ranks, None = by index size (:func:`fine.default_probe`);
        ``max_candidates`` bounds the rows examined; without a fine index one is built in memory), "auto" is "ivf" when a fine index is at
        hand (:meth:`fine_index`), else "exact". ``extra["hds_mode"]``: the mode that ran;
        ``extra["query_modes"]``: per query ("ivf", or "exact" for pools of at most
        ``FineParams.exact_max`` rows); ``QueryResult.truncated``: the safety limit cut it."""
        p = SearchParams(k, radius, max_candidates, "hds", hds_mode or self.hds_mode, nprobe, refine)
        p.check(self.live_count(), self.bits)
        mode = p.hds_mode
        if mode == "auto":
            mode = "ivf" if self.fine_index() is not None else "exact"
        elif mode == "ivf" and self.fine_index() is None and self.fine_problem:
            raise DhfError(f"the saved fine index is not usable: {self.fine_problem}; "
                           f"rebuild it with `dhf fine-index` or use --hds-mode exact")
        if mode == "ivf":
            b = self._hds_ivf(qcodes, qfeats, p)
        else:
            b = self._hds_exact(qcodes, qfeats, k, radius, max_candidates)
            b.extra["query_modes"] = ["exact"] * len(qcodes)
        if self.fine_problem:
            b.extra["fine"] = f"not used: {self.fine_problem}"
        return b

    def _hds_ivf(self, qcodes: np.ndarray, qfeats: np.ndarray, p: SearchParams) -> SearchBatch:
        from .fine import FineParams

        t0 = time.perf_counter()
        fine = self.fine_index() or self.build_fine_index()
        t1 = time.perf_counter()
        fp = FineParams.for_rows(self.live_count(), p.nprobe, p.refine, max(p.k, FineParams.exact_max))
        feats = self.store.features_in_ram()  # read in place by the refine when loaded

        def exact(idx):  # small pools routed to the GPU: the Searcher's exact path (its kernels)
            if self.hds_path(len(idx)) != "gpu":
                return None
            return self._hds_exact(qcodes[idx], np.asarray(qfeats)[idx], p.k, p.radius, p.max_candidates).results

        # (on a CPU Searcher no exact callback: hds_ivf may then split large batches over threads)
        res, examined, qmodes = hds_ivf(fine, np.asarray(qcodes, np.uint8), qfeats, p.k, p.radius,
                                        self.store.gather if feats is None else feats, fp, p.max_candidates,
                                        self.live_count(), exact if self.device.type == "cuda" else None)
        t2 = time.perf_counter()
        return SearchBatch("hds", res, (t2 - t0) * 1e3,
                           {"hds_mode": "ivf", "fine_build_ms": (t1 - t0) * 1e3, "exact_queries": qmodes.count("exact"),
                            "examined": examined, "query_modes": qmodes,
                            "nprobe": fp.nprobe, "refine": fp.refine})

    def _hds_exact(self, qcodes: np.ndarray, qfeats: np.ndarray, k: int, radius: int,
                   max_candidates: int | None) -> SearchBatch:
        t0 = time.perf_counter()
        path = self.hds_path(len(qcodes))
        if (path == "gpu" and self.backend == "torch"
                and (self.index.deleted is None or not self.index.deleted.any())):
            self.last_path = path
            out = hds_device(self.gpu_index().gpu, self._gpu_features(), qcodes, qfeats, k, radius,
                             max_candidates, norms=self._gpu_norms())
            res = [QueryResult(ids, ham, dist, size, trunc) for ids, ham, dist, size, trunc in out]
            return SearchBatch("hds", res, (time.perf_counter() - t0) * 1e3,
                               {"device": str(self.device), "path": path, "hds_mode": "exact"})
        pools = self.pools(qcodes, k, radius, max_candidates)
        t1 = time.perf_counter()
        if self.backend == "torch" and path == "gpu":
            import torch

            from .rerank import rank_pools_torch_ids

            q = torch.as_tensor(np.asarray(qfeats, np.float32), device=self.device)
            ranked = rank_pools_torch_ids(q, self._gpu_features(), [ids for ids, _, _ in pools], k,
                                          norms=self._gpu_norms())
        else:
            # per-pool sorted gathers + blocked dot products (one union gather + GEMM when
            # the batch's pools overlap heavily): rerank.rank_pools_cpu
            ranked = rank_pools_cpu(qfeats, [ids for ids, _, _ in pools], self.store.gather, k)
        res = hds_results(pools, ranked)
        t2 = time.perf_counter()
        return SearchBatch("hds", res, (t2 - t0) * 1e3, {"pool_ms": (t1 - t0) * 1e3, "rerank_ms": (t2 - t1) * 1e3,
                                                         "path": self.last_path, "hds_mode": "exact"})

    def es(self, qfeats: np.ndarray, qcodes: np.ndarray | None, k: int) -> SearchBatch:
        """Exhaustive L2 k-NN on fc7. qfeats float32 [m, D]."""
        self._check(k)
        kk = min(k, self.live_count())
        n_del = self.count - self.live_count()
        t0 = time.perf_counter()
        if self.backend == "faiss-gpu":
            D, I = exhaustive_knn(qfeats, self.store.iter_feature_shards(), kk + n_del, use_gpu=True)
        elif self.backend == "torch":
            import torch

            from .gpu import l2_knn

            xb = self._gpu_features()
            q = torch.as_tensor(np.asarray(qfeats, np.float32), device=self.device)
            D, I = l2_knn(q, xb, kk + n_del)
            D, I = D.cpu().numpy(), I.cpu().numpy()
        else:
            D, I = exhaustive_knn(qfeats, self.store.iter_feature_shards(), kk + n_del)
        ms = (time.perf_counter() - t0) * 1e3
        res = []
        codes = self.codes()
        for qi, (d, i) in enumerate(zip(D, I)):
            ok = i >= 0
            if self.index.deleted is not None:
                ok &= ~self.index.deleted[np.maximum(i, 0)]
            d, i = d[ok][:kk], i[ok][:kk]
            ham = _popcount_rows(qcodes[qi], codes[i]) if qcodes is not None else np.zeros(len(i), np.int32)
            res.append(QueryResult(i, ham, d.astype(np.float32), self.live_count()))
        return SearchBatch("es", res, ms)

    def search(self, mode: str, qcodes: np.ndarray, qfeats: np.ndarray, k: int = 10,
               radius: int = DEFAULT_RADIUS, max_candidates: int | None = DEFAULT_MAX_CANDIDATES,
               hds_mode: str | None = None, nprobe: int | None = None, refine: int | None = None) -> SearchBatch:
        """Dispatch to :meth:`bcs`, :meth:`hds` (with ``hds_mode``, ``nprobe``, ``refine``)
        or :meth:`es`."""
        return dispatch_mode(self, mode, qcodes, qfeats, k, radius, max_candidates, hds_mode=hds_mode,
                             nprobe=nprobe, refine=refine)

    # -- GPU feature cache -------------------------------------------------------------
    def _gpu_features(self):
        if self._gpu_feats is None:
            import torch

            feats = self.store.load_features()
            self._gpu_feats = torch.as_tensor(feats, device=self.device)
        return self._gpu_feats

    def _gpu_norms(self):
        """float32 [n] squared norms of the device features (computed once)."""
        if self._gpu_norms_t is None:
            from .gpu import squared_norms

            self._gpu_norms_t = squared_norms(self._gpu_features())
        return self._gpu_norms_t

    def _gather_device(self, ids: np.ndarray):
        import torch

        if self._gpu_feats is not None or self.device.type == "cuda":
            return self._gpu_features()[torch.as_tensor(ids, device=self.device)]
        return torch.as_tensor(self.store.gather(ids))


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and bool((sa[k].cpu() == sb[k].cpu()).all())
                                          for k in sa)


def results_to_records(batch: SearchBatch, searcher: Searcher) -> list[list[dict[str, Any]]]:
    """Per query, a list of {rank, id, path, label, hamming, distance} dicts."""
    paths, labels, classes = searcher.store.paths(), searcher.store.labels(), searcher.manifest.get("classes", [])
    out = []
    for r in batch.results:
        rows = []
        for rank, (i, h, d) in enumerate(zip(r.ids, r.hamming, r.distance), 1):
            lab = int(labels[i])
            rows.append({
                "rank": rank,
                "id": int(i),
                "path": paths[i],
                "label": classes[lab] if 0 <= lab < len(classes) else None,
                "hamming": int(h),
                "distance": None if np.isnan(d) else float(d),
            })
        out.append(rows)
    return out
