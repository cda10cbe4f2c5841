"""Retrieval metrics for binary hash codes, as the paper's official code defines them.

Protocol (Lin et al., CVPRW 2015, official MATLAB code ``analysis/precision.m``):
every query ranks the whole database by Hamming distance with a *stable* sort
(ties keep database order, i.e. the lower database index comes first). A
retrieved item is relevant when its class label equals the query's.

* AP@K of one query: the mean, over the relevant positions ``j`` (1-based) within
  the first K, of ``(relevant items in the first j) / j``. The divisor is the
  number of relevant items *found* in the first K, not all relevant items in the
  database; a query with no relevant item there scores 0. mAP@K is the mean
  over queries.
* Full-database mAP: the same formula over the whole ranking (then the divisor
  is the number of relevant items in the database).
* P@k: ``(relevant items in the first k) / k``, averaged over queries.
* Precision within Hamming radius r: precision of the items at distance <= r,
  averaged over queries; a query that retrieves nothing there scores 0.

Conventions:

* Codes are ``uint8 [n, nbytes]`` arrays, bits packed with
  ``np.packbits(bits, axis=1, bitorder="little")`` (the FAISS bit order). The
  bit order does not change Hamming distances as long as queries and database
  use the same one.
* Labels are 1-D integer arrays.
* Every function returns fractions in [0, 1] (not percent) as plain Python
  floats, or float64 arrays where a per-query / per-cut-off vector is asked for.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import numpy as np

__all__ = [
    "DEFAULT_KS",
    "average_precision",
    "evaluate_codes",
    "evaluate_ranking",
    "hamming_distance_matrix",
    "pr_curve",
    "pr_curve_at_cutoffs",
    "precision_at_k",
    "precision_within_radius",
]

#: The paper's cut-offs for precision@k: 100, 200, ..., 1000.
DEFAULT_KS: tuple[int, ...] = tuple(range(100, 1001, 100))

_HAS_BITWISE_COUNT = hasattr(np, "bitwise_count")  # numpy >= 2.0
_POPCOUNT_LUT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)

# Element budget for temporary [chunk, n] arrays (bounds memory per chunk).
_CHUNK_ELEMS = 1 << 22
# Smaller budget for the Hamming kernel's uint64 XOR buffer (stays in cache).
_HAMMING_CHUNK_ELEMS = 1 << 20


# --------------------------------------------------------------------------- #
# validation helpers
# --------------------------------------------------------------------------- #
def _check_codes(codes: np.ndarray, name: str) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n, nbytes], got shape {codes.shape}")
    if codes.dtype != np.uint8:
        raise TypeError(f"{name} must be uint8 packed bits, got {codes.dtype}")
    return np.ascontiguousarray(codes)


def _check_labels(labels: np.ndarray, n: int, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must be 1-D of length {n}, got shape {labels.shape}")
    return labels


def _check_hamming(hamming, q_labels, db_labels):
    """(hamming [m, n], q_labels [m], db_labels [n]) as arrays, or ValueError on wrong shapes."""
    hamming = np.asarray(hamming)
    if hamming.ndim != 2:
        raise ValueError("hamming must be 2-D [m, n]")
    m, n = hamming.shape
    return hamming, _check_labels(q_labels, m, "q_labels"), _check_labels(db_labels, n, "db_labels")


def _check_ks(ks: Iterable[int]) -> np.ndarray:
    ks_arr = np.asarray(list(ks), dtype=np.int64).reshape(-1)
    if ks_arr.size == 0:
        raise ValueError("ks must not be empty")
    if (ks_arr < 1).any():
        raise ValueError(f"every k must be >= 1, got {ks_arr.tolist()}")
    return ks_arr


def _check_relevant(relevant: np.ndarray) -> np.ndarray:
    relevant = np.asarray(relevant)
    if relevant.ndim != 2:
        raise ValueError(f"relevant must be 2-D [m, L], got shape {relevant.shape}")
    if relevant.dtype != np.bool_:
        relevant = relevant.astype(bool)
    return relevant


def _dist_dtype(nbits: int) -> np.dtype:
    if nbits <= np.iinfo(np.uint8).max:
        return np.dtype(np.uint8)
    if nbits <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def _n_threads(n_threads: int | None) -> int:
    if n_threads is not None:
        return max(1, int(n_threads))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------- #
# Hamming distances
# --------------------------------------------------------------------------- #
def _as_words(codes: np.ndarray) -> np.ndarray:
    """uint8 [n, nbytes] -> uint64 [n, ceil(nbytes / 8)], zero padded.

    Zero padding does not change Hamming distances (0 xor 0 = 0).
    """
    n, nbytes = codes.shape
    nwords = max(1, -(-nbytes // 8))
    if nbytes == nwords * 8:
        padded = codes
    else:
        padded = np.zeros((n, nwords * 8), dtype=np.uint8)
        padded[:, :nbytes] = codes
    return np.ascontiguousarray(padded).view(np.uint64)


class _HammingKernel:
    """Computes blocks of Hamming distances into reusable buffers.

    Uses ``np.bitwise_count`` on 64-bit words when numpy >= 2.0, otherwise an
    8-bit lookup table over the bytes.
    """

    def __init__(self, db_codes: np.ndarray, nbits: int):
        self.n = db_codes.shape[0]
        self.out_dtype = _dist_dtype(nbits)
        if _HAS_BITWISE_COUNT:
            self.db = _as_words(db_codes)  # uint64 [n, W]
        else:
            self.db = db_codes  # uint8 [n, B]
        self.db_cols = [np.ascontiguousarray(self.db[:, w]) for w in range(self.db.shape[1])]

    def prepare(self, q_codes: np.ndarray) -> np.ndarray:
        return _as_words(q_codes) if _HAS_BITWISE_COUNT else q_codes

    def compute(self, q: np.ndarray, out: np.ndarray, xor_buf: np.ndarray, cnt_buf: np.ndarray) -> None:
        """q: prepared query rows [c, W]; out: [c, n] distances (written in place)."""
        c = q.shape[0]
        for w, col in enumerate(self.db_cols):
            x = xor_buf[:c]
            np.bitwise_xor(q[:, w : w + 1], col[None, :], out=x)
            if _HAS_BITWISE_COUNT:
                if w == 0 and out.dtype == np.uint8:
                    np.bitwise_count(x, out=out)
                    continue
                cnt = cnt_buf[:c]
                np.bitwise_count(x, out=cnt)
            else:
                cnt = np.take(_POPCOUNT_LUT, x, out=cnt_buf[:c])
            if w == 0:
                out[...] = cnt
            else:
                np.add(out, cnt, out=out, casting="unsafe")

    def buffers(self, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        word_dtype = self.db.dtype
        return (
            np.empty((c, self.n), dtype=self.out_dtype),
            np.empty((c, self.n), dtype=word_dtype),
            np.empty((c, self.n), dtype=np.uint8),
        )


def hamming_distance_matrix(
    q_codes: np.ndarray,
    db_codes: np.ndarray,
    *,
    chunk_size: int | None = None,
    n_threads: int | None = None,
) -> np.ndarray:
    """Hamming distances between every query code and every database code.

    Args:
        q_codes: uint8 [m, nbytes] packed query codes.
        db_codes: uint8 [n, nbytes] packed database codes (same nbytes).
        chunk_size: queries per block (bounds the temporary memory); default
            chooses about 1 M distances per block.
        n_threads: worker threads over blocks (numpy releases the GIL);
            default: usable CPUs.

    Returns:
        [m, n] distances, uint8 when ``8 * nbytes <= 255`` bits, else uint16
        (uint32 beyond 65535 bits).
    """
    q_codes = _check_codes(q_codes, "q_codes")
    db_codes = _check_codes(db_codes, "db_codes")
    if q_codes.shape[1] != db_codes.shape[1]:
        raise ValueError(f"code widths differ: {q_codes.shape[1]} vs {db_codes.shape[1]} bytes")
    m, n = q_codes.shape[0], db_codes.shape[0]
    kernel = _HammingKernel(db_codes, 8 * db_codes.shape[1])
    out = np.empty((m, n), dtype=kernel.out_dtype)
    if m == 0 or n == 0:
        return out
    c = chunk_size or max(1, _HAMMING_CHUNK_ELEMS // max(n, 1))
    c = min(c, m)
    q = kernel.prepare(q_codes)
    starts = list(range(0, m, c))
    workers = min(_n_threads(n_threads), len(starts))

    def run(worker: int) -> None:
        _, xor_buf, cnt_buf = kernel.buffers(c)
        for s in starts[worker::workers]:
            e = min(s + c, m)
            kernel.compute(q[s:e], out[s:e], xor_buf, cnt_buf)

    _run_workers(run, workers)
    return out


def _run_workers(run, workers: int) -> None:
    """Call run(0..workers-1), in a thread pool when workers > 1 (errors re-raised)."""
    if workers == 1:
        run(0)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for f in [pool.submit(run, w) for w in range(workers)]:
            f.result()


# --------------------------------------------------------------------------- #
# metrics over a relevance matrix (ranking already applied)
# --------------------------------------------------------------------------- #
def average_precision(relevant: np.ndarray, top_k: int | None = None) -> np.ndarray:
    """Per-query average precision, the official code's definition.

    AP = mean over the relevant positions j (1-based) within the first
    ``top_k`` of ``(relevant in first j) / j``; the divisor is the number of
    relevant items found in the first ``top_k``; 0 when there is none.

    Args:
        relevant: bool [m, L]; row i is query i's ranking (best first), True
            where the item is relevant.
        top_k: cut-off K; ``None`` (or K >= L) uses the whole row. With a row
            that is the full database ranking and ``top_k=None`` this is the
            full-database AP (divisor = all relevant items in the database).

    Returns:
        float64 [m] AP per query, in [0, 1].
    """
    relevant = _check_relevant(relevant)
    m, L = relevant.shape
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        L = min(L, int(top_k))
    out = np.zeros(m, dtype=np.float64)
    if m == 0 or L == 0:
        return out
    inv_pos = 1.0 / np.arange(1, L + 1, dtype=np.float64)
    c = max(1, _CHUNK_ELEMS // L)
    for s in range(0, m, c):
        r = relevant[s : s + c, :L]
        cum = np.cumsum(r, axis=1, dtype=np.int64)
        found = cum[:, -1]
        # sum over relevant j of cum[j] / j
        num = np.einsum("ij,ij,j->i", r.astype(np.float64), cum.astype(np.float64), inv_pos)
        out[s : s + c] = np.where(found > 0, num / np.maximum(found, 1), 0.0)
    return out


def precision_at_k(relevant: np.ndarray, ks: Iterable[int] = DEFAULT_KS) -> np.ndarray:
    """Mean precision at each cut-off k: (relevant in the first k) / k.

    Args:
        relevant: bool [m, L] ranking relevance (best first).
        ks: cut-offs (ints >= 1). A k larger than L counts the missing
            positions as not relevant (still divides by k).

    Returns:
        float64 [len(ks)], mean over the m queries (0.0 when m == 0).
    """
    relevant = _check_relevant(relevant)
    ks_arr = _check_ks(ks)
    m, L = relevant.shape
    if m == 0:
        return np.zeros(ks_arr.size, dtype=np.float64)
    kmax = int(min(ks_arr.max(), L))
    totals = np.zeros(ks_arr.size, dtype=np.int64)
    if kmax > 0:
        cols = np.minimum(ks_arr, kmax) - 1
        c = max(1, _CHUNK_ELEMS // kmax)
        for s in range(0, m, c):
            cum = np.cumsum(relevant[s : s + c, :kmax], axis=1, dtype=np.int64)
            totals += cum[:, cols].sum(axis=0)
    return totals / (ks_arr.astype(np.float64) * m)


def pr_curve_at_cutoffs(
    relevant: np.ndarray,
    cutoffs: Iterable[int],
    n_relevant: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Precision-recall curve of any ranking at fixed cut-offs.

    Args:
        relevant: bool [m, L] ranking relevance (best first).
        cutoffs: ints >= 1; beyond L the missing positions count as not relevant.
        n_relevant: int [m] number of relevant items in the whole database per
            query (the recall denominator). Default: ``relevant.sum(1)``, right
            only when each row is the full ranking.

    Returns:
        ``{"cutoff": int64 [C], "precision": float64 [C], "recall": float64 [C]}``,
        means over queries; a query with no relevant item in the database has
        recall 0.
    """
    relevant = _check_relevant(relevant)
    cut = _check_ks(cutoffs)
    m, L = relevant.shape
    if n_relevant is None:
        n_rel = relevant.sum(axis=1)
    else:
        n_rel = np.asarray(n_relevant).reshape(-1)
        if n_rel.shape[0] != m:
            raise ValueError(f"n_relevant must have length {m}")
    prec = np.zeros(cut.size)
    rec = np.zeros(cut.size)
    if m and L:
        kmax = int(min(cut.max(), L))
        cols = np.minimum(cut, kmax) - 1
        hits = np.cumsum(relevant[:, :kmax], axis=1, dtype=np.int64)[:, cols]  # [m, C]
        prec = (hits / cut[None, :]).mean(axis=0)
        denom = np.maximum(n_rel, 1)[:, None]
        rec = np.where(n_rel[:, None] > 0, hits / denom, 0.0).mean(axis=0)
    return {"cutoff": cut, "precision": prec, "recall": rec}


# --------------------------------------------------------------------------- #
# metrics over a Hamming distance matrix
# --------------------------------------------------------------------------- #
def _radius_counts(
    hamming: np.ndarray, q_labels: np.ndarray, db_labels: np.ndarray, max_radius: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query and radius r in 0..max_radius: retrieved (dist <= r),
    relevant retrieved, and relevant items in the database.

    Returns int64 [m, R+1], int64 [m, R+1], int64 [m].
    """
    m, n = hamming.shape
    nb = max_radius + 1
    ret = np.zeros((m, nb), dtype=np.int64)
    relret = np.zeros((m, nb), dtype=np.int64)
    nrel = np.zeros(m, dtype=np.int64)
    c = max(1, _CHUNK_ELEMS // max(n, 1))
    for s in range(0, m, c):
        e = min(s + c, m)
        d = np.minimum(hamming[s:e].astype(np.int64), nb)  # distances > R go to bin nb
        rel = db_labels[None, :] == q_labels[s:e, None]
        off = (np.arange(e - s, dtype=np.int64) * (nb + 1))[:, None]
        keys = d + off
        h_all = np.bincount(keys.ravel(), minlength=(e - s) * (nb + 1)).reshape(e - s, nb + 1)
        h_rel = np.bincount(keys[rel], minlength=(e - s) * (nb + 1)).reshape(e - s, nb + 1)
        ret[s:e] = np.cumsum(h_all[:, :nb], axis=1)
        relret[s:e] = np.cumsum(h_rel[:, :nb], axis=1)
        nrel[s:e] = rel.sum(axis=1)
    return ret, relret, nrel


def precision_within_radius(
    hamming: np.ndarray, q_labels: np.ndarray, db_labels: np.ndarray, radius: int = 2
) -> float:
    """Mean over queries of the precision of the items at Hamming distance <= radius.

    A query that retrieves nothing within the radius scores 0 (the common
    convention in hashing papers' evaluation code), so this number also
    penalises empty Hamming balls.

    Args:
        hamming: integer [m, n] distances (e.g. from ``hamming_distance_matrix``).
        q_labels: int [m]; db_labels: int [n].
        radius: inclusive Hamming radius (>= 0).

    Returns:
        float in [0, 1] (0.0 when m == 0).
    """
    hamming, q_labels, db_labels = _check_hamming(hamming, q_labels, db_labels)
    m, n = hamming.shape
    if radius < 0:
        raise ValueError("radius must be >= 0")
    if m == 0:
        return 0.0
    total = 0.0
    c = max(1, _CHUNK_ELEMS // max(n, 1))
    for s in range(0, m, c):
        within = hamming[s : s + c] <= radius
        rel = db_labels[None, :] == q_labels[s : s + c, None]
        ret = within.sum(axis=1)
        hit = (within & rel).sum(axis=1)
        total += float(np.where(ret > 0, hit / np.maximum(ret, 1), 0.0).sum())
    return total / m


def pr_curve(
    hamming: np.ndarray,
    q_labels: np.ndarray,
    db_labels: np.ndarray,
    max_radius: int | None = None,
) -> dict[str, np.ndarray]:
    """Precision-recall curve of Hamming ranking, one point per radius.

    For each radius r = 0..max_radius the retrieved set of a query is
    {items with distance <= r}; precision = relevant retrieved / retrieved
    (0 when nothing is retrieved, as in ``precision_within_radius``), recall =
    relevant retrieved / relevant in the database (0 when the database holds no
    relevant item). Both are averaged over queries.

    Args:
        hamming: integer [m, n] distances.
        q_labels: int [m]; db_labels: int [n].
        max_radius: last radius (default: the largest distance in ``hamming``;
            pass the code length in bits for a full curve).

    Returns:
        ``{"radius": int64 [R+1], "precision": float64 [R+1], "recall": float64 [R+1]}``.
    """
    hamming, q_labels, db_labels = _check_hamming(hamming, q_labels, db_labels)
    m, n = hamming.shape
    if max_radius is None:
        max_radius = int(hamming.max()) if hamming.size else 0
    ret, relret, nrel = _radius_counts(hamming, q_labels, db_labels, int(max_radius))
    return _pr_from_counts(ret, relret, nrel)


def _accumulators(m: int, nk: int, nb: int):
    """Zeroed per-query outputs of the ranking metrics for m queries, nk cut-offs and nb
    radii: (ap_k float64 [m], ap_full float64 [m], hits int64 [m, nk], ret int64 [m, nb],
    relret int64 [m, nb], nrel int64 [m])."""
    return (np.zeros(m), np.zeros(m), np.zeros((m, nk), np.int64), np.zeros((m, nb), np.int64),
            np.zeros((m, nb), np.int64), np.zeros(m, np.int64))


def _pr_from_counts(ret: np.ndarray, relret: np.ndarray, nrel: np.ndarray) -> dict[str, np.ndarray]:
    nb = ret.shape[1]
    if ret.shape[0] == 0:
        z = np.zeros(nb)
        return {"radius": np.arange(nb, dtype=np.int64), "precision": z, "recall": z.copy()}
    prec = np.where(ret > 0, relret / np.maximum(ret, 1), 0.0).mean(axis=0)
    rec = np.where(nrel[:, None] > 0, relret / np.maximum(nrel, 1)[:, None], 0.0).mean(axis=0)
    return {"radius": np.arange(nb, dtype=np.int64), "precision": prec, "recall": rec}


# --------------------------------------------------------------------------- #
# full evaluation of codes
# --------------------------------------------------------------------------- #
def _eval_block(
    kernel: _HammingKernel,
    q: np.ndarray,
    q_labels: np.ndarray,
    db_labels: np.ndarray,
    top_k: int,
    ks: np.ndarray,
    nbits: int,
    inv_rank: np.ndarray,
    rank: np.ndarray,
    bufs: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Exact metrics for one block of queries.

    The ranking of a row is ``argsort(dist, kind="stable")`` (numpy's radix sort
    for 8/16-bit keys), so ties keep database order. From the sorted relevance
    only the 0-based positions ``pos`` of the relevant items are kept; with
    ``j = 1..R`` their rank among relevant items:

        AP_full = mean_j j / (pos_j + 1)
        AP@K    = same over the pos_j < K
        hits@k  = #(pos_j < k)
        relret(r) = #(pos_j < N(dist <= r))   (items at distance <= r are a prefix)
    """
    c = q.shape[0]
    dist, xor_buf, cnt_buf = bufs
    d = dist[:c]
    kernel.compute(q, d, xor_buf, cnt_buf)
    nb = nbits + 1
    # comb = 2 * dist + relevant: one gather through the ranking gives both the
    # sorted relevance (comb & 1) and the sorted distances (comb >> 1).
    comb_dtype = _dist_dtype(2 * nbits + 1)
    comb = np.left_shift(d.astype(comb_dtype, copy=False), 1)
    comb |= db_labels[None, :] == q_labels[:, None]
    # comb < 2(r+1)  <=>  dist <= r; same dtype as comb so searchsorted does not cast
    bounds = (2 * np.arange(1, nb + 1, dtype=np.int64)).astype(comb_dtype)
    ap_k, ap_full, hits, ret, relret, nrel = _accumulators(c, ks.size, nb)
    for i in range(c):
        order = np.argsort(d[i], kind="stable")
        cs = comb[i][order]  # grouped by distance (ascending), db order within a distance
        pos = np.flatnonzero(cs & 1)
        R = pos.size
        nrel[i] = R
        # cs is partitioned by distance, so binary search finds each group's end
        cum_all = np.searchsorted(cs, bounds, side="left")
        ret[i] = cum_all
        if R == 0:
            continue
        relret[i] = np.searchsorted(pos, cum_all, side="left")
        hits[i] = np.searchsorted(pos, ks, side="left")
        prec_at_rel = rank[:R] * inv_rank[pos]  # j / (pos_j + 1)
        ap_full[i] = prec_at_rel.mean()
        rk = int(np.searchsorted(pos, top_k, side="left"))
        if rk:
            ap_k[i] = prec_at_rel[:rk].mean()
    return ap_k, ap_full, hits, ret, relret, nrel


def evaluate_codes(
    q_codes: np.ndarray,
    db_codes: np.ndarray,
    q_labels: np.ndarray,
    db_labels: np.ndarray,
    top_k: int | None = 1000,
    ks: Iterable[int] = DEFAULT_KS,
    radius: int = 2,
    *,
    n_threads: int | None = None,
    block_size: int = 16,
) -> dict:
    """Evaluate binary codes with full Hamming ranking (the paper's protocol).

    Every query ranks the whole database by Hamming distance with a stable sort
    (ties keep database order); relevant = same label.

    Args:
        q_codes: uint8 [m, nbytes] packed query codes.
        db_codes: uint8 [n, nbytes] packed database codes.
        q_labels: int [m]; db_labels: int [n].
        top_k: K of mAP@K (the paper: 1000); ``None`` = whole database.
        ks: cut-offs of precision@k (default 100, 200, ..., 1000).
        radius: Hamming radius of ``precision_radius`` (inclusive).
        n_threads: worker threads (numpy releases the GIL); default: usable CPUs.
        block_size: queries per block.

    Returns:
        dict with plain Python values (fractions in [0, 1]):

        * ``map_at_k``: mAP@top_k (official definition, divisor = relevant found)
        * ``map_full``: mAP over the whole database ranking
        * ``precision_at_k``: {k: P@k}
        * ``precision_radius``: mean precision within ``radius`` (0 for empty balls)
        * ``pr_curve``: {"radius": [0..bits], "precision": [...], "recall": [...]}
          of Hamming ranking by radius
        * ``mean_retrieved_radius``: mean number of items within ``radius``
        * ``top_k``, ``radius``, ``bits``, ``n_queries``, ``n_database``
    """
    q_codes = _check_codes(q_codes, "q_codes")
    db_codes = _check_codes(db_codes, "db_codes")
    if q_codes.shape[1] != db_codes.shape[1]:
        raise ValueError(f"code widths differ: {q_codes.shape[1]} vs {db_codes.shape[1]} bytes")
    m, n = q_codes.shape[0], db_codes.shape[0]
    q_labels = _check_labels(q_labels, m, "q_labels")
    db_labels = _check_labels(db_labels, n, "db_labels")
    ks_arr = _check_ks(ks)
    if top_k is not None and top_k < 1:
        raise ValueError("top_k must be >= 1 or None")
    if radius < 0:
        raise ValueError("radius must be >= 0")
    nbits = 8 * q_codes.shape[1]
    K = n if top_k is None else int(top_k)
    nb = nbits + 1

    ap_k, ap_full, hits, ret, relret, nrel = _accumulators(m, ks_arr.size, nb)

    if m and n:
        kernel = _HammingKernel(db_codes, nbits)
        q_prep = kernel.prepare(q_codes)
        rank = np.arange(1, n + 1, dtype=np.float64)
        inv_rank = 1.0 / rank
        bs = max(1, int(block_size))
        starts = list(range(0, m, bs))
        workers = min(_n_threads(n_threads), len(starts))

        def run(worker: int) -> None:
            bufs = kernel.buffers(bs)
            for s in starts[worker::workers]:
                e = min(s + bs, m)
                res = _eval_block(
                    kernel, q_prep[s:e], q_labels[s:e], db_labels, K, ks_arr, nbits,
                    inv_rank, rank, bufs,
                )
                ap_k[s:e], ap_full[s:e], hits[s:e], ret[s:e], relret[s:e], nrel[s:e] = res

        _run_workers(run, workers)

    pr = _pr_from_counts(ret, relret, nrel)
    r = min(radius, nbits)
    if m:
        p_at_k = hits.sum(axis=0) / (ks_arr.astype(np.float64) * m)
        prec_radius = float(pr["precision"][r])
        mean_ret = float(ret[:, r].mean())
    else:
        p_at_k = np.zeros(ks_arr.size)
        prec_radius = 0.0
        mean_ret = 0.0
    return {
        "map_at_k": float(ap_k.mean()) if m else 0.0,
        "map_full": float(ap_full.mean()) if m else 0.0,
        "precision_at_k": {int(k): float(v) for k, v in zip(ks_arr, p_at_k)},
        "precision_radius": prec_radius,
        "pr_curve": _pr_lists(pr, "radius"),
        "mean_retrieved_radius": mean_ret,
        "top_k": top_k,
        "radius": int(radius),
        "bits": nbits,
        "n_queries": m,
        "n_database": n,
    }


def _pr_lists(pr: dict, axis: str) -> dict:
    """A PR curve as JSON-ready lists: {axis: ints, "precision": floats, "recall": floats}."""
    return {axis: [int(x) for x in pr[axis]],
            "precision": [float(x) for x in pr["precision"]],
            "recall": [float(x) for x in pr["recall"]]}


# --------------------------------------------------------------------------- #
# evaluation of rankings from other search modes (HDS, ES, ...)
# --------------------------------------------------------------------------- #
def _relevant_counts(q_labels: np.ndarray, db_labels: np.ndarray) -> np.ndarray:
    """int64 [m]: number of database items sharing each query's label."""
    uniq, counts = np.unique(db_labels, return_counts=True)
    if uniq.size == 0:
        return np.zeros(q_labels.shape[0], dtype=np.int64)
    idx = np.clip(np.searchsorted(uniq, q_labels), 0, uniq.size - 1)
    return np.where(uniq[idx] == q_labels, counts[idx], 0).astype(np.int64)


def evaluate_ranking(
    ranked_ids: np.ndarray,
    q_labels: np.ndarray,
    db_labels: np.ndarray,
    top_k: int | None = 1000,
    ks: Iterable[int] = DEFAULT_KS,
) -> dict:
    """Evaluate rankings produced by any search mode (HDS, ES, ...).

    Args:
        ranked_ids: int64 [m, L] database row numbers, best first; negative ids
            (FAISS's -1 padding) count as empty, not relevant slots.
        q_labels: int [m]; db_labels: int [n].
        top_k: K of mAP@K; ``None`` = the whole row. When L < K the AP uses
            the L ranked items.
        ks: cut-offs of P@k; a k larger than L counts missing items as not
            relevant (divides by k).

    Returns:
        dict with ``map_at_k``, ``map_full`` (only when L == n, i.e. the rows
        are full rankings; else ``None``), ``precision_at_k`` {k: float},
        ``pr_curve`` {"cutoff", "precision", "recall"} at the ks (recall
        relative to all relevant items in the database), ``top_k``,
        ``n_queries``, ``n_database``, ``list_length``.
    """
    ranked_ids = np.asarray(ranked_ids)
    if ranked_ids.ndim != 2:
        raise ValueError(f"ranked_ids must be 2-D [m, L], got shape {ranked_ids.shape}")
    m, L = ranked_ids.shape
    q_labels = _check_labels(q_labels, m, "q_labels")
    db_labels = np.asarray(db_labels)
    if db_labels.ndim != 1:
        raise ValueError("db_labels must be 1-D")
    n = db_labels.shape[0]
    ks_arr = _check_ks(ks)
    if ranked_ids.size and ranked_ids.max() >= n:
        raise ValueError("ranked_ids holds ids >= len(db_labels)")
    valid = ranked_ids >= 0
    if n:
        relevant = valid & (db_labels[np.where(valid, ranked_ids, 0)] == q_labels[:, None])
    else:
        relevant = np.zeros((m, L), dtype=bool)
    ap_k = average_precision(relevant, top_k)
    map_full = None
    if L == n and m:
        map_full = float(average_precision(relevant, None).mean())
    p_at_k = precision_at_k(relevant, ks_arr)
    pr = pr_curve_at_cutoffs(relevant, ks_arr, _relevant_counts(q_labels, db_labels))
    return {
        "map_at_k": float(ap_k.mean()) if m else 0.0,
        "map_full": map_full,
        "precision_at_k": {int(k): float(v) for k, v in zip(ks_arr, p_at_k)},
        "pr_curve": _pr_lists(pr, "cutoff"),
        "top_k": top_k,
        "n_queries": m,
        "n_database": n,
        "list_length": L,
    }
