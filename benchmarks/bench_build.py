"""Build throughput: decode alone, model alone and the whole `dhf build-index`, on the same files.

    python benchmarks/bench_build.py --images DIR --model M [--device cpu|cuda] --json OUT

Timed in one run:
  decode        the product's decode stage alone (stream.decode_chunk in the same worker
                pool; nvjpeg: host read + screening in the pool and decode_jpeg + resize on
                the GPU, synchronised); both worker kinds are timed for PIL
  model         the product's encode function (the stream runner: pinned H2D, model, codes
                packed on the device, D2H) on images decoded into memory beforehand; on
                CUDA in each convolution layout (``model_only_by_layout_img_s``), the
                fastest being ``model_only_img_s`` (the build itself picks one by job size:
                ``product_layout``, see deephash_faiss.extract.stream_layout)
  product       `dhf build-index DIR --model M -o TMP --device D` as a subprocess: wall time
                of the command, start-up included (``product_img_s``); the build's own time
                as the command reports it is ``product_inner_img_s``, its phases (prepare,
                key, encode, first batch, finalize) ``product.phases_s``
and writes n, device, decoder, decode_img_s, model_only_img_s, product_img_s,
ratio_product_vs_model, ratio_product_vs_min_stage (+ machine, versions, date). The JSON
is written even if a stage fails (its error is recorded).

--compare-decoders (CUDA): codes and features of the same JPEGs decoded by PIL and by
nvjpeg: share of identical codes, mean Hamming distance, fc7 cosine (mean, min).

--make-model OUT: write an untrained model file first (``--backbone``, ``--bits``,
``--load-size``, ``--weights``: random by default, the rate does not depend on them) and use
it. ``--compare-decoders`` needs ``--weights default``: a random backbone's fc7 is ~1e-7,
where bf16 rounding decides the cosine.

The photo-sized set: benchmarks/make_photos.py.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
from common import machine_basics, write_json  # noqa: E402


def versions() -> dict:
    out = {}
    for mod in ("torch", "torchvision", "numpy", "PIL", "h5py", "faiss"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "?")
        except Exception as err:  # noqa: BLE001
            out[mod] = f"missing ({type(err).__name__})"
    try:
        import torch

        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
            out["cuda"] = torch.version.cuda
    except Exception:  # noqa: BLE001
        pass
    return out


def make_model(out: str, backbone: str, bits: int, load_size: int | None, input_size: int | None,
               weights: str = "none") -> str:
    from deephash_faiss.model import build_model, save_checkpoint

    m = build_model(backbone, bits, ["a", "b"], weights=weights, input_size=input_size, load_size=load_size, seed=0)
    save_checkpoint(m, out)
    return out


def time_decode(paths, size, kind, workers, batch, decoder, device) -> float:
    import torch

    from deephash_faiss.gpudecode import decode_batch
    from deephash_faiss.stream import DecodePool, decode_chunk, read_screen_chunk

    pool = DecodePool(kind, workers)
    try:
        fn = read_screen_chunk if decoder == "nvjpeg" else decode_chunk
        for f in [pool.submit(fn, paths[:2], size) for _ in range(2 * workers)]:
            f.result()  # start-up of the workers is not decode time
        t0 = time.perf_counter()
        futs = [pool.submit(fn, paths[i:i + batch], size) for i in range(0, len(paths), batch)]
        for f in futs:
            r = f.result()
            if decoder == "nvjpeg":
                decode_batch([d for _, d in r[0]], size, device)
        if decoder == "nvjpeg":
            torch.cuda.synchronize()
        return len(paths) / (time.perf_counter() - t0)
    finally:
        pool.close()


def time_model(model, imgs, device, batch, dtype, layout=None) -> float:
    import torch

    from deephash_faiss.stream import _CpuRunner, _CudaRunner

    cuda = device.type == "cuda"
    runner = (_CudaRunner(model, device, dtype, batch=batch, layout=layout) if cuda
              else _CpuRunner(model, device, dtype))
    for _ in range(2):  # warm-up (cudnn autotune, allocator)
        runner.push(imgs[:batch], None)
    runner.flush()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(0, len(imgs), batch):
        runner.push(imgs[i:i + batch], None)
    runner.flush()
    if cuda:
        torch.cuda.synchronize()
    return len(imgs) / (time.perf_counter() - t0)


def compare_decoders(model, paths, device, batch) -> dict:
    from deephash_faiss.stream import encode_stream

    res = {}
    for dec in ("pil", "nvjpeg"):
        out = list(encode_stream(model, paths, device, batch, decoder=dec, decode_kind="thread"))
        res[dec] = (np.concatenate([o[2] for o in out]), np.concatenate([o[3] for o in out]),
                    np.concatenate([o[4] for o in out]).astype(np.float32))
    (pp, cp, fp), (pn, cn, fn) = res["pil"], res["nvjpeg"]
    common, ip, inn = np.intersect1d(pp, pn, return_indices=True)
    cp, cn, fp, fn = cp[ip], cn[inn], fp[ip], fn[inn]
    ham = np.unpackbits(cp ^ cn, axis=1).sum(1)
    cos = (fp * fn).sum(1) / np.maximum(np.linalg.norm(fp, axis=1) * np.linalg.norm(fn, axis=1), 1e-12)
    return {"n": int(len(common)), "identical_codes": float((ham == 0).mean()), "mean_hamming": float(ham.mean()),
            "max_hamming": int(ham.max(initial=0)), "fc7_cosine_mean": float(cos.mean()),
            "fc7_cosine_min": float(cos.min(initial=1.0)), "bits": int(model.config.bits)}


def run_product(images, model_path, device, batch, decoder, extra) -> dict:
    out = tempfile.mkdtemp(prefix="bench-build-")
    shutil.rmtree(out)
    cmd = [sys.executable, "-m", "deephash_faiss.cli", "build-index", images, "--model", model_path, "-o", out,
           "--device", device, "--batch-size", str(batch), "--decoder", decoder, *extra]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    if r.returncode != 0:
        raise RuntimeError(f"build-index exit {r.returncode}: {(r.stderr or r.stdout).strip()[-500:]}")
    m = re.search(r"indexed (\d+) images .* in ([\d.]+) s", r.stdout)
    phases = {k.strip().replace(" ", "_"): float(v) for k, v in re.findall(r"([a-z ]+) ([\d.]+) s", r.stdout.split("time:")[-1])} \
        if "time:" in r.stdout else {}
    return {"wall_s": wall, "inner_s": float(m.group(2)) if m else None, "count": int(m.group(1)) if m else None,
            "phases_s": phases, "command": " ".join(cmd[2:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", required=True)
    ap.add_argument("--model", required=True, help="model file (written first with --make-model)")
    ap.add_argument("--make-model", action="store_true", help="write an untrained model to --model first")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--weights", default="none",
                    help="--make-model's backbone weights: none (random: fine for rates) or default "
                         "(ImageNet; needed for --compare-decoders, random fc7 is ~1e-7 and bf16 noise)")
    ap.add_argument("--bits", type=int, default=48)
    ap.add_argument("--load-size", type=int, default=None, help="decode size (default: the backbone input size)")
    ap.add_argument("--input-size", type=int, default=None)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--decoder", default="auto", choices=["auto", "pil", "nvjpeg"])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=None, help="decode workers (default: CPU count, max 16)")
    ap.add_argument("--model-n", type=int, default=None, help="images for the model-only stage (default: all)")
    ap.add_argument("--compare-decoders", type=int, default=0, metavar="N",
                    help="CUDA: compare PIL and nvjpeg on the first N images")
    ap.add_argument("--decode-kinds", default="thread,process", help="PIL decode worker kinds to time")
    ap.add_argument("--json", required=True)
    a = ap.parse_args()

    import torch

    from deephash_faiss.data import default_workers, load_images, scan_images
    from deephash_faiss.model import load_model
    from deephash_faiss.pipeline import resolve_decoder
    from deephash_faiss.stream import pick_decode_kind

    res: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "machine": {**machine_basics(), **versions(), "load_avg_start": list(os.getloadavg())},
                 "args": vars(a), "errors": {}}
    try:
        if a.make_model:
            make_model(a.model, a.backbone, a.bits, a.load_size, a.input_size, a.weights)
        model = load_model(a.model)
        device = torch.device(a.device)
        model.to(device).eval()
        size = model.config.load_size
        paths = scan_images(a.images).paths
        workers = a.workers or default_workers()
        decoder = resolve_decoder(a.decoder, device.type, paths)
        kind = pick_decode_kind("auto", len(paths))
        res.update(n=len(paths), device=str(device), decoder=decoder, backbone=model.config.backbone,
                   bits=model.config.bits, load_size=size, input_size=model.config.input_size,
                   batch_size=a.batch_size, decode_workers=workers, decode_kind=kind,
                   torch_threads=torch.get_num_threads())
    except Exception as err:  # noqa: BLE001
        res["errors"]["setup"] = "".join(traceback.format_exception_only(type(err), err)).strip()
        write_json(a.json, res)
        raise SystemExit(f"setup failed: {err}")

    def stage(name, fn):
        try:
            t = time.perf_counter()
            v = fn()
            print(f"{name}: {v if not isinstance(v, float) else round(v, 1)} ({time.perf_counter() - t:.1f} s)",
                  flush=True)
            return v
        except Exception as err:  # noqa: BLE001 - record and go on: the JSON is written either way
            res["errors"][name] = "".join(traceback.format_exception_only(type(err), err)).strip()
            print(f"{name} failed: {res['errors'][name]}", flush=True)
            return None
        finally:
            write_json(a.json, res)

    for k in a.decode_kinds.split(","):
        res[f"decode_pil_{k}_img_s"] = stage(f"decode pil {k}",
                                             lambda k=k: time_decode(paths, size, k, workers, a.batch_size, "pil",
                                                                     device))
    if device.type == "cuda":
        res["decode_nvjpeg_img_s"] = stage("decode nvjpeg", lambda: time_decode(paths, size, "thread", workers,
                                                                                 a.batch_size, "nvjpeg", device))
    if decoder == "nvjpeg":
        res["decode_img_s"] = res["decode_nvjpeg_img_s"]
    else:
        res["decode_img_s"] = res.get(f"decode_pil_{kind}_img_s")

    def model_stage():
        sub = paths[:a.model_n] if a.model_n else paths
        imgs, _, _ = load_images(sub, size)
        if len(imgs) == 0:
            raise RuntimeError("no decodable images")
        reps = max(1, int(np.ceil(2 * a.batch_size / len(imgs))))
        imgs = np.concatenate([imgs] * reps) if reps > 1 else imgs
        if device.type != "cuda":
            return time_model(model, imgs, device, a.batch_size, "float32")
        # the model's own rate is its fastest layout's; the build picks one by job size
        from deephash_faiss.extract import CUDA_LAYOUTS, stream_layout

        res["model_only_by_layout_img_s"] = {lay: time_model(model, imgs, device, a.batch_size, "float32", lay)
                                             for lay in CUDA_LAYOUTS}
        res["product_layout"] = stream_layout(model, len(paths))
        return max(res["model_only_by_layout_img_s"].values())

    res["model_only_img_s"] = stage("model only", model_stage)
    if a.compare_decoders and device.type == "cuda":
        res["decoder_agreement"] = stage("compare decoders", lambda: compare_decoders(
            model, paths[:a.compare_decoders], device, a.batch_size))
    prod = stage("product", lambda: run_product(a.images, a.model, a.device, a.batch_size, decoder, []))
    if prod:
        res["product"] = prod
        res["product_img_s"] = len(paths) / prod["wall_s"]
        if prod.get("inner_s"):
            res["product_inner_img_s"] = len(paths) / prod["inner_s"]
            res["product_startup_s"] = prod["wall_s"] - prod["inner_s"]
    p, m, d = res.get("product_img_s"), res.get("model_only_img_s"), res.get("decode_img_s")
    if p and m:
        res["ratio_product_vs_model"] = p / m
    if p and m and d:
        res["min_stage_img_s"] = min(m, d)
        res["ratio_product_vs_min_stage"] = p / min(m, d)
        if res.get("product_inner_img_s"):
            res["ratio_product_inner_vs_min_stage"] = res["product_inner_img_s"] / min(m, d)
    res["machine"]["load_avg_end"] = list(os.getloadavg())
    write_json(a.json, res)
    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()
           if k.endswith(("_img_s", "_s")) or k.startswith("ratio")})


if __name__ == "__main__":
    main()
