"""How much of FineIndex's list ranking a batch wastes: per block of queries, the lists the
block's GEMM ranks (the union of the lists its codes reach) against the lists one query
needs on average, and for the batch the (query, list) pairs of the GEMMs against the pairs
the queries reach (those the probe sorts). Real-statistics codes grown to N rows, 200 queries,
product defaults.

    python benchmarks/profile_probe_union.py 1e5 /work/harvest/cifar10_smallcnn_48

SEED_DIR: a real index harvest as bench_scale.py --source takes.
"""
import sys

import numpy as np

sys.path.insert(0, "benchmarks")

import realgen  # noqa: E402

import deephash_faiss.fine as fine_mod  # noqa: E402
from deephash_faiss.fine import FineIndex, FineParams, default_cell_size  # noqa: E402
from deephash_faiss.index import BinaryIndex, IndexSpec  # noqa: E402


def main(n: int, seed_dir: str, n_queries: int = 200) -> None:
    rng = np.random.default_rng(0)
    seed = realgen.load_seed(seed_dir)
    codes, feats = realgen.grow_index(seed, n, rng)
    qf = np.ascontiguousarray(seed.q_feats[:n_queries], np.float32)
    b = BinaryIndex.build(codes, IndexSpec("buckets"))
    fine = FineIndex.build(b, feats, cell_size=default_cell_size(n), seed=0)
    stats = []  # per block: (queries, union lists, mean lists per query, reached pairs)
    orig = fine_mod._blocks

    def spy(qown, lists, bounds, n_lists, limit):
        for r0, r1, union in orig(qown, lists, bounds, n_lists, limit):
            per_q = np.diff(bounds)[qown[r0:r1]]
            stats.append((r1 - r0, len(union), per_q.mean(), per_q.sum()))
            yield r0, r1, union

    fine_mod._blocks = spy
    fine.search(np.ascontiguousarray(seed.q_codes[:n_queries]), qf, 10, 3, feats, FineParams.for_rows(n))
    for nq, nu, per, _ in stats:
        print(f"block queries {nq} union lists {nu} mean lists per query {per:.0f} -> "
              f"GEMM waste {nu / max(per, 1):.1f}x")
    gemm, need = sum(s[0] * s[1] for s in stats), sum(s[3] for s in stats)
    print(f"batch: {len(stats)} blocks, GEMM (query, list) pairs {gemm}, reached pairs {need} -> "
          f"{gemm / max(need, 1):.1f}x")
    print("lists total", fine.n_lists)


if __name__ == "__main__":
    main(int(float(sys.argv[1])), sys.argv[2])
