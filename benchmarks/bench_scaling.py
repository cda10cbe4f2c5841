"""Numbers for docs/scaling.md: FAISS binary index memory and speed at 1e6 / 1e7 codes,
and CNN extraction rates on this machine's CPU.

Example:
    python benchmarks/bench_scaling.py --json benchmarks/results/scaling_cpu.json

Index memory: random uniform codes (every code its own hash bucket: the worst case for
hash tables), one index at a time; ``rss_mb`` is the process RSS growth while the index
is built and the codes array has been freed, ``serialized_mb`` the size of
faiss.serialize_index_binary (what codes.index takes on disk). Widths 48, 64, 128 bits;
48-bit codes are also measured zero-padded to 64 bits (deephash_faiss.index pads them
for FAISS's fast kernels). Kinds: flat, hash (b=16 at 1e6, b=20 at 1e7 ... see JSON),
multihash (nhash=2, b=24).

Speed (64-bit codes, 2 faiss threads): BCS k=100 batch of 256 queries on IndexBinaryFlat,
radius-3 range search on flat and hash; queries are database codes with 2 bits flipped.

Extraction: images/s of HashNet forward passes (codes + fc7) on pre-decoded uint8
batches, torch default threads, for smallcnn (32 px) and efficientnet_lite0 (224 px,
untrained weights: speed does not depend on them), plus JPEG decode rate at 32 px.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import machine_basics, write_json  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_index(kind: str, bits: int, n: int):
    import faiss

    if kind == "flat":
        return faiss.IndexBinaryFlat(bits), {}
    if kind == "hash":
        b = 16 if n <= 1_000_000 else 20
        idx = faiss.IndexBinaryHash(bits, b)
        idx.nflip = 2
        return idx, {"b": b, "nflip": 2}
    idx = faiss.IndexBinaryMultiHash(bits, 2, 24)
    idx.nflip = 1
    return idx, {"nhash": 2, "b": 24, "nflip": 1}


def index_memory(ns, bits_list, kinds):
    import faiss

    out = []
    rng = np.random.default_rng(0)
    for n in ns:
        for bits in bits_list:
            for kind in kinds:
                gc.collect()
                codes = rng.integers(0, 256, (n, bits // 8), dtype=np.uint8)
                base = rss_mb()
                t0 = time.perf_counter()
                idx, params = make_index(kind, bits, n)
                for s in range(0, n, 1_000_000):
                    idx.add(codes[s:s + 1_000_000])
                build = time.perf_counter() - t0
                del codes
                gc.collect()
                grow = rss_mb() - base + n * bits / 8 / 2**20  # the codes array was counted in base
                ser = len(faiss.serialize_index_binary(idx)) / 2**20
                row = {"n": n, "bits": bits, "kind": kind, **params, "rss_mb": round(grow, 1),
                       "serialized_mb": round(ser, 1), "bytes_per_code": round(ser * 2**20 / n, 2),
                       "build_s": round(build, 2)}
                print(json.dumps(row), flush=True)
                out.append(row)
                del idx
                gc.collect()
    return out


def index_speed(n: int, bits: int = 64, nq: int = 256, k: int = 100):
    import faiss

    rng = np.random.default_rng(1)
    centres = rng.integers(0, 256, (1000, bits // 8), dtype=np.uint8)
    codes = centres[rng.integers(0, 1000, n)]
    flip = np.zeros((n, bits), bool)
    cols = rng.integers(0, bits, (n, 3))
    flip[np.arange(n)[:, None], cols] = True
    codes ^= np.packbits(flip, axis=1, bitorder="little")
    q = codes[rng.integers(0, n, nq)].copy()
    res = {"n": n, "bits": bits, "queries": nq, "k": k,
           "data": "1000 class centres, each code its centre with <= 3 bits flipped (supervised-like)"}
    flat = faiss.IndexBinaryFlat(bits)
    flat.add(codes)
    flat.search(q[:8], k)
    t0 = time.perf_counter()
    flat.search(q, k)
    dt = time.perf_counter() - t0
    res["flat_knn_qps"] = round(nq / dt, 1)
    t0 = time.perf_counter()
    lims, D, I = flat.range_search(q[:64], 3)
    dt = time.perf_counter() - t0
    res["flat_range3_qps"] = round(64 / dt, 1)
    res["range3_mean_pool"] = round(float(np.diff(lims).mean()), 1)
    h = faiss.IndexBinaryHash(bits, 20 if n > 1_000_000 else 16)
    h.nflip = 2
    h.add(codes)
    t0 = time.perf_counter()
    lims2, _, _ = h.range_search(q[:64], 3)
    dt = time.perf_counter() - t0
    res["hash_range3_qps"] = round(64 / dt, 1)
    res["hash_range3_recall"] = round(float(np.diff(lims2).sum() / max(1, np.diff(lims).sum())), 4)
    print(json.dumps(res), flush=True)
    return res


def extraction(jpeg_dir: str | None):
    import torch

    from deephash_faiss.extract import encode_array
    from deephash_faiss.model import build_model

    out = {"torch_threads": torch.get_num_threads()}
    dev = torch.device("cpu")
    for backbone, isize, lsize, n, bs in [("smallcnn", 32, 32, 4096, 256), ("efficientnet_lite0", 224, 224, 128, 32),
                                          ("efficientnet_lite0", 224, 32, 128, 32)]:
        m = build_model(backbone, 48, ["a", "b"], "none", isize, lsize).eval()
        x = np.random.default_rng(0).integers(0, 256, (n, lsize, lsize, 3), dtype=np.uint8)
        encode_array(m, x[:bs], dev, bs)
        t0 = time.perf_counter()
        encode_array(m, x, dev, bs)
        dt = time.perf_counter() - t0
        out[f"{backbone}_in{isize}_load{lsize}_img_s"] = round(n / dt, 1)
        print(backbone, isize, lsize, round(n / dt, 1), "img/s", flush=True)
    if jpeg_dir and os.path.isdir(jpeg_dir):
        from deephash_faiss.data import load_images, scan_images

        paths = scan_images(jpeg_dir).paths[:5000]
        t0 = time.perf_counter()
        load_images(paths, 32)
        out["decode_jpeg32_img_s"] = round(len(paths) / (time.perf_counter() - t0), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", default="1e6,1e7")
    ap.add_argument("--bits", default="48,64,128")
    ap.add_argument("--kinds", default="flat,hash,multihash")
    ap.add_argument("--jpeg-dir", default="/tmp/dhf-bench-ray/images-10000",
                    help="CIFAR JPEGs (e.g. from bench_ray_build.py) for the decode rate")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import faiss
    import torch

    res = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": dict(machine_basics(), faiss=faiss.__version__, torch=torch.__version__,
                           load_avg_at_start=os.getloadavg())}
    res["extraction"] = extraction(args.jpeg_dir)
    ns = [int(float(x)) for x in args.ns.split(",")]
    res["index_memory"] = index_memory(ns, [int(b) for b in args.bits.split(",")], args.kinds.split(","))
    res["index_speed"] = [index_speed(n) for n in ns]
    res["machine"]["load_avg_at_end"] = os.getloadavg()
    if args.json:
        write_json(args.json, res)


if __name__ == "__main__":
    main()
