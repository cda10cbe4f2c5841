#!/usr/bin/env python3
"""Time the evaluation of 10,000 queries against 50,000 database codes (CPU).

    python benchmarks/bench_evaluate.py [--queries 10000] [--database 50000] [--bits 48] [--dim 128] --json OUT

Synthetic supervised-like codes (10 class centres, 15% of bits flipped) and features; times
``evaluate_arrays`` per mode (what ``dhf evaluate`` runs after encoding the queries).
"""

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from deephash_faiss.evaluate import evaluate_arrays  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--database", type=int, default=50_000)
    p.add_argument("--bits", type=int, default=48)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--modes", nargs="+", default=["bcs", "hds", "es"])
    p.add_argument("--max-candidates", type=int, default=1000)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    centres = rng.random((10, a.bits)) < 0.5

    def make(n):
        lab = rng.integers(0, 10, n)
        bits = centres[lab] ^ (rng.random((n, a.bits)) < 0.15)
        feats = (rng.normal(size=(10, a.dim))[lab] + rng.normal(0, 2.0, (n, a.dim))).astype(np.float32)
        return np.packbits(bits, axis=1, bitorder="little"), feats, lab.astype(np.int32)

    dbc, dbf, dbl = make(a.database)
    qc, qf, ql = make(a.queries)
    out = {"queries": a.queries, "database": a.database, "bits": a.bits, "dim": a.dim, "cpu_count": os.cpu_count(),
           "machine": platform.processor() or platform.machine(), "numpy": np.__version__,
           "date": time.strftime("%Y-%m-%d"), "seconds": {}}
    for mode in a.modes:
        t0 = time.perf_counter()
        r = evaluate_arrays(dbc, dbf, dbl, qc, qf, ql, (mode,), top_k=1000, max_candidates=a.max_candidates)
        out["seconds"][mode] = round(time.perf_counter() - t0, 2)
        out[f"{mode}_map_at_1000"] = r[mode]["map_at_k"]
        print(f"{mode}: {out['seconds'][mode]:.2f} s  mAP@1000 {r[mode]['map_at_k']:.4f}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
