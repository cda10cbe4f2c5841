"""Feasibility check (issue 15, 2026-12-03): can HDS beat FAISS HNSW32 at 1e5 rows by walking a
graph instead of inverted lists?

HNSW32 over PCA-reduced fc7 (64 or 128 dims): the k' nearest, post-filtered by Hamming distance
< radius and refined by exact 256-d L2, against exact HDS (the whole radius pool ranked by L2);
HNSW32 over the 256-d features (the peer) in the same run. Same data as ``bench_scale.py`` (the
Lite0 seed grown to N rows by ``realgen``, PCA-256 float32 in RAM), 200 queries, best of 5.

    python benchmarks/feas_graph_hds.py 1e5 [SEED_DIR]

Result on the 2-core machine (``benchmarks/results/scale/feas_graph_hds_1e5.txt``): recall
0.77-0.91 against exact HDS at 27-76 us per query, against the peer's 19-23 us at recall
0.95-0.97 against ES; 21-31 of 200 queries keep fewer than 10 candidates. Not pursued.
"""
from __future__ import annotations

import os
import sys
import time

import faiss
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import realgen  # noqa: E402

K, RADIUS, NQ = 10, 3, 200


def hamming(codes: np.ndarray, q: np.ndarray) -> np.ndarray:
    """codes uint8 [..., B] vs q uint8 [B] (broadcast) -> int [...]."""
    return np.unpackbits(np.bitwise_xor(codes, q), axis=-1).sum(-1)


def exact_hds(codes, feats, qcodes, qf) -> list[set]:
    """Per query: the K nearest by L2 among rows at Hamming distance < RADIUS (topped up with
    the Hamming-nearest rows when fewer than K)."""
    out = []
    for i in range(len(qcodes)):
        d = hamming(codes, qcodes[i])
        pool = np.flatnonzero(d < RADIUS)
        if len(pool) < K:
            pool = np.argsort(d, kind="stable")[:K]
        dd = ((feats[pool] - qf[i]) ** 2).sum(1)
        out.append(set(pool[np.argsort(dd, kind="stable")[:K]].tolist()))
    return out


def post_filter(ids, codes, feats, qcodes, qf):
    """Graph candidates int64 [m, k'] -> (top-K ids [m, K] within RADIUS by exact L2, survivors [m])."""
    c = np.where(ids >= 0, ids, 0)
    ok = (hamming(codes[c], qcodes[:, None, :]) < RADIUS) & (ids >= 0)
    d = np.where(ok, ((feats[c] - qf[:, None, :]) ** 2).sum(2), np.inf)
    o = np.argsort(d, axis=1, kind="stable")[:, :K]
    return np.take_along_axis(c, o, 1), ok.sum(1)


def recall(ref, got) -> float:
    return float(np.mean([len(set(g) & set(r)) / K for r, g in zip(ref, got)]))


def best_us(fn, reps: int = 5):
    """(fn()'s result, best time of ``reps`` in microseconds per query)."""
    res, best = fn(), 1e9
    for _ in range(reps):
        t = time.perf_counter()
        res = fn()
        best = min(best, time.perf_counter() - t)
    return res, best / NQ * 1e6


def data(n: int, seed_dir: str):
    rng = np.random.default_rng(0)
    seed = realgen.load_seed(seed_dir)
    codes, labels, parent, _ = realgen.grow_codes(seed, n, rng)
    sf, qf = np.asarray(seed.feats, np.float32), np.asarray(seed.q_feats[:NQ], np.float32)
    mu, comp = realgen.pca(sf[:50_000], 256)
    sf, qf = (sf - mu) @ comp, (qf - mu) @ comp
    feats = np.ascontiguousarray(realgen.grow_features(sf, labels, parent, 0.3, rng, np.dtype("float32")))
    return codes, feats, np.ascontiguousarray(seed.q_codes[:NQ]), np.ascontiguousarray(qf, np.float32)


def main(n: int, seed_dir: str) -> None:
    codes, feats, qcodes, qf = data(n, seed_dir)
    print("data", feats.shape, flush=True)
    t = time.perf_counter()
    ex = exact_hds(codes, feats, qcodes, qf)
    print("exact HDS reference", round(time.perf_counter() - t, 1), "s", flush=True)
    flat = faiss.IndexFlatL2(feats.shape[1])
    flat.add(feats)
    _, es = flat.search(qf, K)
    peer = faiss.IndexHNSWFlat(feats.shape[1], 32)
    peer.hnsw.efConstruction = 40
    peer.add(feats)
    for ef in (16, 24, 32, 48, 64):
        peer.hnsw.efSearch = ef
        (_, ih), us = best_us(lambda: peer.search(qf, K))
        print(f"HNSW32 flat256 ef {ef}: {us:.1f} us  recall vs ES {recall(es, ih):.3f}  "
              f"vs exactHDS {recall(ex, ih):.3f}", flush=True)
    for dim in (64, 128):
        pm = faiss.PCAMatrix(feats.shape[1], dim)
        pm.train(feats[:50_000])
        g = faiss.IndexHNSWFlat(dim, 32)
        g.hnsw.efConstruction = 40
        t = time.perf_counter()
        g.add(pm.apply(feats))
        bt = time.perf_counter() - t
        qr = pm.apply(qf)
        for ef, kk in ((16, 32), (24, 32), (32, 40), (48, 48), (64, 64)):
            g.hnsw.efSearch = ef
            (res, kept), us = best_us(lambda: post_filter(g.search(qr, kk)[1], codes, feats, qcodes, qf))
            print(f"HNSW32 pca{dim} (build {bt:.0f}s) ef {ef} k' {kk}: {us:.1f} us  recall vs exactHDS "
                  f"{recall(ex, res):.3f}  <k survivors {int((kept < K).sum())}", flush=True)


if __name__ == "__main__":
    main(int(float(sys.argv[1])), sys.argv[2] if len(sys.argv) > 2 else "/work/harvest/cifar10_lite0_48")
