"""Measure the routing crossovers the Searcher uses (writes deephash_faiss/routing.json).

CPU (default): BCS k=10 ms per query of the code dictionary (BucketIndex) against the FAISS
flat scan (IndexBinaryFlat, 64-bit padded), over n rows holding U distinct 48-bit codes
(rows drawn uniformly from U random codes), for batch sizes 1 and 64. Thresholds:
  auto_buckets_min_rows   smallest n from which the dictionary is no slower at U / n = 0.01
                          (every larger n, both batch sizes)
  dict_knn_max_ratio      largest U / n at which the dictionary is no slower than the scan
                          for every n >= auto_buckets_min_rows and both batch sizes
  auto_buckets_max_ratio  the same number (build-index --index-type auto)
  dict_ball_min_codes     smallest U from which probing the radius-2 ball beats the scan, on
                          trained-like codes (mode codes + a tail, Zipf rows)
CUDA (--device cuda, on the GPU machine): the GPU kernels (search.GpuCodeIndex) against the
best CPU path, n in --cuda-n, batches 1, 16, 1024; thresholds cuda_min_batch / cuda_min_rows =
the smallest batch and n from which the GPU is faster at every larger measured n and batch.
The keys measured in an earlier run on the other device are kept (--merge, default on).

    python benchmarks/bench_route.py                       # CPU, rewrites the cpu keys
    python benchmarks/bench_route.py --device cuda         # on the H200, adds the cuda keys
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import numpy as np  # noqa: E402

from common import machine_basics  # noqa: E402

from deephash_faiss import routing  # noqa: E402
from deephash_faiss.index import BinaryIndex, BucketIndex, IndexSpec  # noqa: E402


def ms_per_query(fn, q, reps=3):
    fn(q)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn(q)
        best = min(best, time.perf_counter() - t)
    return best / len(q) * 1e3


def codes_with(n, U, rng):
    pool = rng.integers(0, 256, (U, 6), dtype=np.uint8)
    return pool[rng.integers(0, U, n)], pool


def clustered_codes(U, rng, centres=10):
    """~U distinct 48-bit codes like a trained model's (per class a mode code and a tail of
    codes 1..6 flips away), rows Zipf over the codes; queries = the centres with one flip."""
    cent = rng.integers(0, 2, (centres, 48), dtype=np.uint8)
    c = cent[rng.integers(0, centres, U)]
    nf = rng.integers(1, 7, U)
    for j in range(6):
        sel = np.flatnonzero(nf > j)
        c[sel, rng.integers(0, 48, len(sel))] ^= 1
    c[:centres] = cent
    pool = np.packbits(c, axis=1, bitorder="little")
    w = 1.0 / np.arange(1, U + 1) ** 1.1
    db = pool[rng.choice(U, 4 * U, p=w / w.sum())]
    qb = cent[rng.integers(0, centres, 64)]
    qb[np.arange(64), rng.integers(0, 48, 64)] ^= 1
    return db, np.packbits(qb, axis=1, bitorder="little")


def cpu_grid(a, rng):
    rows = []
    for n in a.n:
        for ratio in a.ratios:
            U = max(1, int(n * ratio))
            db, pool = codes_with(n, U, rng)
            b = BinaryIndex.build(db, IndexSpec("buckets"))
            f = BinaryIndex.build(db, IndexSpec("flat"))
            for batch in (1, 64):
                q = pool[rng.integers(0, U, batch)]
                q[batch // 2:, 0] ^= 1  # half the queries off the dictionary
                rows.append({"n": n, "ratio": ratio, "distinct": b.n_codes, "batch": batch,
                             "dict_ms": ms_per_query(lambda x: b.search(x, 10), q),
                             "flat_ms": ms_per_query(lambda x: f.search(x, 10), q)})
                print(rows[-1], flush=True)
    ball = []
    for U in a.ball_u:
        db, q = clustered_codes(U, rng)
        b = BucketIndex.build(db)
        row = {"distinct": b.n_codes, "rows": len(db)}
        for on in (False, True):
            th = dict(routing.thresholds(), dict_ball_min_codes=0 if on else 1 << 62)
            saved = routing.thresholds
            routing.thresholds = lambda th=th: th
            try:
                row["ball_ms" if on else "scan_ms"] = ms_per_query(lambda x: b.search(x, 10), q)
            finally:
                routing.thresholds = saved
        ball.append(row)
        print(row, flush=True)
    # the dictionary wins from min_rows on (at U / n = 0.01, every larger n, both batches) ...
    wins = [n for n in a.n if all(x["dict_ms"] <= x["flat_ms"] for x in rows if x["n"] == n and x["ratio"] == 0.01)]
    min_rows = min([n for n in a.n if all(m in wins for m in a.n if m >= n)] or [max(a.n)])
    # ... up to the largest ratio at which it wins for every n >= min_rows and batch
    ok = [r for r in a.ratios if all(x["dict_ms"] <= x["flat_ms"] for x in rows if x["ratio"] == r and x["n"] >= min_rows)]
    max_ratio = max([r for r in a.ratios if all(rr in ok for rr in a.ratios if rr <= r)] or [0.0])
    ball_min = min([r["distinct"] for r in ball if r["ball_ms"] <= r["scan_ms"]
                    and all(b2["ball_ms"] <= b2["scan_ms"] for b2 in ball if b2["distinct"] >= r["distinct"])]
                   or [1 << 62])
    th = {"dict_knn_max_ratio": max_ratio, "auto_buckets_max_ratio": max_ratio,
          "auto_buckets_min_rows": int(min_rows), "dict_ball_min_codes": int(ball_min)}
    return th, {"grid": rows, "ball": ball}


def cuda_grid(a, rng):
    import torch

    from deephash_faiss.search import GpuCodeIndex

    rows = []
    dev = torch.device("cuda")
    for n in a.cuda_n:
        for kind, U in (("two_class", 2), ("real_like", max(2, int(n * 0.04))), ("spread", n)):
            db, pool = codes_with(n, U, rng)
            cpu = BinaryIndex.build(db, IndexSpec("buckets" if U <= 0.25 * n else "flat"))
            t = time.perf_counter()
            g = GpuCodeIndex(db, cpu, dev)
            torch.cuda.synchronize()
            start_s = time.perf_counter() - t
            for batch in (1, 16, 1024):
                q = pool[rng.integers(0, U, batch)]
                rows.append({"n": n, "codes": kind, "distinct": U, "batch": batch, "gpu_start_s": start_s,
                             "gpu_ms": ms_per_query(lambda x: g.search(x, 10), q),
                             "cpu_ms": ms_per_query(lambda x: cpu.search(x, 10), q),
                             "cpu_path": "dict" if isinstance(cpu, BucketIndex) else "flat"})
                print(rows[-1], flush=True)
            del g
            torch.cuda.empty_cache()
    # the GPU only where no dictionary applies (route() sends those to "dict" first)
    th = cuda_thresholds(rows)
    return th, {"grid": rows, "device_name": torch.cuda.get_device_name(0), "torch": torch.__version__}


def cuda_thresholds(rows):
    """routing keys from the CUDA grid: the grid itself (routing.cuda_wins picks the nearest
    measured point) and, as a fallback, the smallest (rows, batch) from which the GPU beat the
    flat scan at every larger measured point."""
    flat_rows = [r for r in rows if r["cpu_path"] == "flat"]
    best = None
    for n0, b0 in sorted({(r["n"], r["batch"]) for r in flat_rows if r["gpu_ms"] <= r["cpu_ms"]}):
        if all(r["gpu_ms"] <= r["cpu_ms"] for r in flat_rows if r["n"] >= n0 and r["batch"] >= b0):
            best = (n0, b0)
            break
    th = {"cuda_min_rows": int(best[0]), "cuda_min_batch": int(best[1])} if best else \
        {"cuda_min_rows": None, "cuda_min_batch": None}
    th["cuda_grid"] = [[r["n"], r["distinct"], r["batch"], round(r["gpu_ms"], 5), round(r["cpu_ms"], 5)] for r in rows]
    return th


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--n", type=lambda s: [int(float(x)) for x in s.split(",")], default=[1000, 10_000, 100_000, 1_000_000])
    ap.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")],
                    default=[0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0])
    ap.add_argument("--ball-u", type=lambda s: [int(float(x)) for x in s.split(",")],
                    default=[1000, 10_000, 100_000, 1_000_000])
    ap.add_argument("--min-rows-floor", type=int, default=10_000)
    ap.add_argument("--cuda-n", type=lambda s: [int(float(x)) for x in s.split(",")],
                    default=[50_000, 1_000_000, 10_000_000, 100_000_000])
    ap.add_argument("--out", default=routing.ROUTING_FILE)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    try:
        with open(a.out) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        doc = {"thresholds": {}, "measured": {}}
    th, detail = cpu_grid(a, rng) if a.device == "cpu" else cuda_grid(a, rng)
    doc["thresholds"].update(th)
    doc.setdefault("measured", {})[a.device] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_basics(), "loadavg": os.getloadavg(), "thresholds": th, **detail,
        "command": "python benchmarks/bench_route.py" + ("" if a.device == "cpu" else " --device cuda")}
    doc["note"] = ("written by benchmarks/bench_route.py; deephash_faiss.routing reads 'thresholds' "
                   "(keys missing here fall back to routing.DEFAULTS)")
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(json.dumps(doc["thresholds"]))


if __name__ == "__main__":
    main()
