"""Server memory under many large uploads at once: ``dhf serve``'s resident size before, at
its peak and after N parallel uploads of S MiB each.

Example:
    python benchmarks/bench_upload_memory.py --index /tmp/dhfdemo/index --uploads 40 --size-mb 19 \
        --json benchmarks/results/serve/upload_memory.json

The server runs as a subprocess (``python -m deephash_faiss.cli serve``) on 127.0.0.1 and a
free port, with ``--max-upload-mb`` above S. Every upload is S MiB of random bytes (not an
image: each answer should be 415, after the whole body was received and parsed), sent by N
threads at once, each with its own connection. A sampler reads the server's ``VmRSS``
(``/proc/PID/status``) every 10 ms. ``--rounds`` repeats the burst (memory that stays after
the first round and does not grow is retained, not leaked). ``--max-uploads`` passes the
server option of that name (absent in dhf before 2026-12-08: leave it out there).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_basics, write_json  # noqa: E402
from load_test import HOST, free_port, stop_server, wait_ready  # noqa: E402


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", required=True)
    ap.add_argument("--uploads", type=int, default=40, help="parallel uploads per round")
    ap.add_argument("--size-mb", type=float, default=19.0, help="MiB per upload")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-uploads", type=int, default=None, help="the server's --max-uploads (default: its own)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import httpx

    import deephash_faiss

    port = free_port()
    cmd = [sys.executable, "-m", "deephash_faiss.cli", "serve", "--index", args.index, "--host", HOST,
           "--port", str(port), "--device", "cpu", "--log-level", "warning", "--timeout", "120",
           "--max-upload-mb", str(args.size_mb + 1)]
    if args.max_uploads is not None:
        cmd += ["--max-uploads", str(args.max_uploads)]
    import subprocess

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://{HOST}:{port}"
    body = os.urandom(int(args.size_mb * 2**20))
    rounds = []
    try:
        wait_ready(httpx, base, proc)
        time.sleep(1.0)
        for r in range(args.rounds):
            before = rss_mib(proc.pid)
            peak, stop = [before], threading.Event()

            def sample():
                while not stop.is_set():
                    peak[0] = max(peak[0], rss_mib(proc.pid))
                    time.sleep(0.01)

            statuses: list[int] = []
            lock = threading.Lock()

            def upload():
                with httpx.Client(timeout=300) as c:
                    try:
                        code = c.post(base + "/search", files={"image": ("r.bin", body, "application/octet-stream")}
                                      ).status_code
                    except httpx.HTTPError:
                        code = -1
                with lock:
                    statuses.append(code)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            t0 = time.perf_counter()
            threads = [threading.Thread(target=upload) for _ in range(args.uploads)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            time.sleep(1.0)
            stop.set()
            sampler.join()
            after = rss_mib(proc.pid)
            counts = {str(c): statuses.count(c) for c in sorted(set(statuses))}
            rounds.append({"round": r + 1, "rss_before_mib": round(before, 1), "rss_peak_mib": round(peak[0], 1),
                           "rss_after_mib": round(after, 1), "wall_s": round(wall, 2), "statuses": counts})
            print(f"round {r + 1}: RSS {before:.0f} -> peak {peak[0]:.0f} -> after {after:.0f} MiB, "
                  f"{wall:.1f} s, statuses {counts}", flush=True)
    finally:
        stop_server(proc)
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine_basics(), "dhf": deephash_faiss.__version__, "httpx": httpx.__version__,
           "index": args.index, "uploads": args.uploads, "size_mb": args.size_mb, "max_uploads": args.max_uploads,
           "rounds": rounds}
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
