"""Feature gather for reranking: FeatureStore.gather vs naive h5py fancy indexing.

Example:
    python benchmarks/bench_gather.py --n 1e6 --dim 1024 --dtype float32 float16 \
        --dir /tmp/dhf_gather --json benchmarks/results/gather_n1e6_d1024.json

Writes --shards HDF5 shards with deephash_faiss.store.write_shard (contiguous,
uncompressed features), then for scattered candidate sets of --sizes random ids:
  naive    per shard, h5py ``f["features"][sorted unique local ids]`` (h5py needs
           increasing indices), then scattered back to the requested order
  gather   FeatureStore.gather (np.memmap of the contiguous dataset, MADV_RANDOM,
           MADV_WILLNEED prefetch of the requested rows, sorted reads); also with
           the prefetch off (gather_noprefetch)
Warm: files in the page cache, median of --repeat, fresh random ids per call;
``gather`` opens a new FeatureStore per call (fresh mapping: one page fault per row),
``gather_mapped`` uses a long-lived store whose mapping is populated (a warm server).
Cold: before each call the files' pages are evicted with posix_fadvise(POSIX_FADV_DONTNEED) (no root needed; the
global /proc/sys/vm/drop_caches is not used: it would slow everyone on a shared
machine) and a fresh FeatureStore is opened. Files are deleted at the end.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shutil
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from deephash_faiss.store import FeatureStore, write_shard  # noqa: E402
from common import write_json  # noqa: E402


def evict(paths):
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def naive_gather(files, starts, ids, dim, dtype):
    import h5py

    out = np.empty((len(ids), dim), dtype)
    shard_of = np.searchsorted(starts, ids, side="right") - 1
    for si, f in enumerate(files):
        sel = np.flatnonzero(shard_of == si)
        if len(sel) == 0:
            continue
        local = ids[sel] - starts[si]
        uniq, inv = np.unique(local, return_inverse=True)
        with h5py.File(f, "r") as h:
            rows = h["features"][uniq]
        out[sel] = rows[inv]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=float, default=1e6)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--dtype", nargs="+", default=["float32", "float16"])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--naive-max", type=int, default=100000, help="skip naive h5py above this many ids")
    ap.add_argument("--dir", default="/tmp/dhf_gather")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", required=True)
    a = ap.parse_args(argv)
    n, dim = int(a.n), a.dim
    rng = np.random.default_rng(0)
    res = {"date": datetime.date.today().isoformat(), "n": n, "dim": dim, "shards": a.shards, "results": []}
    try:
        import faiss
        import h5py
        res["versions"] = {"numpy": np.__version__, "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version,
                           "faiss": faiss.__version__}
    except ImportError:
        pass
    # Not written even where permitted: dropping every cache hurts others on a shared machine.
    res["drop_caches"] = ("writable (not used)" if os.access("/proc/sys/vm/drop_caches", os.W_OK) else "not permitted") \
        + "; cold = posix_fadvise(DONTNEED) on the shard files"
    for dt in a.dtype:
        d = os.path.join(a.dir, dt)
        shutil.rmtree(d, ignore_errors=True)
        rows = [n // a.shards + (i < n % a.shards) for i in range(a.shards)]
        t0 = time.perf_counter()
        shards, start = [], 0
        for si, r in enumerate(rows):
            f = rng.standard_normal((r, dim), dtype=np.float32).astype(dt)
            meta = write_shard(os.path.join(d, "shards", f"part-{si:05d}.h5"), np.zeros((r, 6), np.uint8), f,
                               np.arange(start, start + r), [""] * r, np.zeros(r, np.int32))
            shards.append(meta)
            start += r
            del f
        write_s = time.perf_counter() - t0
        manifest = {"count": n, "feature_dim": dim, "feature_dtype": dt, "bits": 48, "shards": shards}
        files = [os.path.join(d, "shards", s["file"]) for s in shards]
        starts = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        disk_gb = sum(os.path.getsize(p) for p in files) / 2**30
        print(f"{dt}: wrote {disk_gb:.1f} GB in {write_s:.1f} s", flush=True)
        for size in a.sizes:
            row = {"dtype": dt, "ids": size, "disk_gb": disk_gb}
            # cold first: a live mapping keeps its pages from being evicted
            variants = [("gather", "cold"), ("gather_noprefetch", "cold"), ("naive", "cold"),
                        ("gather", "warm"), ("naive", "warm"), ("gather_mapped", "warm")]
            ref_ids = rng.integers(0, n, size)
            ref = naive_gather(files, starts, ref_ids, dim, np.dtype(dt))
            mapped = None
            for meth, cache in variants:
                if meth == "gather_mapped":
                    mapped = FeatureStore(d, manifest)  # long-lived store, every page mapped (a warm server)
                    for sv in mapped.shards:
                        float(mapped._mapped(sv)[:, 0].astype(np.float64).sum())
                if meth == "naive" and size > a.naive_max:
                    continue
                ts = []
                for rep in range(a.repeat + (cache == "warm")):
                    ids = ref_ids if rep == 0 else rng.integers(0, n, size)  # fresh ids per call
                    if cache == "cold":
                        evict(files)
                    store = mapped if meth == "gather_mapped" else FeatureStore(d, manifest)
                    store.prefetch = meth != "gather_noprefetch"
                    t = time.perf_counter()
                    if meth == "naive":
                        g = naive_gather(files, starts, ids, dim, np.dtype(dt))
                    else:
                        g = store.gather(ids)
                    el = time.perf_counter() - t
                    if rep == 0:
                        assert np.array_equal(g, ref), meth
                    if store is not mapped:
                        del store
                        gc.collect()
                    if cache == "warm" and rep == 0:
                        continue  # warm-up
                    ts.append(el)
                tm = statistics.median(ts)
                row[f"{meth}_{cache}_s"] = tm
                row[f"{meth}_{cache}_rows_per_s"] = size / tm
            for meth, cache in variants:
                if meth != "naive" and f"naive_{cache}_s" in row and f"{meth}_{cache}_s" in row:
                    row[f"speedup_{meth}_{cache}"] = row[f"naive_{cache}_s"] / row[f"{meth}_{cache}_s"]
            print(json.dumps(row), flush=True)
            res["results"].append(row)
            del mapped
            gc.collect()
        if not a.keep:
            shutil.rmtree(d, ignore_errors=True)
    if not a.keep:
        shutil.rmtree(a.dir, ignore_errors=True)
    write_json(a.json, res)


if __name__ == "__main__":
    main()
