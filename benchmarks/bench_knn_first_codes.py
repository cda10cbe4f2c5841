"""How many codes the dictionary's batched k-NN asks of faiss in its first round
(``BucketIndex.KNN_FIRST_CODES``; then x 8 a round until every query's k-th row is certain), on
real indexes grown to N rows as bench_scale.py grows them (issue 15).

    python benchmarks/bench_knn_first_codes.py --source /work/harvest/cifar10_smallcnn_48 \
        --n 1e5,2e5,1e6 --json benchmarks/results/scale/knn_first_codes_smallcnn.json

For each N: the Hamming k-NN (k = 10) of a batch of the seed's queries (``--queries``) and of the
queries among them whose radius-3 pool holds fewer than k rows (the ones the ivf HDS tops up),
each value of ``--values`` in turn, ``--rounds`` alternations, the fastest of ``--repeat`` calls
a round; the results must be identical for every value.
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
from bench_fine_assign import best_of as fastest  # noqa: E402  (result and fastest time)
from common import machine_basics, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True, help="real arrays (reproduce.py --export) or index dir")
    ap.add_argument("--n", default="1e5,1e6", help="comma-separated row counts")
    ap.add_argument("--values", default="16,32,64")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", required=True)
    a = ap.parse_args()

    import faiss

    from deephash_faiss.index import BinaryIndex, BucketIndex, IndexSpec

    seed = realgen.load_seed(a.source)
    values = [int(v) for v in a.values.split(",")]
    out = {"source": a.source, "machine": machine_basics(), "faiss": faiss.__version__, "numpy": np.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "k": a.k, "values": values, "runs": []}
    saved = BucketIndex.KNN_FIRST_CODES
    for n in [int(float(x)) for x in a.n.split(",")]:
        codes, _, _, _ = realgen.grow_codes(seed, n, np.random.default_rng(a.seed))
        bidx = BinaryIndex.build(codes, IndexSpec("buckets"))
        qc = np.ascontiguousarray(seed.q_codes[:a.queries])
        under = qc[bidx.pool_sizes(qc, 3) < a.k]
        run = {"n": n, "distinct_codes": int(bidx.n_codes), "under_k_queries": len(under),
               "ball": bool(bidx._use_ball()), "batch_ms": {v: [] for v in values}, "under_ms": {v: [] for v in values}}
        ref, same = None, True
        try:
            for _ in range(a.rounds):
                for v in values:
                    BucketIndex.KNN_FIRST_CODES = v
                    got, s = fastest(lambda: bidx.search(qc, a.k), a.repeat)
                    run["batch_ms"][v].append(round(s * 1e3, 3))
                    if len(under):
                        run["under_ms"][v].append(round(fastest(lambda: bidx.search(under, a.k), a.repeat)[1] * 1e3, 3))
                    ref = got if ref is None else ref
                    same = same and all(np.array_equal(x, y) for x, y in zip(ref, got))
        finally:
            BucketIndex.KNN_FIRST_CODES = saved
        run["same_results"] = bool(same)
        run["batch_ms_median"] = {v: float(np.median(t)) for v, t in run["batch_ms"].items()}
        run["under_ms_median"] = {v: float(np.median(t)) if t else None for v, t in run["under_ms"].items()}
        out["runs"].append(run)
        print({k: run[k] for k in ("n", "distinct_codes", "under_k_queries", "ball", "same_results",
                                   "batch_ms_median", "under_ms_median")}, flush=True)
        write_json(a.json, out)


if __name__ == "__main__":
    main()
