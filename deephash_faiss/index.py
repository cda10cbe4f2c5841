"""Binary codes and FAISS binary indexes.

Bit order: a code of ``bits`` bits is stored as uint8 [bits / 8], bit ``j`` in byte
``j // 8`` at position ``j % 8`` counted from the least significant bit — FAISS's
order, i.e. ``np.packbits(bits, axis=-1, bitorder="little")``.

Index types (``kind``):

* ``flat`` — :class:`faiss.IndexBinaryFlat`, exact.
* ``hash`` — :class:`faiss.IndexBinaryHash` with ``b`` hash bits (the code prefix) and
  ``nflip``: radius search is exact when ``nflip >= radius - 1``.
* ``multihash`` — :class:`faiss.IndexBinaryMultiHash` with ``nhash`` tables of ``b``
  bits: exact for radius r when ``nflip >= floor((r - 1) / nhash)``.
* ``buckets`` — :class:`BucketIndex`, a code dictionary: the distinct codes in a FAISS
  IndexBinaryFlat, each with a posting list of row ids sorted by id. k-NN and radius
  results are identical to ``flat`` (ties, deletions and the cap included) at a cost that
  grows with the number of distinct codes, not rows: supervised codes collapse a class onto
  a few codes (CIFAR-10: 50,000 images, ~1,900 codes).
* ``auto`` — resolved when the index is built (:func:`resolve_auto_kind`): ``buckets`` when
  the codes are few enough distinct ones for the dictionary to win, else ``flat``.

Search results are always ordered by (Hamming distance, database id), so ties are
deterministic and equal a stable sort of the distances. ``hash`` and ``multihash`` k-NN are
approximate: faiss probes only ``nflip`` bit flips, so a list may miss nearer codes or come
back short (the :class:`~deephash_faiss.search.Searcher` completes short lists with an exact
flat scan); ``flat`` and ``buckets`` are exact.

Padding: FAISS has specialised Hamming kernels for 4, 8, 16, 20, 32 and 64-byte codes;
other widths (e.g. 48-bit = 6-byte codes) take a generic, several times slower path
(benchmarks/bench_search.py, docs/benchmarks.md). :class:`BinaryIndex` therefore stores
codes zero-padded to the next fast width (:func:`padded_nbytes`; 6 -> 8 bytes) and pads
queries the same way. Zero bytes add 0 to every XOR popcount, so distances, ids and
order are unchanged. ``BinaryIndex.bits`` stays the logical width; the FAISS index
(and the saved ``codes.index``) has ``padded_nbytes * 8`` bits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import DhfError

INDEX_KINDS = ("flat", "hash", "multihash", "buckets", "auto")
_FAST_NBYTES = (4, 8, 16, 20, 32, 64)  # FAISS HammingComputer specialisations
_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def pack_codes(h: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Binarise latent activations and pack them.

    Args:
        h: float [n, bits], sigmoid outputs in (0, 1) (or a {0,1} bit matrix with
            ``threshold=0.5``).
    Returns:
        uint8 [n, bits / 8] in FAISS bit order.
    """
    h = np.asarray(h)
    if h.ndim != 2 or h.shape[1] % 8:
        raise DhfError(f"codes need shape [n, bits] with bits a multiple of 8, got {h.shape}")
    return np.packbits(h > threshold, axis=1, bitorder="little")


def unpack_codes(codes: np.ndarray) -> np.ndarray:
    """uint8 [n, nbytes] -> uint8 {0, 1} [n, nbytes * 8] (inverse of :func:`pack_codes`)."""
    return np.unpackbits(np.asarray(codes, dtype=np.uint8), axis=1, bitorder="little")


def padded_nbytes(nbytes: int) -> int:
    """Code width (bytes) that BinaryIndex stores ``nbytes``-byte codes at: the next width
    with a FAISS fast Hamming kernel (4, 8, 16, 20, 32, 64), else a multiple of 8."""
    nbytes = int(nbytes)
    if nbytes in _FAST_NBYTES:
        return nbytes
    for w in _FAST_NBYTES:
        if w > nbytes:
            return w
    return -(-nbytes // 8) * 8


def pad_codes(codes: np.ndarray, nbytes: int) -> np.ndarray:
    """Zero-pad uint8 codes [n, b] on the right to [n, nbytes] (no copy if already that wide)."""
    if codes.shape[1] == nbytes:
        return codes
    out = np.zeros((codes.shape[0], nbytes), np.uint8)
    out[:, :codes.shape[1]] = codes
    return out


def hamming_numpy(q: np.ndarray, db: np.ndarray) -> np.ndarray:
    """Reference Hamming distances: uint8 [m, B], uint8 [n, B] -> int32 [m, n] (for small inputs)."""
    x = np.bitwise_xor(q[:, None, :], db[None, :, :])
    return _POPCOUNT8[x].sum(axis=2, dtype=np.int32)


@dataclass
class IndexSpec:
    """Which FAISS binary index to build, with its parameters."""

    kind: str = "auto"  # resolved to "buckets" or "flat" by BinaryIndex.build
    hash_bits: int | None = None  # b for hash / multihash (default: min(bits, 16) / bits // nhash)
    nhash: int = 3
    nflip: int = 2
    params: dict[str, Any] = field(default_factory=dict)

    def check(self, bits: int) -> None:
        if self.kind not in INDEX_KINDS:
            raise DhfError(f"unknown index type {self.kind!r}; choose from {', '.join(INDEX_KINDS)}")
        if self.kind in ("hash", "multihash"):
            if self.hash_bits is not None and self.hash_bits < 1:
                raise DhfError(f"--hash-bits must be at least 1, got {self.hash_bits}")
            if self.kind == "multihash" and self.nhash < 1:
                raise DhfError(f"--nhash must be at least 1, got {self.nhash}")
            b = self.resolved_hash_bits(bits)
            if not 1 <= b <= min(bits, 63):
                raise DhfError(f"hash bits must be in 1..{min(bits, 63)}, got {b}")
            if self.kind == "multihash" and b * self.nhash > bits:
                raise DhfError(f"multihash needs nhash * b <= {bits} bits, got {self.nhash} x {b}")
            if self.nflip < 0:
                raise DhfError("nflip must be >= 0")

    def resolved_hash_bits(self, bits: int) -> int:
        if self.hash_bits:
            return int(self.hash_bits)
        if self.kind == "multihash":
            return max(1, min(bits // max(1, self.nhash), 24))
        return min(bits, 16)

    def to_dict(self, bits: int) -> dict[str, Any]:
        if self.kind == "auto":
            raise DhfError("index type 'auto' must be resolved before it is saved (resolve_auto_kind)")
        d: dict[str, Any] = {"type": self.kind}
        if self.kind == "hash":
            d.update(b=self.resolved_hash_bits(bits), nflip=self.nflip)
        elif self.kind == "multihash":
            d.update(b=self.resolved_hash_bits(bits), nhash=self.nhash, nflip=self.nflip)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IndexSpec":
        return cls(kind=d.get("type", "flat"), hash_bits=d.get("b"), nhash=int(d.get("nhash", 3)),
                   nflip=int(d.get("nflip", 2)))


def make_faiss_index(bits: int, spec: IndexSpec, stored_bits: int | None = None):
    """An empty FAISS binary index for ``bits``-bit codes (stored as ``stored_bits`` >= bits,
    zero-padded; hash bits are taken from the first ``bits`` bits either way)."""
    import faiss

    spec.check(bits)
    d = int(stored_bits or bits)
    if spec.kind in ("flat", "buckets", "auto"):
        return faiss.IndexBinaryFlat(d)
    b = spec.resolved_hash_bits(bits)
    if spec.kind == "hash":
        idx = faiss.IndexBinaryHash(d, b)
    else:
        idx = faiss.IndexBinaryMultiHash(d, spec.nhash, b)
    idx.nflip = spec.nflip
    return idx


class BinaryIndex:
    """A FAISS binary index over database codes, with deterministic result order.

    Ids are row numbers 0..ntotal-1 in insertion order. ``deleted`` (a bool mask over
    ids) hides rows from every search.
    """

    def __init__(self, faiss_index, spec: IndexSpec, bits: int):
        self.index = faiss_index
        self.spec = spec
        self.bits = int(bits)  # logical code width; the FAISS index may be zero-padded wider
        self.nbytes = self.bits // 8
        self.stored_nbytes = int(faiss_index.code_size)
        if self.stored_nbytes < self.nbytes:
            raise DhfError(f"code index has {self.stored_nbytes * 8} bits, fewer than {self.bits}")
        self.deleted: np.ndarray | None = None

    @classmethod
    def build(cls, codes: np.ndarray, spec: IndexSpec | None = None, pad: bool = True) -> "BinaryIndex":
        """Index uint8 codes [n, nbytes] (``pad``: store them zero-padded to a fast width)."""
        codes = _as_codes(codes)
        spec = spec or IndexSpec()
        if spec.kind == "auto":  # resolved in place: the caller's spec then saves the chosen type
            spec.kind = resolve_auto_kind(codes)
        if spec.kind == "buckets":
            return BucketIndex.build(codes, spec, pad=pad)  # same interface as BinaryIndex
        bits = codes.shape[1] * 8
        stored = padded_nbytes(codes.shape[1]) * 8 if pad else bits
        idx = cls(make_faiss_index(bits, spec, stored), spec, bits)
        idx.add(codes)
        return idx

    def add(self, codes: np.ndarray) -> None:
        """Append uint8 codes [n, nbytes]; they get the next ids."""
        codes = _as_codes(codes)
        if codes.shape[1] != self.nbytes:
            raise DhfError(f"codes have {codes.shape[1] * 8} bits, the index {self.bits}")
        if len(codes):
            self.index.add(pad_codes(codes, self.stored_nbytes))

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def save(self, path: str) -> None:
        import faiss

        faiss.write_index_binary(self.index, path)

    @classmethod
    def load(cls, path: str, spec: IndexSpec, bits: int | None = None) -> "BinaryIndex":
        """Read ``codes.index``. ``bits``: the logical code width (the manifest's); the file
        may hold the codes zero-padded wider. An unpadded flat index of a slow width is
        re-padded in memory (a copy of the codes)."""
        import faiss

        if not os.path.exists(path):
            raise DhfError(f"code index missing: {path}")
        if spec.kind == "buckets" or _is_bucket_file(path):
            return BucketIndex.load(path, spec, bits)
        try:
            idx = faiss.read_index_binary(path)
        except RuntimeError as err:
            raise DhfError(f"cannot read code index {path}: {str(err).splitlines()[0][:160]}") from None
        bits = int(bits or idx.d)
        if idx.d < bits:
            raise DhfError(f"code index {path} has {idx.d} bits, expected {bits}")
        if isinstance(idx, faiss.IndexBinaryFlat) and idx.d == bits and padded_nbytes(bits // 8) * 8 != bits:
            codes = faiss.vector_to_array(idx.xb).reshape(-1, bits // 8)
            padded = faiss.IndexBinaryFlat(padded_nbytes(bits // 8) * 8)
            if len(codes):
                padded.add(pad_codes(codes, padded.code_size))
            idx = padded
        return cls(idx, spec, bits)

    def _check_queries(self, q: np.ndarray) -> np.ndarray:
        q = _as_codes(q)
        if q.shape[1] != self.nbytes:
            raise DhfError(f"query codes have {q.shape[1] * 8} bits, the index {self.bits}")
        return pad_codes(q, self.stored_nbytes)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Hamming k-NN (BCS).

        Args:
            q: uint8 [m, nbytes].
            k: neighbours per query (>= 1); fewer live rows than k pad with id -1.
        Returns:
            (D int32 [m, k], I int64 [m, k]) ordered by (distance, id).
        """
        q = self._check_queries(q)
        if k < 1:
            raise DhfError("k must be at least 1")
        m = len(q)
        n_del = int(self.deleted.sum()) if self.deleted is not None else 0
        kk = min(self.ntotal, k + n_del)
        if kk == 0 or m == 0:
            return np.full((m, k), np.iinfo(np.int32).max, np.int32), np.full((m, k), -1, np.int64)
        D, I = self.index.search(q, kk)
        D, I = D.astype(np.int32), I.astype(np.int64)
        # FAISS heaps compare (distance, id) pairs, so the k kept are the k smallest by
        # (distance, id), in that order: a stable sort's ties (tested against numpy).
        return _finish_knn(D, I, k, self.deleted)

    def range_search(self, q: np.ndarray, radius: int, max_candidates: int | None = None):
        """All codes at Hamming distance < ``radius`` (FAISS semantics), nearest first.

        Args:
            q: uint8 [m, nbytes].
            radius: strict upper bound on the distance (>= 0).
            max_candidates: keep at most this many per query (nearest, then lowest id).
        Returns:
            (lims int64 [m + 1], D int32 [lims[-1]], I int64 [lims[-1]]): query i's
            results are ``I[lims[i]:lims[i+1]]``, ordered by (distance, id).
        """
        q = self._check_queries(q)
        if radius < 0:
            raise DhfError("radius must be >= 0")
        if len(q) == 0 or self.ntotal == 0 or radius == 0:
            return np.zeros(len(q) + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64)
        lims, D, I = self.index.range_search(q, int(radius))
        return sort_and_cap(lims.astype(np.int64), D.astype(np.int32), I.astype(np.int64),
                            max_candidates, self.deleted)


def sort_and_cap(lims, D, I, max_candidates=None, deleted=None):
    """Order each query's results by (distance, id), drop deleted ids, cap at ``max_candidates``.

    Args / returns: FAISS CSR layout (lims int64 [m + 1], D int32, I int64).
    """
    m = len(lims) - 1
    qid = np.repeat(np.arange(m, dtype=np.int64), np.diff(lims))
    if deleted is not None and len(I):
        keep = ~deleted[I]
        qid, D, I = qid[keep], D[keep], I[keep]
    if max_candidates is not None and len(I) > m * max_candidates and int(D.min()) >= 0:
        # Huge pools (supervised codes): keep per query only the distances up to the one
        # where the cap is reached, before sorting (the nearest max_candidates are in there)
        dspan = int(D.max()) + 1
        hist = np.bincount(qid * dspan + D, minlength=m * dspan).reshape(m, dspan)
        reach = hist.cumsum(1) >= max_candidates
        thr = np.where(reach.any(1), reach.argmax(1), dspan - 1)
        keep = D <= thr[qid]
        qid, D, I = qid[keep], D[keep], I[keep]
    counts = np.bincount(qid, minlength=m)
    if len(I):
        # One int64 key (query | distance | id), bit-packed; sorting the keys themselves
        # (numpy's SIMD sort) and unpacking with shifts is ~5-10x faster than a 3-key
        # lexsort. Ids are unique within a query, so the order is the same.
        dbits = max(1, int(D.max()).bit_length())
        ibits = max(1, int(I.max()).bit_length())
        qbits = max(1, m.bit_length())
        if qbits + dbits + ibits <= 63 and int(D.min()) >= 0 and int(I.min()) >= 0:
            key = qid << (dbits + ibits)
            key |= D.astype(np.int64) << ibits
            key |= I
            key.sort()
            I = key & ((1 << ibits) - 1)
            key >>= ibits
            D = (key & ((1 << dbits) - 1)).astype(np.int32)
        else:
            order = np.lexsort((I, D, qid))
            D, I = D[order], I[order]
    if max_candidates is not None and len(I):
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rank = np.arange(len(I)) - np.repeat(starts, counts)
        sel = rank < max_candidates
        D, I = D[sel], I[sel]
        counts = np.minimum(counts, max_candidates)
    lims = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return lims, D, I


def _finish_knn(D, I, k, deleted):
    m = len(D)
    if deleted is not None:
        live = (I >= 0) & ~deleted[np.maximum(I, 0)]
        D2 = np.full((m, k), np.iinfo(np.int32).max, np.int32)
        I2 = np.full((m, k), -1, np.int64)
        for i in range(m):
            sel = np.flatnonzero(live[i])[:k]
            D2[i, :len(sel)], I2[i, :len(sel)] = D[i, sel], I[i, sel]
        return D2, I2
    if D.shape[1] >= k:
        return D[:, :k], I[:, :k]
    padD = np.full((m, k - D.shape[1]), np.iinfo(np.int32).max, np.int32)
    padI = np.full((m, k - D.shape[1]), -1, np.int64)
    return np.hstack([D, padD]), np.hstack([I, padI])


def _as_codes(codes) -> np.ndarray:
    codes = np.ascontiguousarray(codes)
    if codes.dtype != np.uint8 or codes.ndim != 2:
        raise DhfError(f"codes must be uint8 [n, nbytes], got {codes.dtype} {codes.shape}")
    return codes


# ------------------------------------------------------------------------ code dictionary

BUCKET_MAGIC = b"DHFBKT01"


def write_array_file(f, magic: bytes, header: dict, arrays: dict[str, np.ndarray], tail_key: str | None = None) -> int:
    """The dhf array-file layout (code dictionary, fine index): ``magic``, the JSON header's
    length (8 bytes, little-endian), the header, then ``arrays`` at 64-byte aligned offsets.
    ``header["arrays"]`` gets each array's {"offset", "dtype", "shape"}, and
    ``header[tail_key]`` (when given) the aligned offset after the last array, where the
    caller writes more. Returns that offset."""
    import json

    for _ in range(2):  # two passes: the offsets depend on the header's length
        hb = json.dumps(header, sort_keys=True).encode()
        pos = -(-(len(magic) + 8 + len(hb) + 64) // 64) * 64
        layout = {}
        for name, a in arrays.items():
            layout[name] = {"offset": pos, "dtype": a.dtype.str, "shape": list(a.shape)}
            pos = -(-(pos + a.nbytes) // 64) * 64
        header["arrays"] = layout
        if tail_key:
            header[tail_key] = pos
    hb = json.dumps(header, sort_keys=True).encode()
    f.write(magic)
    f.write(len(hb).to_bytes(8, "little"))
    f.write(hb)
    for name, a in arrays.items():
        f.seek(layout[name]["offset"])
        f.write(a.tobytes())
    return pos


def read_array_file_header(f, magic: bytes, what: str) -> dict:
    """The JSON header of a :func:`write_array_file` file open at its start.

    Raises:
        ValueError: the file does not start with ``magic`` (``what``: what it should be)."""
    import json

    if f.read(len(magic)) != magic:
        raise ValueError(f"not {what}")
    return json.loads(f.read(int.from_bytes(f.read(8), "little")))
# "auto" picks the dictionary when distinct codes / rows is at most this (the measured
# crossover: benchmarks/bench_route.py writes deephash_faiss/routing.json).
AUTO_BUCKETS_MAX_RATIO = 0.25


def _row_keys(codes: np.ndarray) -> np.ndarray:
    """One sortable key per code row: uint64 for codes of <= 8 bytes, else a void view."""
    nb = codes.shape[1]
    if nb <= 8:
        return np.ascontiguousarray(pad_codes(codes, 8)).view("<u8").ravel()
    return np.ascontiguousarray(codes).view(np.dtype((np.void, nb))).ravel()


def distinct_codes(codes: np.ndarray) -> int:
    """Number of distinct rows of uint8 codes [n, B]."""
    codes = _as_codes(codes)
    return int(len(np.unique(_row_keys(codes)))) if len(codes) else 0


def resolve_auto_kind(codes: np.ndarray) -> str:
    """``"buckets"`` when there are at least ``auto_buckets_min_rows`` codes and distinct codes /
    rows <= the measured crossover (:mod:`deephash_faiss.routing`), else ``"flat"``."""
    from .routing import thresholds

    n = len(codes)
    if n < int(thresholds().get("auto_buckets_min_rows", 4096)):
        return "flat"  # both take microseconds: keep the classic index
    ratio = float(thresholds().get("auto_buckets_max_ratio", AUTO_BUCKETS_MAX_RATIO))
    return "buckets" if distinct_codes(codes) <= ratio * n else "flat"


def _is_bucket_file(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(BUCKET_MAGIC)) == BUCKET_MAGIC
    except OSError:
        return False


def _ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + l) for each (s, l): int64 [lens.sum()]."""
    lens = np.asarray(lens, np.int64)
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    csum = np.cumsum(lens)
    shift = np.repeat(np.asarray(starts, np.int64) - (csum - lens), lens)
    return np.arange(total, dtype=np.int64) + shift


def _sort_pairs(D: np.ndarray, I: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order (distance int, id int64 >= 0) pairs by (distance, id) (one packed int64 key)."""
    if len(I) == 0:
        return D.astype(np.int32), I.astype(np.int64)
    ibits = max(1, int(I.max()).bit_length())
    key = (D.astype(np.int64) << ibits) | I
    key.sort()
    return (key >> ibits).astype(np.int32), key & ((1 << ibits) - 1)


class BucketIndex(BinaryIndex):
    """Code dictionary index: the distinct codes (a FAISS IndexBinaryFlat, zero-padded to a
    fast width like :class:`BinaryIndex`) and, per code, a posting list of the row ids that
    hold it, sorted by id.

    Arrays (flat, memory-mapped from the saved file):
        dict_codes uint8 [U, nbytes]; offsets int64 [U + 1]; ids int64 [n] — code ``c``'s
        rows are ``ids[offsets[c]:offsets[c + 1]]``, ascending.

    k-NN walks the codes in Hamming order (dictionary k-NN, widened until the distance level
    of the k-th live row is complete) and merges the posting lists by (distance, id); a code
    contributes at most its first ``k`` + (its deleted rows) ids. Radius pools are unions of
    the posting lists of the codes within the radius, cut at ``max_candidates`` the same way.
    Results are identical to :class:`BinaryIndex` over IndexBinaryFlat (ties, deletions,
    cap), at a cost set by the number of distinct codes U, not n.
    """

    def __init__(self, bits: int, dict_codes: np.ndarray, offsets: np.ndarray, ids: np.ndarray,
                 spec: IndexSpec | None = None, pad: bool = True):
        import faiss

        nb = int(bits) // 8
        stored = padded_nbytes(nb) if pad else nb
        dindex = faiss.IndexBinaryFlat(stored * 8)
        # the dictionary zero-padded to the stored width: the faiss index's codes, and what
        # _scan compares queries with
        self._padded = np.ascontiguousarray(pad_codes(np.ascontiguousarray(dict_codes, dtype=np.uint8), stored))
        if len(dict_codes):
            dindex.add(self._padded)
        super().__init__(dindex, spec or IndexSpec("buckets"), bits)
        self.dict_codes = dict_codes
        self.offsets = offsets
        self.ids = ids
        self.sizes = np.diff(np.asarray(offsets, np.int64))
        self._bucket_of: np.ndarray | None = None
        self._dkeys: np.ndarray | None = None
        self._masks: dict = {}
        self._live: np.ndarray | None = None
        self._live_f: np.ndarray | None = None
        self._del_counts: np.ndarray | None = None

    # -- deletions ----------------------------------------------------------------------
    @property
    def deleted(self):
        return self._deleted

    @deleted.setter
    def deleted(self, mask) -> None:
        self._deleted = mask
        self._live = self._live_f = self._del_counts = None

    def bucket_of_rows(self) -> np.ndarray:
        """int32 [n]: the dictionary code of each row (computed once)."""
        if self._bucket_of is None:
            b = np.empty(self.ntotal, np.int32)
            b[np.asarray(self.ids)] = np.repeat(np.arange(self.n_codes, dtype=np.int32), self.sizes)
            self._bucket_of = b
        return self._bucket_of

    def _counts(self) -> tuple[np.ndarray, np.ndarray]:
        """(live rows int64 [U], deleted rows int64 [U]) per code."""
        if self._live is None:
            d = self._deleted
            if d is None or not d.any():
                self._del_counts = np.zeros(self.n_codes, np.int64)
            else:
                self._del_counts = np.bincount(self.bucket_of_rows()[np.flatnonzero(d)],
                                               minlength=self.n_codes).astype(np.int64)
            self._live = self.sizes - self._del_counts
        return self._live, self._del_counts

    def _live_weights(self) -> np.ndarray:
        """float64 [U]: the live rows of each code as ``np.bincount`` weights (integer weights
        are converted on every call: 157 against 32 us for 25,000 codes)."""
        if self._live_f is None:  # (reset with the deletions, like _live)
            self._live_f = self._counts()[0].astype(np.float64)
        return self._live_f

    # -- building, saving ---------------------------------------------------------------
    @property
    def n_codes(self) -> int:
        return int(len(self.sizes))

    @property
    def ntotal(self) -> int:
        return int(len(self.ids))

    @classmethod
    def build(cls, codes: np.ndarray, spec: IndexSpec | None = None, pad: bool = True) -> "BucketIndex":
        """Index uint8 codes [n, nbytes]: one stable sort of the codes gives the dictionary
        and id-sorted posting lists."""
        codes = _as_codes(codes)
        n, nb = codes.shape
        if n == 0:
            return cls(nb * 8, np.zeros((0, nb), np.uint8), np.zeros(1, np.int64), np.zeros(0, np.int64), spec, pad)
        keys = _row_keys(codes)
        perm = np.argsort(keys, kind="stable").astype(np.int64)  # ties keep id order
        sk = keys[perm]
        starts = np.flatnonzero(np.concatenate([[True], sk[1:] != sk[:-1]]))
        offsets = np.concatenate([starts, [n]]).astype(np.int64)
        return cls(nb * 8, codes[perm[starts]], offsets, perm, spec, pad)

    def add(self, codes: np.ndarray) -> None:
        """Append uint8 codes [n, nbytes] (ids ntotal..); the dictionary is rebuilt."""
        codes = _as_codes(codes)
        if codes.shape[1] != self.nbytes:
            raise DhfError(f"codes have {codes.shape[1] * 8} bits, the index {self.bits}")
        if not len(codes):
            return
        old = self.row_codes()
        new = BucketIndex.build(np.vstack([old, codes]), self.spec, pad=self.stored_nbytes != self.nbytes)
        deleted = self._deleted
        self.__dict__.update(new.__dict__)
        if deleted is not None:
            mask = np.zeros(self.ntotal, bool)
            mask[:len(deleted)] = deleted
            self.deleted = mask

    def row_codes(self) -> np.ndarray:
        """uint8 [n, nbytes]: every row's code, by id."""
        return np.asarray(self.dict_codes)[self.bucket_of_rows()] if self.ntotal else \
            np.zeros((0, self.nbytes), np.uint8)

    def save(self, path: str) -> None:
        """One file: magic, a JSON header, then the three arrays 64-byte aligned (raw,
        little-endian; :meth:`load` memory-maps them)."""
        arrays = {"dict_codes": np.ascontiguousarray(self.dict_codes, np.uint8),
                  "offsets": np.ascontiguousarray(self.offsets, "<i8"),
                  "ids": np.ascontiguousarray(self.ids, "<i8")}
        header = {"bits": self.bits, "stored_nbytes": self.stored_nbytes, "n_codes": self.n_codes,
                  "ntotal": self.ntotal}
        with open(path, "wb") as f:
            end = write_array_file(f, BUCKET_MAGIC, header, arrays)
            f.truncate(max(f.tell(), end))

    @classmethod
    def load(cls, path: str, spec: IndexSpec, bits: int | None = None) -> "BucketIndex":
        try:
            with open(path, "rb") as f:
                header = read_array_file_header(f, BUCKET_MAGIC, "a dhf code-dictionary file")
            size = os.path.getsize(path)
            arrs = {}
            for name, a in header["arrays"].items():
                shape = tuple(a["shape"])
                nbytes = int(np.prod(shape)) * np.dtype(a["dtype"]).itemsize
                if a["offset"] + nbytes > size:
                    raise ValueError(f"{name} runs past the end of the file (truncated)")
                arrs[name] = (np.memmap(path, dtype=a["dtype"], mode="r", offset=a["offset"], shape=shape)
                              if nbytes else np.zeros(shape, a["dtype"]))
            fbits = int(header["bits"])
            offsets, ids = arrs["offsets"], arrs["ids"]
            if len(offsets) != int(header["n_codes"]) + 1 or len(ids) != int(header["ntotal"]) \
                    or int(offsets[-1]) != len(ids):
                raise ValueError("inconsistent dictionary arrays")
        except (ValueError, KeyError, TypeError, OSError) as err:
            raise DhfError(f"cannot read code index {path}: {err}") from None
        if bits is not None and fbits != int(bits):
            raise DhfError(f"code index {path} has {fbits} bits, expected {bits}")
        spec = spec if spec.kind == "buckets" else IndexSpec("buckets")
        return cls(fbits, np.asarray(arrs["dict_codes"]), offsets, ids, spec,
                   pad=int(header["stored_nbytes"]) != fbits // 8)

    # -- search -------------------------------------------------------------------------
    def _prefix_rows(self, codes: np.ndarray, dists: np.ndarray, limit: int | None, counts: bool = False):
        """(distance int32, ids int64) of the first ``limit`` + (deleted) rows of each code's
        posting list (all rows when ``limit`` is None), in code order; deleted rows dropped.
        With ``counts`` also the rows kept of each code: (D, I, int64 [len(codes)])."""
        live, dels = self._counts()
        sizes = self.sizes[codes]
        lens = sizes if limit is None else np.minimum(sizes, limit + dels[codes])
        pos = _ranges(np.asarray(self.offsets)[codes], lens)
        I = np.asarray(self.ids[pos], np.int64) if len(pos) else np.zeros(0, np.int64)
        D = np.repeat(np.asarray(dists, np.int32), lens)
        kept = np.asarray(lens, np.int64)
        if self._deleted is not None and len(I) and dels[codes].any():
            keep = ~self._deleted[I]
            D, I = D[keep], I[keep]
            if counts:  # the keep mask summed over each code's rows
                c, ends = np.concatenate([[0], np.cumsum(keep)]), np.cumsum(kept)
                kept = c[ends] - c[ends - kept]
        return (D, I, kept) if counts else (D, I)

    # Dictionary lookups. Codes of <= 8 bytes are uint64 keys (the dictionary is sorted by
    # key): distances by XOR + popcount over the whole dictionary (``scan``), or, for a large
    # dictionary, by probing the Hamming ball of radius <= BALL_RADIUS around the query
    # (every key within it, binary search: exact, cost independent of U), falling back to
    # the scan for queries whose ball holds too few rows. Wider codes use the FAISS index.
    BALL_RADIUS = 2
    #: reach() takes :meth:`_scan` (every code's distance, then a row-wise cut) up to this many
    #: (query, code) pairs, faiss's range search over the padded dictionary above. Measured
    #: (real-statistics codes, 2 cores): 1 query x 811 / 25,182 codes scan 0.081 / 0.089 ms,
    #: range search 0.095 / 0.103 ms; 200 queries x 811 / 25,182 codes scan 1.1 / 5.6 ms, range
    #: search 0.35 / 2.0 ms (the numpy popcount scan before: 1.4 / 11.0 ms).
    SCAN_REACH_MAX_PAIRS = 32_768
    #: _knn_codes takes faiss's k-NN over the padded dictionary (kc nearest codes, kc x 8 until
    #: the k-th row's level is complete; vectorized over the batch) from this many queries on,
    #: the scan of every code one query at a time below; dictionaries of KNN_BALL_MIN_CODES
    #: codes or more keep the Hamming ball first (each faiss round scans the whole dictionary).
    #: Measured (real-statistics codes, 200 queries, k = 10, bench_scale.py --codes-only, 2 cores,
    #: before the level-0 step took most queries): faiss 0.019 ms a query at 1e6 rows (10,413
    #: codes) against 0.071 for the per-query scan; 0.023 at 1e7 (37,756 codes) against the ball's
    #: 0.078; 0.195 at 1e8 (143,990 codes) against the ball's 0.116. Crossover (4-8 queries) of
    #: the per-query scan and faiss: 1 query 134 / 203 us, 8 queries 37 / 30 us a query (1e5 rows).
    KNN_FAISS_MIN_QUERIES = 8
    KNN_BALL_MIN_CODES = 75_000
    #: _knn_codes: codes asked of faiss's k-NN in its first round (then x 8 a round). Measured
    #: (``benchmarks/bench_knn_first_codes.py``, real-statistics smallcnn codes, 200 queries,
    #: k = 10, 2 cores; ``knn_first_codes_smallcnn.json``), batch ms for 16 / 32 / 64: 1e5 rows
    #: 4.03 / 3.48 / 2.78 (an earlier run 2.96 / 2.46 / 2.82), 2e5 3.80 / 3.20 / 3.73, 1e6 5.45 /
    #: 4.60 / 4.87, 1e7 26.0 / 26.5 / 26.0; the queries whose radius-3 pool is under k (the ones
    #: HDS tops up) 1.32 / 0.60 / 0.77 ms at 1e5 (17 queries), 2.23 / 1.50 / 1.55 at 1e6 (8).
    KNN_FIRST_CODES = 32
    #: reach() of a batch of at least REACH_FAISS_MIN_QUERIES queries takes faiss's range
    #: search over dictionaries of fewer than REACH_BALL_MIN_CODES codes even where k-NN probes
    #: the Hamming ball (``dict_ball_min_codes``): 200 queries x 60,963 / 154,878 codes 6.2 /
    #: 13.7 ms against the ball's 20.3 / 22.4 ms (about 0.44 ns a pair against 0.1 ms a query);
    #: single queries keep the ball (0.19 vs 0.26 ms at 154,878 codes).
    REACH_FAISS_MIN_QUERIES = 8
    REACH_BALL_MIN_CODES = 250_000

    def _keys(self) -> np.ndarray | None:
        if self.nbytes > 8:
            return None
        if self._dkeys is None:
            self._dkeys = _row_keys(np.asarray(self.dict_codes)) if self.n_codes else np.zeros(0, np.uint64)
        return self._dkeys

    def _use_ball(self) -> bool:
        from .routing import thresholds

        return self.nbytes <= 8 and self.n_codes >= int(thresholds().get("dict_ball_min_codes", 1 << 16))

    def _ball_batch(self, qkeys: np.ndarray, r: int):
        """The dictionary codes at distance <= r of every query, as flat arrays: (query int64,
        code int64, distance int32), grouped by query (one ``searchsorted`` for the batch)."""
        masks, pc = self._ball_masks(r)
        keys = self._keys()
        step = max(1, (1 << 22) // len(masks))  # queries per block: at most 4M probes
        out = []
        for s in range(0, len(qkeys), step):
            probes = (qkeys[s:s + step, None] ^ masks[None, :]).ravel()
            pos = np.searchsorted(keys, probes)
            pos[pos == len(keys)] = 0
            hit = np.flatnonzero(keys[pos] == probes)
            out.append((s + hit // len(masks), pos[hit].astype(np.int64), pc[hit % len(masks)]))
        if not out:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32)
        return tuple(np.concatenate(x) for x in zip(*out))

    def _ball_masks(self, r: int):
        """(XOR masks uint64 of every pattern of <= r bits, their popcounts int32), cached."""
        cache = self._masks
        if r not in cache:
            from itertools import combinations

            ms = [0] + [sum(1 << b for b in c) for rr in range(1, r + 1) for c in combinations(range(self.bits), rr)]
            masks = np.array(ms, np.uint64)
            cache[r] = (masks, np.bitwise_count(masks).astype(np.int32))
        return cache[r]

    def _scan(self, q: np.ndarray):
        """Per query distances int32 [U] to every dictionary code, for zero-padded query codes
        uint8 [m, stored_nbytes] (blocks of queries): faiss's ``hammings`` over the padded
        dictionary at a fast width (200 queries x 25,000 codes: 2.7 ms against 15 ms for numpy's
        popcount of uint64 keys), numpy otherwise."""
        import faiss

        fast = self.stored_nbytes in _FAST_NBYTES
        U = self.n_codes
        keys = None if fast else self._keys()
        step = max(1, (1 << 22) // max(1, U))
        for s in range(0, len(q), step):
            qb = np.ascontiguousarray(q[s:s + step], dtype=np.uint8)
            if fast:
                d = np.empty((len(qb), U), np.int32)
                faiss.hammings(faiss.swig_ptr(qb), faiss.swig_ptr(self._padded), len(qb), U, self.stored_nbytes,
                               faiss.swig_ptr(d))
            else:
                d = np.bitwise_count(_row_keys(qb[:, :self.nbytes])[:, None] ^ keys[None, :]).astype(np.int32)
            yield from d

    def _knn_codes(self, q: np.ndarray, need: int):
        """Every code up to the distance level of each query's ``need``-th live row (ordering
        within a query is left to the merge): (owner int64 [E] ascending, codes int64 [E],
        distances int32 [E])."""
        live, _ = self._counts()
        m, U = len(q), self.n_codes
        parts = []  # (owner, codes, distances) pieces
        if self.nbytes <= 8:
            qkeys = _row_keys(q[:, :self.nbytes])
            # level 0 first, for the whole batch: a query whose own code holds ``need`` live rows
            # needs no other code (trained codes collapse: most queries land in a big bucket)
            keys = self._keys()
            pos = np.minimum(np.searchsorted(keys, qkeys), U - 1)
            own = (keys[pos] == qkeys) & (live[pos] >= need)
            parts.append((np.flatnonzero(own), pos[own].astype(np.int64), np.zeros(int(own.sum()), np.int32)))
            todo = np.flatnonzero(~own)
            if len(todo) and self._use_ball() and (len(todo) < self.KNN_FAISS_MIN_QUERIES
                                                   or U >= self.KNN_BALL_MIN_CODES):
                # the Hamming ball of every remaining query at once: its levels 0..BALL_RADIUS
                # are complete, so a query whose ball holds need live rows is done
                R = self.BALL_RADIUS
                qi, c, d = self._ball_batch(qkeys[todo], R)
                qi = todo[qi]
                hist = np.bincount(qi * (R + 1) + d, weights=self._live_weights()[c],
                                   minlength=m * (R + 1)).reshape(m, R + 1)
                cum = np.cumsum(hist, axis=1)
                done = cum[:, -1] >= need
                level = (cum < need).sum(1)  # searchsorted(cum, need) per query
                sel = done[qi] & (d <= level[qi])
                parts.append((qi[sel], c[sel], d[sel]))
                todo = todo[~done[todo]]
            if len(todo) < self.KNN_FAISS_MIN_QUERIES:  # few queries: the scan, one query at a time
                for qi, d in zip(todo.tolist(), self._scan(q[todo])):
                    cum = np.cumsum(np.bincount(d, weights=self._live_weights(), minlength=self.bits + 1))
                    c = np.flatnonzero(d <= int(np.searchsorted(cum, need)))
                    parts.append((np.full(len(c), qi, np.int64), c, d[c]))
                todo = todo[:0]
        else:
            todo = np.arange(m)
        # the nearest kc codes of each query (faiss k-NN over the padded dictionary), kc x 8
        # until the level of the need-th live row is complete below the last code's distance
        kc = min(U, self.KNN_FIRST_CODES)
        while len(todo):
            Dd, Id = self.index.search(q[todo], kc)
            Id = Id.astype(np.int64)
            ok = np.ones(len(todo), bool) if kc >= U else (live[Id] * (Dd < Dd[:, -1:])).sum(1) >= need
            if ok.any():
                Do, Io = Dd[ok], Id[ok]
                at = np.minimum((np.cumsum(live[Io], axis=1) < need).sum(1), kc - 1)  # searchsorted(cum, need)
                r, c = np.nonzero(Do <= Do[np.arange(len(Do)), at][:, None])
                parts.append((todo[ok][r], Io[r, c], Do[r, c]))
            todo = todo[~ok]
            kc = min(U, kc * 8)
        parts = [p for p in parts if len(p[0])]
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32)
        owner, codes, d = parts[0] if len(parts) == 1 else (np.concatenate(x) for x in zip(*parts))
        if len(parts) > 1 and (np.diff(owner) < 0).any():  # level 0's queries, the ball's, the others
            o = np.argsort(owner, kind="stable")
            owner, codes, d = owner[o], codes[o], d[o]
        return owner, codes, np.asarray(d, np.int32)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Hamming k-NN, identical to :meth:`BinaryIndex.search` over IndexBinaryFlat: the
        codes up to each query's k-th live row (:meth:`_knn_codes`), the first rows of their
        posting lists, one sort of the whole batch by (query, distance, id).

        Args / returns: as :meth:`BinaryIndex.search` (D int32 [m, k], I int64 [m, k]).
        """
        q = self._check_queries(q)
        if k < 1:
            raise DhfError("k must be at least 1")
        m, U = len(q), self.n_codes
        outD = np.full((m, k), np.iinfo(np.int32).max, np.int32)
        outI = np.full((m, k), -1, np.int64)
        live, _ = self._counts()
        need = int(min(k, int(live.sum()))) if U else 0
        if need == 0 or m == 0:
            return outD, outI
        owner, codes, d = self._knn_codes(q, need)
        if m < self.KNN_FAISS_MIN_QUERIES:  # few queries: merge each one's rows apart (less overhead)
            at = np.searchsorted(owner, np.arange(m + 1)).tolist()
            for qi in range(m):
                D, I = _sort_pairs(*self._prefix_rows(codes[at[qi]:at[qi + 1]], d[at[qi]:at[qi + 1]], need))
                outD[qi, :min(need, len(I))], outI[qi, :min(need, len(I))] = D[:need], I[:need]
            return outD, outI
        D, I, kept = self._prefix_rows(codes, d, need, counts=True)
        lims = np.concatenate([[0], np.cumsum(np.bincount(owner, weights=kept, minlength=m))]).astype(np.int64)
        lims, D, I = sort_and_cap(lims, D, I, need)  # rows come grouped by query
        counts = np.diff(lims)
        qid = np.repeat(np.arange(m), counts)
        rank = np.arange(len(I)) - np.repeat(lims[:-1], counts)
        outD[qid, rank], outI[qid, rank] = D, I
        return outD, outI

    def reach(self, q: np.ndarray, radius: int, ordered: bool = True):
        """The dictionary codes at Hamming distance < ``radius`` of each query.

        Returns (lims int64 [m + 1], D int32, codes int64) in FAISS CSR layout, each query's
        codes ordered by (distance, code number), or in any order with ``ordered=False``
        (callers that rank the codes themselves skip the sort)."""
        q = self._check_queries(q)
        if radius < 0:
            raise DhfError("radius must be >= 0")
        m = len(q)
        if m == 0 or self.n_codes == 0 or radius == 0:
            return np.zeros(m + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64)
        ball = (self._use_ball() and radius - 1 <= self.BALL_RADIUS
                and (m < self.REACH_FAISS_MIN_QUERIES or self.n_codes >= self.REACH_BALL_MIN_CODES))
        small = m * self.n_codes <= self.SCAN_REACH_MAX_PAIRS
        if self.nbytes <= 8 and (ball or small or self.stored_nbytes not in _FAST_NBYTES):
            # the Hamming ball (single queries, huge dictionaries), or the scan (few pairs, or
            # an unpadded odd width); else faiss's range search over the zero-padded dictionary
            if ball:
                qi, I, D = self._ball_batch(_row_keys(q[:, :self.nbytes]), int(radius) - 1)
                lims = np.concatenate([[0], np.cumsum(np.bincount(qi, minlength=m))])
            else:
                per = []
                for d in self._scan(q):
                    c = np.flatnonzero(d < radius)
                    per.append((c, d[c]))
                if m == 1:  # (a single query: its arrays as they are)
                    (I, D), lims = per[0], np.array([0, len(per[0][0])], np.int64)
                else:
                    lims = np.concatenate([[0], np.cumsum([len(c) for c, _ in per])])
                    I = np.concatenate([c for c, _ in per])
                    D = np.concatenate([d for _, d in per])
        else:
            lims, D, I = self.index.range_search(q, int(radius))
        lims, D, I = lims.astype(np.int64, copy=False), D.astype(np.int32, copy=False), I.astype(np.int64, copy=False)
        return sort_and_cap(lims, D, I) if ordered else (lims, D, I)

    def pool_sizes(self, q: np.ndarray, radius: int) -> np.ndarray:
        """int64 [m]: live rows at Hamming distance < ``radius`` of each query (the radius pool
        sizes, from the dictionary alone: no posting list is read)."""
        lims, _, codes = self.reach(q, radius)
        live, _ = self._counts()
        c = np.concatenate([[0], np.cumsum(live[codes])]) if len(codes) else np.zeros(1, np.int64)
        return (c[lims[1:]] - c[lims[:-1]]).astype(np.int64)

    def range_search(self, q: np.ndarray, radius: int, max_candidates: int | None = None):
        """Rows at Hamming distance < ``radius``: the union of the posting lists of the codes
        within the radius, ordered by (distance, id), deleted rows dropped, cut at
        ``max_candidates`` (each code then contributes at most its first max_candidates live
        rows). Identical to :meth:`BinaryIndex.range_search` over IndexBinaryFlat."""
        return self.pool_rows(*self.reach(q, radius), max_candidates)

    #: :meth:`pool_rows` of one query over at most this many rows: one lexsort of its rows
    #: (the batch machinery's few dozen numpy calls cost a small pool's single query ~0.1 ms).
    POOL_ROWS_ONE_MAX = 4096

    def pool_rows(self, lims_c: np.ndarray, Dc: np.ndarray, Ic: np.ndarray, max_candidates: int | None = None):
        """The rows of reached codes: :meth:`range_search` from a :meth:`reach` result
        (lims_c int64 [m + 1], Dc int32, Ic int64; each query's codes nearest first), so a
        caller that already has the reach does not resolve the radius again.

        A single query may give its codes in any order; where they hold at most
        ``POOL_ROWS_ONE_MAX`` rows (deleted ones included) its rows are sorted in one lexsort.

        Returns (lims int64 [m + 1], D int32, I int64), rows by (distance, id), deleted rows
        dropped, cut at ``max_candidates``."""
        m = len(lims_c) - 1
        if m == 1:
            if int(self.sizes[Ic].sum()) <= self.POOL_ROWS_ONE_MAX:
                D, I = self._prefix_rows(Ic, Dc, None)
                o = np.lexsort((I, D))[:max_candidates]
                return np.array([0, len(o)], np.int64), D[o].astype(np.int32, copy=False), I[o]
            o = np.lexsort((Ic, Dc))  # (its codes nearest first, as below)
            Dc, Ic = Dc[o], Ic[o]
        owner = np.repeat(np.arange(m, dtype=np.int64), np.diff(lims_c))
        if max_candidates is not None and len(Ic):
            # levels past the one where the cap is reached cannot contribute: per query, the
            # first code where its running count of live rows reaches the cap sets the last
            # distance kept (the whole batch at once; segments of one cumulative sum)
            live, _ = self._counts()
            cum = np.cumsum(live[Ic])
            before = np.concatenate([[0], cum])[lims_c[:-1]]  # live rows of the earlier queries
            pos = np.maximum(np.searchsorted(cum, before + max_candidates), lims_c[:-1])  # first reaching it
            cut = pos < lims_c[1:]  # the cap is reached within the query's own codes
            thr = np.full(m, np.iinfo(np.int32).max, np.int64)
            thr[cut] = Dc[pos[cut]]
            keep = Dc <= thr[owner]
            Ic, Dc, owner = Ic[keep], Dc[keep], owner[keep]
        D, I, kept = self._prefix_rows(Ic, Dc, max_candidates, counts=True)
        counts = np.bincount(owner, weights=kept, minlength=m).astype(np.int64)
        lims = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        # deleted rows are already gone; order and cap
        return sort_and_cap(lims, D.astype(np.int32), I.astype(np.int64), max_candidates, None)
