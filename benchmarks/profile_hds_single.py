"""Where a single-query ivf HDS call goes (issue 15): ``search.hds_ivf`` of one query at a time
on a real index grown to N rows as bench_scale.py grows it, timed over 1,000 queries and then
profiled with cProfile (own time and cumulative time, the top rows printed).

    python benchmarks/profile_hds_single.py --source /work/harvest/cifar10_smallcnn_48 --n 1e5
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import numpy as np  # noqa: E402

import realgen  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    realgen.add_grow_args(ap)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()

    from deephash_faiss.fine import FineParams
    from deephash_faiss.search import hds_ivf

    n = int(a.n)
    _, feats, qc, qf, _, fine = realgen.grow_fine_index(a.source, n, a.dim, np.random.default_rng(0))
    fine.warm()
    fp = FineParams.for_rows(n, exact_max=max(10, FineParams.exact_max))
    m = min(a.queries, len(qc))

    def run() -> None:
        for i in range(m):
            hds_ivf(fine, qc[i:i + 1], qf[i:i + 1], 10, 3, feats, fp, None, n, threads=1)

    run()  # warm-up
    t = time.perf_counter()
    run()
    print(f"{(time.perf_counter() - t) / m * 1e6:.1f} us per query ({m} single queries, n={n})")
    pr = cProfile.Profile()
    pr.enable()
    run()
    pr.disable()
    st = pstats.Stats(pr)
    st.sort_stats("tottime").print_stats(a.top)
    st.sort_stats("cumulative").print_stats(a.top)


if __name__ == "__main__":
    main()
