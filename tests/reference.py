"""Independent references for the tests: brute-force numpy, no project code."""

from __future__ import annotations

import numpy as np


def exact_hds(codes, feats, deleted, qc, qf, radius, k=None):
    """Per query the exact HDS ranking by brute force: every live row at Hamming distance <
    ``radius`` (codes uint8 [n, B], deleted bool [n]), by (squared L2 in float64, id); the
    whole pool, or its first ``k``. Returns a list of (ids int64, squared L2 float64)."""
    ham = np.unpackbits(qc[:, None, :] ^ codes[None], axis=2).sum(2)
    out = []
    for i in range(len(qc)):
        pool = np.flatnonzero((ham[i] < radius) & ~deleted)
        d = ((feats[pool].astype(np.float64) - qf[i]) ** 2).sum(1)
        o = np.lexsort((pool, d))[:k]
        out.append((pool[o], d[o]))
    return out
