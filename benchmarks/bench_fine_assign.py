"""Where a batch of ivf HDS goes, and what the unranked scan of pools within the probe budget
saves (``fine.WHOLE_POOL_FACTOR``: 1.0, the product's, against 0.0, every query ranked), on a
real index grown to N rows as bench_scale.py grows it (issue 15).

    python benchmarks/bench_fine_assign.py --source /work/harvest/cifar10_smallcnn_48 --n 1e5 \
        --json benchmarks/results/scale/fine_assign_smallcnn_n1e5.json

Timed in one process, the two factors alternating ``--rounds`` times (fastest of ``--repeat``
calls a round): ``FineIndex.search`` for the batch, its recall@10 against exact HDS (queries it
ranks itself), and rows examined. Also timed: the exact path of the small pools resolved apart
(``search.hamming_pools`` + ``rerank.rank_pools_cpu``, as the Searcher ran it before 2026-12-06),
the whole ivf HDS of the batch that way (``before``) against the product's ``search.hds_ivf``
(``product``: the small pools from the fine search's own reach), alternating, with a check that
both return the same ids (``hds_ivf_same_ids``); the refine's top k by packed keys against its
argsort fallback (``refine_rounds``, ``refine_same_ids``), and a cProfile of ``FineIndex.search``
(``profile``: the functions with the most own time).
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import numpy as np  # noqa: E402

import realgen  # noqa: E402
from common import machine_basics, write_json  # noqa: E402


def best_of(fn, repeat: int) -> tuple[object, float]:
    """(fn()'s last result, its fastest time in s over ``repeat`` calls after one warm-up)."""
    out = fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return out, min(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    realgen.add_grow_args(ap)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--radius", type=int, default=3)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--noise", type=float, default=0.3)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", required=True)
    a = ap.parse_args()

    import faiss

    from deephash_faiss import fine as fine_mod
    from deephash_faiss.fine import FineParams, default_probe
    from deephash_faiss.rerank import rank_pools_cpu
    from deephash_faiss.search import hamming_pools, hds_ivf

    n, rng = int(a.n), np.random.default_rng(a.seed)
    codes, feats, qc, qf, bidx, fine = realgen.grow_fine_index(a.source, n, a.dim, rng, a.noise, a.queries, a.seed)
    nprobe, refine = default_probe(n)
    fp = FineParams(nprobe=nprobe, refine=refine, exact_max=max(a.k, FineParams.exact_max))

    lims, _, I = bidx.range_search(qc, a.radius)  # exact HDS: the whole pool ranked by L2
    pools = [I[lims[i]:lims[i + 1]] for i in range(len(qc))]
    exact = [p[o] for p, (o, _) in zip(pools, rank_pools_cpu(qf, pools, feats, a.k))]

    def recall(res) -> float:
        r = [len(set(e[:a.k]) & set(o[0][:a.k])) / min(a.k, len(e)) for e, o in zip(exact, res)
             if len(e) and not o[5]]
        return float(np.mean(r))

    search = lambda: fine.search(qc, qf, a.k, a.radius, feats, fp)  # noqa: E731
    out = {"source": a.source, "n": n, "dim": int(feats.shape[1]), "queries": len(qc), "machine": machine_basics(),
           "faiss": faiss.__version__, "numpy": np.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "cell_size": fine.cell_size, "nprobe": nprobe, "refine": refine, "budget_rows": nprobe * fine.cell_size,
           "pool_mean": float(np.mean([len(p) for p in pools])), "rounds": {"1.0": [], "0.0": []}}
    for _ in range(a.rounds):
        for factor in (1.0, 0.0):
            fine_mod.WHOLE_POOL_FACTOR = factor
            res, s = best_of(search, a.repeat)
            out["rounds"][str(factor)].append(round(s * 1e3, 3))
            out[f"recall_factor_{factor}"] = recall(res)
            out[f"examined_factor_{factor}"] = float(np.mean([o[3] for o in res]))
    fine_mod.WHOLE_POOL_FACTOR = 1.0
    for f, ms in out["rounds"].items():
        out[f"search_ms_median_factor_{f}"] = float(np.median(ms))
    res = search()
    small = [i for i, o in enumerate(res) if o[5]]
    out["exact_path_queries"] = len(small)
    out["exact_path_pools_under_k"] = int(sum(res[i][2] < a.k for i in small))
    if small:
        pl, s = best_of(lambda: [p for p, _, _ in hamming_pools(bidx, qc[small], a.k, a.radius, None, n)], a.repeat)
        out["exact_path_pools_ms"] = s * 1e3
        out["exact_path_rank_ms"] = best_of(lambda: rank_pools_cpu(qf[small], pl, feats, a.k), a.repeat)[1] * 1e3

    # the whole ivf HDS of a batch, small pools included: the product's (search.hds_ivf: the
    # small pools from the fine search's own reach) against the earlier composition (the
    # caller resolving the radius of the small pools again, hamming_pools + rank_pools_cpu)
    def before():
        r = search()
        sm = [i for i, o in enumerate(r) if o[5]]
        if sm:
            pools = hamming_pools(bidx, qc[sm], a.k, a.radius, None, n)
            ranked = rank_pools_cpu(qf[sm], [p for p, _, _ in pools], feats, a.k)
            for j, i in enumerate(sm):
                r[i] = (pools[j][0][ranked[j][0]],) + r[i][1:]
        return [o[0] for o in r]

    def product():
        return [q.ids for q in hds_ivf(fine, qc, qf, a.k, a.radius, feats, fp, None, n)[0]]

    same = all(np.array_equal(x, y) for x, y in zip(before(), product()))
    out["hds_ivf_same_ids"] = bool(same)
    out["hds_ivf_rounds"] = {"before": [], "product": []}
    for _ in range(a.rounds):
        for name, fn in (("before", before), ("product", product)):
            out["hds_ivf_rounds"][name].append(round(best_of(fn, a.repeat)[1] * 1e3, 3))
    for name, ms in out["hds_ivf_rounds"].items():
        out[f"hds_ivf_ms_median_{name}"] = float(np.median(ms))

    # the refine's top k: packed (distance, id) keys, partitioned (the product's), against the
    # rows sorted by id and argsorted stably (its fallback for ids past 31 bits), whole ivf HDS
    same = True
    out["refine_rounds"] = {"packed": [], "argsort": []}
    for _ in range(a.rounds):
        for name, bits in (("packed", fine_mod.REFINE_KEY_ID_BITS), ("argsort", 0)):
            saved, fine_mod.REFINE_KEY_ID_BITS = fine_mod.REFINE_KEY_ID_BITS, bits
            try:
                got, s = best_of(product, a.repeat)
            finally:
                fine_mod.REFINE_KEY_ID_BITS = saved
            out["refine_rounds"][name].append(round(s * 1e3, 3))
            if name == "packed":
                ref = got
            else:
                same = same and all(np.array_equal(x, y) for x, y in zip(ref, got))
    out["refine_same_ids"] = bool(same)
    # the refine alone (less noise than the whole batch): the batch's ranked queries x refine
    # random candidate ids, the features in RAM
    cand = np.stack([rng.choice(n, refine, replace=False) for _ in range(len(qc) - len(small))]).astype(np.int64)
    qr = qf[:len(cand)]
    out["refine_alone_rows"] = list(cand.shape)
    for name, bits in (("packed", fine_mod.REFINE_KEY_ID_BITS), ("argsort", 0)) * 3:
        saved, fine_mod.REFINE_KEY_ID_BITS = fine_mod.REFINE_KEY_ID_BITS, bits
        try:
            ms = best_of(lambda: fine_mod._refine(qr, cand, feats, a.k), 4 * a.repeat)[1] * 1e3
        finally:
            fine_mod.REFINE_KEY_ID_BITS = saved
        out.setdefault(f"refine_alone_ms_{name}", []).append(round(ms, 3))
    for name, ms in out["refine_rounds"].items():
        out[f"refine_hds_ivf_ms_median_{name}"] = float(np.median(ms))
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(20):
        search()
    prof.disable()
    st = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    top = sorted(st.items(), key=lambda kv: -kv[1][2])[:12]
    out["profile"] = [{"function": f"{os.path.basename(k[0])}:{k[1]}({k[2]})", "own_ms_per_batch": v[2] / 20 * 1e3,
                       "cum_ms_per_batch": v[3] / 20 * 1e3} for k, v in top]
    write_json(a.json, out)
    print({k: v for k, v in out.items() if k not in ("machine", "profile", "rounds", "hds_ivf_rounds", "refine_rounds")})
    for p in out["profile"]:
        print(f"  {p['own_ms_per_batch']:6.2f} ms own  {p['cum_ms_per_batch']:6.2f} cum  {p['function']}")


if __name__ == "__main__":
    main()
