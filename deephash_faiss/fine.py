"""HDS without truncation: an inverted-file index over fc7 *inside* the Hamming buckets.

The exact HDS pool is every row whose code lies within the radius, ranked by L2 on fc7.
With supervised codes a pool is most of a class (millions of rows at 1e9), so cutting it
(``max_candidates``) keeps arbitrary rows. :class:`FineIndex` ranks inside the pool with an
index instead:

* **Lists keyed by (code, cell).** Every dictionary code of a
  :class:`~deephash_faiss.index.BucketIndex` with more than ``cell_size`` rows is split
  by k-means on its rows' features into ``ceil(rows / cell_size)`` cells
  (:class:`faiss.Kmeans`); smaller codes are one list. Each list has a centroid.
* **Compressed features in the lists**: a :class:`faiss.IndexIVFScalarQuantizer`
  (``"sq8"``: 1 byte per dimension, or ``"fp16"``) whose inverted lists are these
  (code, cell) lists, filled with ``faiss.contrib.ivf_tools.add_preassigned`` (the IVF's
  own coarse quantizer is never used).
* **Search**: the query's radius reaches a set of codes (``BucketIndex.reach``); among their
  lists it probes those whose centroids are nearest the query's fc7, nearest first, until
  ``nprobe x cell_size`` rows (``search_preassigned``), keeps the ``refine`` best by compressed distance, and re-ranks
  those exactly on the stored features (``gather``), ties by id. A pool of at most
  ``exact_max`` live rows is ranked exactly instead (cheaper than probing).

Deleted rows are left out when the index is built (build it from the current index).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import DhfError


@dataclass
class FineParams:
    """Approximate-HDS knobs (the quality knobs; ``max_candidates`` is only a safety limit).

    nprobe: lists probed per query, counted in rows: the nearest lists (by centroid) are
    probed until ``nprobe x cell_size`` rows; refine: candidates re-ranked exactly (>= k);
    exact_max: pools of at most this many rows are ranked exactly."""

    nprobe: int = 32
    refine: int = 100
    exact_max: int = 2048

    def check(self) -> None:
        if self.nprobe < 1 or self.refine < 1 or self.exact_max < 0:
            raise DhfError("nprobe and refine must be at least 1, exact-max at least 0")


class FineIndex:
    """IVF lists keyed by (dictionary code, k-means cell of fc7 within the code).

    Arrays: list_offsets int64 [U + 1] (code c's lists are list_offsets[c]..list_offsets[c+1]-1),
    centroids float32 [L, D]; ``ivf``: faiss IndexIVFScalarQuantizer with L lists whose
    ids are database row ids.
    """

    def __init__(self, buckets, list_offsets: np.ndarray, centroids: np.ndarray, ivf, cell_size: int,
                 storage: str):
        self.buckets = buckets
        self.list_offsets = list_offsets
        self.centroids = centroids
        self.ivf = ivf
        self.cell_size = int(cell_size)
        self.storage = storage
        self.dim = int(centroids.shape[1]) if centroids.ndim == 2 else 0

    @property
    def n_lists(self) -> int:
        return int(self.list_offsets[-1])

    @classmethod
    def build(cls, buckets, features, cell_size: int = 1024, storage: str = "sq8", seed: int = 0,
              niter: int = 10, max_train: int = 64, chunk: int = 1 << 18, log: Callable[[str], None] | None = None):
        """Build from a :class:`~deephash_faiss.index.BucketIndex` and the features.

        Args:
            buckets: the code dictionary (its ``deleted`` rows are left out).
            features: float32/float16 [n, D] (array or memory map), row i = id i.
            cell_size: target rows per (code, cell) list.
            storage: "sq8" or "fp16" (compressed features held in the lists).
            max_train: k-means trains on at most ``max_train`` rows per cell (sampled).
        """
        import faiss
        from faiss.contrib.ivf_tools import add_preassigned

        from .rerank import _to_float32

        if storage not in ("sq8", "fp16"):
            raise DhfError(f"unknown fine-index storage {storage!r} (sq8 or fp16)")
        n, D = features.shape
        if n != buckets.ntotal:
            raise DhfError(f"{n} feature rows for {buckets.ntotal} codes")
        rng = np.random.default_rng(seed)
        live, _ = buckets._counts()
        U = buckets.n_codes
        ncell = np.maximum(1, np.ceil(live / max(1, cell_size)).astype(np.int64))
        ncell[live == 0] = 1
        list_offsets = np.concatenate([[0], np.cumsum(ncell)]).astype(np.int64)
        L = int(list_offsets[-1])
        centroids = np.zeros((L, D), np.float32)
        assign = np.empty(n, np.int64)  # row id -> list (deleted rows: -1)
        assign.fill(-1)
        deleted = buckets.deleted
        offsets, ids = np.asarray(buckets.offsets), buckets.ids
        big = np.flatnonzero(ncell > 1)
        small = np.flatnonzero(ncell == 1)
        # small codes: one list each; centroid = mean (used only to rank lists)
        for s in range(0, len(small), 4096):
            cs = small[s:s + 4096]
            lens = offsets[cs + 1] - offsets[cs]
            from .index import _ranges

            rows = np.asarray(ids[_ranges(offsets[cs], lens)], np.int64)
            owner = np.repeat(np.arange(len(cs)), lens)
            if deleted is not None and len(rows):
                keep = ~deleted[rows]
                rows, owner = rows[keep], owner[keep]
            if len(rows) == 0:
                continue
            order = np.argsort(rows, kind="stable")
            x = _to_float32(np.asarray(features[rows[order]]))
            sums = np.zeros((len(cs), D), np.float64)
            np.add.at(sums, owner[order], x)
            cnt = np.bincount(owner, minlength=len(cs))
            centroids[list_offsets[cs]] = (sums / np.maximum(cnt, 1)[:, None]).astype(np.float32)
            assign[rows] = list_offsets[cs][owner]
        for j, c in enumerate(big):
            rows = np.asarray(ids[offsets[c]:offsets[c + 1]], np.int64)
            if deleted is not None:
                rows = rows[~deleted[rows]]
            kc = int(ncell[c])
            x = _to_float32(np.asarray(features[rows]))
            ntrain = min(len(rows), kc * max_train)
            train = x[np.sort(rng.choice(len(rows), ntrain, replace=False))] if ntrain < len(rows) else x
            km = faiss.Kmeans(D, kc, niter=niter, seed=seed + int(c), min_points_per_centroid=1,
                              max_points_per_centroid=max_train)
            km.train(train)
            _, a = km.index.search(x, 1)
            centroids[list_offsets[c]:list_offsets[c + 1]] = km.centroids
            assign[rows] = list_offsets[c] + a[:, 0]
            if log and (j % 50 == 0 or j == len(big) - 1):
                log(f"fine index: k-means {j + 1}/{len(big)} big codes")
        qt = {"sq8": faiss.ScalarQuantizer.QT_8bit, "fp16": faiss.ScalarQuantizer.QT_fp16}[storage]
        quantizer = faiss.IndexFlatL2(D)
        ivf = faiss.IndexIVFScalarQuantizer(quantizer, D, max(1, L), qt, faiss.METRIC_L2, False)
        if storage == "sq8":
            samp = np.sort(rng.choice(n, min(n, 100_000), replace=False))
            ivf.sq.train(_to_float32(np.asarray(features[samp])))
        ivf.is_trained = True
        for s in range(0, n, chunk):
            a = assign[s:s + chunk]
            keep = a >= 0
            if not keep.any():
                continue
            x = np.ascontiguousarray(_to_float32(np.asarray(features[s:s + chunk]))[keep])
            rid = np.arange(s, s + len(a), dtype=np.int64)[keep]
            add_preassigned(ivf, x, np.ascontiguousarray(a[keep]), rid)
        return cls(buckets, list_offsets, centroids, ivf, cell_size, storage)

    def memory_bytes(self) -> int:
        """Bytes of compressed features + ids in the lists, centroids and list offsets."""
        per = int(self.ivf.code_size) + 8
        return int(self.ivf.ntotal) * per + self.centroids.nbytes + self.list_offsets.nbytes

    def search(self, qcodes: np.ndarray, qfeats: np.ndarray, k: int, radius: int, gather,
               params: FineParams | None = None, max_candidates: int | None = None):
        """Approximate HDS.

        Args:
            qcodes: uint8 [m, B]; qfeats: float32 [m, D].
            gather: ids int64 [p] -> features [p, D] (the exact features, for the refine).
            max_candidates: safety limit on rows examined per query (lists are dropped,
                farthest centroid first, past it; the result says ``truncated``).
        Returns:
            list of m (ids int64 [k'], squared L2 float32 [k'], pool rows int, examined int,
            truncated bool, exact bool); pools of fewer than ``exact_max`` live rows (and
            queries that reach no code) come back with ``exact=True`` and empty arrays, for
            the caller's exact path.
        """
        from faiss.contrib.ivf_tools import search_preassigned

        from .rerank import rank_pools_cpu

        p = params or FineParams()
        p.check()
        b = self.buckets
        live, _ = b._counts()
        lims, Dc, Ic = b.reach(qcodes, radius)
        m = len(qcodes)
        q = np.ascontiguousarray(qfeats, np.float32).reshape(m, -1)
        out: list = [None] * m
        approx, lists, coarse, sizes_ex, trunc = [], [], [], [], []
        list_rows = self._list_sizes()
        for i in range(m):
            codes = Ic[lims[i]:lims[i + 1]]
            pool = int(live[codes].sum()) if len(codes) else 0
            if pool <= p.exact_max:
                out[i] = (np.zeros(0, np.int64), np.zeros(0, np.float32), pool, pool, False, True)
                continue
            ls = _ranges_of(self.list_offsets, codes)
            ls = ls[list_rows[ls] > 0]
            cd = ((self.centroids[ls] - q[i]) ** 2).sum(1)
            o = np.argsort(cd, kind="stable")
            ls, cd = ls[o], cd[o]
            rows = np.cumsum(list_rows[ls])
            # probe the nearest lists until nprobe x cell_size rows (small codes are lists of
            # a few rows: counting rows, not lists, keeps the work and the recall even)
            cut = int(np.searchsorted(rows, p.nprobe * self.cell_size)) + 1
            ls, cd, rows = ls[:cut], cd[:cut], rows[:cut]
            t = False
            if max_candidates is not None and rows[-1] > max_candidates:
                cut = max(1, int(np.searchsorted(rows, max_candidates, side="right")))
                ls, cd, rows, t = ls[:cut], cd[:cut], rows[:cut], True
            approx.append(i)
            lists.append(ls)
            coarse.append(cd)
            sizes_ex.append((pool, int(rows[-1])))
            trunc.append(t)
        if approx:
            P = max(len(x) for x in lists)
            Iq = np.full((len(approx), P), -1, np.int64)
            Dq = np.zeros((len(approx), P), np.float32)
            for j, (ls, cd) in enumerate(zip(lists, coarse)):
                Iq[j, :len(ls)], Dq[j, :len(ls)] = ls, cd
            self.ivf.nprobe = P
            R = max(k, p.refine)
            _, I = search_preassigned(self.ivf, q[approx], R, Iq, Dq)
            cands = [row[row >= 0] for row in I]
            # exact refine on the stored features; candidates in id order so ties go by id
            cands = [np.sort(c) for c in cands]
            ranked = rank_pools_cpu(q[approx], cands, gather, k)
            for j, i in enumerate(approx):
                o, d = ranked[j]
                out[i] = (cands[j][o], d, sizes_ex[j][0], sizes_ex[j][1], trunc[j], False)
        return out

    def _list_sizes(self) -> np.ndarray:
        if getattr(self, "_lsizes", None) is None:
            inv = self.ivf.invlists
            self._lsizes = np.array([inv.list_size(i) for i in range(self.ivf.nlist)], np.int64)
        return self._lsizes


def _ranges_of(list_offsets: np.ndarray, codes: np.ndarray) -> np.ndarray:
    from .index import _ranges

    return _ranges(list_offsets[codes], list_offsets[codes + 1] - list_offsets[codes])
