"""Feasibility check (issue 15, 2026-12-03, twelfth session): HDS with one HNSW graph per big code
bucket instead of the inverted lists, against FAISS HNSW32 over all rows.

A trained model puts most of a class on a few codes, so a query's radius pool is a handful of
big buckets plus a tail of small ones. Here every bucket of at least ``--min-bucket`` rows gets
its own HNSW32 graph over the 256-d features; a query searches the graph of each big bucket in
its pool (queries batched per bucket, faiss on all cores) and would scan the small buckets'
rows exactly. Measured: the graph part's time per query, the graphs probed and the small-bucket
rows per query (the exact part's size), and recall@10 of the merged result against exact HDS
(the whole pool ranked by L2). Same data as ``feas_graph_hds.py`` / ``bench_scale.py`` (the
Lite0 seed grown by ``realgen``, PCA-256 float32), 200 queries, best of 5.

    python benchmarks/feas_bucket_graph.py 1e5 [SEED_DIR] [--min-bucket 1000]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import faiss
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from feas_graph_hds import K, NQ, RADIUS, best_us, data, exact_hds, hamming, recall  # noqa: E402


def buckets(codes: np.ndarray):
    """(distinct codes uint8 [u, B], bucket of each row int64 [n], rows of each bucket: list of int64 arrays)."""
    uniq, inv = np.unique(codes, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    order = np.argsort(inv, kind="stable")
    cuts = np.flatnonzero(np.diff(inv[order])) + 1
    return uniq, inv, np.split(order, cuts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("n", type=float)
    ap.add_argument("seed", nargs="?", default="/work/harvest/cifar10_lite0_48")
    ap.add_argument("--min-bucket", type=int, default=1000)
    a = ap.parse_args()
    codes, feats, qcodes, qf = data(int(a.n), a.seed)
    ex = exact_hds(codes, feats, qcodes, qf)
    uniq, inv, rows = buckets(codes)
    sizes = np.array([len(r) for r in rows])
    big = np.flatnonzero(sizes >= a.min_bucket)
    print(f"n {len(codes)}  distinct codes {len(uniq)}  buckets >= {a.min_bucket} rows: {len(big)} "
          f"holding {sizes[big].sum() / len(codes):.3f} of the rows", flush=True)
    t = time.perf_counter()
    graphs = {}
    for b in big:
        g = faiss.IndexHNSWFlat(feats.shape[1], 32)
        g.hnsw.efConstruction = 40
        g.add(feats[rows[b]])
        graphs[b] = g
    print(f"graphs built in {time.perf_counter() - t:.1f} s", flush=True)
    reach = hamming(uniq[None, :, :], qcodes[:, None, :]) < RADIUS  # [NQ, u]
    small_rows = np.array([sizes[reach[i]].sum() - sizes[np.intersect1d(np.flatnonzero(reach[i]), big)].sum()
                           for i in range(NQ)])
    probes = reach[:, big].sum(1)
    per_bucket = {b: np.flatnonzero(reach[:, b]) for b in big}
    for ef in (16, 24, 32, 48):
        def graph_part():
            cand_d = [[] for _ in range(NQ)]
            cand_i = [[] for _ in range(NQ)]
            for b, qs in per_bucket.items():
                if len(qs) == 0:
                    continue
                graphs[b].hnsw.efSearch = ef
                d, i = graphs[b].search(qf[qs], K)
                gi = np.where(i >= 0, rows[b][np.maximum(i, 0)], -1)
                for j, q in enumerate(qs):
                    cand_d[q].append(d[j])
                    cand_i[q].append(gi[j])
            return cand_d, cand_i

        (cand_d, cand_i), us = best_us(graph_part)
        got = []
        for q in range(NQ):  # merged with the small buckets' rows ranked exactly (not timed)
            sm = [rows[b] for b in np.flatnonzero(reach[q]) if sizes[b] < a.min_bucket]
            ids = np.concatenate(cand_i[q] + sm) if (cand_i[q] or sm) else np.zeros(0, np.int64)
            ids = ids[ids >= 0]
            if len(ids) < K:
                got.append(sorted(ex[q]))
                continue
            d = ((feats[ids] - qf[q]) ** 2).sum(1)
            got.append(ids[np.argsort(d, kind="stable")[:K]].tolist())
        print(f"per-bucket HNSW32 ef {ef}: graph part {us:.1f} us/query  graphs probed per query mean "
              f"{probes.mean():.2f} (max {probes.max()})  small-bucket rows per query mean {small_rows.mean():.0f} "
              f"(median {np.median(small_rows):.0f}, max {small_rows.max()})  recall@10 vs exact HDS "
              f"{recall(ex, got):.3f}", flush=True)
    peer = faiss.IndexHNSWFlat(feats.shape[1], 32)
    peer.hnsw.efConstruction = 40
    peer.add(feats)
    flat = faiss.IndexFlatL2(feats.shape[1])
    flat.add(feats)
    _, es = flat.search(qf, K)
    for ef in (16, 24):
        peer.hnsw.efSearch = ef
        (_, ih), us = best_us(lambda: peer.search(qf, K))
        print(f"peer HNSW32 over all rows ef {ef}: {us:.1f} us/query  recall vs ES {recall(es, ih):.3f}", flush=True)


if __name__ == "__main__":
    main()
