"""Would a CUDA graph free the encoder's forward pass from the GIL? (issue 12; H200 only)

    python benchmarks/diag_graph.py --model M.pt [--layouts contiguous channels_last] [--batches 40]
        [--gil-batches 10] [--spinners 2] [--json OUT]

``diag_runner.py`` found the product's CUDA runner alone at the model's rate (11,412 img/s at
CIFAR-10's 32-px load size, NCHW) but unable to finish 20 batches in ~130 s while 8 Python
threads spun on numpy: the forward pass launches its ~200 kernels from Python, and threads that
hold the GIL starve it. A CUDA graph replays the whole pass with one call. This times, per
layout, on zeros of the model's load size, batch 256 (``model.preprocess`` eager, then the
backbone, flip averaging off, the latent layer and the sigmoid under bf16 autocast, results
left on the device, one synchronisation at the end):

  eager_<layout>        the pass as ``extract.forward_batch`` runs it
  graph_<layout>        the same pass captured once in a CUDA graph (``torch.cuda.graph``) and
                        replayed; ``capture_s_<layout>`` the capture's cost
  *_gil_<layout>        both under GIL load: ``--spinners`` Python threads (default 2) spinning on
                        small numpy work, ``--gil-batches`` batches
  max_abs_diff_<layout> fc7 of the graph against eager on the same input (0 = the same kernels)

Each number is printed as it ends (a timed-out run still says what it measured).
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--gil-batches", type=int, default=10)
    ap.add_argument("--spinners", type=int, default=2)
    ap.add_argument("--layouts", nargs="+", default=["contiguous", "channels_last"])
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    import numpy as np
    import torch

    from deephash_faiss.extract import backbone_features
    from deephash_faiss.model import load_model

    dev = torch.device("cuda")
    model = load_model(a.model, dev).eval()
    S = model.config.load_size
    xb = torch.zeros((a.batch, S, S, 3), dtype=torch.uint8, device=dev)
    res: dict = {"batch": a.batch, "load_size": S, "torch": torch.__version__, "device": torch.cuda.get_device_name(0),
                 "spinners": a.spinners, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}

    def put(key, value, unit="img/s"):
        res[key] = value
        print(f"{key} {value} {unit}", flush=True)

    def spinning(n: int):
        stop = threading.Event()

        def spin() -> None:
            v = np.ones(64)
            while not stop.is_set():
                v = (v * 1.0000001).copy()
        ths = [threading.Thread(target=spin, daemon=True) for _ in range(n)]
        for t in ths:
            t.start()
        return stop, ths

    for lay in a.layouts:
        fmt = torch.contiguous_format if lay == "contiguous" else torch.channels_last
        model.to(memory_format=fmt)

        @torch.no_grad()
        def body(x):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                fc7 = backbone_features(model, x)
            return fc7, torch.sigmoid(model.latent(fc7))

        @torch.no_grad()
        def prep():
            return model.preprocess(xb).contiguous(memory_format=fmt)

        def eager(n):
            for _ in range(n):
                out = body(prep())
            return out

        def rate(fn, n):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn(n)
            torch.cuda.synchronize()
            return round(n * a.batch / (time.perf_counter() - t), 1)

        eager(2)  # untimed: plans, kernels (NHWC builds its depthwise kernels here)
        put(f"eager_{lay}", rate(eager, a.batches))
        static_x = prep()
        t = time.perf_counter()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            body(static_x)  # warm-up on the side stream, as torch.cuda.graph asks
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_out = body(static_x)
        torch.cuda.synchronize()
        put(f"capture_s_{lay}", round(time.perf_counter() - t, 3), "s")

        def graph(n):
            for _ in range(n):
                static_x.copy_(prep())
                g.replay()

        graph(2)
        put(f"graph_{lay}", rate(graph, a.batches))
        ref = body(static_x)[0]
        g.replay()
        torch.cuda.synchronize()
        put(f"max_abs_diff_{lay}", float((static_out[0] - ref).abs().max()), "")
        for name, fn in (("graph_gil", graph), ("eager_gil", eager)):
            stop, ths = spinning(a.spinners)
            try:
                put(f"{name}_{lay}", rate(fn, a.gil_batches))
            finally:
                stop.set()
                for th in ths:
                    th.join()

    if a.json:
        write_json(a.json, res, indent=1)


if __name__ == "__main__":
    main()
