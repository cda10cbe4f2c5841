"""Ray build vs. two independent half builds (the overhead of distributing the encoding).

Example (2-core CI machine; CIFAR-10 JPEGs, smallcnn):
    python benchmarks/bench_ray_build.py --data /work/shared/data/cifar10-jpg.tar.gz \
        --n 10000 --json benchmarks/results/ray_build_10k.json

--data: a folder of images (CLASS/IMAGE), or the cifar10-jpg.tar.gz (its first --n train
images are extracted to --work), or "noise" (--n random 32x32 PNGs are written).

Timed, on the same images and model (an untrained smallcnn: weights do not change speed):
  local_full   one process, api.build_index of all images, torch default threads
  halves       two processes started together, each api.build_index of one half with one
               torch thread (what two independent machines/cores would do); wall time of both
  ray          build_index_ray on a local Ray: 2 actors x 1 CPU (1 torch thread each);
               ray.init, the build (actor start + encoding + finalize) and shutdown timed apart
ratio = ray build (without and with ray.init) / halves. Goal: <= 1.3.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from common import machine_basics, write_json  # noqa: E402


def prepare_images(data: str, n: int, work: str) -> str:
    out = os.path.join(work, f"images-{n}")
    if os.path.isdir(out) and sum(len(f) for _, _, f in os.walk(out)) >= n:
        return out
    shutil.rmtree(out, ignore_errors=True)
    if data == "noise":
        from PIL import Image

        rng = np.random.default_rng(0)
        for i in range(n):
            c = i % 10
            d = os.path.join(out, f"class{c}")
            os.makedirs(d, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(os.path.join(d, f"{i:06d}.png"))
        return out
    if os.path.isdir(data):
        return data
    got = 0
    with tarfile.open(data, "r:gz") as tf:
        for m in tf:
            if not m.isfile() or "/train/" not in m.name:
                continue
            rel = m.name.split("/train/", 1)[1]
            dst = os.path.join(out, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with open(dst, "wb") as f:
                f.write(tf.extractfile(m).read())
            got += 1
            if got >= n:
                break
    return out


HALF = r"""
import sys, time, torch
torch.set_num_threads(1)
from deephash_faiss import api
t0 = time.perf_counter()
rep = api.build_index(sys.argv[1], sys.argv[2], sys.argv[3], batch_size=int(sys.argv[4]), shard_size=int(sys.argv[5]),
                      device="cpu", progress=False)
print(rep.count, time.perf_counter() - t0)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/work/shared/data/cifar10-jpg.tar.gz")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--work", default="/tmp/dhf-bench-ray")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    from deephash_faiss import api
    from deephash_faiss.data import scan_images
    from deephash_faiss.distributed import build_index_ray
    from deephash_faiss.model import build_model, save_checkpoint

    os.makedirs(args.work, exist_ok=True)
    t0 = time.perf_counter()
    images = prepare_images(args.data, args.n, args.work)
    prep_s = time.perf_counter() - t0
    lst = scan_images(images)
    n = len(lst)
    model_path = os.path.join(args.work, "smallcnn.pt")
    save_checkpoint(build_model("smallcnn", 48, lst.classes, "none", 32, 32), model_path)

    # two halves as separate folders of symlinks (same files)
    halves = []
    for h in range(2):
        d = os.path.join(args.work, f"half{h}")
        shutil.rmtree(d, ignore_errors=True)
        for p, lab in zip(lst.paths[h::2], lst.labels[h::2]):
            dst = os.path.join(d, lst.classes[lab], os.path.basename(p))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.symlink(os.path.abspath(p), dst)
        halves.append(d)

    res: dict = {"n_images": n, "data": args.data, "images_dir": images, "prepare_seconds": round(prep_s, 2),
                 "batch_size": args.batch_size, "shard_size": args.shard_size, "workers": args.workers,
                 "backbone": "smallcnn (untrained, 48 bits, 32 px)"}

    def clean(d):
        shutil.rmtree(d, ignore_errors=True)

    # warm the page cache once
    for p in lst.paths:
        with open(p, "rb") as f:
            f.read()

    def local_build(name):
        """Build the whole index in this process; returns (index dir, seconds)."""
        d = os.path.join(args.work, name)
        clean(d)
        t0 = time.perf_counter()
        api.build_index(images, d, model_path, batch_size=args.batch_size, shard_size=args.shard_size,
                        device="cpu", progress=False)
        return d, round(time.perf_counter() - t0, 2)

    out, res["local_full_seconds"] = local_build("idx-local")
    res["local_full_threads"] = torch.get_num_threads()

    procs = []
    t0 = time.perf_counter()
    for h, d in enumerate(halves):
        o = os.path.join(args.work, f"idx-half{h}")
        clean(o)
        procs.append(subprocess.Popen([sys.executable, "-c", HALF, d, o, model_path, str(args.batch_size),
                                       str(args.shard_size)], stdout=subprocess.PIPE, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}))
    outs = [p.communicate()[0].split() for p in procs]
    res["halves_wall_seconds"] = round(time.perf_counter() - t0, 2)
    res["halves_each"] = [{"count": int(o[0]), "seconds": round(float(o[1]), 2)} for o in outs]

    import ray

    out = os.path.join(args.work, "idx-ray")
    clean(out)
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    t1 = time.perf_counter()
    rep = build_index_ray(images, out, model_path, batch_size=args.batch_size, shard_size=args.shard_size,
                          num_workers=args.workers, num_cpus_per_worker=1, progress=False)
    t2 = time.perf_counter()
    ray.shutdown()
    t3 = time.perf_counter()
    res["ray"] = {"init_seconds": round(t1 - t0, 2), "build_seconds": round(t2 - t1, 2),
                  "shutdown_seconds": round(t3 - t2, 2), "count": rep.count,
                  "shards_written": rep.shards_written}
    res["ratio_ray_build_vs_halves"] = round((t2 - t1) / res["halves_wall_seconds"], 3)
    res["ratio_ray_init_plus_build_vs_halves"] = round((t2 - t0) / res["halves_wall_seconds"], 3)
    res["overhead_seconds_vs_halves"] = round((t2 - t0) - res["halves_wall_seconds"], 2)
    res["images_per_second"] = {"local_full": round(n / res["local_full_seconds"], 1),
                                "halves": round(n / res["halves_wall_seconds"], 1),
                                "ray_build": round(n / (t2 - t1), 1)}
    # identical result to a 1-thread local build?  (Ray workers use 1 thread each)
    from deephash_faiss.store import FeatureStore, read_manifest

    def feats(d):
        m = read_manifest(d)
        st = FeatureStore(d, m)
        return st.codes(), st.load_features()

    torch.set_num_threads(1)
    o1, res["local_full_1thread_seconds"] = local_build("idx-local-1thread")
    (c1, f1), (c2, f2) = feats(o1), feats(out)
    res["ray_equals_1thread_local"] = bool(np.array_equal(c1, c2) and np.array_equal(f1, f2))
    res["machine"] = dict(machine_basics(), torch=torch.__version__, ray=ray.__version__)
    res["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(json.dumps(res, indent=2))
    if args.json:
        write_json(args.json, res)


if __name__ == "__main__":
    main()
