"""Squared-L2 ranking of candidate pools (HDS) and exhaustive L2 search (ES).

Backends:

* ``"torch"`` — ``|q|^2 - 2 q.X^T + |X|^2`` in torch on the features' device: the GPU
  flat L2 search when the features live on CUDA (:mod:`deephash_faiss.gpu`).
* ``"faiss-gpu"`` — ``faiss.knn_gpu`` when a GPU build of faiss is importable.
* ``"faiss"`` — CPU: ``faiss.pairwise_distances`` for pools, ``faiss.knn`` (the
  IndexFlatL2 kernel) for exhaustive search.

Equal distances are ordered by id, so results are deterministic.
"""

from __future__ import annotations

import numpy as np

from .errors import DhfError


def faiss_has_gpu() -> bool:
    try:
        import faiss

        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:  # noqa: BLE001
        return False


def pick_backend(device: str) -> str:
    """The L2 backend for a device: on CUDA "faiss-gpu" when a GPU build of faiss is
    importable (used for ES) else "torch"; "faiss" on CPU. HDS pools are always ranked with
    torch on CUDA (gather-then-compute: faiss-gpu ignores id filters)."""
    if str(device).startswith("cuda"):
        return "faiss-gpu" if faiss_has_gpu() else "torch"
    return "faiss"


_GPU_RESOURCES = None


def _faiss_knn(xq: np.ndarray, xb: np.ndarray, k: int, use_gpu: bool):
    """faiss's flat L2 k-NN: ``faiss.knn`` on CPU, ``faiss.knn_gpu`` (faiss-gpu) on the GPU."""
    import faiss

    if not use_gpu:
        return faiss.knn(xq, xb, k)
    global _GPU_RESOURCES
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    return faiss.knn_gpu(_GPU_RESOURCES, xq, xb, k)


def rank_pool(q: np.ndarray, feats: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rank one query's candidate pool by squared L2 (CPU, faiss).

    Args:
        q: float [D]; feats: float [n, D] (float16 is upcast).
        k: keep the k nearest (None: all).
    Returns:
        (local indices int64 [k'] into ``feats``, squared distances float32 [k']), nearest
        first, ties by index.
    """
    import faiss

    if len(feats) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    qf = np.ascontiguousarray(q, dtype=np.float32).reshape(1, -1)
    xf = np.ascontiguousarray(feats, dtype=np.float32)
    d = faiss.pairwise_distances(qf, xf)[0]
    order = np.argsort(d, kind="stable")
    if k is not None:
        order = order[:k]
    return order.astype(np.int64), d[order].astype(np.float32)


def rank_pools_cpu(qfeats: np.ndarray, ids_list, gather, k: int | None = None):
    """Rank a batch of candidate pools by squared L2 on CPU (HDS rerank).

    ``gather(ids) -> [len(ids), D]`` fetches feature rows (e.g. :meth:`FeatureStore.gather`,
    which reads sorted), or is the features themselves (float32 [n, D] in RAM). Pools of at most ``SMALL_POOL`` rows are ranked in one padded batch
    (:func:`l2_by_ids`). When the pools overlap heavily (queries x union <= 4 x total
    pool entries: supervised codes, queries of one class share a pool) the union is
    gathered once and scored with one GEMM; otherwise each pool is gathered and scored
    as |x|^2 - 2 x.q + |q|^2 in cache-sized row blocks (:func:`_norms_dots`). float16
    features are upcast to float32.

    Args:
        qfeats: float [m, D]; ids_list: m int64 arrays of database ids.
        k: keep the k nearest per query (None: all).
    Returns:
        list of m (local indices int64 [k_i] into ``ids_list[i]``, squared distances
        float32 [k_i]), nearest first, ties by local index (like :func:`rank_pool`).
    """
    m = len(ids_list)
    sizes = np.array([len(x) for x in ids_list], dtype=np.int64)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.float32))
    if m == 0 or sizes.sum() == 0:
        return [empty for _ in range(m)]
    q = np.ascontiguousarray(qfeats, dtype=np.float32).reshape(m, -1)
    feats = gather if isinstance(gather, np.ndarray) else None
    if feats is not None:
        gather = feats.__getitem__
    P = int(sizes.max())
    if m == 1 and P <= SMALL_POOL:  # one small pool: as below, without the padding
        d = l2_by_ids(q, np.asarray(ids_list[0], np.int64)[None], gather if feats is None else feats)[0]
        order = np.argsort(d, kind="stable")[:P if k is None else min(k, P)]
        return [(order.astype(np.int64, copy=False), d[order])]
    if P <= SMALL_POOL and m * P <= 4 * int(sizes.sum()):
        # small pools (the fine index's exact path): one padded batch, no per-pool loop
        pad = np.full((m, P), -1, np.int64)
        pad[np.arange(P)[None, :] < sizes[:, None]] = np.concatenate([np.asarray(x, np.int64) for x in ids_list])
        d = l2_by_ids(q, pad, gather if feats is None else feats)
        order = np.argsort(d, axis=1, kind="stable")  # ties by local index; padding (inf) last
        kk = [int(n) if k is None else min(k, int(n)) for n in sizes]
        return [(order[i, :kk[i]].astype(np.int64), d[i, order[i, :kk[i]]]) for i in range(m)]
    qn = np.einsum("ij,ij->i", q, q)
    allids = np.concatenate([np.asarray(x, dtype=np.int64) for x in ids_list])
    uniq, inv = np.unique(allids, return_inverse=True)
    u = len(uniq)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    # Heavy overlap (queries of one class share a pool): gather the union once and do one
    # GEMM. Otherwise gather each pool (one sorted read each) and do a GEMV: copying a
    # union much larger than the pools would cost more than it saves.
    use_gemm = m * u <= 4 * int(sizes.sum()) and m * u <= (1 << 27)
    if use_gemm:
        fu = np.ascontiguousarray(gather(uniq), dtype=np.float32)
        norms_u = np.einsum("ij,ij->i", fu, fu)
        dots_all = q @ fu.T
    out = []
    for i in range(m):
        if sizes[i] == 0:
            out.append(empty)
            continue
        if use_gemm:
            loc = inv[starts[i]:starts[i + 1]]
            dots, norms = dots_all[i, loc], norms_u[loc]
        else:
            x = gather(np.asarray(ids_list[i], dtype=np.int64))
            norms, dots = _norms_dots(x, q[i])
        d = norms - 2 * dots + qn[i]
        np.maximum(d, 0, out=d)
        if k is not None and k < len(d):
            part = np.argpartition(d, k - 1)[:k]
            kth = d[part].max()
            cand = np.flatnonzero(d <= kth)  # every tie of the k-th distance, in index order
            order = cand[np.argsort(d[cand], kind="stable")][:k]
        else:
            order = np.argsort(d, kind="stable")
        out.append((order.astype(np.int64), d[order].astype(np.float32)))
    return out


SMALL_POOL = 1024  # rank_pools_cpu: pools of at most this many rows are ranked in one padded batch


def l2_by_ids(q: np.ndarray, ids: np.ndarray, gather, block_bytes: int = 1 << 25) -> np.ndarray:
    """Squared L2 of each query to its own candidate rows, batched (CPU, faiss).

    faiss's ``fvec_L2sqr_by_idx`` (direct sum of squared differences, no BLAS call) over the
    features themselves when ``gather`` is the float32 matrix in RAM (read in place), else over
    one ``gather`` per block of queries (at most ``block_bytes`` of float32 rows).

    Args:
        q: float32 [m, D]; ids: int64 [m, R] database ids, -1 for none.
        gather: ids int64 [p] (any order, repeats) -> features [p, D] (float16 upcast), or the
            features: a C-contiguous float32 array [n, D].
    Returns:
        float32 [m, R], +inf where ids is -1.
    """
    import faiss

    q = np.ascontiguousarray(q, np.float32)
    m, R = ids.shape
    D = q.shape[1]
    valid = ids >= 0
    full = bool(valid.all())
    d = np.empty((m, R), np.float32) if full else np.full((m, R), np.inf, np.float32)
    if ids.size == 0 or not valid.any():
        return d
    safe = ids if full else np.where(valid, ids, ids[valid][0])  # a real row in the empty slots (masked below)
    if isinstance(gather, np.ndarray):
        if gather.dtype != np.float32 or not gather.flags.c_contiguous or gather.ndim != 2 or gather.shape[1] != D:
            raise DhfError("features given in place must be a C-contiguous float32 [n, D] array")
        faiss.fvec_L2sqr_by_idx(faiss.swig_ptr(d), faiss.swig_ptr(q), faiss.swig_ptr(gather),
                                faiss.swig_ptr(np.ascontiguousarray(safe, np.int64)), D, m, R)
        if not full:
            d[~valid] = np.inf
        return d
    step = max(1, block_bytes // max(1, R * D * 4))
    for s in range(0, m, step):
        e = min(m, s + step)
        x = np.ascontiguousarray(_to_float32(np.asarray(gather(safe[s:e].ravel()))))
        pos = np.arange((e - s) * R, dtype=np.int64)
        faiss.fvec_L2sqr_by_idx(faiss.swig_ptr(d[s:e]), faiss.swig_ptr(q[s:e]), faiss.swig_ptr(x),
                                faiss.swig_ptr(pos), D, e - s, R)
    if not full:
        d[~valid] = np.inf
    return d


def rank_pools_torch_ids(q, feats, ids_list, k: int | None = None, budget_bytes: int = 1 << 31,
                         norms=None):
    """Batched pool ranking on the features' device (:func:`deephash_faiss.gpu.l2_rerank_ids`).

    Args:
        q: torch float [m, D]; feats: torch [n, D] (float32/float16) on q's device;
        ids_list: m int64 numpy arrays of database ids (the pools).
        norms: optional float32 [n] squared norms of feats.
        budget_bytes: bound on one gathered [chunk, P, D] block.
    Returns:
        list of m (local indices int64 numpy [k_i], squared distances float32 numpy [k_i]),
        nearest first, ties by local index.
    """
    import torch

    from .gpu import l2_rerank_ids

    m = len(ids_list)
    sizes = np.array([len(x) for x in ids_list], dtype=np.int64)
    P = int(sizes.max()) if m else 0
    if P == 0:
        return [(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in range(m)]
    pad = np.zeros((m, P), np.int64)
    pad[np.arange(P)[None, :] < sizes[:, None]] = np.concatenate(
        [np.asarray(x, np.int64) for x in ids_list])
    dev = feats.device
    D, O = l2_rerank_ids(q, feats, torch.as_tensor(pad, device=dev), torch.as_tensor(sizes, device=dev),
                         P if k is None else k, norms, budget_bytes)
    D, O = D.cpu().numpy(), O.cpu().numpy()
    out = []
    for i, nrow in enumerate(sizes):
        kk = int(nrow) if k is None else min(k, int(nrow))
        out.append((O[i, :kk].astype(np.int64), D[i, :kk].astype(np.float32)))
    return out


def _norms_dots(x: np.ndarray, q: np.ndarray, block: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """|x_i|^2 and x_i . q for rows of x, in cache-sized row blocks (float16 upcast first).

    Whole-pool einsum + GEMV on a pool of a few MB (it leaves the cache between the two
    passes) measured ~6x slower on the 2-core benchmark machine."""
    n = len(x)
    if x.dtype != np.float32:
        x = _to_float32(x)  # one call per pool: per-block torch calls cost more than they save
    norms = np.empty(n, np.float32)
    dots = np.empty(n, np.float32)
    for s in range(0, n, block):
        xb = x[s:s + block]
        norms[s:s + block] = np.einsum("ij,ij->i", xb, xb)
        dots[s:s + block] = xb @ q
    return norms, dots


def _to_float32(x: np.ndarray) -> np.ndarray:
    """Upcast (float16 through torch's vectorised conversion when available: numpy's is slow)."""
    if x.dtype == np.float16:
        try:
            import torch

            return torch.from_numpy(np.ascontiguousarray(x)).float().numpy()
        except ImportError:
            pass
    return np.ascontiguousarray(x, dtype=np.float32)


def exhaustive_knn(xq: np.ndarray, shards, k: int, use_gpu: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """ES with faiss: exact L2 k-NN over feature shards, merged by (distance, id)
    (``use_gpu``: faiss-gpu's ``knn_gpu``, shard by shard).

    Args:
        xq: float32 [m, D].
        shards: iterable of (first id, features [rows, D]).
        k: neighbours per query.
    Returns:
        (squared distances float32 [m, k], ids int64 [m, k]); -1 ids pad a short database.
    """
    if k < 1:
        raise DhfError("k must be at least 1")
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    m = len(xq)
    best_d = np.full((m, 0), np.inf, np.float32)
    best_i = np.full((m, 0), -1, np.int64)
    for start, feats in shards:
        if len(feats) == 0:
            continue
        xb = np.ascontiguousarray(feats, dtype=np.float32)
        kk = min(k, len(xb))
        D, I = _faiss_knn(xq, xb, kk, use_gpu)
        best_d = np.hstack([best_d, D])
        best_i = np.hstack([best_i, I.astype(np.int64) + start])
        order = np.lexsort((best_i, best_d), axis=1)[:, :k]
        best_d = np.take_along_axis(best_d, order, 1)
        best_i = np.take_along_axis(best_i, order, 1)
    if best_d.shape[1] < k:
        padn = k - best_d.shape[1]
        best_d = np.hstack([best_d, np.full((m, padn), np.inf, np.float32)])
        best_i = np.hstack([best_i, np.full((m, padn), -1, np.int64)])
    return best_d, best_i
