"""Helpers shared by the benchmark scripts: machine facts, the fastest of repeated runs, the JSON result file."""
from __future__ import annotations

import json
import os
import platform
import time


def mem_gb() -> float:
    """Physical memory of this machine in GiB (one decimal)."""
    return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)


def machine_basics() -> dict:
    """{cpus, platform, python, mem_gb}; scripts add their library versions."""
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "mem_gb": mem_gb()}


def write_json(path: str, obj, indent: int = 2, default=None) -> None:
    """Write obj as JSON to path, creating the parent folders."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=indent, default=default)


def best_ms(fn, repeat: int, warmup: int = 0) -> float:
    """Milliseconds of the fastest of ``repeat`` calls of fn(), after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts) * 1e3


def hnsw32(x, cache_path: str | None = None, ef_construction: int = 40):
    """(faiss IndexHNSWFlat with 32 links over x float32 [n, D], build seconds or None when read
    from ``cache_path``): the HNSW32 peer of the scale benchmarks, written to ``cache_path``
    (when given) after a build."""
    import faiss

    if cache_path and os.path.exists(cache_path):
        return faiss.read_index(cache_path), None
    t = time.perf_counter()
    h = faiss.IndexHNSWFlat(x.shape[1], 32)
    h.hnsw.efConstruction = ef_construction
    h.add(x)
    bt = round(time.perf_counter() - t, 1)
    if cache_path:
        os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
        faiss.write_index(h, cache_path)
    return h, bt
