"""A/B of two versions of the code on FineIndex.search: run once per checkout (the same data,
the same seed), then compare the saved results. Real-statistics codes grown to N rows
(``benchmarks/realgen.py``), features float32 in RAM, 400 queries searched with no safety limit
and with ``max_candidates`` 2,000 and 500; timing: 200 queries, best and median of 7.

    git worktree add /tmp/old <commit>
    python benchmarks/ab_fine_search.py run 1e6 /tmp/old.pkl --code /tmp/old
    python benchmarks/ab_fine_search.py run 1e6 /tmp/new.pkl --code .
    python benchmarks/ab_fine_search.py compare /tmp/old.pkl /tmp/new.pkl

``--seed-dir``: a real index harvest as bench_scale.py --source takes (default the Lite0 seed).
Memory: about 3x the features (1e6 rows x 256-d: 3 GB; 1e7 does not fit 24 GB).
"""
import argparse
import os
import pickle
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def run(a) -> None:
    sys.path.insert(0, os.path.abspath(a.code))  # the version under test first
    sys.path.insert(1, HERE)
    import numpy as np

    import realgen
    from deephash_faiss import api
    from deephash_faiss.fine import FineParams
    from deephash_faiss.index import IndexSpec

    import deephash_faiss
    print("code:", os.path.dirname(deephash_faiss.__file__))
    n = int(float(a.n))
    seed = realgen.load_seed(a.seed_dir)
    codes, feats = realgen.grow_index(seed, n, np.random.default_rng(0))
    qc = np.ascontiguousarray(seed.q_codes[:400])
    qf = np.ascontiguousarray(seed.q_feats[:400], np.float32)
    d = tempfile.mkdtemp(prefix="dhf-ab-")
    try:
        api.index_from_arrays(d, codes, feats, spec=IndexSpec("buckets"))
        s = api.open_index(d, device="cpu", features_in_memory=True)
        s.build_fine_index()
        fine, ram = s.fine_index(), s.store.features_in_ram()
        fp = FineParams.for_rows(n, None, None, FineParams.exact_max)
        res = {mc: fine.search(qc, qf, 10, 3, ram, fp, mc) for mc in (None, 2000, 500)}
        ts = []
        for _ in range(7):
            t = time.perf_counter()
            fine.search(qc[:200], qf[:200], 10, 3, ram, fp)
            ts.append(time.perf_counter() - t)
        ts.sort()
        print(f"n {n}: FineIndex.search, 200 queries: best {ts[0] * 1e3:.2f} ms, median {ts[3] * 1e3:.2f} ms")
        with open(a.out, "wb") as f:
            pickle.dump({"n": n, "results": res, "ms": [t * 1e3 for t in ts]}, f)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def compare(a) -> None:
    import numpy as np

    with open(a.a, "rb") as f:
        x = pickle.load(f)
    with open(a.b, "rb") as f:
        y = pickle.load(f)
    for mc, rx in x["results"].items():
        ry = y["results"][mc]
        same = len(rx) == len(ry) and all(
            np.array_equal(p[0], q[0]) and np.array_equal(p[1], q[1]) and tuple(p[2:]) == tuple(q[2:])
            for p, q in zip(rx, ry))
        print(f"max_candidates {mc}: identical {same}; truncated {sum(bool(p[4]) for p in rx)} of {len(rx)}")
    print(f"best ms {x['ms'][0]:.2f} -> {y['ms'][0]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("n")
    r.add_argument("out")
    r.add_argument("--code", default=os.path.join(HERE, ".."), help="checkout whose deephash_faiss runs")
    r.add_argument("--seed-dir", default="/work/harvest/cifar10_lite0_48")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    a = ap.parse_args()
    run(a) if a.cmd == "run" else compare(a)


if __name__ == "__main__":
    main()
