"""Prepared for the next session with a GPU (not run yet): what bounds the nvjpeg decode stage.

    python benchmarks/diag_decode_threads.py --photos DIR [--n 30000] [--json OUT]

Issue 12, 2026-12-03: ``gpudecode.decode_batch`` alone ran 13,000-15,000 img/s (one thread,
bytes read beforehand: ``diag_startup.py``), but bench_build's decode stage (16 reading and
screening threads feeding one decoding thread) 8,235 img/s at 200,000 photos, and the build
7,700 img/s after its first batch. The header screening is Python: reading threads compete
with the decoding thread for the GIL. This times, on the same files, batch 256, 224 px:

  op_alone            the nvjpeg operator on bytes read beforehand, one thread
  decode_batch_T      ``decode_batch`` on bytes read beforehand, T decoding threads (1, 2), each
                      on its own CUDA stream
  fed_R               ``read_screen_chunk`` in R reading threads (2, 4, 8, 16), results decoded
                      in order by one thread: bench_build's decode stage with R workers
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", required=True)
    ap.add_argument("--n", type=int, default=30_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--device", default="cuda", help="cuda (the measurement); cpu runs the same code (a smoke test)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    import torch

    from deephash_faiss.gpudecode import decode_batch, decode_jpegs, read_bytes
    from deephash_faiss.stream import DecodePool, read_screen_chunk

    paths = sorted(glob.glob(os.path.join(a.photos, "**", "*.jpg"), recursive=True))[:a.n]
    datas = [read_bytes(p) for p in paths]
    batches = [datas[i:i + a.batch] for i in range(0, len(datas), a.batch)]
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    decode_batch(batches[0][:2], a.size, dev)  # first call (operators, nvjpeg handle)
    sync()
    res: dict = {"n": len(paths), "batch": a.batch, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                 "torch": torch.__version__, "device": torch.cuda.get_device_name(0) if cuda else "cpu"}

    def rate(fn) -> float:
        t = time.perf_counter()
        fn()
        sync()
        return round(len(paths) / (time.perf_counter() - t), 1)

    tensors = [[torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in b] for b in batches]
    res["op_alone"] = rate(lambda: [decode_jpegs(t, dev) for t in tensors])
    for nt in (1, 2):
        def run(nt=nt):
            def worker(j):
                ctx = torch.cuda.stream(torch.cuda.Stream(dev)) if cuda else contextlib.nullcontext()
                with ctx:
                    for b in batches[j::nt]:
                        decode_batch(b, a.size, dev)
                    sync()
            ths = [threading.Thread(target=worker, args=(j,)) for j in range(nt)]
            for t in ths:
                t.start()
            for t in ths:
                t.join()
        res[f"decode_batch_{nt}"] = rate(run)
    for readers in (2, 4, 8, 16):
        pool = DecodePool("thread", readers)
        try:
            def fed():
                futs = [pool.submit(read_screen_chunk, paths[i:i + a.batch], a.size)
                        for i in range(0, len(paths), a.batch)]
                for f in futs:
                    decode_batch([d for _, d in f.result()[0]], a.size, dev)
            res[f"fed_{readers}"] = rate(fed)
        finally:
            pool.close()
    print(json.dumps(res))
    if a.json:
        write_json(a.json, res, indent=1)


if __name__ == "__main__":
    main()
