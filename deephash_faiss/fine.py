"""HDS without truncation: an inverted-file index over fc7 *inside* the Hamming buckets.

The exact HDS pool is every row whose code lies within the radius, ranked by L2 on fc7.
With supervised codes a pool is most of a class (millions of rows at 1e9), so cutting it
(``max_candidates``) keeps arbitrary rows. :class:`FineIndex` ranks inside the pool with an
index instead:

* **Lists keyed by (code, cell).** Every dictionary code of a
  :class:`~deephash_faiss.index.BucketIndex` with more than ``cell_size`` rows is split
  by k-means on its rows' features into ``ceil(rows / cell_size)`` cells
  (:class:`faiss.Kmeans`); smaller codes are one list. Each list has a centroid.
* **Compressed features in the lists**: a faiss IVF whose inverted lists are these (code, cell)
  lists (the IVF's own coarse quantizer is never used): ``"pq4"`` (the default) an
  :class:`faiss.IndexIVFPQFastScan`, 4-bit PQ with sub-quantizers of one dimension (D / 2 bytes a
  row; of two dimensions, D / 4 bytes, up to 1e5 rows: :func:`pq4_subquantizers`), scanned by
  faiss's SIMD fast-scan kernels in packed blocks of 32 rows; or an
  :class:`faiss.IndexIVFScalarQuantizer` (``"sq8"``: 1 byte per dimension, one range for all;
  ``"fp16"``). Saved files of every storage load.
* **Search, vectorized over the batch**: the radius is resolved once per distinct query code
  (``BucketIndex.reach``: real codes collapse, queries share codes); queries ordered by code are
  taken in blocks of codes that share lists: one GEMM (faiss) of their fc7 against the
  centroids of the union of the lists they reach, then each query's reached lists nearest
  first, cut at ``nprobe x cell_size`` rows (where the reached pairs fill most of the GEMM, a
  partition keeps each query's ``PROBE_PREFIX x nprobe`` nearest and only those are sorted;
  else one sort of the block's (query, list) pairs). A query whose reached lists hold no more
  than that budget skips the ranking and scans them all: the cut would keep every one. Then one
  ``search_preassigned`` for the whole batch keeps the ``refine`` best by compressed distance,
  and one batched exact re-rank on the stored features (``gather``; faiss
  ``fvec_L2sqr_by_idx``) gives the top k, ties by id. A pool of at most ``exact_max`` live
  rows is ranked exactly instead (cheaper than probing). Every GEMM runs on faiss's OpenMP
  threads: numpy's BLAS threads spin after a call and took the scan's cores.

Deleted rows are left out when the index is built; rows removed later stay in the lists and
are filtered at search (like every other path). :meth:`FineIndex.add` (``dhf add``) puts new
rows in the nearest list of their code (a code new to the index gets a list of its own) and
:meth:`FineIndex.compact` renumbers (``dhf compact``), so the saved index never goes stale.
Saved with the index (``dhf fine-index``, manifest key ``fine``; :meth:`save` / :meth:`load`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import DhfError

FINE_MAGIC = b"DHFFINE1"
STORAGES = ("pq4", "sq8", "fp16")
DEFAULT_STORAGE = "auto"
#: "auto" storage: pq4 up to this many live rows, sq8 above. Measured (bench_scale.py, real
#: CIFAR-10 statistics): pq4 recall@10 vs exact HDS 0.997 at 1e5 and 0.968 at 1e6 (256-d), but
#: 0.84 at 1e7 (256-d) and 0.70 at 1e8 (32-d float16), where sq8 gave 0.972 and 0.986.
PQ4_MAX_ROWS = 2_000_000


def default_storage(rows: int) -> str:
    """The list storage "auto" picks for an index of ``rows`` live rows (:data:`PQ4_MAX_ROWS`)."""
    return "pq4" if rows <= PQ4_MAX_ROWS else "sq8"


#: pq4 with sub-quantizers of 2 dimensions (d / 2 of them) up to this many live rows, of one
#: dimension above (:func:`pq4_subquantizers`).
PQ4_PAIRS_MAX_ROWS = 100_000


def pq4_subquantizers(d: int, rows: int) -> int:
    """Sub-quantizers of a pq4 fine index over ``rows`` live rows of d-dim features: d / 2
    (2 dimensions each, d / 4 bytes a row) up to :data:`PQ4_PAIRS_MAX_ROWS` rows when d is
    even, else d (one dimension each, d / 2 bytes a row).

    Measured (bench_scale.py, real CIFAR-10 statistics, 256-d): at 1e5 rows d / 2 scans half
    the bytes and keeps recall@10 at the default probing (0.964 vs 0.967 against exact HDS) at
    0.75x the time; at 1e6 it lost recall (0.946 at nprobe 64 / refine 150 against 0.968), and
    d / 4 lost it already at 1e5 (0.90)."""
    return d // 2 if rows <= PQ4_PAIRS_MAX_ROWS and d % 2 == 0 and d >= 2 else d


def _new_ivf(d: int, nlist: int, storage: str, pq_m: int | None = None):
    """An empty faiss IVF (no residual) with ``nlist`` lists: IndexIVFPQFastScan ("pq4", with
    ``pq_m`` sub-quantizers, default d) or IndexIVFScalarQuantizer ("sq8", "fp16")."""
    import faiss

    if storage == "pq4":
        # 4-bit PQ (16 trained levels per sub-quantizer: pq_m / 2 bytes a row), scanned by
        # faiss's SIMD fast-scan kernels in blocks of 32 rows: ~4x faster than SQ8 per row at
        # one dimension per sub-quantizer; pq4_subquantizers picks the width by index size.
        ivf = faiss.IndexIVFPQFastScan(faiss.IndexFlatL2(d), d, max(1, nlist), pq_m or d, 4, faiss.METRIC_L2, 32)
        ivf.by_residual = False
        return ivf
    # sq8: one byte per dimension over one range for all dimensions (QT_8bit_uniform: scanned
    # faster than per-dimension ranges, same recall after the exact refine, bench_scale.py)
    qt = {"sq8": faiss.ScalarQuantizer.QT_8bit_uniform, "fp16": faiss.ScalarQuantizer.QT_fp16}[storage]
    return faiss.IndexIVFScalarQuantizer(faiss.IndexFlatL2(d), d, max(1, nlist), qt, faiss.METRIC_L2, False)


def _train_encoder(ivf, storage: str, x: np.ndarray) -> None:
    """Train the list encoding on sample rows x float32 [s, D] (the coarse quantizer is not
    trained: it holds the list centroids)."""
    if storage == "pq4":
        # faiss prints a warning per sub-quantizer when fewer than 39 rows per level train it
        # (hundreds of lines for a small index); the levels are the same either way.
        ivf.pq.cp.min_points_per_centroid = 1
        ivf.pq.train(x)
    elif storage == "sq8":
        ivf.sq.train(x)
    ivf.is_trained = True


def _copy_encoder(old, new, storage: str) -> None:
    """Give the empty IVF ``new`` the trained encoding of ``old`` (same storage)."""
    import faiss

    if storage == "pq4":
        faiss.copy_array_to_vector(faiss.vector_to_array(old.pq.centroids), new.pq.centroids)
    else:
        faiss.copy_array_to_vector(faiss.vector_to_array(old.sq.trained), new.sq.trained)
    new.is_trained = True


def _is_blocked(ivf) -> bool:
    """True for fast-scan IVFs (lists stored as packed blocks of ``bbs`` rows)."""
    return hasattr(ivf, "bbs")


def _list_codes(ivf, i: int):
    """(ids int64 [s], codes uint8 [s, code_size]) of list i (fast-scan blocks unpacked)."""
    import faiss

    inv, cs = ivf.invlists, int(ivf.code_size)
    s = int(inv.list_size(i))
    ids = faiss.rev_swig_ptr(inv.get_ids(i), s).copy()
    if not _is_blocked(ivf):
        return ids, faiss.rev_swig_ptr(inv.get_codes(i), s * cs).reshape(s, cs).copy()
    packer, bbs = ivf.get_CodePacker(), int(ivf.bbs)
    nb = -(-s // bbs)
    blocks = faiss.rev_swig_ptr(inv.get_codes(i), nb * packer.block_size)
    flat = np.empty((nb * bbs, cs), np.uint8)
    for j in range(nb):
        packer.unpack_all(faiss.swig_ptr(blocks[j * packer.block_size:]), faiss.swig_ptr(flat[j * bbs:]))
    return ids, flat[:s]


def _put_list(ivf, i: int, ids: np.ndarray, codes: np.ndarray) -> None:
    """Make list i hold exactly (ids int64 [s], codes uint8 [s, code_size]) (packed into
    blocks for fast-scan IVFs). ``ivf.ntotal`` is the caller's."""
    import faiss

    inv = ivf.invlists
    inv.resize(i, 0)
    s = len(ids)
    if s == 0:
        return
    ids = np.ascontiguousarray(ids, np.int64)
    if _is_blocked(ivf):
        packer, bbs = ivf.get_CodePacker(), int(ivf.bbs)
        nb = -(-s // bbs)
        flat = np.zeros((nb * bbs, int(ivf.code_size)), np.uint8)
        flat[:s] = codes
        codes = np.zeros(nb * packer.block_size, np.uint8)
        for j in range(nb):
            packer.pack_all(faiss.swig_ptr(flat[j * bbs:]), faiss.swig_ptr(codes[j * packer.block_size:]))
    inv.add_entries(i, s, faiss.swig_ptr(ids), faiss.swig_ptr(np.ascontiguousarray(codes, np.uint8)))


def _add_to_lists(ivf, x: np.ndarray, assign: np.ndarray, ids: np.ndarray) -> None:
    """Append rows x float32 [n, D] with ids int64 [n] to lists assign int64 [n] (>= 0).

    SQ IVFs: ``faiss.contrib.ivf_tools.add_preassigned``. Fast-scan IVFs: faiss's add_core
    would write single codes into packed blocks, so the rows are encoded (``sa_encode`` of the
    PQ) and each touched list is rewritten whole (:func:`_put_list`)."""
    from faiss.contrib.ivf_tools import add_preassigned

    if len(x) == 0:
        return
    if not _is_blocked(ivf):
        add_preassigned(ivf, np.ascontiguousarray(x, np.float32), np.ascontiguousarray(assign, np.int64),
                        np.ascontiguousarray(ids, np.int64))
        return
    codes = ivf.pq.compute_codes(np.ascontiguousarray(x, np.float32))
    order = np.argsort(assign, kind="stable")
    a = assign[order]
    cuts = np.flatnonzero(np.diff(a)) + 1
    for grp in np.split(order, cuts):
        li = int(assign[grp[0]])
        old_ids, old_codes = _list_codes(ivf, li)
        _put_list(ivf, li, np.concatenate([old_ids, ids[grp]]), np.vstack([old_codes, codes[grp]]))
    ivf.ntotal += len(x)


@dataclass
class FineParams:
    """Approximate-HDS knobs (the quality knobs; ``max_candidates`` is only a safety limit).

    nprobe: lists probed per query, counted in rows: the nearest lists (by centroid) are
    probed until ``nprobe x cell_size`` rows; refine: candidates re-ranked exactly (>= k);
    exact_max: pools of at most this many rows are ranked exactly.

    The class defaults are the large-index values (pq4 lists: recall@10 against exact HDS
    0.968 at 1e6 rows of real CIFAR-10 statistics; the 4-bit codes rank coarsely, so the refine
    is what recall needs: 100 gave 0.951 at 1e6); :meth:`for_rows` gives the defaults for an
    index's size (:func:`default_probe`: fewer probes for small indexes)."""

    nprobe: int = 64
    refine: int = 150
    exact_max: int = 128

    @classmethod
    def for_rows(cls, rows: int, nprobe: int | None = None, refine: int | None = None,
                 exact_max: int | None = None) -> "FineParams":
        """The parameters for an index of ``rows`` live rows: given values kept, the others
        from :func:`default_probe` (and ``exact_max`` from the class default)."""
        dn, dr = default_probe(rows)
        return cls(nprobe=dn if nprobe is None else nprobe, refine=dr if refine is None else refine,
                   exact_max=cls.exact_max if exact_max is None else exact_max)

    def check(self) -> None:
        if self.nprobe < 1 or self.refine < 1 or self.exact_max < 0:
            raise DhfError("nprobe and refine must be at least 1, exact-max at least 0")


SMALL_PROBE = (24, 100)  # (nprobe, refine) of indexes up to SMALL_PROBE_ROWS rows (default_probe)
SMALL_PROBE_ROWS = 100_000
SMALL_REFINE_MAX_ROWS = 300_000  # refine SMALL_PROBE[1] up to this many rows, FineParams.refine above


def default_probe(rows: int) -> tuple[int, int]:
    """The default (nprobe, refine) for an index of ``rows`` live rows: nprobe
    ``SMALL_PROBE[0]`` up to ``SMALL_PROBE_ROWS`` rows, then growing with sqrt(rows) up to
    ``FineParams.nprobe`` (64, from ~7e5 rows); refine ``SMALL_PROBE[1]`` up to
    ``SMALL_REFINE_MAX_ROWS`` rows, else ``FineParams.refine`` (150).

    Pools are a class's share of the index, so a small index needs fewer probed rows for the
    same recall, and a batch there is dominated by the fixed costs the probing adds. Measured
    on real CIFAR-10 statistics (bench_scale.py --sweep, docs/benchmarks.md), recall@10 against
    exact HDS: 1e5 rows 24 / 100 0.967 (64 / 150: 0.997 at 1.4x the time); 2e5 rows 24 / 100
    0.942, 32 / 100 0.962; 1e6 rows 64 / 150 0.968, 64 / 100 0.951."""
    grown = int(np.ceil(SMALL_PROBE[0] * np.sqrt(max(rows, 0) / SMALL_PROBE_ROWS)))
    nprobe = min(FineParams.nprobe, max(SMALL_PROBE[0], grown))
    return nprobe, SMALL_PROBE[1] if rows <= SMALL_REFINE_MAX_ROWS else FineParams.refine


def default_cell_size(rows: int) -> int:
    """The default rows per list for an index of ``rows`` live rows: a power of two near
    sqrt(rows) / 16, between 64 and 1024 (64 up to ~1.5e6 rows, 256 at 1e7, 512 at 1e8).

    A query pays for ranking the lists its pool reaches (pool / cell_size centroids, float32)
    and for scanning the rows of the lists it probes (nprobe x cell_size rows, SQ8); pools grow
    with the index, so the balance of the two moves with sqrt(rows). Measured:
    docs/benchmarks.md (bench_scale.py --sweep)."""
    c = 2 ** int(round(np.log2(max(1.0, np.sqrt(max(1, rows)) / 16))))
    return int(min(1024, max(64, c)))


TWO_LEVEL_MIN = 64  # codes split into more cells than this: two-level k-means (sqrt(k) coarse, then cells)


def _kmeans(x: np.ndarray, k: int, niter: int, seed: int, max_train: int, rng):
    """(centroids float32 [k', D], cell of each row int64 [len(x)]): faiss k-means trained on at
    most ``k * max_train`` sampled rows."""
    import faiss

    k = max(1, min(k, len(x)))
    ntrain = min(len(x), k * max_train)
    train = x[np.sort(rng.choice(len(x), ntrain, replace=False))] if ntrain < len(x) else x
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, min_points_per_centroid=1,
                      max_points_per_centroid=max_train)
    km.train(np.ascontiguousarray(train, np.float32))
    _, a = km.index.search(np.ascontiguousarray(x, np.float32), 1)
    return km.centroids, a[:, 0].astype(np.int64)


def _cells(x: np.ndarray, k: int, cell_size: int, niter: int, seed: int, max_train: int, rng):
    """Split the rows x float32 [r, D] of one code into about ``k`` cells of ``cell_size`` rows.

    Up to ``TWO_LEVEL_MIN`` cells: k-means. More: two levels (sqrt(k) coarse clusters, then
    each coarse cluster split into round(rows / cell_size) cells), so that training and
    assignment cost r x 2 sqrt(k) distances instead of r x k (a 3e6-row code at cell size 256
    is 12,000 cells). Returns (centroids float32 [k', D], cell of each row int64 [r])."""
    if k <= TWO_LEVEL_MIN:
        return _kmeans(x, k, niter, seed, max_train, rng)
    k1 = int(np.ceil(np.sqrt(k)))
    _, a1 = _kmeans(x, k1, niter, seed, max_train, rng)
    order = np.argsort(a1, kind="stable")
    bounds = np.searchsorted(a1[order], np.arange(k1 + 1))
    cents, assign, base = [], np.empty(len(x), np.int64), 0
    for i in range(k1):
        r = order[bounds[i]:bounds[i + 1]]
        if len(r) == 0:
            continue
        k2 = max(1, int(round(len(r) / cell_size)))
        if k2 == 1:
            c2, a2 = x[r].mean(0, keepdims=True).astype(np.float32), np.zeros(len(r), np.int64)
        else:
            c2, a2 = _kmeans(x[r], k2, niter, seed + 7919 * (i + 1), max_train, rng)
        cents.append(c2)
        assign[r] = base + a2
        base += len(c2)
    return np.vstack(cents), assign


#: :class:`CodeMemo`'s bound on the bytes of the arrays it keeps (it is emptied past it) and on
#: the entries, and the largest array kept (bigger ones are recomputed each call).
MEMO_BYTES = 64 << 20
MEMO_ENTRIES = 1 << 16
MEMO_ARRAY_BYTES = 1 << 20


class CodeMemo:
    """Per-code memos of single-query searches, shared by the threads that search one index.

    Real codes collapse: queries repeat codes (the first 2,000 CIFAR-10 test queries hold 631
    distinct codes), and most of a single query's Hamming work (the radius reach, the pool
    size, the lists reached, a small pool's rows) depends on the code alone. Each entry is a
    dict tagged with the index state it was made for (a tuple of the objects that state is
    made of: the dictionary, its live counts, the list sizes, the code-to-list map, compared by
    identity; every mutation replaces one of them), so an entry of an older state is never
    used. Bounded: emptied past ``MEMO_ENTRIES`` entries or ``MEMO_BYTES`` of arrays; values
    larger than ``MEMO_ARRAY_BYTES`` are not kept.
    """

    def __init__(self):
        self._d: dict = {}
        self._bytes = 0

    def clear(self) -> None:
        self._d, self._bytes = {}, 0

    def __len__(self) -> int:
        return len(self._d)

    def entry(self, key, state: tuple) -> dict:
        """The memo dict of ``key`` made for ``state`` (a new, empty one when there is none)."""
        got = self._d.get(key)
        if got is not None and len(got[0]) == len(state) and all(a is b for a, b in zip(got[0], state)):
            return got[1]
        if got is not None:  # an older state: every entry is stale
            self.clear()
        if len(self._d) >= MEMO_ENTRIES or self._bytes >= MEMO_BYTES:
            self.clear()
        memo = _Memo(self)
        self._d[key] = (state, memo)
        return memo


class _Memo(dict):
    """One code's memo (:class:`CodeMemo`): a dict that counts the bytes of the arrays it is
    given and drops the ones past ``MEMO_ARRAY_BYTES``."""

    def __init__(self, owner: CodeMemo):
        super().__init__()
        self._owner = owner

    def __setitem__(self, key, value) -> None:
        n = _nbytes(value)
        if n <= MEMO_ARRAY_BYTES:
            self._owner._bytes += n
            super().__setitem__(key, value)


def _nbytes(value) -> int:
    """Bytes of the numpy arrays in value (an array, or tuples / lists of them and scalars),
    each made read-only."""
    if isinstance(value, np.ndarray):
        value.flags.writeable = False  # (kept for later calls: nobody may write to it)
        return int(value.nbytes)
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


class FineIndex:
    """IVF lists keyed by (dictionary code, k-means cell of fc7 within the code).

    Arrays: codes uint8 [G, B] (the codes it holds lists for, matched by value to the
    dictionary it serves: :meth:`attach`), list_offsets int64 [G + 1] (code g's lists are
    list_offsets[g]..list_offsets[g+1]-1), centroids float32 [L, D]; ``ivf``: a faiss IVF with
    L lists whose ids are database row ids (IndexIVFPQFastScan for ``storage`` "pq4", lists
    in packed blocks: read and written through :func:`_list_codes` / :func:`_put_list`;
    IndexIVFScalarQuantizer for "sq8" / "fp16"); rows: the rows (ids 0..rows-1) it covers.

    :meth:`search` on real CIFAR-10 code statistics (bench_scale.py, 2 cores, batches of 200
    queries): see docs/benchmarks.md, "Scale with real code statistics".
    """

    def __init__(self, buckets, list_offsets: np.ndarray, centroids: np.ndarray, ivf, cell_size: int,
                 storage: str, codes: np.ndarray | None = None, rows: int | None = None):
        self.list_offsets = np.asarray(list_offsets, np.int64)
        self.centroids = np.ascontiguousarray(centroids, np.float32)
        self.ivf = ivf
        if _is_blocked(ivf):
            ivf.implem = FAST_SCAN_IMPLEM  # once here: searches only read the index
        self.cell_size = int(cell_size)
        self.storage = storage
        self.dim = int(ivf.d)
        self.codes = np.asarray(buckets.dict_codes if codes is None else codes, np.uint8)
        self.rows = int(buckets.ntotal if rows is None else rows)
        self._lsizes = None
        self.buckets = None
        self._dict2fine = None
        self._memo = CodeMemo()
        if buckets is not None:
            self.attach(buckets)

    @property
    def n_lists(self) -> int:
        return int(self.list_offsets[-1])

    @classmethod
    def build(cls, buckets, features, cell_size: int | None = None, storage: str = DEFAULT_STORAGE, seed: int = 0,
              niter: int = 10, max_train: int = 64, chunk: int = 1 << 18, log: Callable[[str], None] | None = None):
        """Build from a :class:`~deephash_faiss.index.BucketIndex` and the features.

        Args:
            buckets: the code dictionary (its ``deleted`` rows are left out).
            features: float32/float16 [n, D] (array or memory map), row i = id i.
            cell_size: target rows per (code, cell) list (None: :func:`default_cell_size` of
                the live rows).
            storage: "auto" (:func:`default_storage`), "pq4" (4-bit PQ, :func:`pq4_subquantizers`, faiss fast-scan),
                "sq8" or "fp16" (compressed features held in the lists).
            max_train: k-means trains on at most ``max_train`` rows per cell (sampled).
        """
        from .rerank import _to_float32

        n, D = features.shape
        if n != buckets.ntotal:
            raise DhfError(f"{n} feature rows for {buckets.ntotal} codes")
        live, _ = buckets._counts()
        if storage == "auto":
            storage = default_storage(int(live.sum()))
        if storage not in STORAGES:
            raise DhfError(f"unknown fine-index storage {storage!r} (auto, pq4, sq8 or fp16)")
        if cell_size is None:
            cell_size = default_cell_size(int(live.sum()))
        if cell_size < 1:
            raise DhfError("the cell size must be at least 1 (--cell-size)")
        rng = np.random.default_rng(seed)
        ncell = np.maximum(1, np.ceil(live / max(1, cell_size)).astype(np.int64))
        ncell[live == 0] = 1
        deleted = buckets.deleted
        offsets, ids = np.asarray(buckets.offsets), buckets.ids
        big = np.flatnonzero(ncell > 1)
        small = np.flatnonzero(ncell == 1)
        # big codes first: their cells (k-means, two-level when large), local cell of each row
        local = np.zeros(n, np.int64)
        big_cents: dict[int, np.ndarray] = {}
        for j, c in enumerate(big):
            rows = np.asarray(ids[offsets[c]:offsets[c + 1]], np.int64)
            if deleted is not None:
                rows = rows[~deleted[rows]]
            x = _to_float32(np.asarray(features[rows]))
            cents, a = _cells(x, int(ncell[c]), cell_size, niter, seed + int(c), max_train, rng)
            big_cents[int(c)] = cents
            local[rows] = a
            ncell[c] = len(cents)
            if log and (j % 50 == 0 or j == len(big) - 1):
                log(f"fine index: k-means {j + 1}/{len(big)} big codes")
        list_offsets = np.concatenate([[0], np.cumsum(ncell)]).astype(np.int64)
        L = int(list_offsets[-1])
        centroids = np.zeros((L, D), np.float32)
        assign = np.empty(n, np.int64)  # row id -> list (deleted rows: -1)
        assign.fill(-1)
        for c, cents in big_cents.items():
            centroids[list_offsets[c]:list_offsets[c + 1]] = cents
            rows = np.asarray(ids[offsets[c]:offsets[c + 1]], np.int64)
            if deleted is not None:
                rows = rows[~deleted[rows]]
            assign[rows] = list_offsets[c] + local[rows]
        del local, big_cents
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
        ivf = _new_ivf(D, L, storage, pq4_subquantizers(D, int(live.sum())) if storage == "pq4" else None)
        ivf.quantizer.add(centroids)  # the list centroids (saved with the IVF; search never uses it)
        if n:
            samp = np.sort(rng.choice(n, min(n, 100_000), replace=False))
            _train_encoder(ivf, storage, _to_float32(np.asarray(features[samp])))
        if _is_blocked(ivf):  # encode all rows, then write each list once (packed blocks)
            sizes = np.bincount(assign[assign >= 0], minlength=L).astype(np.int64)
            rid = np.flatnonzero(assign >= 0)
            rid = rid[np.argsort(assign[rid], kind="stable")]
            codes = np.empty((len(rid), int(ivf.code_size)), np.uint8)
            pos = np.empty(n, np.int64)
            pos[rid] = np.arange(len(rid))
            for s in range(0, n, chunk):
                a = assign[s:s + chunk]
                keep = np.flatnonzero(a >= 0)
                if len(keep):
                    x = _to_float32(np.asarray(features[s:s + chunk]))[keep]
                    codes[pos[s + keep]] = ivf.pq.compute_codes(np.ascontiguousarray(x))
            starts = np.concatenate([[0], np.cumsum(sizes)])
            for li in np.flatnonzero(sizes):
                _put_list(ivf, int(li), rid[starts[li]:starts[li + 1]], codes[starts[li]:starts[li + 1]])
            ivf.ntotal = len(rid)
        else:
            for s in range(0, n, chunk):
                a = assign[s:s + chunk]
                keep = a >= 0
                if not keep.any():
                    continue
                x = np.ascontiguousarray(_to_float32(np.asarray(features[s:s + chunk]))[keep])
                _add_to_lists(ivf, x, a[keep], np.arange(s, s + len(a), dtype=np.int64)[keep])
        return cls(buckets, list_offsets, centroids, ivf, cell_size, storage)

    # -- the code dictionary it serves ---------------------------------------------------
    def attach(self, buckets) -> "FineIndex":
        """Serve the dictionary ``buckets`` (its numbering may differ from the one the index was
        built with: codes are matched by value). Every code of ``buckets`` that holds rows must
        have lists here, and the index must cover exactly ``buckets.ntotal`` rows, else the
        fine index is stale.

        Raises:
            DhfError: stale (rows or codes the fine index does not hold)."""
        from .index import _row_keys

        if self.rows != buckets.ntotal:
            raise DhfError(f"the fine index covers {self.rows} rows, the index holds {buckets.ntotal}: it is stale "
                           f"(rebuild it with `dhf fine-index`)")
        U = buckets.n_codes
        m = np.full(U, -1, np.int64)
        if U and len(self.codes):
            fk = _row_keys(np.ascontiguousarray(self.codes, np.uint8))
            dk = _row_keys(np.ascontiguousarray(buckets.dict_codes, np.uint8))
            o = np.argsort(fk, kind="stable")
            pos = np.minimum(np.searchsorted(fk[o], dk), len(fk) - 1)
            hit = fk[o][pos] == dk
            m[hit] = o[pos[hit]]
        missing = np.flatnonzero((m < 0) & (np.asarray(buckets.sizes) > 0))
        if len(missing):
            raise DhfError(f"the fine index has no lists for {len(missing)} code(s) of the index: it is stale "
                           f"(rebuild it with `dhf fine-index`)")
        self.buckets = buckets
        self._dict2fine = m
        return self

    def warm(self) -> None:
        """Compute the tables :meth:`search` builds on first use (list sizes; the dictionary's
        live counts, row buckets and code keys), so that threads searching at once share them."""
        self._list_sizes()
        b = self.buckets
        if b is not None:
            b._counts()
            b.bucket_of_rows()
            b._keys()

    # -- lists as arrays (for updates and saving) -------------------------------------
    def export_lists(self):
        """(sizes int64 [L], ids int64 [N], codes uint8 [N, code_size]) in list order (codes
        unpacked: one row per entry, whatever the storage)."""
        inv, cs, L = self.ivf.invlists, int(self.ivf.code_size), int(self.ivf.nlist)
        sizes = np.array([inv.list_size(i) for i in range(L)], np.int64)
        ids = np.empty(int(sizes.sum()), np.int64)
        codes = np.empty((int(sizes.sum()), cs), np.uint8)
        pos = 0
        for i in np.flatnonzero(sizes):
            s = int(sizes[i])
            ids[pos:pos + s], codes[pos:pos + s] = _list_codes(self.ivf, int(i))
            pos += s
        return sizes, ids, codes

    def _set_lists(self, centroids: np.ndarray, sizes: np.ndarray, ids: np.ndarray, codes: np.ndarray) -> None:
        """Replace the IVF by one with ``len(centroids)`` lists holding these entries (the
        scalar quantizer's training is kept)."""
        old = self.ivf
        ivf = _new_ivf(old.d, len(centroids), self.storage, old.pq.M if self.storage == "pq4" else None)
        _copy_encoder(old, ivf, self.storage)
        ivf.quantizer.add(np.ascontiguousarray(centroids, np.float32))
        starts = np.concatenate([[0], np.cumsum(sizes)])
        for i in np.flatnonzero(sizes):
            a, b = int(starts[i]), int(starts[i + 1])
            _put_list(ivf, int(i), ids[a:b], codes[a:b])
        ivf.ntotal = int(sizes.sum())
        self.ivf, self.centroids, self._lsizes = ivf, np.ascontiguousarray(centroids, np.float32), None
        self._cnorms = None

    def add(self, codes: np.ndarray, features: np.ndarray) -> None:
        """Index new rows (ids ``rows``..``rows + m - 1``): a row whose code has lists goes to
        the nearest of them (by centroid); rows of a code new to the index form one new list
        per code (centroid: their mean). ``attach`` the grown dictionary afterwards.

        Args:
            codes: uint8 [m, B]; features: float32/float16 [m, D]."""
        from .index import _row_keys
        from .rerank import _to_float32

        m = len(codes)
        if m == 0:
            return
        x = np.ascontiguousarray(_to_float32(np.asarray(features)))
        fk = _row_keys(np.ascontiguousarray(self.codes, np.uint8))
        nk = _row_keys(np.ascontiguousarray(codes, np.uint8))
        o = np.argsort(fk, kind="stable")
        pos = np.minimum(np.searchsorted(fk[o], nk), max(0, len(fk) - 1))
        known = (fk[o][pos] == nk) if len(fk) else np.zeros(m, bool)
        group = np.where(known, o[pos] if len(fk) else 0, -1)
        assign = np.empty(m, np.int64)
        for g in np.unique(group[known]):
            r = np.flatnonzero(group == g)
            a, b = int(self.list_offsets[g]), int(self.list_offsets[g + 1])
            d = ((x[r, None, :] - self.centroids[None, a:b, :]) ** 2).sum(2) if b - a > 1 else np.zeros((len(r), 1))
            assign[r] = a + np.argmin(d, axis=1)
        ids = np.arange(self.rows, self.rows + m, dtype=np.int64)
        new = np.flatnonzero(~known)
        if len(new):  # new codes: new lists (the IVF is rebuilt with more lists)
            uk, first, inv = np.unique(nk[new], return_index=True, return_inverse=True)
            G, L = len(self.codes), self.n_lists
            cents = np.zeros((len(uk), x.shape[1]), np.float64)
            np.add.at(cents, inv, x[new])
            cents /= np.bincount(inv, minlength=len(uk))[:, None]
            assign[new] = L + inv
            sizes, oids, ocodes = self.export_lists()
            self.codes = np.concatenate([np.asarray(self.codes, np.uint8), np.asarray(codes, np.uint8)[new[first]]])
            self.list_offsets = np.concatenate([self.list_offsets, L + 1 + np.arange(len(uk), dtype=np.int64)])
            assert len(self.codes) == G + len(uk)
            self._set_lists(np.vstack([self.centroids, cents.astype(np.float32)]),
                            np.concatenate([sizes, np.zeros(len(uk), np.int64)]), oids, ocodes)
        _add_to_lists(self.ivf, x, assign, ids)
        self.rows += m
        self._lsizes = None

    def compact(self, keep: np.ndarray) -> None:
        """Renumber after ``dhf compact``: rows with ``keep`` False are dropped, the others get
        ids 0.. in their old order. keep: bool [rows]."""
        keep = np.asarray(keep, bool)
        if len(keep) != self.rows:
            raise DhfError(f"compact mask has {len(keep)} rows, the fine index {self.rows}")
        newid = np.cumsum(keep) - 1
        sizes, ids, codes = self.export_lists()
        ok = keep[ids]
        owner = np.repeat(np.arange(len(sizes)), sizes)[ok]
        self._set_lists(self.centroids, np.bincount(owner, minlength=len(sizes)).astype(np.int64),
                        newid[ids[ok]], codes[ok])
        self.rows = int(keep.sum())

    # -- files --------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """One file: magic, a JSON header, the code and list-offset arrays, then the faiss IVF
        (faiss.write_index; its coarse quantizer holds the list centroids)."""
        import faiss

        from .index import write_array_file

        arrays = {"codes": np.ascontiguousarray(self.codes, np.uint8),
                  "list_offsets": np.ascontiguousarray(self.list_offsets, "<i8")}
        header = {"rows": self.rows, "cell_size": self.cell_size, "storage": self.storage, "dim": self.dim,
                  "n_codes": int(len(self.codes)), "n_lists": self.n_lists}
        if self.ivf.quantizer.ntotal != self.n_lists:
            self.ivf.quantizer.reset()
            self.ivf.quantizer.add(np.ascontiguousarray(self.centroids, np.float32))
        with open(path, "wb") as f:
            f.seek(write_array_file(f, FINE_MAGIC, header, arrays, tail_key="faiss_offset"))
            w = faiss.PyCallbackIOWriter(f.write)
            faiss.write_index(self.ivf, w)
            del w

    @classmethod
    def load(cls, path: str) -> "FineIndex":
        """Read a file written by :meth:`save` (``attach`` a dictionary before searching).

        Raises:
            DhfError: not a fine-index file, truncated or inconsistent."""
        import faiss

        from .index import read_array_file_header

        try:
            with open(path, "rb") as f:
                header = read_array_file_header(f, FINE_MAGIC, "a dhf fine-index file")
                arrs = {}
                for name, a in header["arrays"].items():
                    f.seek(a["offset"])
                    shape = tuple(a["shape"])
                    nbytes = int(np.prod(shape)) * np.dtype(a["dtype"]).itemsize
                    buf = f.read(nbytes)
                    if len(buf) != nbytes:
                        raise ValueError(f"{name} runs past the end of the file (truncated)")
                    arrs[name] = np.frombuffer(buf, a["dtype"]).reshape(shape).copy()
                f.seek(header["faiss_offset"])
                ivf = faiss.read_index(faiss.PyCallbackIOReader(f.read))
            lo = arrs["list_offsets"]
            L = int(lo[-1]) if len(lo) else 0
            if (len(lo) != int(header["n_codes"]) + 1 or len(arrs["codes"]) != int(header["n_codes"])
                    or L != int(header["n_lists"]) or ivf.nlist != max(1, L) or ivf.quantizer.ntotal != L):
                raise ValueError("inconsistent fine-index arrays")
            if header["storage"] not in STORAGES:
                raise ValueError(f"unknown storage {header['storage']!r}")
        except (ValueError, KeyError, TypeError, OSError, RuntimeError) as err:
            raise DhfError(f"cannot read fine index {path}: {err}") from None
        cents = faiss.downcast_index(ivf.quantizer).reconstruct_n(0, L) if L else np.zeros((0, ivf.d), np.float32)
        fi = cls(None, lo, cents, ivf, int(header["cell_size"]), header["storage"], arrs["codes"], int(header["rows"]))
        return fi

    def memory_bytes(self) -> int:
        """Bytes of compressed features + ids in the lists, centroids and list offsets."""
        per = int(self.ivf.code_size) + 8
        return int(self.ivf.ntotal) * per + self.centroids.nbytes + self.list_offsets.nbytes

    def search(self, qcodes: np.ndarray, qfeats: np.ndarray, k: int, radius: int, gather,
               params: FineParams | None = None, max_candidates: int | None = None, block_elems: int = 1 << 20,
               small_pools: bool = False):
        """Approximate HDS, vectorized over the batch: the radius is resolved once per
        distinct query code (queries with one code reach the same lists); queries, ordered by
        code, are taken in blocks of at most about ``block_elems`` (queries x the union of the
        lists they reach, :func:`_blocks`), one GEMM a block, and each query's nearest lists
        picked among the ones its code reaches (:meth:`_probe`); then one
        ``search_preassigned`` for all queries and one batched exact refine (:func:`_refine`).

        Args:
            qcodes: uint8 [m, B]; qfeats: float32 [m, D].
            gather: ids int64 [p] (any order, repeats) -> features [p, D] (the exact
                features, for the refine), or the features themselves when they are in RAM
                (a C-contiguous float32 array [n, D]: read in place, no copy).
            max_candidates: safety limit on rows examined per query (lists are dropped,
                farthest centroid first, past it; the result says ``truncated``).
        Returns:
            list of m (ids int64 [k'], squared L2 float32 [k'], pool rows int, examined int,
            truncated bool, exact bool); pools of at most ``exact_max`` live rows (and
            queries that reach no code) come back with ``exact=True`` and empty arrays, for
            the caller's exact path. With ``small_pools``: (that list, (queries int64 [s],
            lims int64 [s + 1], D int32, I int64)), the radius pools of those ``exact``
            queries as :meth:`BucketIndex.range_search` gives them (rows by (distance, id),
            cut at ``max_candidates``) from the reach already resolved here, so the exact
            path need not resolve the radius again.
        """
        from .index import _ranges, _row_keys, sort_and_cap

        p = params or FineParams()
        p.check()
        b = self.buckets
        if b is None:
            raise DhfError("the fine index serves no code dictionary (attach one)")
        live, _ = b._counts()
        m = len(qcodes)
        q = np.ascontiguousarray(qfeats, np.float32).reshape(m, -1)
        out: list = [None] * m
        none = (np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64))
        if m == 0:
            return (out, none) if small_pools else out
        qcodes = np.ascontiguousarray(qcodes, np.uint8)
        if m == 1 and SINGLE_QUERY_PATH:
            return self._search_one(qcodes, q, k, radius, gather, p, max_candidates, small_pools)
        _, first, inv = np.unique(_row_keys(qcodes), return_index=True, return_inverse=True)
        inv = inv.ravel()
        lims, Dc, Ic = b.reach(qcodes[first], radius, ordered=False)  # per distinct code, any order
        cum = np.concatenate([[0], np.cumsum(live[Ic])]) if len(Ic) else np.zeros(1, np.int64)
        pools = (cum[lims[1:]] - cum[lims[:-1]])[inv]  # live rows in each query's radius pool
        small = np.flatnonzero(pools <= p.exact_max)
        for i in small:
            out[i] = (np.zeros(0, np.int64), np.zeros(0, np.float32), int(pools[i]), int(pools[i]), False, True)
        if small_pools:  # their rows, from the reach of their distinct codes
            u = inv[small]
            cnt = lims[u + 1] - lims[u]
            at = _ranges(lims[u], cnt)
            # (pool_rows wants each query's codes nearest first)
            none = (small.astype(np.int64), *b.pool_rows(*sort_and_cap(np.concatenate([[0], np.cumsum(cnt)]).astype(np.int64),
                                                                       Dc[at], Ic[at]), max_candidates))
        todo = np.flatnonzero(pools > p.exact_max)
        if len(todo) == 0:
            return (out, none) if small_pools else out
        todo = todo[np.argsort(inv[todo], kind="stable")]  # by distinct code
        # (distinct code, list) pairs of the lists each distinct code reaches (non-empty ones)
        owner = np.repeat(np.arange(len(first)), np.diff(lims))
        keep = live[Ic] > 0
        fc, owner = self._dict2fine[Ic[keep]], owner[keep]
        nl = self.list_offsets[fc + 1] - self.list_offsets[fc]
        lists, owner = _ranges(self.list_offsets[fc], nl), np.repeat(owner, nl)
        keep = self._list_sizes()[lists] > 0
        lists, owner = lists[keep], owner[keep]
        bounds = np.searchsorted(owner, np.arange(len(first) + 1))
        Iq, Dq, examined, trunc = self._assign(q[todo], inv[todo], lists, bounds, p, max_candidates, block_elems)
        I = _scan_lists(self.ivf, q[todo], max(k, p.refine), Iq, Dq)
        I = _drop_deleted(I, b.deleted)  # rows removed after the build
        ids, dist = _refine(q[todo], I, gather, k)
        found = (ids >= 0).sum(1).tolist()  # the valid ones come first
        for j, (i, f, pl, ex, tr) in enumerate(zip(todo.tolist(), found, pools[todo].tolist(), examined.tolist(),
                                                    trunc.tolist())):
            out[i] = (ids[j, :f], dist[j, :f], pl, ex, tr, False)
        return (out, none) if small_pools else out

    def _search_one(self, qcode: np.ndarray, q: np.ndarray, k: int, radius: int, gather, p: FineParams,
                    max_candidates: int | None, small_pools: bool):
        """:meth:`search` of one query (qcode uint8 [1, B], q float32 [1, D]), same result
        layout: the batch machinery's few hundred small numpy calls (blocks, keys over a GEMM,
        prefix sorts) are a fixed cost that dominates a single query, so here the lists its
        code reaches are ranked directly. The lists probed are the batch path's (nearest
        centroid first, ties by list number, cut at the same row budget), up to the float
        rounding of the centroid distances: here a direct sum of squared differences over the
        reached centroids (faiss ``fvec_L2sqr_by_idx``), in the batch one GEMM per block. As in
        :meth:`_probe`, only the ``PROBE_PREFIX x nprobe`` nearest lists are sorted (a partition
        first) unless their rows fall short of the budget. What depends on the code alone comes
        from :meth:`code_memo`."""
        import faiss

        from .index import _ranges

        b = self.buckets
        sizes = self._list_sizes()
        memo = self.code_memo(qcode, radius)  # what depends on the code alone, kept across calls
        reach = memo.get("reach")
        if reach is None:  # (set with the pool; absent too where it was too big to keep)
            live, _ = b._counts()
            reach = b.reach(qcode, radius, ordered=False)
            memo["pool"] = int(live[reach[2]].sum()) if len(reach[2]) else 0
            memo["reach"] = reach
        pool = memo["pool"]
        none = (np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64))
        if pool <= p.exact_max:  # for the caller's exact path, with its pool rows when asked
            out = [(np.zeros(0, np.int64), np.zeros(0, np.float32), pool, pool, False, True)]
            if small_pools:
                rows_ = memo.get(("pool_rows", max_candidates))
                if rows_ is None:
                    # (one query's codes in any order)
                    rows_ = memo[("pool_rows", max_candidates)] = b.pool_rows(*reach, max_candidates)
                none = (np.zeros(1, np.int64), *rows_)
            return (out, none) if small_pools else out
        lists = memo.get("lists")
        if lists is None:
            live, _ = b._counts()
            fc = self._dict2fine[reach[2][live[reach[2]] > 0]]
            lists = _ranges(self.list_offsets[fc], self.list_offsets[fc + 1] - self.list_offsets[fc])
            lists = memo["lists"] = lists[sizes[lists] > 0]
        rows = int(sizes[lists].sum())
        budget = p.nprobe * self.cell_size
        limit = int(WHOLE_POOL_FACTOR * budget)
        trunc = False
        if rows <= (limit if max_candidates is None else min(limit, max_candidates)):
            Iq, examined = lists, rows  # every reached list, in reach order (as :meth:`_assign`)
            Dq = np.zeros(len(lists), np.float32)
        else:  # nearest centroid first, ties by list number; lists that start under the budget
            Dq = np.empty(len(lists), np.float32)
            faiss.fvec_L2sqr_by_idx(faiss.swig_ptr(Dq), faiss.swig_ptr(q), faiss.swig_ptr(self.centroids),
                                    faiss.swig_ptr(lists), self.dim, 1, len(lists))
            t = max(8, PROBE_PREFIX * p.nprobe)
            o = None
            if t < len(lists):  # the nearest t lists (every tie of the t-th) sorted, if their rows reach the budget
                sel = np.flatnonzero(Dq <= np.partition(Dq, t - 1)[t - 1])
                o = sel[np.lexsort((lists[sel], Dq[sel]))]
                R = np.concatenate([[0], np.cumsum(sizes[lists[o]])])
                if R[-1] < budget:  # (they do not: the whole row, as below)
                    o = None
            if o is None:
                o = np.lexsort((lists, Dq))
                R = np.concatenate([[0], np.cumsum(sizes[lists[o]])])
            Iq, Dq = lists[o], Dq[o]
            cut = min(int(np.searchsorted(R, budget)), len(Iq))
            if max_candidates is not None and R[cut] > max_candidates:
                trunc = True
                cut = max(1, int(np.searchsorted(R, max_candidates, side="right")) - 1)
            Iq, Dq, examined = Iq[:cut], Dq[:cut], int(R[cut])
        if not len(Iq):  # (lists of deleted rows only)
            Iq, Dq = np.full(1, -1, np.int64), np.zeros(1, np.float32)
        I = _scan_lists(self.ivf, q, max(k, p.refine), Iq[None], Dq[None])
        I = _drop_deleted(I, b.deleted)
        ids, dist = _refine(q, I, gather, k)
        f = int((ids >= 0).sum())
        out = [(ids[0, :f], dist[0, :f], pool, examined, trunc, False)]
        return (out, none) if small_pools else out

    def _assign(self, qt: np.ndarray, qown: np.ndarray, lists: np.ndarray, bounds: np.ndarray, p: FineParams,
                max_candidates: int | None, block_elems: int):
        """The lists each query scans, as :meth:`_probe` returns them. A query whose reached
        lists hold at most the probe budget (``nprobe x cell_size`` rows, and at most
        ``max_candidates``) scans them all, in list order: the probe would take every one of
        them too (each starts under the budget), so its centroid ranking is skipped (the scan
        order differs, which can only change ties of compressed distances). Small
        indexes are mostly such queries (real CIFAR-10 statistics at 1e5 rows: pools of ~1,800
        rows against a budget of 1,536). The others go through :meth:`_probe`."""
        from .index import _ranges

        budget = p.nprobe * self.cell_size
        cs = np.concatenate([[0], np.cumsum(self._list_sizes()[lists])])
        rows = (cs[bounds[1:]] - cs[bounds[:-1]])[qown]  # rows in the lists each query reaches
        limit = int(WHOLE_POOL_FACTOR * budget)
        whole = rows <= (limit if max_candidates is None else min(limit, max_candidates))
        rest = np.flatnonzero(~whole)
        parts = []
        if len(rest):
            parts.append((rest, *self._probe(qt[rest], qown[rest], lists, bounds, p, max_candidates, block_elems)))
        sel = np.flatnonzero(whole)
        if len(sel):
            cnt = np.diff(bounds)[qown[sel]]
            Iw = np.full((len(sel), max(1, int(cnt.max()))), -1, np.int64)
            Iw[np.repeat(np.arange(len(sel)), cnt), _ranges(np.zeros(len(sel), np.int64), cnt)] = \
                lists[_ranges(bounds[qown[sel]], cnt)]
            parts.append((sel, Iw, np.zeros(Iw.shape, np.float32), rows[sel], np.zeros(len(sel), bool)))
        if len(parts) == 1:
            return parts[0][1:]
        w = max(part[1].shape[1] for part in parts)
        Iq = np.full((len(qt), w), -1, np.int64)
        Dq = np.zeros((len(qt), w), np.float32)
        examined, trunc = np.zeros(len(qt), np.int64), np.zeros(len(qt), bool)
        for at, I_, D_, e_, t_ in parts:
            Iq[at, :I_.shape[1]], Dq[at, :I_.shape[1]], examined[at], trunc[at] = I_, D_, e_, t_
        return Iq, Dq, examined, trunc

    def _probe(self, qt: np.ndarray, qown: np.ndarray, lists: np.ndarray, bounds: np.ndarray, p: FineParams,
               max_candidates: int | None, block_elems: int):
        """The lists each query probes: among the lists its code reaches, nearest centroid first
        (ties by list number) until ``nprobe x cell_size`` rows (small codes are lists of a few
        rows: counting rows, not lists, keeps the work and the recall even), fewer past
        ``max_candidates``.

        Only the (query, list) pairs of reached lists are ranked: their centroid distances come
        from one GEMM (faiss) per block of consecutive distinct codes (queries x the union of
        the block's lists, :func:`_blocks`). A query's pairs are packed (distance, list) keys
        (:func:`_order_keys`) and only its ``PROBE_PREFIX x nprobe`` nearest are cut to the
        budget (:func:`_budget_cut`): where the reached pairs fill ``DENSE_PAIRS`` of the GEMM,
        a row of keys over all of it (the unreached masked) is partitioned and that prefix
        sorted; else the block's pairs are sorted once by (query, key). Where a prefix holds too
        few rows for the budget (lists of a few rows) the query's whole row is sorted: the
        lists probed are the same as a full sort's.

        Args:
            qt: float32 [t, D] the queries, ordered by their distinct code qown int64 [t];
            lists: int64 [E] the (non-empty) lists the distinct codes reach, code u's being
                ``lists[bounds[u]:bounds[u + 1]]`` (bounds int64 [U + 1]).
        Returns:
            (lists int64 [t, w] (-1 past each query's cut), centroid distances float32 [t, w],
            rows examined int64 [t], truncated bool [t])."""
        import faiss

        from .index import _ranges

        n = np.diff(bounds)[qown]  # lists each query reaches
        budget = p.nprobe * self.cell_size
        width = max(8, PROBE_PREFIX * p.nprobe)
        sizes = self._list_sizes()
        col = np.empty(self.n_lists, np.int64)
        m = n.copy()  # pairs of each query ranked (fewer where only a prefix was sorted)
        flat, dense = [], []  # per block: sorted keys, query-major, and their kb / union
        for r0, r1, union in _blocks(qown, lists, bounds, self.n_lists, block_elems):
            col[union] = np.arange(len(union))
            # faiss's GEMM (OpenMP threads, like the scan after it: numpy's BLAS threads would
            # still be spinning when the scan starts and take its cores)
            g = faiss.pairwise_distances(qt[r0:r1], self.centroids[union])
            nb = n[r0:r1]
            kb = max(1, (len(union) - 1).bit_length())
            if nb.sum() >= DENSE_PAIRS * g.size and width < len(union):
                # most of the GEMM is reached: a row of keys a query over all of it (the
                # unreached last), partitioned, only the prefix sorted
                bcodes, qloc = np.unique(qown[r0:r1], return_inverse=True)
                cnt = np.diff(bounds)[bcodes]
                reach = np.zeros((len(bcodes), len(union)), bool)
                reach[np.repeat(np.arange(len(bcodes)), cnt), col[lists[_ranges(bounds[bcodes], cnt)]]] = True
                keys = _order_keys(g, np.arange(len(union))[None, :], kb)
                keys[~reach[qloc.ravel()]] = _NO_KEY
                top = np.sort(np.partition(keys, width - 1, axis=1)[:, :width], axis=1)
                m[r0:r1] = np.minimum(nb, width)
                flat.append((top[np.arange(width) < m[r0:r1, None]], kb, union))
                dense.append((r0, r1, keys, kb, union))
            else:  # only the reached pairs, one sort by (query, key)
                bq = np.repeat(np.arange(r1 - r0), nb)
                bc = col[lists[_ranges(bounds[qown[r0:r1]], nb)]]
                k = _order_keys(g[bq, bc], bc, kb)
                if (r1 - r0 - 1).bit_length() + 32 + kb <= 63:
                    k = np.sort((bq << (32 + kb)) | k) & ((1 << (32 + kb)) - 1)
                else:
                    k = k[np.lexsort((k, bq))]
                flat.append((k, kb, union))
        Iq, Dq, examined, trunc, cut = _budget_cut(flat, m, sizes, budget, max_candidates)
        short = np.flatnonzero((m < n) & (cut == m))  # a sorted prefix ran out under the budget
        if len(short):  # those queries: their whole rows
            again = []
            for r0, r1, keys, kb, union in dense:
                sel = short[(short >= r0) & (short < r1)]
                if len(sel):
                    full = np.sort(keys[sel - r0], axis=1)
                    again.append((full[np.arange(full.shape[1]) < n[sel, None]], kb, union))
            I2, D2, examined[short], trunc[short], _ = _budget_cut(again, n[short], sizes, budget, max_candidates)
            if I2.shape[1] > Iq.shape[1]:
                pad = I2.shape[1] - Iq.shape[1]
                Iq = np.pad(Iq, ((0, 0), (0, pad)), constant_values=-1)
                Dq = np.pad(Dq, ((0, 0), (0, pad)))
            Iq[short], Dq[short] = -1, 0
            Iq[short, :I2.shape[1]], Dq[short, :I2.shape[1]] = I2, D2
        return Iq, Dq, examined, trunc

    def _centroid_norms(self) -> np.ndarray:
        if getattr(self, "_cnorms", None) is None or len(self._cnorms) != len(self.centroids):
            self._cnorms = np.einsum("ij,ij->i", self.centroids, self.centroids)
        return self._cnorms

    def _list_sizes(self) -> np.ndarray:
        if getattr(self, "_lsizes", None) is None:
            inv = self.ivf.invlists
            self._lsizes = np.array([inv.list_size(i) for i in range(self.ivf.nlist)], np.int64)
        return self._lsizes

    def code_memo(self, qcode: np.ndarray, radius: int) -> dict:
        """The memo of one query code (uint8 [1, B] or [B]) at this radius: a dict that
        :meth:`search` of a single query (and the caller's exact path) fills with what depends
        on the code alone (its radius reach, pool size, reached lists, small-pool rows), so a
        later query of the same code skips that work. It is valid for the current state of the
        index only (:class:`CodeMemo`): an add, a deletion, a compact or an attach gives fresh
        memos."""
        b = self.buckets
        return self._memo.entry((np.ascontiguousarray(qcode, np.uint8).tobytes(), int(radius)),
                                (b, b._counts()[0], self._list_sizes(), self._dict2fine))


#: :meth:`FineIndex.search` of one query takes :meth:`FineIndex._search_one` (False: the batch
#: path, as before). Measured by ``benchmarks/bench_hds_batches.py`` (its arm
#: ``hds_batch_path`` at batch 1; docs/benchmarks.md, "Single queries").
SINGLE_QUERY_PATH = True

#: faiss fast-scan kernel of :meth:`FineIndex.search` (11: one query at a time, a reservoir of
#: the best; 12 / 13: queries grouped per list): at 1e5 / 1e6 rows ~5-10% faster than the
#: default, recall as high; at 1e5 rows, batches of 200 and 2,000, still the fastest or within
#: the noise of 13 (ad hoc, 2026-12-07).
FAST_SCAN_IMPLEM = 11

#: A block's fixed cost in (query, list) pairs of GEMM: :func:`_blocks` starts a new block where
#: adding the next distinct code to the current one would grow the GEMM by more than ranking
#: the code apart plus this. Measured (real CIFAR-10 statistics, 256-d), time of
#: :meth:`FineIndex._probe` for a batch: 1e6 rows, 2000 queries: 4096 98 ms, 16384 89 ms,
#: 65536 90 ms; 1e5 rows, 200 queries: 4096 3.1 ms, 16384 2.7 ms.
BLOCK_OVERHEAD_PAIRS = 16384


#: :meth:`FineIndex._assign`: a query whose reached lists hold at most this x the probe budget
#: scans them all, unranked. At 1.0 the lists are exactly those the probe would pick; only the
#: order they are scanned in differs, which can change ties of compressed distances at the refine
#: cut. Measured by ``benchmarks/bench_fine_assign.py`` (real CIFAR-10 statistics, smallcnn seed,
#: 200 queries, 2-core Intel host, alternating with 0.0 = every query ranked): ``search`` median
#: 7.33 ms against 8.30 ms at 1e5 rows (recall@10 against exact HDS 0.966 both), 27.9 ms against
#: 30.3 ms at 1e6 (recall 0.9838 against 0.9844). Factors 2-8 and "all" gave 6.6-7.2 ms at 1e5
#: (recall 0.975-0.977, an earlier ad-hoc run): within the noise, so 1.0.
WHOLE_POOL_FACTOR = 1.0

#: :meth:`FineIndex._probe` sorts a query's ``PROBE_PREFIX x nprobe`` nearest lists (a partition
#: first), and the whole row only where their rows do not reach the budget. Measured (real
#: CIFAR-10 statistics, 200 queries): the lists probed were 9-42 of 201 reached at 1e5 rows
#: (nprobe 24) and 6-81 of 1,545 at 1e6 (nprobe 64).
PROBE_PREFIX = 2
_NO_KEY = np.iinfo(np.int64).max  # past a query's pairs in a row of keys: after every key
#: :meth:`FineIndex._probe` builds a block's keys over the whole GEMM (queries x the union of
#: their lists, the unreached masked) where the reached pairs are at least this share of it,
#: else from the reached pairs alone (gathered from the GEMM: about 2.5x a dense key's cost a
#: pair, measured on 70 x 1,545 blocks; below 0.4 the dense keys cost more than they save).
DENSE_PAIRS = 0.4


def _order_keys(d: np.ndarray, c: np.ndarray, kb: int) -> np.ndarray:
    """int64 keys [e] whose order is (distance d float32 [e], column c int64 [e] < 2**kb): the
    distance as its 32 bits in float order above the column's ``kb`` bits (kb <= 31)."""
    bits = (d + np.float32(0)).view(np.int32)  # + 0: -0.0 becomes 0.0
    bits = (bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))).astype(np.int64) + 2**31  # uint32 in float order
    return (bits << kb) | c


def _key_distance(keys: np.ndarray, kb: int) -> np.ndarray:
    """The float32 distances of :func:`_order_keys`'s keys (any shape)."""
    b = (((keys >> kb) & 0xFFFFFFFF) - 2**31).astype(np.int32)
    return (b ^ ((b >> 31) & np.int32(0x7FFFFFFF))).view(np.float32)


def _budget_cut(parts, m: np.ndarray, sizes: np.ndarray, budget: int, max_candidates: int | None):
    """Each query probes its nearest lists that start under ``budget`` rows (the rows of the
    pairs before them), cut again to stay within ``max_candidates`` rows (one list at least).

    Args:
        parts: [(keys int64 [e], kb, union int64 [l])]: the queries' pairs, query-major, each
            query's m[i] pairs sorted (:func:`_order_keys`; a key's column names list
            ``union[column]``); m: int64 [t]; sizes: int64, the rows of every list.
    Returns:
        (lists int64 [t, w] (-1 past each query's cut), centroid distances float32 [t, w],
        rows examined int64 [t], truncated bool [t], cut int64 [t])."""
    from .index import _ranges

    pl = np.concatenate([u[k & ((1 << kb) - 1)] for k, kb, u in parts]) if parts else np.zeros(0, np.int64)
    cd = np.concatenate([_key_distance(k, kb) for k, kb, _ in parts]) if parts else np.zeros(0, np.float32)
    s0 = np.cumsum(m) - m
    # query i probes its nearest cut[i] pairs, s0[i]..s0[i] + cut[i] - 1: those that start
    # under the budget (R[e]: rows in pairs 0..e-1, all queries)
    R = np.concatenate([[0], np.cumsum(sizes[pl])])
    cut = np.minimum(np.searchsorted(R, R[s0] + budget) - s0, m)
    examined = R[s0 + cut] - R[s0]
    trunc = np.zeros(len(m), bool)
    if max_candidates is not None:
        trunc = examined > max_candidates
        fit = np.searchsorted(R, R[s0] + max_candidates, side="right") - s0 - 1  # pairs within the limit
        cut = np.where(trunc, np.maximum(1, fit), cut)
        examined = R[s0 + cut] - R[s0]
    sel = _ranges(s0, cut)
    Iq = np.full((len(m), max(1, int(cut.max()) if len(cut) else 1)), -1, np.int64)
    Dq = np.zeros(Iq.shape, np.float32)
    q, rank = np.repeat(np.arange(len(m)), cut), sel - np.repeat(s0, cut)
    Iq[q, rank], Dq[q, rank] = pl[sel], cd[sel]
    return Iq, Dq, examined, trunc, cut


def _blocks(qown: np.ndarray, lists: np.ndarray, bounds: np.ndarray, n_lists: int, limit: int):
    """Cut queries ordered by distinct code (qown int64 [t]) into blocks of whole, consecutive
    distinct codes. The next code joins the current block unless the block's GEMM, queries x
    the union of their lists, would then pass ``limit`` or grow by more than ranking the code
    apart costs (its queries x its lists + :data:`BLOCK_OVERHEAD_PAIRS`); a block holds one
    code at least.

    Args:
        lists: int64 [E] the lists the distinct codes reach, code u's being
            ``lists[bounds[u]:bounds[u + 1]]`` (bounds int64 [U + 1]); n_lists: lists in all.
    Yields (first query, last query + 1, the union of the block's lists int64 [l], ascending)."""
    codes, start, count = np.unique(qown, return_index=True, return_counts=True)
    mark = np.zeros(n_lists, bool)  # the lists of the current block
    b0, nq, nl = 0, 0, 0
    for j, u in enumerate(codes.tolist()):
        ls, c = lists[bounds[u]:bounds[u + 1]], int(count[j])
        new = len(ls) - int(np.count_nonzero(mark[ls]))
        grown = (nq + c) * (nl + new)
        if nq and (grown > limit or grown > nq * nl + c * len(ls) + BLOCK_OVERHEAD_PAIRS):
            union = np.flatnonzero(mark)
            yield int(start[b0]), int(start[j]), union
            mark[union] = False
            b0, nq, nl, new = j, 0, 0, len(ls)
        mark[ls] = True
        nq, nl = nq + c, nl + new
    yield int(start[b0]), len(qown), np.flatnonzero(mark)


_IVF_PARAMS: dict = {}


def _ivf_params(nprobe: int):
    """A ``faiss.SearchParametersIVF`` of this probe width, made once (8 us a call otherwise,
    a few percent of a single query) and never changed after: threads share it read-only."""
    import faiss

    p = _IVF_PARAMS.get(nprobe)
    if p is None:
        if len(_IVF_PARAMS) >= 1024:
            _IVF_PARAMS.clear()
        p = faiss.SearchParametersIVF()
        p.nprobe = nprobe
        _IVF_PARAMS[nprobe] = p
    return p


def _scan_lists(ivf, q: np.ndarray, k: int, Iq: np.ndarray, Dq: np.ndarray) -> np.ndarray:
    """Ids int64 [m, k] (-1 for none) of the k best rows by the lists' compressed distances
    among the lists Iq int64 [m, w] (-1: none; centroid distances Dq float32 [m, w]) of each
    query q float32 [m, D]: faiss ``search_preassigned``, with the probe width passed in
    ``SearchParametersIVF`` instead of set on the index, so that threads can scan one index at
    once (:func:`~deephash_faiss.search.hds_ivf` splits large batches)."""
    import faiss

    m = len(q)
    q, Iq, Dq = (np.ascontiguousarray(a, t) for a, t in ((q, np.float32), (Iq, np.int64), (Dq, np.float32)))
    params = _ivf_params(int(Iq.shape[1]))
    D, I = np.empty((m, k), np.float32), np.empty((m, k), np.int64)
    # (the SWIG method under faiss's numpy wrapper, which accepts no params)
    ivf.search_preassigned_c(m, faiss.swig_ptr(q), k, faiss.swig_ptr(Iq), faiss.swig_ptr(Dq), faiss.swig_ptr(D),
                             faiss.swig_ptr(I), False, params)
    return I


def _drop_deleted(I: np.ndarray, deleted: np.ndarray | None) -> np.ndarray:
    """Candidate ids I int64 [m, R] with the rows marked in ``deleted`` (bool [n], or None)
    replaced by -1."""
    if deleted is None or not deleted.any():
        return I
    return np.where((I >= 0) & deleted[np.maximum(I, 0)], -1, I)


def _ranges_of(list_offsets: np.ndarray, codes: np.ndarray) -> np.ndarray:
    from .index import _ranges

    return _ranges(list_offsets[codes], list_offsets[codes + 1] - list_offsets[codes])


#: :func:`_refine` packs (distance, id) in one int64 key for ids of at most this many bits (the
#: most :func:`_order_keys` can hold), else it sorts each row by id and argsorts it stably.
REFINE_KEY_ID_BITS = 31


def _refine(q: np.ndarray, cand: np.ndarray, gather, k: int):
    """Exact top k of each query among its candidates (squared L2 on the stored features,
    :func:`~deephash_faiss.rerank.l2_by_ids`), ties by id.

    Args:
        q: float32 [m, D]; cand: int64 [m, R] candidate ids, -1 for none.
        gather: ids int64 [p] (any order, repeats) -> features [p, D], or the features
            (float32 [n, D] in RAM).
    Returns:
        (ids int64 [m, k'], squared distances float32 [m, k']) nearest first, -1 / inf past
        a query's candidates; k' = min(k, R)."""
    from .rerank import l2_by_ids

    kk = min(k, cand.shape[1])
    if len(cand) == 1:  # one query: a lexsort of its valid candidates (the keys' dozen calls cost more)
        c = cand[0]
        c = c[c >= 0]
        d = l2_by_ids(q, c[None], gather)[0]
        o = np.lexsort((c, d))[:kk]
        if len(o) == kk:
            return c[o][None], d[o][None]
        ids, dist = np.full((1, kk), -1, np.int64), np.full((1, kk), np.inf, np.float32)
        ids[0, :len(o)], dist[0, :len(o)] = c[o], d[o]
        return ids, dist
    ib = max(1, int(cand.max()).bit_length()) if cand.size else 1
    if ib <= REFINE_KEY_ID_BITS:
        # one packed key a candidate, (distance in float order, id) (:func:`_order_keys`): a
        # partition to the k best and a sort of those (a stable argsort of every row took ~9%
        # of a batch of HDS at 1e5 rows)
        d = l2_by_ids(q, cand, gather)
        keys = _order_keys(d, np.maximum(cand, 0), ib)
        keys[cand < 0] = _NO_KEY
        if kk < keys.shape[1]:
            keys = np.partition(keys, kk - 1, axis=1)[:, :kk]
        keys.sort(axis=1)
        none = keys == _NO_KEY
        ids = np.where(none, -1, keys & ((1 << ib) - 1))
        return ids, np.where(none, np.float32(np.inf), _key_distance(keys, ib))
    big = np.iinfo(np.int64).max
    c = np.sort(np.where(cand < 0, big, cand), axis=1)  # id order: the stable sort keeps ties by id
    c[c == big] = -1
    d = l2_by_ids(q, c, gather)
    o = np.argsort(d, axis=1, kind="stable")[:, :kk]
    return np.take_along_axis(c, o, 1), np.take_along_axis(d, o, 1)
