"""What the integrity checks on open cost (docs/reliability.md, "Checks on open").

Builds indexes from random arrays (64-bit codes, tiny float16 features, so the disk
stays small) and times, warm page cache, best of ``--repeat``:

* ``check_open``: stat of every shard and the code index, sha256 of the code index when
  at most ``store.OPEN_HASH_LIMIT`` bytes (the default check of ``Searcher.__init__``);
* ``check_open(full=True)``: sha256 of every file (``Searcher(full_check=True)``);
* ``Searcher(...)`` open as a whole (manifest, checks, FAISS index load), and the same
  with the checks replaced by a no-op (the open cost before them);
* ``checked_model_path``: the sha256 of the model, paid when the model is first loaded,
  for the smallcnn checkpoint and a synthetic file of ``--model-mb`` MB (resnet50 is ~95 MB).

    python benchmarks/bench_open.py --out benchmarks/results/open_checks.json
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import best_ms as best, machine_basics, write_json  # noqa: E402

from deephash_faiss import api, store  # noqa: E402
from deephash_faiss.model import build_model, file_sha256, save_checkpoint  # noqa: E402
from deephash_faiss.search import Searcher  # noqa: E402


def _open_unchecked(d: str) -> None:
    """Searcher open with check_open replaced by a no-op: what opening cost before the checks."""
    import deephash_faiss.search as search_mod

    saved = search_mod.check_open
    search_mod.check_open = lambda *a, **k: None
    try:
        Searcher(d, device="cpu")
    finally:
        search_mod.check_open = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000,10000000", help="rows per index")
    ap.add_argument("--shard-size", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--model-mb", type=int, default=95)
    ap.add_argument("--out", default=None)
    ap.add_argument("--tmp", default=None, help="scratch folder (default: system temp)")
    a = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="dhf-bench-open-", dir=a.tmp)
    rows = []
    try:
        rng = np.random.default_rng(0)
        mdl = build_model("smallcnn", 64, ["a", "b"], weights="none")
        mpath = os.path.join(tmp, "model.pt")
        save_checkpoint(mdl, mpath)
        for n in [int(float(x)) for x in a.sizes.split(",")]:
            d = os.path.join(tmp, f"idx-{n}")
            codes = rng.integers(0, 256, (n, 8), dtype=np.uint8)
            feats = np.zeros((n, 4), np.float16)
            api.index_from_arrays(d, codes, feats, shard_size=a.shard_size)
            m = store.read_manifest(d)
            ipath = os.path.join(d, m["index"]["file"])
            isize = os.path.getsize(ipath)
            file_sha256(ipath)  # warm the page cache
            row = {
                "rows": n, "shards": len(m["shards"]), "code_index_bytes": isize,
                "code_index_hashed_on_open": isize <= store.OPEN_HASH_LIMIT,
                "check_open_ms": round(best(lambda: store.check_open(d, m), a.repeat), 2),
                "check_open_full_ms": round(best(lambda: store.check_open(d, m, full=True), max(1, a.repeat // 2)), 1),
                "stat_only_ms": round(best(lambda: store.check_open(d, m, hash_limit=-1), a.repeat), 2),
                "searcher_open_ms": round(best(lambda: Searcher(d, device="cpu"), a.repeat), 1),
                "searcher_open_without_checks_ms": round(best(lambda: _open_unchecked(d), a.repeat), 1),
            }
            rows.append(row)
            print(row, flush=True)
            shutil.rmtree(d)
        big = os.path.join(tmp, "big-model.bin")
        with open(big, "wb") as f:
            f.write(os.urandom(a.model_mb << 20))
        file_sha256(big)
        model = {
            "smallcnn_bytes": os.path.getsize(mpath),
            "smallcnn_sha256_ms": round(best(lambda: file_sha256(mpath), a.repeat), 1),
            f"file_{a.model_mb}MB_sha256_ms": round(best(lambda: file_sha256(big), a.repeat), 1),
        }
        print(model)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    import faiss
    import h5py
    import torch

    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": {**machine_basics(), "numpy": np.__version__, "faiss": faiss.__version__,
                       "h5py": h5py.__version__, "torch": torch.__version__},
           "load_average_1_5_15": [round(x, 1) for x in os.getloadavg()],
           "open_hash_limit_bytes": store.OPEN_HASH_LIMIT, "page_cache": "warm", "indexes": rows, "model": model}
    if a.out:
        write_json(a.out, out)
        print("wrote", a.out)


if __name__ == "__main__":
    main()
