"""Sharded BCS / HDS over N devices (issue 14): one shard per device, fan-out + merge.

Each shard is a :class:`deephash_faiss.search.GpuCodeIndex` (codes on its own device,
``cuda:i``) over ``--n-per-shard`` random 64-bit codes (or clustered: --classes); queries
fan out to all shards from one thread per shard and the k-NN lists are merged with
:func:`deephash_faiss.distributed.merge_knn_batch` (the merge ShardedCodeIndex uses). Checked
identical to one index over all codes on the first device when that fits (--check).
Reports queries/s and p50/p99 batch latency for 1 shard and for N shards.

    python benchmarks/bench_shards.py --devices cuda:0,...,cuda:7 --n-per-shard 1e8 --json OUT
    python benchmarks/bench_shards.py --devices cpu,cpu --n-per-shard 1e5 --json OUT   # CPU smoke test
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import numpy as np  # noqa: E402

from common import machine_basics, write_json  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", required=True)
    ap.add_argument("--n-per-shard", type=float, default=1e8)
    ap.add_argument("--bits", type=int, default=64)
    ap.add_argument("--classes", type=int, default=0, help="0: random codes; else clustered codes")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    import torch

    from deephash_faiss.distributed import merge_knn_batch
    from deephash_faiss.index import BinaryIndex, IndexSpec
    from deephash_faiss.search import GpuCodeIndex

    devs = a.devices.split(",")
    n = int(a.n_per_shard)
    nb = a.bits // 8
    rng = np.random.default_rng(0)
    shards = []
    t0 = time.perf_counter()
    for i, d in enumerate(devs):
        g = torch.Generator(device="cpu").manual_seed(i)
        codes = torch.randint(0, 256, (n, nb), dtype=torch.uint8, generator=g).numpy()
        owner = BinaryIndex.build(codes[:1], IndexSpec("flat"))  # only its deleted mask (None) is used
        shards.append((GpuCodeIndex(codes, owner, torch.device(d)), i * n, codes if a.check and i < 2 else None))
        del codes
    build_s = time.perf_counter() - t0
    q = rng.integers(0, 256, (a.batch, nb), dtype=np.uint8)

    def one(sh):
        gi, off, _ = sh
        D, I = gi.search(q, a.k)
        return D, np.where(I >= 0, I + off, -1)

    def run(parts_of):
        lat = []
        with ThreadPoolExecutor(len(parts_of)) as ex:
            for b in range(a.batches + 1):
                t = time.perf_counter()
                parts = list(ex.map(one, parts_of))
                D, I = merge_knn_batch(parts, a.k)
                if b:  # first batch: warm-up
                    lat.append(time.perf_counter() - t)
        lat = np.array(lat)
        return {"shards": len(parts_of), "rows": n * len(parts_of), "qps": a.batch / float(np.mean(lat)),
                "p50_ms": float(np.percentile(lat, 50) * 1e3), "p99_ms": float(np.percentile(lat, 99) * 1e3)}, (D, I)

    one_shard, _ = run(shards[:1])
    all_shards, (D, I) = run(shards)
    out = {"devices": devs, "n_per_shard": n, "bits": a.bits, "k": a.k, "batch": a.batch, "build_s": build_s,
           "one_shard": one_shard, "all_shards": all_shards,
           "rows_x_qps_ratio": all_shards["qps"] * len(shards) / one_shard["qps"],
           "machine": machine_basics(), "torch": torch.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if a.check and len(shards) >= 2:
        both = np.vstack([shards[0][2], shards[1][2]])
        ref = BinaryIndex.build(both, IndexSpec("flat")).search(q[:64], a.k)
        parts = [one(s) for s in shards[:2]]
        got = merge_knn_batch([(p[0][:64], p[1][:64]) for p in parts], a.k)
        out["identical_to_one_index_2_shards"] = bool(np.array_equal(ref[0], got[0]) and np.array_equal(ref[1], got[1]))
    write_json(a.json, out)
    print(out)


if __name__ == "__main__":
    main()
