#!/usr/bin/env python3
"""Laptop mode on a CPU: `dhf build-index` of labelled images with no model against the same
build with a model, and the peak memory of training (issues 12 and 13).

    python benchmarks/bench_laptop.py --archive /work/shared/data/cifar10-jpg.tar.gz --n 1000 \
        --json benchmarks/results/laptop_cpu.json [--with-finetune]

Makes a folder of ``--n`` CIFAR-10 train images (an equal number per class, 32 px JPEGs), then
runs, each as its own `dhf` process (wall time of the command, start-up included; peak RSS
of that process from wait4):

1. ``dhf build-index IMAGES -o A`` (no model: on a CPU the frozen backbone's fc7 is computed
   once, H + classifier trained on it, the index written from the cached fc7);
2. ``dhf build-index IMAGES --model A/model.pt -o B`` (the same folder with a model);
3. ``dhf train IMAGES -o M`` (laptop mode's training alone);
4. with ``--with-finetune``: ``dhf train IMAGES --finetune --epochs 1`` (the paper's fine-tune on
   a CPU: 90% of the images train, i.e. 900 of 1,000; issue 12's memory goal). ``--finetune-n N``
   runs it on the first N images instead (peak memory does not grow with N beyond the decoded
   32-px images, 3 KB each; one epoch of 900 takes long on a small CPU).

Goals: (1) <= 2x the wall time of (2); peak RSS of (1) and of every train <= 3 GB.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine_basics, write_json  # noqa: E402


def make_folder(archive: str, out: str, n: int, classes: int = 10) -> int:
    """Extract n train images (n / classes per class, archive order) into out/<class>/."""
    per = n // classes
    counts: dict[str, int] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar:
            parts = m.name.split("/")
            if not m.isfile() or len(parts) < 4 or parts[-3] != "train":
                continue
            c = parts[-2]
            if counts.get(c, 0) >= per:
                continue
            counts[c] = counts.get(c, 0) + 1
            os.makedirs(os.path.join(out, c), exist_ok=True)
            with open(os.path.join(out, c, parts[-1]), "wb") as f:
                f.write(tar.extractfile(m).read())
            if sum(counts.values()) >= per * classes and len(counts) >= classes:
                break
    return sum(counts.values())


def run(cmd: list[str], log_path: str) -> dict:
    """Run a command; wall seconds, exit code, peak RSS (GiB) of that process, log tail."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    with open(log_path) as f:
        tail = f.read().splitlines()[-12:]
    return {"command": " ".join(cmd), "wall_s": round(wall, 2), "rc": os.waitstatus_to_exitcode(status),
            "peak_rss_gb": round(ru.ru_maxrss / 2**20, 3), "log_tail": tail}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archive", default="/work/shared/data/cifar10-jpg.tar.gz")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--workdir", default="/tmp/dhf-bench-laptop")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--with-finetune", action="store_true", help="also time one fine-tuning epoch (slow on a CPU)")
    ap.add_argument("--finetune-n", type=int, default=None, help="fine-tune on this many images (default: all)")
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    import shutil

    import torch

    shutil.rmtree(args.workdir, ignore_errors=True)
    images = os.path.join(args.workdir, "images")
    n = make_folder(args.archive, images, args.n)
    dhf = [sys.executable, "-m", "deephash_faiss.cli"]
    common = ["--device", "cpu", "-q"]
    a, b = os.path.join(args.workdir, "idx-laptop"), os.path.join(args.workdir, "idx-model")
    res = {}
    res["build_no_model"] = run(dhf + ["build-index", images, "-o", a, "--backbone", args.backbone] + common,
                                os.path.join(args.workdir, "build_no_model.log"))
    res["build_with_model"] = run(dhf + ["build-index", images, "--model", os.path.join(a, "model.pt"), "-o", b]
                                  + common, os.path.join(args.workdir, "build_with_model.log"))
    res["train_laptop"] = run(dhf + ["train", images, "-o", os.path.join(args.workdir, "m.pt"), "--backbone",
                                     args.backbone] + common, os.path.join(args.workdir, "train_laptop.log"))
    if args.with_finetune:
        ft_images = images
        if args.finetune_n:
            ft_images = os.path.join(args.workdir, "images-finetune")
            make_folder(args.archive, ft_images, args.finetune_n)
        res["train_finetune_1_epoch"] = run(
            dhf + ["train", ft_images, "-o", os.path.join(args.workdir, "ft.pt"), "--backbone", args.backbone,
                   "--finetune", "--epochs", "1"] + common, os.path.join(args.workdir, "train_finetune.log"))
    ratio = res["build_no_model"]["wall_s"] / max(1e-9, res["build_with_model"]["wall_s"])
    peaks = [r["peak_rss_gb"] for k, r in res.items() if k != "build_with_model"]
    out = {
        "benchmark": "laptop mode: build-index without a model vs with one, CPU",
        "n_images": n, "finetune_n_images": args.finetune_n or n if args.with_finetune else None, "image_size": 32, "backbone": args.backbone, "device": "cpu",
        "runs": res,
        "ratio_no_model_vs_model": round(ratio, 3),
        "goal_ratio_le_2": ratio <= 2.0,
        "max_peak_rss_gb": max(peaks),
        "goal_peak_rss_le_3gb": max(peaks) <= 3.0,
        "machine": {**machine_basics(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "load_average_at_end": os.getloadavg()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    write_json(args.json, out)
    print(f"no model {res['build_no_model']['wall_s']:.1f} s, with model {res['build_with_model']['wall_s']:.1f} s:"
          f" ratio {ratio:.2f}; peak RSS {max(peaks):.2f} GB -> {args.json}")


if __name__ == "__main__":
    main()
