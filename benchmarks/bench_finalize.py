"""Time the build's finalize stage (``layout.publish_shards``: copy each partial shard, renumber
its ids, fsync, sha256) on synthetic partial shards of the build's real format.

    python benchmarks/bench_finalize.py [--shards 4] [--rows 50000] [--dim 1280] [--rounds 3] [--json OUT]

The 200,000-photo H200 builds of issue 12 (4 shards x 50,000 rows x 1280 float32, ~1 GB) spent
2.0-2.3 s in finalize. Writes {"serial_s": [...], "parallel_s": [...]} per round, alternating,
the same partial shards each time (``publish_shards(..., workers=1)`` against the default).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from deephash_faiss import layout  # noqa: E402


def make_parts(part_dir: str, shards: int, rows: int, dim: int) -> None:
    rng = np.random.default_rng(0)
    for s in range(shards):
        codes = rng.integers(0, 256, (rows, 6), dtype=np.uint8)
        feats = rng.standard_normal((rows, dim), dtype=np.float32)
        paths = [f"/photos/{s}/{i:06d}.jpg" for i in range(rows)]
        layout.write_part(part_dir, s, codes, feats, np.arange(rows), paths, np.zeros(rows, np.int32), [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    root = tempfile.mkdtemp(dir=a.dir)
    try:
        part = os.path.join(root, "part")
        make_parts(part, a.shards, a.rows, a.dim)
        res = {"shards": a.shards, "rows": a.rows, "dim": a.dim, "cpus": os.cpu_count(),
               "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "serial_s": [], "parallel_s": []}
        for r in range(a.rounds):
            for key, workers in (("serial_s", 1), ("parallel_s", None)):
                ix = os.path.join(root, f"ix-{key}-{r}")
                os.makedirs(ix)
                t = time.perf_counter()
                shards, _, _, n = layout.publish_shards(ix, part, range(a.shards), 0, 1, workers=workers)
                res[key].append(round(time.perf_counter() - t, 3))
                assert n == a.shards * a.rows and [s["start"] for s in shards] == [i * a.rows for i in range(a.shards)]
                shutil.rmtree(ix)
        print(json.dumps(res))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
