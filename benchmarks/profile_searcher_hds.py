"""What the Searcher adds to the fine index's HDS: ``Searcher.hds(..., hds_mode="ivf")`` (the
product path: the fine index, the exact path for small pools, Hamming distances and results per
query) against ``FineIndex.search`` alone, on the same index and 200 queries; then the exact
path alone for the queries whose pools are small, and its range search. Real-statistics
codes grown to N rows (``benchmarks/realgen.py``), features float32 in RAM, fastest of 7 runs.

    python benchmarks/profile_searcher_hds.py 1e5 /work/harvest/cifar10_lite0_48

SEED_DIR: a real index harvest as bench_scale.py --source takes.
"""
import sys
import tempfile

import numpy as np

sys.path.insert(0, "benchmarks")

import realgen  # noqa: E402
from common import best_ms  # noqa: E402

from deephash_faiss import api  # noqa: E402
from deephash_faiss.fine import FineParams  # noqa: E402
from deephash_faiss.index import IndexSpec  # noqa: E402


def main(n: int, seed_dir: str, n_queries: int = 200) -> None:
    rng = np.random.default_rng(0)
    seed = realgen.load_seed(seed_dir)
    codes, feats = realgen.grow_index(seed, n, rng)
    qc = np.ascontiguousarray(seed.q_codes[:n_queries])
    qf = np.ascontiguousarray(seed.q_feats[:n_queries], np.float32)
    d = tempfile.mkdtemp(prefix="dhf-profile-")
    api.index_from_arrays(d, codes, feats, spec=IndexSpec("buckets"))
    s = api.open_index(d, device="cpu", features_in_memory=True)
    s.build_fine_index()
    fine, ram = s.fine_index(), s.store.features_in_ram()
    fp = FineParams.for_rows(n, None, None, max(10, FineParams.exact_max))  # as Searcher.hds sets them
    a = best_ms(lambda: s.hds(qc, qf, 10, hds_mode="ivf"), 7, warmup=1)
    b = best_ms(lambda: fine.search(qc, qf, 10, 3, ram, fp), 7, warmup=1)
    print(f"n {n}, {n_queries} queries: Searcher.hds ivf {a:.2f} ms, FineIndex.search {b:.2f} ms, "
          f"the Searcher's own {a - b:.2f} ms")
    # the Searcher's exact path for the queries whose pools are small, and its range search
    small = [i for i, m in enumerate(s.hds(qc, qf, 10, hds_mode="ivf").extra["query_modes"]) if m == "exact"]
    if small:
        qs = qc[small]
        e = best_ms(lambda: s._hds_exact(qs, qf[small], 10, 3, None), 20, warmup=2)
        r = best_ms(lambda: s.index.range_search(qs, 3, None), 20, warmup=2)
        print(f"  exact path for the {len(small)} small-pool queries {e:.2f} ms, of which the range search {r:.2f} ms")


if __name__ == "__main__":
    main(int(float(sys.argv[1])), sys.argv[2])
