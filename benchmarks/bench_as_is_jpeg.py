"""JPEGs at the load size: torchvision's libjpeg-turbo (data.as_is_jpeg) against PIL.

    python benchmarks/bench_as_is_jpeg.py --images DIR --size 32 [--model M --rounds 6] --json OUT

1. ``decode_image`` on every file of DIR, the as-is path on and off alternately in this
   process (``--decode-rounds`` each): img/s per arm, and whether the arrays are identical.
2. With ``--model``: ``dhf build-index DIR --model M`` (CPU), ``DHF_AS_IS_JPEG=0`` and ``1``
   alternately ``--rounds`` times each: the command's wall time and the build's own time
   ("in X s"), per run and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_basics, write_json  # noqa: E402


def decode_all(paths, size):
    from deephash_faiss import data

    return np.stack([data.decode_image(p, size) for p in paths])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", required=True)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--decode-rounds", type=int, default=3)
    ap.add_argument("--model")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--json", required=True)
    a = ap.parse_args(argv)

    import torch  # the as-is path needs torch loaded, as in a build

    from deephash_faiss import data

    paths = data.scan_images(a.images).paths
    out = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": {**machine_basics(), "load_avg_start": list(os.getloadavg())},
           "images": a.images, "n": len(paths), "size": a.size, "self_check": data.as_is_jpeg_enabled()}
    rates = {"pil": [], "as_is": []}
    ref = None
    identical = True
    for _ in range(a.decode_rounds):
        for arm in ("pil", "as_is"):
            data._AS_IS[:] = [arm == "as_is" and out["self_check"]]
            t = time.perf_counter()
            arr = decode_all(paths, a.size)
            rates[arm].append(len(paths) / (time.perf_counter() - t))
            if ref is None:
                ref = arr
            else:
                identical &= bool(np.array_equal(ref, arr))
    out["decode_img_s"] = rates
    out["decode_median_img_s"] = {k: statistics.median(v) for k, v in rates.items()}
    out["decode_speedup"] = out["decode_median_img_s"]["as_is"] / out["decode_median_img_s"]["pil"]
    out["identical"] = identical
    print(json.dumps({k: out[k] for k in ("n", "decode_median_img_s", "decode_speedup", "identical")}))

    if a.model:
        runs = []
        tmp = tempfile.mkdtemp(prefix="dhf-asis-")
        dhf = [sys.executable, "-m", "deephash_faiss.cli"]
        for r in range(a.rounds):
            for arm in ("pil", "as_is"):
                idx = os.path.join(tmp, "idx")
                shutil.rmtree(idx, ignore_errors=True)
                env = dict(os.environ, DHF_AS_IS_JPEG="1" if arm == "as_is" else "0")
                t = time.perf_counter()
                p = subprocess.run(dhf + ["build-index", a.images, "--model", a.model, "-o", idx, "--device", "cpu",
                                          "--quiet"], env=env, capture_output=True, text=True)
                wall = time.perf_counter() - t
                m = re.search(r" in ([0-9.]+) s", p.stdout + p.stderr)
                runs.append({"round": r, "arm": arm, "rc": p.returncode, "wall_s": wall,
                             "inner_s": float(m.group(1)) if m else None})
                print(json.dumps(runs[-1]))
        shutil.rmtree(tmp, ignore_errors=True)
        out["builds"] = runs
        for arm in ("pil", "as_is"):
            mine = [x for x in runs if x["arm"] == arm and x["rc"] == 0]
            out[f"build_median_wall_s_{arm}"] = statistics.median(x["wall_s"] for x in mine) if mine else None
            out[f"build_median_inner_s_{arm}"] = statistics.median(x["inner_s"] for x in mine if x["inner_s"]) if mine else None
    out["machine"]["load_avg_end"] = list(os.getloadavg())
    import PIL
    import torchvision

    out["machine"].update(torch=torch.__version__, torchvision=torchvision.__version__, PIL=PIL.__version__)
    write_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
