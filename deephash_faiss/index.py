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

Search results are always ordered by (Hamming distance, database id), so ties are
deterministic and equal a stable sort of the distances.

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

INDEX_KINDS = ("flat", "hash", "multihash")
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

    kind: str = "flat"
    hash_bits: int | None = None  # b for hash / multihash (default: min(bits, 16) / bits // nhash)
    nhash: int = 3
    nflip: int = 2
    params: dict[str, Any] = field(default_factory=dict)

    def check(self, bits: int) -> None:
        if self.kind not in INDEX_KINDS:
            raise DhfError(f"unknown index type {self.kind!r}; choose from {', '.join(INDEX_KINDS)}")
        if self.kind in ("hash", "multihash"):
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
    if spec.kind == "flat":
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
