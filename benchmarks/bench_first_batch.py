"""What a build's first batch costs on CUDA, and which settings change it.

    python benchmarks/bench_first_batch.py --json OUT [--sizes 32 224] [--batch 256]

`dhf build-index` on the H200 spent 5.2 s (CIFAR-10, 32 px images) and 8.4-12.7 s
(640x480 photos) on its first batch, then ran at 13,000+ img/s (issue 12). This times, in a
fresh process per case (the cost is paid once per process), the steps of a CUDA encode's
start: ``import torch``, CUDA init, the model built and moved to the GPU, the first forward
pass, the second, and the steady rate over ``--steady`` batches, for settings that change
how kernels are chosen and loaded:

  default          the product's forward (bf16 autocast, channels_last, cuDNN heuristics)
  fp32             autocast off
  contiguous       NCHW instead of channels_last
  cudnn_benchmark  torch.backends.cudnn.benchmark = True (cuDNN times its algorithms)
  no_cudnn         torch.backends.cudnn.enabled = False (torch's own convolution kernels)
  eager_modules    CUDA_MODULE_LOADING=EAGER (every kernel loaded at CUDA init)
  default_again    the default a second time (any cross-process cache shows here)
  dw_native        channels_last, depthwise convolutions with cuDNN off (torch's kernels)
  deterministic    torch.backends.cudnn.deterministic = True
  dw_contiguous    depthwise convolutions in NCHW, the rest in NHWC (a transpose on each side)
  product_<layout> the product's own forward_batch with DHF_CUDA_LAYOUT=<layout>
                   (channels_last or contiguous)
  product_<layout>_parN  the same after every convolution ran once, at the batch's shapes,
                   in N other threads at once (``warm_convolutions`` here; its time is
                   ``parallel_warm_s``)
  product_<layout>_elsewhere  the same after one whole forward pass in another thread
                   (``parallel_warm_s``): torch keeps cuDNN's plans per thread, so the first
                   pass in this thread pays them again (issue 12, ``stream.model_thread``)
  ..._again        a case a second time (any cross-process cache shows here)

Per case it also records the first-call time of the slowest modules (forward hooks), so a
slow first pass can be traced to the layers that pay it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CASES = {
    "default": {},
    "fp32": {"amp": False},
    "contiguous": {"channels_last": False},
    "cudnn_benchmark": {"benchmark": True},
    "no_cudnn": {"cudnn": False},
    "eager_modules": {"env": {"CUDA_MODULE_LOADING": "EAGER"}},
    "default_again": {},
    "dw_native": {"dw_native": True},
    "deterministic": {"deterministic": True},
    "product_channels_last": {"product": True, "env": {"DHF_CUDA_LAYOUT": "channels_last"}},
    "product_contiguous": {"product": True, "env": {"DHF_CUDA_LAYOUT": "contiguous"}},
    "dw_contiguous": {"dw_contiguous": True},
}
DEFAULT_CASES = list(CASES)
for _lay in ("channels_last", "contiguous"):
    for _w in (1, 8, 16):
        CASES[f"product_{_lay}_par{_w}"] = {"product": True, "parallel": _w, "env": {"DHF_CUDA_LAYOUT": _lay}}
    CASES[f"product_{_lay}_elsewhere"] = {"product": True, "elsewhere": True, "env": {"DHF_CUDA_LAYOUT": _lay}}
for _c in list(CASES):
    if not _c.endswith("_again"):
        CASES.setdefault(_c + "_again", CASES[_c])


def conv_inputs(model) -> list:
    """Every convolution of ``model.backbone`` with its input shape [C, H, W] at the model's input
    size, in call order (a batch-1 pass of a CPU copy with hooks)."""
    import copy

    import torch

    probe = copy.deepcopy(model.backbone).cpu().float().eval()
    mods = dict(zip(probe.modules(), model.backbone.modules()))
    seen: dict = {}
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.setdefault(mods[m], tuple(a[0].shape[1:])))
             for m in probe.modules() if isinstance(m, torch.nn.Conv2d)]
    size = model.config.input_size
    with torch.no_grad():
        probe(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return list(seen.items())


def warm_convolutions(model, batch: int, device, layout: str, workers: int) -> None:
    """Every convolution of ``model.backbone`` once on zeros at a batch of ``batch``, bf16
    autocast, in ``layout``, ``workers`` threads at once (depthwise first)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    fmt = torch.contiguous_format if layout == "contiguous" else torch.channels_last
    items = sorted(conv_inputs(model), key=lambda it: (it[0].groups == 1, -it[1][0] * it[1][1] * it[1][2]))

    def one(item) -> None:
        m, (c, h, w) = item
        with torch.cuda.device(device), torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            m(torch.zeros((batch, c, h, w), dtype=torch.bfloat16, device=device).contiguous(memory_format=fmt))
            torch.cuda.current_stream(device).synchronize()

    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(one, items))
    torch.cuda.synchronize(device)


def child(opts: dict) -> dict:
    t0 = time.perf_counter()
    import torch

    t1 = time.perf_counter()
    dev = torch.device(opts.get("device", "cuda"))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.zeros(1, device=dev)
    sync()
    t2 = time.perf_counter()
    from deephash_faiss.model import build_model

    torch.backends.cudnn.benchmark = bool(opts.get("benchmark", False))
    torch.backends.cudnn.enabled = bool(opts.get("cudnn", True))
    torch.backends.cudnn.deterministic = bool(opts.get("deterministic", False))
    amp = bool(opts.get("amp", True))
    fmt = torch.channels_last if opts.get("channels_last", True) else torch.contiguous_format
    m = build_model("efficientnet_lite0", 48, ["a", "b"], weights="none", load_size=opts["size"], seed=0)
    m = m.to(dev).eval()
    sync()
    t3 = time.perf_counter()
    warm_s = None
    if opts.get("parallel"):
        from deephash_faiss.extract import cuda_layout

        a = time.perf_counter()
        warm_convolutions(m, opts["batch"], dev, cuda_layout(m, opts["batch"]), workers=opts["parallel"])
        warm_s = time.perf_counter() - a
    if opts.get("elsewhere"):
        import threading

        from deephash_faiss.extract import forward_batch

        def other() -> None:
            import contextlib

            with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
                xz = torch.zeros((opts["batch"], opts["size"], opts["size"], 3), dtype=torch.uint8, device=dev)
                forward_batch(m, xz, dev, to_host=False)
                torch.cuda.synchronize(dev)

        a = time.perf_counter()
        th = threading.Thread(target=other)
        th.start()
        th.join()
        warm_s = time.perf_counter() - a
    first_call: dict[str, float] = {}
    starts: dict[str, float] = {}

    def pre(name):
        def f(mod, inp):
            sync()
            starts[name] = time.perf_counter()
        return f

    def post(name):
        def f(mod, inp, out):
            sync()
            first_call.setdefault(name, time.perf_counter() - starts[name])
        return f

    hooks = []
    convs = [n for n, mod in m.backbone.named_modules() if isinstance(mod, torch.nn.Conv2d)]
    for name, mod in m.backbone.named_modules():
        inside_conv = any(name.startswith(c + ".") for c in convs)
        if isinstance(mod, torch.nn.Conv2d) or (len(list(mod.children())) == 0 and not inside_conv):
            hooks += [mod.register_forward_pre_hook(pre(name)), mod.register_forward_hook(post(name))]
    if opts.get("dw_native"):
        for mod in m.backbone.modules():
            if isinstance(mod, torch.nn.Conv2d) and mod.groups > 1:
                mod.register_forward_pre_hook(lambda *a: setattr(torch.backends.cudnn, "enabled", False))
                mod.register_forward_hook(lambda *a: setattr(torch.backends.cudnn, "enabled", True))
    if opts.get("dw_contiguous"):
        for mod in m.backbone.modules():
            if isinstance(mod, torch.nn.Conv2d) and mod.groups > 1:
                mod.register_forward_pre_hook(lambda _m, a: (a[0].contiguous(),))
                mod.register_forward_hook(lambda _m, _a, y: y.contiguous(memory_format=torch.channels_last))
    x = torch.randint(0, 255, (opts["batch"], opts["size"], opts["size"], 3), dtype=torch.uint8, device=dev)

    @torch.no_grad()
    def fwd():
        if opts.get("product"):
            from deephash_faiss.extract import forward_batch

            h = forward_batch(m, x, dev, to_host=False)[1]
            sync()
            return h
        y = m.preprocess(x).contiguous(memory_format=fmt)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp and dev.type == "cuda"):
            f = m.backbone(y)
        h = torch.sigmoid(m.latent(f.float()))
        sync()
        return h

    a = time.perf_counter()
    fwd()
    first = time.perf_counter() - a
    for h in hooks:
        h.remove()
    a = time.perf_counter()
    fwd()
    second = time.perf_counter() - a
    a = time.perf_counter()
    for _ in range(opts["steady"]):
        fwd()
    steady = opts["steady"] * opts["batch"] / (time.perf_counter() - a)
    slow = sorted(first_call.items(), key=lambda kv: -kv[1])[:8]
    types = {}
    for name, mod in m.backbone.named_modules():
        if name in first_call:
            k = type(mod).__name__
            if isinstance(mod, torch.nn.Conv2d):
                k = "Conv2d" + ("_dw" if mod.groups > 1 else ("_1x1" if mod.kernel_size == (1, 1) else "_kxk"))
            types[k] = types.get(k, 0.0) + first_call[name]
    return {"import_torch_s": t1 - t0, "cuda_init_s": t2 - t1, "model_to_gpu_s": t3 - t2,
            "parallel_warm_s": warm_s, "first_forward_s": first, "second_forward_s": second, "steady_img_s": steady,
            "first_call_by_type_s": {k: round(v, 4) for k, v in sorted(types.items(), key=lambda kv: -kv[1])},
            "slowest_first_calls_s": [[n, round(v, 4)] for n, v in slow]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 224], help="image side the model loads")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steady", type=int, default=20)
    ap.add_argument("--cases", nargs="+", default=DEFAULT_CASES, choices=list(CASES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    import torch

    out = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "batch": a.batch, "cases": {}}
    for size in a.sizes:
        for case in a.cases:
            opts = {k: v for k, v in CASES[case].items() if k != "env"}
            opts.update(size=size, batch=a.batch, steady=a.steady, device=a.device)
            env = dict(os.environ, **CASES[case].get("env", {}))
            t = time.perf_counter()
            r = subprocess.run([sys.executable, __file__, "--json", "-", "--child", json.dumps(opts)],
                               capture_output=True, text=True, env=env)
            key = f"{case}@{size}"
            if r.returncode:
                out["cases"][key] = {"error": r.stderr.strip().splitlines()[-1:]}
            else:
                res = json.loads(r.stdout.strip().splitlines()[-1])
                res["process_s"] = time.perf_counter() - t
                out["cases"][key] = res
            c = out["cases"][key]
            print(key, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in c.items()
                        if not isinstance(v, (dict, list))}, flush=True)
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
