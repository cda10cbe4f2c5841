"""Where a single ivf HDS query's time goes (issue 15), timed in place: ``search.hds_ivf`` of one
query at a time over ``--queries`` real-statistics queries on a real index grown to N rows as
bench_scale.py grows it, with the fine index's kernels wrapped by ``perf_counter`` timers (no
profiler: a line profiler inflates C calls). Reported per query, in microseconds, over the
queries that took the lists (mode "ivf"): the radius reach (``BucketIndex.reach``), the
centroid distances (``fvec_L2sqr_by_idx`` outside the refine), the fast-scan scan
(``fine._scan_lists``), the exact refine (``fine._refine``) and the rest (numpy and Python
glue, the memo, the results); with the memo emptied first (``cold``, the default: a query gains
only from codes repeated before it) or kept from a pass over the same queries (``warm``). Also
faiss HNSW32 at ``--ef`` on the same features, one query a call, for scale.

    python benchmarks/profile_hds_single.py --source /work/harvest/cifar10_smallcnn_48 --n 1e6 --ef 48 \\
        --cache-dir /tmp/dhf-bench-cache
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import realgen  # noqa: E402
from common import hnsw32  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True, help="real arrays (reproduce.py --export) or index dir")
    ap.add_argument("--n", type=float, default=1e5)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--memo", choices=("cold", "warm"), default="cold")
    ap.add_argument("--ef", type=int, default=16, help="HNSW32 efSearch")
    ap.add_argument("--cache-dir", default=None, help="bench_scale.py's HNSW32 cache")
    a = ap.parse_args()
    import faiss

    from deephash_faiss import fine as fine_mod
    from deephash_faiss.search import hds_ivf

    n = int(a.n)
    feats, qc, qf, fine, fp = realgen.grow_for_search(a.source, n, a.dim)
    m = min(a.queries, len(qc))
    spent = {"reach": 0.0, "centroids": 0.0, "scan": 0.0, "refine": 0.0}
    inside = []  # the stage running now (the refine's own L2 is the refine's)

    def timed(name, fn):
        def call(*args, **kw):
            if inside:
                return fn(*args, **kw)
            inside.append(name)
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                spent[name] += time.perf_counter() - t
                inside.pop()
        return call

    def one(i):
        return hds_ivf(fine, qc[i:i + 1], qf[i:i + 1], 10, 3, feats, fp, None, n, threads=1)

    modes = [one(i)[2][0] for i in range(m)]  # (also the warm-up)
    ivf = [i for i in range(m) if modes[i] == "ivf"]
    b = fine.buckets
    patches = [(type(b), "reach"), (faiss, "fvec_L2sqr_by_idx"), (fine_mod, "_scan_lists"), (fine_mod, "_refine")]
    names = ["reach", "centroids", "scan", "refine"]
    saved = [getattr(o, k) for o, k in patches]
    def prepare():
        if a.memo == "cold":
            fine._memo.clear()
        else:
            for i in ivf:
                one(i)

    prepare()
    t = time.perf_counter()
    for i in ivf:
        one(i)
    plain = time.perf_counter() - t  # the same pass unwrapped: what the timers add
    prepare()
    for (o, k), f, name in zip(patches, saved, names):
        setattr(o, k, timed(name, f))
    try:
        t = time.perf_counter()
        for i in ivf:
            one(i)
        total = time.perf_counter() - t
    finally:
        for (o, k), f in zip(patches, saved):
            setattr(o, k, f)
    per = {k: round(v / len(ivf) * 1e6, 1) for k, v in spent.items()}
    per["rest"] = round(total / len(ivf) * 1e6 - sum(per.values()), 1)
    per["total"] = round(total / len(ivf) * 1e6, 1)
    per["total_unwrapped"] = round(plain / len(ivf) * 1e6, 1)
    key = f"{os.path.basename(os.path.normpath(a.source))}-n{n}-d{feats.shape[1]}-float32-s0"
    h, _ = hnsw32(feats, os.path.join(a.cache_dir, f"hnsw32-{key}.faiss") if a.cache_dir else None)
    h.hnsw.efSearch = a.ef
    for _ in range(2):  # (the first pass warms the graph)
        t = time.perf_counter()
        for i in range(m):
            h.search(qf[i:i + 1], 10)
        hn = (time.perf_counter() - t) / m * 1e6
    print(json.dumps({"n": n, "queries": m, "ivf_queries": len(ivf), "memo": a.memo, "nprobe": fp.nprobe,
                      "refine": fp.refine, "us_per_ivf_query": per, "hnsw32_ef": a.ef,
                      "hnsw32_us_per_query": round(hn, 1),
                      "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}))


if __name__ == "__main__":
    main()
