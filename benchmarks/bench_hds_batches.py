"""ivf HDS against its peer HNSW32 by batch size, and what splitting a batch over threads gives
(``search.hds_ivf``: parts of at least ``HDS_THREAD_MIN_QUERIES`` queries, one OpenMP thread
each), on a real index grown to N rows as bench_scale.py grows it (issue 15).

    python benchmarks/bench_hds_batches.py --source /work/harvest/cifar10_smallcnn_48 --n 1e5 \
        --cache-dir /tmp/dhf-bench-cache --json benchmarks/results/scale/hds_batches_smallcnn_n1e5.json

Every query is timed once a round: the seed's real queries (``--queries``, all by default) in
consecutive batches of B, each batch one call, so no batch runs on caches that its own earlier
run warmed (bench_scale.py times the fastest of repeated calls of one batch). For each B and
round, in an order that turns each round: ``hds_ivf`` with one thread (``threads=1``), ``hds_ivf``
as the product calls it (``threads=None``: split from 2 x HDS_THREAD_MIN_QUERIES queries), and
faiss HNSW32 at ``--ef`` (read from bench_scale.py's ``--cache-dir`` cache when there). Reported:
microseconds per query (each round, the median), HDS over HNSW32, recall@10 of HDS against exact
HDS and of HNSW32 against ES on the first ``--recall-queries`` queries, and whether the two HDS
calls returned the same ids. At batch 1 a fourth arm, ``hds_batch_path``, searches the single
queries through the batch machinery (``fine.SINGLE_QUERY_PATH`` off), against the product's
single-query path (``single_path_speedup``; ``single_path_same_ids_share``: the share of the
first queries whose ids the two paths agree on). The fine index's per-code memo of single
queries (``fine.CodeMemo``) is emptied before each arm's pass, so a pass gains only from the
codes repeated within it, never from an earlier pass over the same queries; ``--memo warm``
keeps it (a service that has seen these codes), reported apart (``memo``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import numpy as np  # noqa: E402

import realgen  # noqa: E402
from common import hnsw32, machine_basics, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    realgen.add_grow_args(ap)
    ap.add_argument("--queries", type=int, default=None, help="default: all of the seed's")
    ap.add_argument("--batches", default="1,16,200,500,1000,2000,5000")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ef", type=int, default=16, help="HNSW32 efSearch")
    ap.add_argument("--recall-queries", type=int, default=1000)
    ap.add_argument("--radius", type=int, default=3)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--noise", type=float, default=0.3)
    ap.add_argument("--cache-dir", default=None, help="bench_scale.py's HNSW32 cache")
    ap.add_argument("--memo", choices=("cold", "warm"), default="cold",
                    help="cold: the single-query memo emptied before each timed pass; warm: kept")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", required=True)
    a = ap.parse_args()

    import faiss

    from deephash_faiss import fine as fine_mod
    from deephash_faiss import search as search_mod
    from deephash_faiss.fine import FineParams
    from deephash_faiss.rerank import rank_pools_cpu
    from deephash_faiss.search import hds_ivf

    n = int(a.n)
    codes, feats, qc, qf, bidx, fine = realgen.grow_fine_index(a.source, n, a.dim, np.random.default_rng(a.seed), a.noise, a.queries, a.seed)
    fp = FineParams.for_rows(n, exact_max=max(a.k, FineParams.exact_max))
    key = f"{os.path.basename(os.path.normpath(a.source))}-n{n}-d{feats.shape[1]}-float32-s{a.seed}"
    h, build_s = hnsw32(feats, os.path.join(a.cache_dir, f"hnsw32-{key}.faiss") if a.cache_dir else None)
    h.hnsw.efSearch = a.ef

    def hds(c, f, threads):
        return hds_ivf(fine, c, f, a.k, a.radius, feats, fp, None, n, threads=threads)[0]

    # recall on the first queries: HDS against exact HDS (the whole pool ranked), HNSW32 against ES
    r = min(a.recall_queries, len(qc))
    lims, _, I = bidx.range_search(qc[:r], a.radius)
    pools = [I[lims[i]:lims[i + 1]] for i in range(r)]
    exact = [p[o] for p, (o, _) in zip(pools, rank_pools_cpu(qf[:r], pools, feats, a.k))]
    got = hds(qc[:r], qf[:r], None)
    rec = [len(set(e[:a.k]) & set(g.ids[:a.k])) / min(a.k, len(e)) for e, g in zip(exact, got) if len(e)]
    _, Ies = faiss.knn(qf[:r], feats, a.k)
    _, Ih = h.search(qf[:r], a.k)
    same = all(np.array_equal(x.ids, y.ids) for x, y in zip(got, hds(qc[:r], qf[:r], 1)))

    out = {"source": a.source, "n": n, "dim": int(feats.shape[1]), "queries": len(qc), "machine": machine_basics(),
           "faiss": faiss.__version__, "numpy": np.__version__, "omp_threads": faiss.omp_get_max_threads(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "distinct_codes": int(bidx.n_codes),
           "nprobe": fp.nprobe, "refine": fp.refine, "cell_size": fine.cell_size,
           "hds_thread_min_queries": search_mod.HDS_THREAD_MIN_QUERIES, "hnsw_ef": a.ef, "memo": a.memo,
           "hnsw_build_s": build_s,
           "hds_recall_at10_vs_exact": float(np.mean(rec)),
           "hnsw_recall_at10_vs_es": float(np.mean([len(set(x) & set(y)) / a.k for x, y in zip(Ies, Ih)])),
           "hds_threads_same_ids": bool(same), "batches": {}}
    def batch_path(c, f):  # single queries through the batch machinery (fine.SINGLE_QUERY_PATH off)
        fine_mod.SINGLE_QUERY_PATH = False
        try:
            return hds(c, f, None)
        finally:
            fine_mod.SINGLE_QUERY_PATH = True

    # single queries: the single-query path against the batch machinery, ids equal (share of queries)
    one = [hds(qc[i:i + 1], qf[i:i + 1], None)[0] for i in range(r)]
    out["single_path_same_ids_share"] = float(np.mean([
        np.array_equal(o.ids, batch_path(qc[i:i + 1], qf[i:i + 1])[0].ids) for i, o in enumerate(one)]))
    out["hds_single_recall_at10_vs_exact"] = float(np.mean(
        [len(set(e[:a.k]) & set(g.ids[:a.k])) / min(a.k, len(e)) for e, g in zip(exact, one) if len(e)]))
    arms = {"hds_one_thread": lambda c, f: hds(c, f, 1), "hds_product": lambda c, f: hds(c, f, None),
            "hnsw32": lambda c, f: h.search(f, a.k), "hds_batch_path": batch_path}
    for fn in arms.values():  # warm-up
        fn(qc[:200], qf[:200])
    for B in [int(x) for x in a.batches.split(",")]:
        m = len(qc) // B * B
        if m == 0:
            continue
        names = list(arms) if B == 1 else list(arms)[:3]  # the batch path differs at batch 1 only
        us = {name: [] for name in names}
        for rnd in range(a.rounds):
            for name in names[rnd % len(names):] + names[:rnd % len(names)]:
                tot = 0.0
                if a.memo == "cold":
                    fine._memo.clear()
                for i in range(0, m, B):
                    t = time.perf_counter()
                    arms[name](qc[i:i + B], qf[i:i + B])
                    tot += time.perf_counter() - t
                us[name].append(round(tot / m * 1e6, 2))
        med = {name: float(np.median(v)) for name, v in us.items()}
        out["batches"][str(B)] = {"queries_timed": m, "us_per_query": us, "median_us_per_query": med,
                                  "hds_product_over_hnsw": med["hds_product"] / med["hnsw32"],
                                  "hds_one_thread_over_hnsw": med["hds_one_thread"] / med["hnsw32"],
                                  "threads_speedup": med["hds_one_thread"] / med["hds_product"]}
        if "hds_batch_path" in med:
            out["batches"][str(B)]["single_path_speedup"] = med["hds_batch_path"] / med["hds_product"]
        print(B, {k: round(v, 1) for k, v in med.items()},
              "hds/hnsw %.2f" % out["batches"][str(B)]["hds_product_over_hnsw"], flush=True)
        write_json(a.json, out)
    print({k: v for k, v in out.items() if k not in ("machine", "batches")})


if __name__ == "__main__":
    main()
