"""How ivf HDS should run a small batch (issue 15): one query at a time through the fine index's
single-query path, or one batch call on one OpenMP thread, or on all of them; and what the
product does (``search.hds_ivf`` as shipped), on a real index grown to N rows as bench_scale.py
grows it. The measurements behind ``search.HDS_SINGLE_LOOP_MAX_QUERIES`` and
``search.HDS_ONE_THREAD_MAX_ROWS``.

    python benchmarks/bench_hds_small_batches.py --source /work/harvest/cifar10_smallcnn_48 --n 1e5 \\
        --batches 1,2,4,8,16,24,32,48 --json benchmarks/results/scale/hds_small_batches_smallcnn_n1e5.json

Arms (each timed over the first ``--queries`` real queries in consecutive batches of B, the
per-code memo emptied before every pass, in an order that turns each round; microseconds a
query, the median of ``--rounds``):

* ``loop``: every query its own ``hds_ivf`` call (the single-query path, one OpenMP thread);
* ``batch_1thread`` / ``batch_threads``: one ``hds_ivf`` call a batch through the batch
  machinery on one OpenMP thread / on faiss's threads (the two constants forced);
* ``product``: ``hds_ivf`` as shipped;
* ``loop_2threads`` (only when asked in ``--arms``): the batch's queries one at a time in two
  Python threads (half each, one OpenMP thread each).

It also reports whether ``product`` returned the ids of ``loop`` (``product_same_ids_share``: the
share of queries whose ids agree; the batch machinery ranks centroids with a GEMM, the
single-query path with direct sums, so float rounding may change a tie).
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
import numpy as np  # noqa: E402

import realgen  # noqa: E402
from common import machine_basics, write_json  # noqa: E402

ARMS = ("loop", "batch_1thread", "batch_threads", "product")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    realgen.add_grow_args(ap)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--batches", default="1,2,4,8,16,24,32,48")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    import faiss

    from deephash_faiss import search as sm

    n = int(a.n)
    feats, qc, qf, fine, fp = realgen.grow_for_search(a.source, n, a.dim)
    Q = min(a.queries, len(qc))
    arms = [x for x in a.arms.split(",") if x]
    shipped = (sm.HDS_SINGLE_LOOP_MAX_QUERIES, sm.HDS_ONE_THREAD_MAX_ROWS)

    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(2, initializer=lambda: faiss.omp_set_num_threads(1))

    def call(c, f):
        return sm.hds_ivf(fine, c, f, 10, 3, feats, fp, None, n)[0]

    def run(arm: str, bs: int):
        """(us a query, ids of every query)."""
        fine._memo.clear()
        loop, one = shipped
        if arm.startswith("batch"):
            loop, one = 0, (1 << 62 if arm == "batch_1thread" else -1)
        sm.HDS_SINGLE_LOOP_MAX_QUERIES, sm.HDS_ONE_THREAD_MAX_ROWS = loop, one
        ids = []
        try:
            t = time.perf_counter()
            for i in range(0, Q, bs):
                if arm == "loop_2threads":
                    halves = [list(range(i, min(Q, i + bs)))[h::2] for h in (0, 1)]
                    for got in pool.map(lambda ix: [call(qc[j:j + 1], qf[j:j + 1])[0] for j in ix], halves):
                        ids += [r.ids for r in got]  # (kept per half: only the timing is compared)
                elif arm == "loop":
                    for j in range(i, min(Q, i + bs)):
                        ids += [r.ids for r in call(qc[j:j + 1], qf[j:j + 1])]
                else:
                    ids += [r.ids for r in call(qc[i:i + bs], qf[i:i + bs])]
            us = (time.perf_counter() - t) / Q * 1e6
        finally:
            sm.HDS_SINGLE_LOOP_MAX_QUERIES, sm.HDS_ONE_THREAD_MAX_ROWS = shipped
        return us, ids

    run("product", 16)  # warm-up
    rows = []
    for bs in [int(x) for x in a.batches.split(",") if x]:
        times = {arm: [] for arm in arms}
        ids = {}
        for r in range(a.rounds):
            for arm in (arms if r % 2 == 0 else arms[::-1]):
                us, got = run(arm, bs)
                times[arm].append(round(us, 1))
                ids.setdefault(arm, got)
        row = {"batch": bs, "rows_probed_per_batch": bs * fp.nprobe * fine.cell_size,
               "us_per_query": {arm: float(np.median(v)) for arm, v in times.items()},
               "us_per_query_rounds": times}
        if "loop" in ids and "product" in ids:  # (loop_2threads keeps its halves' order: not compared)
            row["product_same_ids_share"] = float(np.mean([np.array_equal(x, y)
                                                           for x, y in zip(ids["loop"], ids["product"])]))
        rows.append(row)
        print(json.dumps({"n": n, **{k: v for k, v in row.items() if k != "us_per_query_rounds"}}), flush=True)
    out = {"n": n, "dim": int(feats.shape[1]), "queries": Q, "rounds": a.rounds, "nprobe": fp.nprobe,
           "refine": fp.refine, "cell_size": fine.cell_size, "omp_threads": faiss.omp_get_max_threads(),
           "shipped": {"HDS_SINGLE_LOOP_MAX_QUERIES": shipped[0], "HDS_ONE_THREAD_MAX_ROWS": shipped[1]},
           "source": os.path.basename(os.path.normpath(a.source)), "rows": rows,
           "machine": machine_basics(), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    if a.json:
        write_json(a.json, out)


if __name__ == "__main__":
    main()
