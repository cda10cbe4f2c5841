"""Decode throughput by worker kind and count, and `dhf build-index` by decode-thread count
(issue 12: on a GPU host threads are bound by the GIL; docs/scaling.md, "Thread counts").

    python benchmarks/bench_decode_threads.py --images cifar10/train --size 32 \
        --pools thread:1,thread:2,process:2 --json OUT.json
    python benchmarks/bench_decode_threads.py --images cifar10/train --size 32 --pools "" \
        --build-model smallcnn32.pt --build-threads 1,2 --rounds 3 --device cpu --json OUT.json

Decode: every file through the build's own pool (``stream.DecodePool``, ``stream.decode_chunk``,
batches of 256 cut in the build's chunks), torch imported so the as-is JPEG path decodes in
threads, after one untimed read of every file; a pool named twice is timed twice. Builds: the command as a subprocess, its decode pool forced to threads
(``stream.PROCESS_MIN_CPUS`` raised) with ``data.default_workers`` set to the count; wall time
and the build's own "in X s", the counts alternating ``--rounds`` times.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from common import machine_basics, write_json  # noqa: E402

BUILD = """import sys
from deephash_faiss import data, stream
stream.PROCESS_MIN_CPUS = 1 << 30
data.default_workers = lambda: {workers}
from deephash_faiss.cli import main
sys.argv = ['dhf'] + sys.argv[1:]
main()
"""


def decode_rate(paths: list[str], size: int, kind: str, workers: int, batch: int = 256) -> float:
    """Images per second decoding ``paths`` in the build's pool of ``workers`` ``kind`` workers."""
    from deephash_faiss import stream

    pool = stream.DecodePool(kind, workers)
    try:
        chunk = max(stream.DECODE_CHUNK_MIN, -(-batch // workers))
        t = time.perf_counter()
        futs = [stream.submit_chunks(pool, stream.decode_chunk, paths[o:o + batch], size, chunk)
                for o in range(0, len(paths), batch)]
        n = sum(len(f.result()[0]) for f in futs)
        return n / (time.perf_counter() - t)
    finally:
        pool.close()


def build_once(images: str, model: str, workers: int, device: str, batch: int) -> dict:
    """One `dhf build-index` with ``workers`` decode threads: wall and inner seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-c", BUILD.format(workers=workers), "build-index", images, "--model", model,
               "-o", os.path.join(tmp, "ix"), "--device", device, "--batch-size", str(batch)]
        t = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t
    m = re.search(r"indexed \d+ images into .* in ([0-9.]+) s", p.stdout + p.stderr)
    if p.returncode or not m:
        raise SystemExit(f"build failed (rc {p.returncode}): {(p.stderr or p.stdout)[-500:]}")
    return {"wall_s": round(wall, 3), "inner_s": float(m.group(1))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", required=True, help="a folder of images (searched recursively)")
    ap.add_argument("--size", type=int, default=32, help="decode size")
    ap.add_argument("--pools", default="thread:1,thread:2,thread:4,thread:8,thread:16,process:16",
                    help="KIND:WORKERS,... to time decoding alone ('' for none)")
    ap.add_argument("--build-model", default=None, help="also time `dhf build-index --model M`")
    ap.add_argument("--build-threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    import torch  # noqa: F401 - the as-is JPEG path decodes where torch is loaded

    from deephash_faiss import data

    paths = sorted(p for p in glob.glob(os.path.join(a.images, "**", "*"), recursive=True) if os.path.isfile(p))
    out = {"images": a.images, "n": len(paths), "size": a.size, "machine": machine_basics(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "as_is_jpeg": data.as_is_jpeg_enabled(), "decode_img_s": {}, "builds": {}}
    for p in paths:  # the page cache warm, as for every timed pass after it
        with open(p, "rb") as f:
            f.read()
    for spec in [s for s in a.pools.split(",") if s]:
        kind, w = spec.split(":")
        rate = round(decode_rate(paths, a.size, kind, int(w)))
        out["decode_img_s"].setdefault(spec, []).append(rate)
        print(f"decode {spec}: {rate:,} img/s", flush=True)
    if a.build_model:
        counts = [int(c) for c in a.build_threads.split(",")]
        for _ in range(a.rounds):
            for c in counts:
                r = build_once(a.images, a.build_model, c, a.device, a.batch_size)
                out["builds"].setdefault(str(c), []).append(r)
                print(f"build, {c} decode thread(s): {r}", flush=True)
    write_json(a.json, out)


if __name__ == "__main__":
    main()
