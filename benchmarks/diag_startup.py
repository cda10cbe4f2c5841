"""Where a CUDA build's fixed costs go: ``import torch`` and the nvjpeg decoder's first call.

    python benchmarks/diag_startup.py --photos DIR --json OUT

Each case runs in a fresh process (these costs are paid once per process). Cases:

  import_torch      ``python -X importtime -c "import torch"``: wall time and the slowest
                    top-level imports (cumulative), twice (the second shows what a warm
                    page cache leaves)
  nvjpeg_create_B   ``nvjpegCreateEx`` with backend B (0 default, 3 hardware; torchvision
                    uses 3) through ctypes after CUDA init: wall and
                    CPU seconds of the call alone
  nvjpeg_first      ``torchvision.io.decode_jpeg(..., device="cuda")``: first call on one
                    JPEG, second call, then batches of 256 (steady rate), twice (a second
                    process shows any cross-process cache); whether the first call releases
                    the GIL (iterations a Python thread makes meanwhile)
  resize_first_*    the first call of the resize after decoding: torch's antialiased
                    ``interpolate`` alone, or the product's ``gpudecode.square_batch``
  product_decode    the product's nvjpeg front half (``stream.read_screen_chunk`` per image,
                    one thread) and ``gpudecode.decode_batch`` at steady state

Issue 12: the build's wall time on the H200 is dominated by such fixed costs at 50,000 images.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

NVJPEG_LIBS = ("libnvjpeg.so.13", "libnvjpeg.so.12", "libnvjpeg.so")


def _child(case: str, photos: str) -> dict:
    out: dict = {}
    t = time.perf_counter()
    import torch

    out["import_torch_s"] = time.perf_counter() - t
    t = time.perf_counter()
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    out["cuda_init_s"] = time.perf_counter() - t
    paths = sorted(glob.glob(os.path.join(photos, "**", "*.jpg"), recursive=True))
    if case.startswith("nvjpeg_create_"):
        import ctypes

        lib = None
        for name in NVJPEG_LIBS:
            try:
                lib = ctypes.CDLL(name)
                out["lib"] = name
                break
            except OSError:
                continue
        if lib is None:  # the copy torchvision links against
            import torchvision

            cands = glob.glob(os.path.join(os.path.dirname(torchvision.__file__), "..", "nvidia", "**",
                                           "libnvjpeg.so*"), recursive=True)
            out["candidates"] = cands
            if not cands:
                out["error"] = "no libnvjpeg found"
                return out
            lib = ctypes.CDLL(cands[0])
            out["lib"] = cands[0]
        h = ctypes.c_void_p()
        backend = int(case.rsplit("_", 1)[1])
        t, c = time.perf_counter(), time.process_time()
        st = lib.nvjpegCreateEx(ctypes.c_int(backend), None, None, ctypes.c_uint(0), ctypes.byref(h))
        out.update(status=int(st), create_s=time.perf_counter() - t, create_cpu_s=time.process_time() - c)
        return out
    import threading

    from torchvision.io import ImageReadMode, decode_jpeg

    datas = [open(p, "rb").read() for p in paths[:1 + 256 * 6]]
    tens = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    if case.startswith("nvjpeg_first"):
        ticks = [0]
        stop = threading.Event()

        def spin():
            while not stop.is_set():
                ticks[0] += 1

        th = threading.Thread(target=spin)
        t, c = time.perf_counter(), time.process_time()
        th.start()
        decode_jpeg(tens[0], mode=ImageReadMode.RGB, device="cuda")
        torch.cuda.synchronize()
        stop.set()
        th.join()
        out.update(first_s=time.perf_counter() - t, first_cpu_s=time.process_time() - c, spin_ticks=ticks[0])
        t0 = time.perf_counter()
        k = 0
        while time.perf_counter() - t0 < 0.2:
            k += 1
        out["spin_ticks_per_s_alone"] = k / (time.perf_counter() - t0)
        t = time.perf_counter()
        decode_jpeg(tens[0], mode=ImageReadMode.RGB, device="cuda")
        torch.cuda.synchronize()
        out["second_s"] = time.perf_counter() - t
        rates = []
        for b in range(6):
            chunk = tens[1 + 256 * b:1 + 256 * (b + 1)]
            t = time.perf_counter()
            decode_jpeg(chunk, mode=ImageReadMode.RGB, device="cuda")
            torch.cuda.synchronize()
            rates.append(len(chunk) / (time.perf_counter() - t))
        out["batch256_img_s"] = rates
        return out
    if case.startswith("resize_first"):  # after decode_jpeg's first call: the resize's first call
        sys.path.insert(0, os.getcwd())
        import torch.nn.functional as F

        from deephash_faiss.gpudecode import square_batch

        img = decode_jpeg(tens[0], mode=ImageReadMode.RGB, device="cuda")
        torch.cuda.synchronize()
        x = torch.stack([img, img])
        t = time.perf_counter()
        if case == "resize_first_interpolate_aa":  # the kernel square_batch calls
            F.interpolate(x.float(), size=(224, 299), mode="bilinear", align_corners=False, antialias=True)
        else:
            square_batch(x, 224)
        torch.cuda.synchronize()
        out["first_s"] = time.perf_counter() - t
        return out
    if case == "product_decode":
        sys.path.insert(0, os.getcwd())
        from deephash_faiss.gpudecode import decode_batch
        from deephash_faiss.stream import read_screen_chunk

        t = time.perf_counter()
        decode_batch(datas[:1], 224, "cuda")
        torch.cuda.synchronize()
        out["first_decode_batch_s"] = time.perf_counter() - t
        t = time.perf_counter()
        gpu, _, _ = read_screen_chunk(paths[1:257], 224)
        out["read_screen_img_s_one_thread"] = 256 / (time.perf_counter() - t)
        rates = []
        for b in range(6):
            chunk = datas[1 + 256 * b:1 + 256 * (b + 1)]
            t = time.perf_counter()
            decode_batch(chunk, 224, "cuda")
            torch.cuda.synchronize()
            rates.append(len(chunk) / (time.perf_counter() - t))
        out["decode_batch_img_s"] = rates
        return out
    raise SystemExit(f"unknown case {case}")


def _import_profile() -> dict:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-X", "importtime", "-c", "import torch"], capture_output=True, text=True)
    wall = time.perf_counter() - t
    rows = []
    for line in p.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_us, cum_us, name = line[len("import time:"):].split("|")
        rows.append((int(cum_us), int(self_us), name.rstrip()))
    depth = lambda name: (len(name) - len(name.lstrip()) - 1) // 2  # noqa: E731 - importtime's nesting
    top = [(c, s, n.strip()) for c, s, n in rows if depth(n) <= 2]
    selfs = sorted(rows, key=lambda r: -r[1])[:15]
    return {"wall_s": wall, "cumulative_us_depth_le2": sorted(top, key=lambda r: -r[0])[:20],
            "slowest_self_us": [(s, n.strip()) for _, s, n in selfs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--cases", default=None, help="comma-separated subset of the cases")
    ap.add_argument("--no-import-profile", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(_child(a.child, a.photos)))
        return
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                 "import_torch": [] if a.no_import_profile else [_import_profile(), _import_profile()]}
    cases = [("nvjpeg_create_3", {}), ("nvjpeg_create_0", {}), ("nvjpeg_first", {}),
             ("nvjpeg_first_again", {}), ("resize_first_interpolate_aa", {}), ("resize_first_square", {}),
             ("product_decode", {})]
    if a.cases:
        cases = [c for c in cases if c[0] in a.cases.split(",")]
    for name, env in cases:
        t = time.perf_counter()
        p = subprocess.run([sys.executable, __file__, "--photos", a.photos, "--json", "-", "--child", name],
                           capture_output=True, text=True, env={**os.environ, **env}, timeout=120)
        try:
            r = json.loads(p.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            r = {"error": p.stderr[-2000:]}
        r["process_s"] = time.perf_counter() - t
        res[name] = r
        print(name, json.dumps(r)[:600], flush=True)
    with open(a.json, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
