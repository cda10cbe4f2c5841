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
