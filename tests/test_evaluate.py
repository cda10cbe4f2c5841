"""Rankings of HDS and ES in the evaluation, against a naive construction."""

import json
import os

import numpy as np
from click.testing import CliRunner

from deephash_faiss.evaluate import evaluate_arrays


def _naive_ap(rel, top_k):
    hits, s = 0, 0.0
    for j, r in enumerate(rel[:top_k], 1):
        if r:
            hits += 1
            s += hits / j
    return s / hits if hits else 0.0


def _ham(a, b):
    return int(np.unpackbits(np.bitwise_xor(a, b)).sum())


def test_hds_and_es_rankings_match_naive():
    rng = np.random.default_rng(0)
    n, m, nb, dim = 300, 25, 1, 6
    centres = rng.integers(0, 256, (4, nb), dtype=np.uint8)
    dbl = rng.integers(0, 4, n)
    db = centres[dbl] ^ np.packbits(rng.random((n, 8 * nb)) < 0.1, axis=1, bitorder="little")
    ql = rng.integers(0, 4, m)
    q = centres[ql] ^ np.packbits(rng.random((m, 8 * nb)) < 0.1, axis=1, bitorder="little")
    dbf = rng.normal(size=(n, dim)).astype(np.float32) + dbl[:, None]
    qf = rng.normal(size=(m, dim)).astype(np.float32) + ql[:, None]
    top_k, radius, cap = 50, 2, 40
    res = evaluate_arrays(db, dbf, dbl, q, qf, ql, ("hds", "es"), top_k=top_k, ks=[10, 50],
                          hds_radius=radius, max_candidates=cap)
    aps_h, aps_e, p10_h = [], [], []
    for i in range(m):
        ham = np.array([_ham(q[i], d) for d in db])
        bcs = sorted(range(n), key=lambda j: (ham[j], j))
        pool = [j for j in bcs if ham[j] < radius][:cap]
        l2 = ((dbf - qf[i]) ** 2).sum(1)
        pool_sorted = sorted(pool, key=lambda j: (l2[j], pool.index(j)))
        hds = pool_sorted + [j for j in bcs if j not in set(pool)]
        es = sorted(range(n), key=lambda j: (l2[j], j))
        aps_h.append(_naive_ap([dbl[j] == ql[i] for j in hds], top_k))
        aps_e.append(_naive_ap([dbl[j] == ql[i] for j in es], top_k))
        p10_h.append(np.mean([dbl[j] == ql[i] for j in hds[:10]]))
    assert abs(res["hds"]["map_at_k"] - np.mean(aps_h)) < 1e-6
    assert abs(res["es"]["map_at_k"] - np.mean(aps_e)) < 1e-6
    assert abs(res["hds"]["precision_at_k"][10] - np.mean(p10_h)) < 1e-6


def test_cli_evaluate_writes_json_and_plots(image_folder, trained_model, tmp_path):
    from deephash_faiss import api
    from deephash_faiss.cli import main

    idx = str(tmp_path / "idx")
    api.build_index(image_folder, idx, trained_model, device="cpu", progress=False)
    out = str(tmp_path / "ev" / "eval.json")
    os.makedirs(os.path.dirname(out))
    r = CliRunner().invoke(main, ["evaluate", "--index", idx, "--queries", image_folder, "--top-k", "20",
                                  "--json", out, "-q", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    res = json.load(open(out))
    for mode in ("bcs", "hds", "es"):
        assert 0.8 <= res[mode]["map_at_k"] <= 1.0
        assert mode in res["query_ms"]
    assert res["n_queries"] == 72 and res["n_database"] == 72
    assert os.path.getsize(str(tmp_path / "ev" / "precision_at_k.png")) > 0
