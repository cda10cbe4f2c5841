"""Cost-based routing thresholds, measured (``benchmarks/bench_route.py`` writes
``routing.json`` next to this module; the committed file records machine and date).

Nothing here is guessed: a key missing from the JSON falls back to the conservative choice
noted beside its default (the path that was never slower where it was measured).
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Any

ROUTING_FILE = os.path.join(os.path.dirname(__file__), "routing.json")

# Fallbacks when routing.json lacks a key (each is the conservative side of its crossover).
DEFAULTS: dict[str, Any] = {
    # build: "auto" index type takes the dictionary when distinct codes / rows <= this
    "auto_buckets_max_ratio": 0.25,
    # ... and the index has at least this many rows (below, both take microseconds)
    "auto_buckets_min_rows": 4096,
    # search: the dictionary's k-NN beats the flat scan when distinct codes / live rows <= this
    "dict_knn_max_ratio": 0.25,
    # CUDA: batches smaller than this stay on the CPU path (GPU start-up and transfers
    # cannot be won back); None = always CPU unless measured
    "cuda_min_batch": None,
    # CUDA: ... and indexes with fewer live rows than this
    "cuda_min_rows": 0,
    # CUDA: the measured grid [[rows, distinct codes, batch, gpu ms/query, cpu ms/query], ...]
    # (bench_route.py --device cuda); when present it decides, nearest measured point
    "cuda_grid": None,
    # CUDA exact HDS (pools + rerank on the GPU) from this batch size on; None = never
    "cuda_hds_min_batch": None,
    # CUDA: the grid's GPU point counts as a win only when gpu ms < margin x cpu ms. A policy,
    # not a measurement: the one near tie of the H200 grid (1e6 distinct codes, batch 1: 0.97)
    # ran 1.11x slower than the CPU through the Searcher in another run
    # (benchmarks/results/searcher_cuda_h200.json), so near ties stay on the CPU.
    "cuda_win_margin": 0.8,
    # one-shot `dhf search --device auto` (a fresh process): fewer query images than this are
    # encoded and searched on the CPU even where a GPU is present (CUDA initialisation and moving
    # the model cost the process seconds it cannot win back on a few images); None = always the
    # GPU when present. Measured by benchmarks/bench_oneshot.py on the H200 (docs/benchmarks.md,
    # "One-shot `dhf search` on a GPU machine"): with the bytecode compiled (2026-12-03,
    # oneshot_search_h200_compiled.json) the CPU still won at 64 queries (median 3.36 s against
    # 3.89 s) and lost at 256 (6.17 against 4.13); the lines through those medians cross at ~104
    # queries, so the GPU from 128 (was 64, from runs that compiled torch in every process).
    "cuda_oneshot_min_queries": 128,
}


@lru_cache(maxsize=1)
def thresholds() -> dict[str, Any]:
    """The measured thresholds (``routing.json``) over :data:`DEFAULTS`."""
    out = dict(DEFAULTS)
    try:
        with open(ROUTING_FILE) as f:
            data = json.load(f)
        out.update(data.get("thresholds", {}))
    except (OSError, ValueError):
        pass
    return out


def route(live: int, distinct: int | None, batch: int, device_type: str, saved: str = "flat") -> str:
    """The code path for one call: "dict" (code dictionary), "flat" (FAISS scan) or "gpu".

    Args:
        live: live rows; distinct: distinct codes (None: unknown, no dictionary loaded);
        batch: queries in the call; device_type: "cpu" or "cuda"; saved: the saved index
            type ("dict" for a code-dictionary file, else the FAISS kind).
    Rules (thresholds from routing.json):
      * the dictionary when its size is known, live >= ``auto_buckets_min_rows`` and
        distinct / live <= ``dict_knn_max_ratio`` (it then costs ~distinct, not live), else the
        flat scan (a saved dictionary below those sizes is searched by a flat scan built from
        the codes: the measured faster path there);
      * on CUDA with a measured grid (``cuda_grid``): the GPU when it was faster than the CPU
        path at the nearest measured point (:func:`cuda_wins`), else the CPU rules;
      * on CUDA without one, the GPU kernels take a batch of at least ``cuda_min_batch`` queries over at
        least ``cuda_min_rows`` live rows when no dictionary applies; smaller calls stay on the
        CPU (GPU start-up and transfers would not be won back). Unmeasured -> CPU.
    """
    t = thresholds()
    dict_serves = (distinct is not None and live >= int(t["auto_buckets_min_rows"])
                   and distinct <= float(t["dict_knn_max_ratio"]) * live)
    if device_type == "cuda" and t.get("cuda_grid"):
        if cuda_wins(t["cuda_grid"], live, live if distinct is None else distinct, batch,
                     float(t.get("cuda_win_margin") or 1.0)):
            return "gpu"
        device_type = "cpu"  # the CPU rules below pick the CPU path the grid compared with
    if dict_serves:
        return "dict"
    if saved == "dict" and distinct is None:
        return "dict"
    if device_type == "cuda":
        mb, mr = t.get("cuda_min_batch"), t.get("cuda_min_rows")
        if mb is not None and batch >= int(mb) and live >= int(mr or 0):
            return "gpu"
    return "faiss" if saved in ("hash", "multihash") else "flat"  # "faiss": the saved hash index


def cuda_wins(grid, live: int, distinct: int, batch: int, margin: float = 1.0) -> bool:
    """Whether the GPU beat the CPU (gpu ms < ``margin`` x cpu ms) at the measured point nearest
    (rows, distinct codes, batch), nearness in (log10 rows, log10 distinct, log10 batch); rows
    [n, U, b, gpu_ms, cpu_ms]. Below the smallest measured batch or rows the CPU is kept
    (start-up not won back)."""
    import math

    pts = [(math.log10(max(r[0], 1)), math.log10(max(r[1], 1)), math.log10(max(r[2], 1)), r[3] < margin * r[4])
           for r in grid]
    if not pts or batch < min(r[2] for r in grid) or live < min(r[0] for r in grid):
        return False
    x = (math.log10(max(live, 1)), math.log10(max(distinct, 1)), math.log10(max(batch, 1)))
    best = min(pts, key=lambda p: (p[0] - x[0]) ** 2 + (p[1] - x[1]) ** 2 + (p[2] - x[2]) ** 2)
    return best[3]


def oneshot_device(requested: str, n_queries: int, gpu_available: bool) -> tuple[str, str | None]:
    """The device of a one-shot search process (``dhf search``) over ``n_queries`` images.

    Returns (device, reason): ``requested`` unchanged unless it is "auto" on a machine with a
    GPU and ``n_queries`` is below ``cuda_oneshot_min_queries``; then ("cpu", a one-line reason
    for the screen). A long-lived process (``dhf serve``, the Python API) keeps "auto" = the GPU.
    """
    mq = thresholds().get("cuda_oneshot_min_queries")
    if requested != "auto" or not gpu_available or mq is None or n_queries >= int(mq):
        return requested, None
    return "cpu", (f"{n_queries} quer{'y' if n_queries == 1 else 'ies'} (< {int(mq)}): searching on the CPU, "
                   "where a one-shot search is faster than starting the GPU (--device cuda forces it)")
