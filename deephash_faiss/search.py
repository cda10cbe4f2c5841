"""BCS, HDS and ES over an index directory.

* **BCS** (binary code search): Hamming k-NN over the codes, ties by id.
* **HDS** (Hamming distance search + rerank, the paper's coarse-to-fine search): the pool
  is every database code at Hamming distance < ``radius`` from the query, nearest first,
  capped at ``max_candidates``; if that holds fewer than k images it is topped up with
  the Hamming k-NN. The pool is ranked by squared L2 on fc7 and the top k returned.
* **ES** (exhaustive search): exact L2 k-NN over all fc7 features.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .errors import DhfError
from .index import BinaryIndex, IndexSpec
from .rerank import exhaustive_knn, pick_backend, rank_pools_cpu
from .store import FeatureStore, read_manifest

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
    """Hamming distances of one query uint8 [B] to codes uint8 [n, B] -> int32 [n]."""
    x = np.bitwise_xor(codes, q[None])
    return np.unpackbits(x, axis=1).sum(1, dtype=np.int32) if len(x) else np.zeros(0, np.int32)


def dispatch_mode(searcher, mode: str, qcodes, qfeats, k: int, radius: int, max_candidates: int | None):
    """Run ``mode`` ("bcs", "hds" or "es") on any object with ``bcs``/``hds``/``es`` methods
    (:class:`Searcher`, :class:`deephash_faiss.distributed.ShardedSearcher`)."""
    if mode == "bcs":
        return searcher.bcs(qcodes, k)
    if mode == "hds":
        return searcher.hds(qcodes, qfeats, k, radius, max_candidates)
    if mode == "es":
        return searcher.es(qfeats, qcodes, k)
    raise DhfError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")


MAX_CANDIDATES_LIMIT = 2**31 - 1  # the largest pool cap every backend (faiss, torch, Triton) takes


def check_search_args(k: int, radius: int | None, max_candidates: int | None, live: int,
                      bits: int | None = None) -> None:
    """Refuse search parameters no backend can honour, with one :class:`DhfError` line.

    The one check of k, radius and max_candidates, shared by the CLI, the Python API
    (:class:`Searcher`, ``ShardedSearcher``) and the service.

    Args:
        k: results per query, at least 1.
        radius: HDS pool radius (Hamming distance < radius), 0 to ``bits + 1`` (which
            pools every code); None when the mode takes none.
        max_candidates: HDS pool cap, 1 to ``MAX_CANDIDATES_LIMIT``; None for no cap.
        live: live (not deleted) rows of the index; 0 is refused.
        bits: code length; None skips the upper bound on ``radius``.
    """
    # messages name the API argument, then the CLI option: "k must be at least 1 (-k)"
    for name, opt, v in (("k", "-k", k), ("radius", "--radius", radius),
                         ("max_candidates", "--max-candidates", max_candidates)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
            raise DhfError(f"{name} must be an integer, not {type(v).__name__} ({opt})")
    if k < 1:
        raise DhfError("k must be at least 1 (-k)")
    if radius is not None:
        if radius < 0:
            raise DhfError("radius must be >= 0 (--radius)")
        if bits is not None and radius > bits + 1:
            raise DhfError(f"radius {radius} is above the code length: it must be between 0 and {bits + 1} "
                           f"(pools hold distances < radius; {bits + 1} pools every code) (--radius)")
    if max_candidates is not None and not 1 <= max_candidates <= MAX_CANDIDATES_LIMIT:
        raise DhfError(f"max_candidates must be between 1 and {MAX_CANDIDATES_LIMIT} (--max-candidates)")
    if live == 0:
        raise DhfError("the index is empty")


def hamming_pools(code_index, qcodes: np.ndarray, k: int, radius: int, max_candidates: int | None,
                  live: int):
    """HDS candidate pools from a code index (:class:`BinaryIndex` or :class:`GpuCodeIndex`).

    Each query's pool is every code at Hamming distance < ``radius``, nearest first by
    (distance, id), cut at ``max_candidates``; a pool of fewer than k codes is topped up
    with the Hamming k-NN (``live``: the number of live codes bounds that k).

    Args:
        qcodes: uint8 [m, B].
    Returns:
        list of m (ids int64 [p], hamming int32 [p], truncated bool).
    """
    lims, D, I = code_index.range_search(qcodes, radius, max_candidates)
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
            extra = ~np.isin(i2[ok], ids)
            ids = np.concatenate([ids, i2[ok][extra]])
            ham = np.concatenate([ham, d2[ok][extra]])
        out.append((ids, ham.astype(np.int32), truncated))
    return out


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
        code_backend: "auto" (the GPU kernels of :mod:`deephash_faiss.gpu` when ``device``
            is CUDA, else the FAISS index), "faiss" or "gpu" (the torch path, also on CPU).
    """

    def __init__(self, index_dir: str, device: str = "auto", features_in_memory: bool = False,
                 code_backend: str = "auto"):
        from .model import resolve_device

        self.index_dir = index_dir
        self.manifest = read_manifest(index_dir)
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
        self.backend = pick_backend(str(self.device))
        if code_backend not in ("auto", "faiss", "gpu"):
            raise DhfError(f"unknown code backend {code_backend!r} (auto, faiss or gpu)")
        if code_backend == "auto":
            code_backend = "gpu" if self.device.type == "cuda" else "faiss"
        self.code_backend = code_backend
        self._codes_index = (GpuCodeIndex(self.codes(), self.index, self.device) if code_backend == "gpu"
                             else self.index)
        if features_in_memory:
            self.store.load_features()
            if self.device.type == "cuda":
                self._gpu_features()

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

            if not self.manifest["model"].get("file"):
                raise DhfError(f"{self.index_dir} has no model: it was built from arrays; search it by codes")
            path = os.path.join(self.index_dir, self.manifest["model"]["file"])
            model = load_model(path, self.device)
            if model.config.bits != self.bits:
                raise DhfError(f"model has {model.config.bits} bits, the index {self.bits}")
            if model.config.feature_dim != self.store.dim:
                raise DhfError(f"model has {model.config.feature_dim}-d features but the index "
                               f"{self.store.dim}-d")
            self._model = model
        return self._model

    def set_model(self, model) -> None:
        """Use another model for queries (it must produce the index's bits and feature size)."""
        if model.config.bits != self.bits:
            raise DhfError(f"model has {model.config.bits}-bit codes but the index has {self.bits}-bit codes")
        if model.config.feature_dim != self.store.dim:
            raise DhfError(f"model has {model.config.feature_dim}-d features but the index {self.store.dim}-d")
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
            for p, c, f, b in encode_paths(self.model, list(paths), self.device, batch_size):
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
        t0 = time.perf_counter()
        D, I = self._codes_index.search(qcodes, min(k, self.live_count()))
        ms = (time.perf_counter() - t0) * 1e3
        res = []
        for d, i in zip(D, I):
            ok = i >= 0
            res.append(QueryResult(i[ok], d[ok], np.full(ok.sum(), np.nan, np.float32), self.live_count()))
        return SearchBatch("bcs", res, ms)

    def pools(self, qcodes: np.ndarray, k: int, radius: int, max_candidates: int | None):
        """HDS candidate pools: list of (ids int64 [p], hamming int32 [p], truncated)."""
        return hamming_pools(self._codes_index, qcodes, k, radius, max_candidates, self.live_count())

    def hds(self, qcodes: np.ndarray, qfeats: np.ndarray, k: int, radius: int = DEFAULT_RADIUS,
            max_candidates: int | None = DEFAULT_MAX_CANDIDATES) -> SearchBatch:
        """Pool by Hamming radius, rank the pool by L2 on fc7. qfeats float32 [m, D]."""
        self._check(k, radius, max_candidates)
        t0 = time.perf_counter()
        if (self.code_backend == "gpu" and self.backend == "torch"
                and (self.index.deleted is None or not self.index.deleted.any())):
            out = hds_device(self._codes_index.gpu, self._gpu_features(), qcodes, qfeats, k, radius,
                             max_candidates, norms=self._gpu_norms())
            res = [QueryResult(ids, ham, dist, size, trunc) for ids, ham, dist, size, trunc in out]
            return SearchBatch("hds", res, (time.perf_counter() - t0) * 1e3, {"device": str(self.device)})
        pools = self.pools(qcodes, k, radius, max_candidates)
        t1 = time.perf_counter()
        if self.backend == "torch":
            import torch

            from .rerank import rank_pools_torch_ids

            q = torch.as_tensor(np.asarray(qfeats, np.float32), device=self.device)
            ranked = rank_pools_torch_ids(q, self._gpu_features(), [ids for ids, _, _ in pools], k,
                                          norms=self._gpu_norms())
        else:
            # per-pool sorted gathers + blocked dot products (one union gather + GEMM when
            # the batch's pools overlap heavily): rerank.rank_pools_cpu
            ranked = rank_pools_cpu(qfeats, [ids for ids, _, _ in pools], self.store.gather, k)
        res = []
        for (ids, ham, trunc), (order, dist) in zip(pools, ranked):
            res.append(QueryResult(ids[order], ham[order], dist, len(ids), trunc))
        t2 = time.perf_counter()
        return SearchBatch("hds", res, (t2 - t0) * 1e3, {"pool_ms": (t1 - t0) * 1e3, "rerank_ms": (t2 - t1) * 1e3})

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
               radius: int = DEFAULT_RADIUS, max_candidates: int | None = DEFAULT_MAX_CANDIDATES) -> SearchBatch:
        """Dispatch to :meth:`bcs`, :meth:`hds` or :meth:`es`."""
        return dispatch_mode(self, mode, qcodes, qfeats, k, radius, max_candidates)

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
