"""What the CIFAR-10 build loses between the model and the command (issue 12).

(Prepared 2026-12-03, ninth session. Its one H200 run, in h200_readers_and_runner.sh, hit its
120 s limit without output: it printed only at the end, and the GIL-loaded runs, then over all
batches, were the slow part. Each measurement is now printed as it ends and the GIL-loaded runs
take the first GIL_BATCHES batches; not run since.)

    python benchmarks/diag_runner.py --model M.pt [--n 50000] [--device cuda] [--json OUT]

On the H200 the model alone (``extract.encode_array``, NCHW) ran 11,449 img/s at CIFAR-10's
32-px load size, the encode phase of ``dhf build-index`` about 8,150 img/s after its first
batch. This times, in one process on the same pre-made uint8 batches (zeros: the model's time
does not depend on the pixels) [n, S, S, 3] at the model's load size, batch 256:

  encode_array_<layout>   the model-only measurement (bench_build's; one sync a batch)
  runner_<layout>         the product's ``stream._CudaRunner`` (pinned copies, side stream,
                          results collected 2 batches later), fed as fast as it takes them
  runner_gil_<layout>     the same (first GIL_BATCHES batches) with 8 Python threads spinning on small numpy work (the
                          decode pool's result handling, the shard writer): does the GIL
                          starve the kernel launches?
  runner_switch_<layout>  runner_gil with the interpreter's switch interval the encoder sets
                          (stream.GIL_SWITCH_S)

each after one untimed pass (cuDNN plans, kernel loading); layouts "contiguous" (NCHW) and
"channels_last" (NHWC).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import write_json  # noqa: E402


GIL_BATCHES = 20  # batches timed under GIL load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--device", default="cuda", help="cuda (the measurement); cpu is a smoke test")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    import numpy as np
    import torch

    from deephash_faiss.extract import encode_array
    from deephash_faiss.model import load_model
    from deephash_faiss.stream import GIL_SWITCH_S, _CudaRunner

    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    model = load_model(a.model, dev).eval()
    S = model.config.load_size
    x = np.zeros((a.n, S, S, 3), np.uint8)
    batches = [x[i:i + a.batch] for i in range(0, a.n, a.batch)]
    res: dict = {"n": a.n, "batch": a.batch, "load_size": S, "torch": torch.__version__,
                 "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                 "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def rate(fn, n: int = a.n) -> float:
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return round(n / (time.perf_counter() - t), 1)

    def put(key: str, value: float) -> None:
        res[key] = value
        print(f"{key} {value} img/s", flush=True)

    def spin(stop: threading.Event) -> None:
        v = np.ones(64)
        while not stop.is_set():
            v = (v * 1.0000001).copy()

    layouts = ("contiguous", "channels_last") if cuda else ("channels_last",)
    for lay in layouts:
        os.environ["DHF_CUDA_LAYOUT"] = lay
        encode_array(model, x[:a.batch], dev, a.batch)  # untimed: plans, kernels
        put(f"encode_array_{lay}", rate(lambda: encode_array(model, x, dev, a.batch)))
        if not cuda:
            continue

        def run(some=batches) -> None:
            r = _CudaRunner(model, dev, "float32", batch=a.batch, layout=lay)
            for i, b in enumerate(some):
                r.push(b, i)
            r.flush()

        run()
        put(f"runner_{lay}", rate(run))
        few = batches[:GIL_BATCHES]
        for name, switch in (("runner_gil", None), ("runner_switch", GIL_SWITCH_S)):
            stop = threading.Event()
            ths = [threading.Thread(target=spin, args=(stop,), daemon=True) for _ in range(8)]
            old = sys.getswitchinterval()
            if switch:
                sys.setswitchinterval(switch)
            for t in ths:
                t.start()
            try:
                put(f"{name}_{lay}", rate(lambda: run(few), sum(len(b) for b in few)))
            finally:
                stop.set()
                for t in ths:
                    t.join()
                sys.setswitchinterval(old)
    os.environ.pop("DHF_CUDA_LAYOUT", None)
    print(json.dumps(res))
    if a.json:
        write_json(a.json, res, indent=1)


if __name__ == "__main__":
    main()
