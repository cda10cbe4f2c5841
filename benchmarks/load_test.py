"""Load test of ``dhf serve``: a server on loopback, N concurrent clients, bounded in count and time.

Example:
    python benchmarks/load_test.py --index /tmp/dhfdemo/index --concurrency 8 --requests 2000 \
        --json benchmarks/results/load_test.json

The server is started as a subprocess (``python -m deephash_faiss.cli serve``) on 127.0.0.1
and a free port, and stopped at the end. Requests cycle through the modes (BCS, HDS, ES)
and the two query kinds: an image upload (multipart; the bytes of database images fetched
from ``/images/{id}`` beforehand) and a database id (JSON). Each client is a thread with
its own ``httpx.Client`` (keep-alive). Reports latency percentiles (p50/p95/p99, ms)
overall and per (kind, mode), throughput (requests/s) and errors (any non-200 or
exception). Exit status 1 if any request failed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import subprocess
import sys
import threading
import time

import numpy as np

from common import write_json

HOST = "127.0.0.1"  # loopback only


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(index: str, port: int, device: str, timeout_s: float) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "deephash_faiss.cli", "serve", "--index", index, "--host", HOST,
           "--port", str(port), "--device", device, "--log-level", "warning", "--timeout", str(timeout_s)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(httpx, base: str, proc: subprocess.Popen, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with status {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(base + "/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"server not ready within {limit_s:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def pct(a: np.ndarray, q: float) -> float:
    return float(np.percentile(a, q)) if len(a) else float("nan")


def summarise(lat_ms: np.ndarray) -> dict:
    return {"n": int(len(lat_ms)), "p50_ms": round(pct(lat_ms, 50), 2), "p95_ms": round(pct(lat_ms, 95), 2),
            "p99_ms": round(pct(lat_ms, 99), 2), "mean_ms": round(float(lat_ms.mean()), 2) if len(lat_ms) else None,
            "max_ms": round(float(lat_ms.max()), 2) if len(lat_ms) else None}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("deephash_faiss", "torch", "faiss", "fastapi", "starlette", "uvicorn", "httpx", "numpy"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "?")
        except ImportError:
            out[mod] = None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--index", required=True, help="index directory (dhf build-index / dhf demo)")
    ap.add_argument("--concurrency", type=int, default=8, help="concurrent clients")
    ap.add_argument("--requests", type=int, default=2000, help="requests in all (after warm-up)")
    ap.add_argument("--max-seconds", type=float, default=600, help="stop sending after this long")
    ap.add_argument("--modes", default="bcs,hds,es", help="comma-separated modes to cycle through")
    ap.add_argument("--kinds", default="upload,id", help="query kinds to cycle through: upload, id")
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--radius", type=int, default=3)
    ap.add_argument("--queries", type=int, default=64, help="distinct query images/ids")
    ap.add_argument("--warmup", type=int, default=30, help="untimed requests first")
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--server-timeout", type=float, default=30.0, help="the server's per-request timeout (s)")
    ap.add_argument("--json", dest="json_out", default=None, help="write the report here")
    args = ap.parse_args(argv)
    if args.concurrency < 1 or args.requests < 1 or args.max_seconds <= 0:
        ap.error("--concurrency, --requests and --max-seconds must be positive")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not set(modes) <= {"bcs", "hds", "es"} or not set(kinds) <= {"upload", "id"} or not modes or not kinds:
        ap.error("--modes takes bcs,hds,es and --kinds upload,id")

    import httpx

    port = free_port()
    base = f"http://{HOST}:{port}"
    t_start = time.monotonic()
    proc = start_server(args.index, port, args.device, args.server_timeout)
    try:
        wait_ready(httpx, base, proc)
        startup_s = time.monotonic() - t_start
        info = httpx.get(base + "/info", timeout=10).json()
        n = info["live_count"]
        rng = np.random.default_rng(0)
        qids = [int(i) for i in rng.choice(info["count"], size=min(args.queries, info["count"]), replace=False)]
        qids = [i for i in qids if httpx.get(f"{base}/images/{i}", timeout=10).status_code == 200]
        uploads = [httpx.get(f"{base}/images/{i}", timeout=10).content for i in qids]
        k = min(args.k, n)
        plan = [(kinds[(j // len(modes)) % len(kinds)], modes[j % len(modes)], j % len(qids))
                for j in range(args.requests + args.warmup)]

        lock = threading.Lock()
        next_i = [0]
        lat = np.full(len(plan), np.nan)
        status = np.zeros(len(plan), np.int32)
        good = np.zeros(len(plan), bool)
        errors: list[str] = []
        deadline = time.monotonic() + args.max_seconds

        def take() -> int | None:
            with lock:
                if next_i[0] >= len(plan) or time.monotonic() > deadline:
                    return None
                next_i[0] += 1
                return next_i[0] - 1

        def send(client, j: int) -> None:
            kind, mode, q = plan[j]
            params = {"mode": mode, "k": k, "radius": args.radius}
            t0 = time.perf_counter()
            try:
                if kind == "upload":
                    r = client.post(base + "/search", files={"image": (f"q{qids[q]}.png", uploads[q], "image/png")},
                                    data={key: str(v) for key, v in params.items()})
                else:
                    r = client.post(base + "/search", json={"id": qids[q], **params})
                ok = r.status_code == 200 and len(r.json()["results"]) == k
                status[j] = r.status_code
                good[j] = ok
                if not ok:
                    with lock:
                        errors.append(f"{kind}/{mode}: HTTP {r.status_code} {r.text[:200]}")
            except Exception as err:  # noqa: BLE001 - every failure is counted
                status[j] = -1
                with lock:
                    errors.append(f"{kind}/{mode}: {type(err).__name__}: {err}")
            lat[j] = (time.perf_counter() - t0) * 1e3

        # warm-up, one client
        with httpx.Client(timeout=60) as c:
            for j in range(args.warmup):
                send(c, take())
        warm_errors = len(errors)

        def worker() -> None:
            with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=1)) as c:
                while (j := take()) is not None:
                    send(c, j)

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.concurrency)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.max_seconds + 120)
        wall = time.perf_counter() - t0
    finally:
        stop_server(proc)

    timed = np.arange(args.warmup, len(plan))
    done = timed[~np.isnan(lat[timed])]
    ok = done[good[done]]
    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.machine()},
        "versions": versions(),
        "index": {key: info[key] for key in ("count", "bits", "feature_dim", "classes", "index", "device")}
        | {"backbone": info["model"]["backbone"], "path": os.path.abspath(args.index)},
        "settings": {"concurrency": args.concurrency, "requests": args.requests, "warmup": args.warmup, "k": k,
                     "radius": args.radius, "modes": modes, "kinds": kinds, "distinct_queries": len(qids),
                     "host": HOST},
        "server_startup_s": round(startup_s, 2),
        "completed": int(len(done)),
        "errors": int(len(done) - len(ok)),
        "warmup_errors": warm_errors,
        "wall_s": round(wall, 3),
        "throughput_rps": round(len(done) / wall, 1) if wall > 0 else None,
        "latency": summarise(lat[done]),
        "by_kind_mode": {f"{kd}/{md}": summarise(lat[[j for j in done if plan[j][:2] == (kd, md)]])
                         for kd in kinds for md in modes},
        "error_samples": errors[:10],
        "command": " ".join([os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "load_test.py"]
                            + (argv if argv is not None else sys.argv[1:])),
    }
    print(f"{report['completed']} requests ({args.concurrency} clients) in {wall:.1f} s: "
          f"{report['throughput_rps']} req/s, p50 {report['latency']['p50_ms']} ms, "
          f"p95 {report['latency']['p95_ms']} ms, p99 {report['latency']['p99_ms']} ms, errors {report['errors']}")
    for key, s in report["by_kind_mode"].items():
        print(f"  {key:<12} n {s['n']:>5}  p50 {s['p50_ms']:>8} ms  p95 {s['p95_ms']:>8} ms  p99 {s['p99_ms']:>8} ms")
    for e in report["error_samples"]:
        print("  error:", e)
    if args.json_out:
        write_json(args.json_out, report)
        print(f"wrote {args.json_out}")
    return 1 if report["errors"] or report["completed"] < args.requests else 0


if __name__ == "__main__":
    sys.exit(main())
