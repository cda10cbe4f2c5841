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
    """The rerank backend for a device: torch on CUDA, faiss on CPU."""
    return "torch" if str(device).startswith("cuda") else "faiss"


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


def rank_pools_torch(q, feats_list, k: int | None = None):
    """Batched pool ranking in torch (any device).

    Args:
        q: torch float [m, D]; feats_list: m torch tensors [n_i, D] on q's device.
    Returns:
        list of m (local indices int64 numpy [k_i], squared distances float32 numpy [k_i]).
    """
    import torch

    m = len(feats_list)
    if m == 0:
        return []
    sizes = [len(f) for f in feats_list]
    P = max(sizes) if sizes else 0
    if P == 0:
        return [(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in range(m)]
    dim = q.shape[1]
    pad = torch.zeros((m, P, dim), device=q.device, dtype=torch.float32)
    for i, f in enumerate(feats_list):
        if len(f):
            pad[i, : len(f)] = f.float()
    qf = q.float()
    d = (pad * pad).sum(-1) - 2 * torch.bmm(pad, qf[:, :, None])[..., 0] + (qf * qf).sum(-1, keepdim=True)
    lens = torch.tensor(sizes, device=q.device)
    d = d.masked_fill(torch.arange(P, device=q.device)[None] >= lens[:, None], float("inf"))
    d = d.clamp_min_(0)
    ds, order = torch.sort(d, dim=1, stable=True)
    out = []
    ds, order = ds.cpu().numpy(), order.cpu().numpy()
    for i, n in enumerate(sizes):
        kk = n if k is None else min(k, n)
        out.append((order[i, :kk].astype(np.int64), ds[i, :kk].astype(np.float32)))
    return out


def exhaustive_knn(xq: np.ndarray, shards, k: int) -> tuple[np.ndarray, np.ndarray]:
    """ES on CPU: exact L2 k-NN over feature shards with faiss, merged by (distance, id).

    Args:
        xq: float32 [m, D].
        shards: iterable of (first id, features [rows, D]).
        k: neighbours per query.
    Returns:
        (squared distances float32 [m, k], ids int64 [m, k]); -1 ids pad a short database.
    """
    import faiss

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
        D, I = faiss.knn(xq, xb, kk)
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


def exhaustive_knn_torch(xq, xb, k: int, block: int = 1 << 16):
    """ES in torch (the GPU flat L2): xq float [m, D], xb float [n, D] on one device.

    Returns (squared distances float32 [m, k], ids int64 [m, k]) as torch tensors.
    """
    import torch

    m, n = xq.shape[0], xb.shape[0]
    k = min(k, n)
    qf = xq.float()
    qn = (qf * qf).sum(1, keepdim=True)
    best_d = torch.empty((m, 0), device=xq.device)
    best_i = torch.empty((m, 0), device=xq.device, dtype=torch.long)
    for s in range(0, n, block):
        xbb = xb[s:s + block].float()
        d = qn - 2 * qf @ xbb.T + (xbb * xbb).sum(1)[None]
        dd, ii = torch.topk(d, min(k, d.shape[1]), dim=1, largest=False, sorted=True)
        best_d = torch.cat([best_d, dd], 1)
        best_i = torch.cat([best_i, ii + s], 1)
        best_d, o = torch.topk(best_d, min(k, best_d.shape[1]), dim=1, largest=False, sorted=True)
        best_i = torch.gather(best_i, 1, o)
    return best_d.clamp_min(0), best_i
