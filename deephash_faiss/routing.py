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
