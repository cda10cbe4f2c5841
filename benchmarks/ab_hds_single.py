"""Single-query ivf HDS of two checkouts, A/B (issue 15): ``search.hds_ivf`` of one query at a
time, ``--queries`` real-statistics queries on a real index grown to N rows as bench_scale.py
grows it, timed ``--rounds`` times; prints one JSON line (microseconds per query each round, and
an md5 of every result's ids and Hamming distances, so two checkouts can be shown to agree).
Also each mode's queries apart (``median_us_per_query_by_mode``: ivf, the lists; exact, a small
pool ranked whole). With ``--memo off,cold,warm`` it times the arms of the single-query memo (fine.CodeMemo) in one
process instead (``fullsort``: the lists sorted whole, against the prefix sort of ``cold``), and
checks that every arm returns the first pass's results. Run it alternately on two checkouts
(separate processes: one package each), e.g. a worktree of the older commit:

    git worktree add /tmp/base <older commit>
    for i in 1 2 3 4 5 6; do
      python benchmarks/ab_hds_single.py --repo /tmp/base --source /work/harvest/cifar10_smallcnn_48 --n 1e5
      python benchmarks/ab_hds_single.py --repo . --source /work/harvest/cifar10_smallcnn_48 --n 1e5
    done
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."),
                    help="the checkout whose deephash_faiss (and benchmarks/realgen.py) to time")
    ap.add_argument("--source", required=True, help="real arrays (reproduce.py --export) or index dir")
    ap.add_argument("--n", type=float, default=1e5)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--memo", default="cold",
                    help="comma list of arms, timed in one process, in an order that turns each round: cold "
                         "(the fine index's per-code memo, fine.CodeMemo where the checkout has one, emptied "
                         "before each round: a round gains only from codes repeated within it), warm (kept "
                         "from a pass over the same queries: a service that has seen these codes), off (no "
                         "memo: every call a fresh one), fullsort (cold, and every reached list sorted: "
                         "fine.PROBE_PREFIX out of reach)")
    a = ap.parse_args()
    repo = os.path.abspath(a.repo)
    sys.path[:0] = [os.path.join(repo, "benchmarks"), repo]
    import numpy as np
    import realgen

    from deephash_faiss.fine import FineParams
    from deephash_faiss.search import hds_ivf

    n = int(a.n)
    # (as realgen.grow_for_search, written out: the checkout under test may predate it)
    _, feats, qc, qf, _, fine = realgen.grow_fine_index(a.source, n, a.dim, np.random.default_rng(0))
    fine.warm()
    fp = FineParams.for_rows(n, exact_max=max(10, FineParams.exact_max))
    m = min(a.queries, len(qc))

    spent: dict = {}  # mode ("ivf" / "exact") -> seconds of the last run, and its queries

    def run():
        out = []
        spent.clear()
        for i in range(m):
            t = time.perf_counter()
            r, _, md = hds_ivf(fine, qc[i:i + 1], qf[i:i + 1], 10, 3, feats, fp, None, n, threads=1)
            s, c = spent.get(md[0], (0.0, 0))
            spent[md[0]] = (s + time.perf_counter() - t, c + 1)
            out.append(r[0])
        return out

    arms = a.memo.split(",")
    if not set(arms) <= {"cold", "warm", "off", "fullsort"}:
        ap.error("--memo takes cold, warm, off and fullsort")
    memo = getattr(fine, "_memo", None)
    import deephash_faiss.fine as fine_mod

    prefix = fine_mod.PROBE_PREFIX

    class NoMemo:  # every code a fresh, empty memo
        def entry(self, key, state):
            return {}

        def clear(self):
            pass

    res = run()  # warm-up, and the results compared
    us: dict = {arm: [] for arm in arms}
    by_mode: dict = {arm: {} for arm in arms}  # arm -> mode -> mean us of its queries, each round
    for rnd in range(a.rounds):
        for arm in arms[rnd % len(arms):] + arms[:rnd % len(arms)]:
            fine_mod.PROBE_PREFIX = 1 << 40 if arm == "fullsort" else prefix
            if memo is not None:
                fine._memo = NoMemo() if arm == "off" else memo
                if arm in ("cold", "fullsort"):
                    memo.clear()
                elif arm == "warm":
                    run()
            t = time.perf_counter()
            got = run()
            us[arm].append(round((time.perf_counter() - t) / m * 1e6, 1))
            for md, (sec, c) in spent.items():
                by_mode[arm].setdefault(md, []).append(round(sec / c * 1e6, 1))
            assert all(np.array_equal(x.ids, y.ids) and np.array_equal(x.distance, y.distance)
                       for x, y in zip(got, res)), f"{arm}: results differ from the first pass"
    h = hashlib.md5()
    for r in res:
        h.update(np.asarray(r.ids, np.int64).tobytes())
        h.update(np.asarray(r.hamming, np.int32).tobytes())
    print(json.dumps({"repo": repo, "n": n, "queries": m, "us_per_query": us[arms[0]] if len(arms) == 1 else us,
                      "median_us_per_query": {arm: float(np.median(v)) for arm, v in us.items()},
                      # (each mode's queries timed one by one: ivf = the lists, exact = a small pool)
                      "median_us_per_query_by_mode": {arm: {md: float(np.median(v)) for md, v in d.items()}
                                                      for arm, d in by_mode.items()},
                      "queries_by_mode": {md: c for md, (_, c) in spent.items()},
                      "distinct_query_codes": int(len(np.unique(qc[:m], axis=0))),
                      "results_md5": h.hexdigest()}))


if __name__ == "__main__":
    main()
