"""Wall time of one-shot ``dhf search`` commands, the number a user gets, per device and query count.

    python benchmarks/bench_oneshot.py --index IDX --queries DIR --n 1 16 64 256 \\
        --devices cpu cuda auto --rounds 3 --json OUT

Each measurement is a fresh ``dhf search --json -q`` process (interpreter start, imports, index
open, model load, encode, search, print) timed from outside; devices are interleaved within a
round so that drift on the machine hits them alike. Writes per (n, device) every wall time, the
best and the median, the command's own ``encode_ms`` / ``timing_ms`` (first query), and the
start-up floors measured the same way (``import torch``; ``import torch`` + CUDA init).
``crossover``: the smallest n at which the median cuda wall time is below cpu's (None if never).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def _dhf() -> list[str]:
    """This interpreter's ``dhf`` (``python -m deephash_faiss.cli``: a ``dhf`` on PATH may be another install's)."""
    return [sys.executable, "-m", "deephash_faiss.cli"]


def _timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    return time.perf_counter() - t, p


def query_dirs(src: str, sizes: list[int], root: str) -> dict[int, str]:
    """Folders of the first n images (sorted) of ``src``, one per n (symlinks)."""
    files = sorted(f for f in os.listdir(src) if f.lower().endswith((".jpg", ".jpeg", ".png")))
    out = {}
    for n in sizes:
        if n > len(files):
            raise SystemExit(f"{src} has {len(files)} images, fewer than {n}")
        d = os.path.join(root, f"q{n}")
        os.makedirs(d, exist_ok=True)
        for f in files[:n]:
            os.symlink(os.path.abspath(os.path.join(src, f)), os.path.join(d, f))
        out[n] = d
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", required=True)
    ap.add_argument("--queries", required=True, help="folder of query images")
    ap.add_argument("--n", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--devices", nargs="+", default=["cpu", "cuda", "auto"])
    ap.add_argument("--mode", default="hds", help="search mode (the command's default: hds)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", required=True)
    a = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="dhf-oneshot-")
    dirs = query_dirs(a.queries, a.n, tmp)
    dhf = _dhf()
    runs: dict[str, list] = {}
    for r in range(a.rounds):
        for n in a.n:
            for d in a.devices:
                s, p = _timed(dhf + ["search", "--query", dirs[n], "--index", a.index, "--mode", a.mode, "--device", d,
                                     "--json", "-q"])
                rec = {"round": r, "wall_s": round(s, 4), "rc": p.returncode}
                if p.returncode == 0:
                    out = json.loads(p.stdout)
                    rec["encode_ms_per_query"] = out[0].get("encode_ms")
                    rec["search_ms_per_query"] = out[0].get("timing_ms")
                else:
                    rec["stderr"] = p.stderr[-400:]
                runs.setdefault(f"{n}|{d}", []).append(rec)
                print(n, d, rec, flush=True)
    floors = {}
    cuda_init = "import torch; torch.zeros(1, device='cuda'); torch.cuda.synchronize()"
    for name, code in (("import torch", "import torch"), ("import torch + CUDA init", cuda_init)):
        ts = [_timed([sys.executable, "-c", code])[0] for _ in range(a.rounds)]
        floors[name] = {"best_s": round(min(ts), 4), "median_s": round(statistics.median(ts), 4)}
    table = []
    for n in a.n:
        row = {"n": n}
        for d in a.devices:
            w = [x["wall_s"] for x in runs[f"{n}|{d}"] if x["rc"] == 0]
            row[d] = {"best_s": min(w), "median_s": round(statistics.median(w), 4)} if w else None
        table.append(row)
    cross = next((r["n"] for r in table if r.get("cuda") and r.get("cpu")
                  and r["cuda"]["median_s"] < r["cpu"]["median_s"]), None)
    try:
        import torch

        dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        tv = torch.__version__
    except Exception:  # noqa: BLE001
        dev, tv = "unknown", None
    res = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": platform.platform(),
           "cpus": os.cpu_count(), "device_name": dev, "torch": tv, "index": a.index, "mode": a.mode,
           "rounds": a.rounds, "table": table, "crossover": cross, "floors": floors, "runs": runs,
           "command": " ".join(sys.argv)}
    with open(a.json, "w") as f:
        json.dump(res, f, indent=1)
    for r in table:
        print(r)
    print("crossover (cuda median < cpu):", cross, "floors:", floors)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
