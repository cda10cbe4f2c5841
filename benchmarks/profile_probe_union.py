"""How much of FineIndex's list ranking a batch wastes: per block of queries, the lists the
block's GEMM ranks (the union of the lists its codes reach) against the lists one query
needs on average, and for the batch the (query, list) pairs of the GEMMs against the pairs
the queries reach (those the probe sorts). Real-statistics codes grown to N rows, 200 queries,
product defaults.

    python benchmarks/profile_probe_union.py 1e5 /work/harvest/cifar10_smallcnn_48

SEED_DIR: a real index harvest as bench_scale.py --source takes.
"""
import sys, numpy as np
sys.path.insert(0, "benchmarks")
import realgen
import deephash_faiss.fine as fine_mod
from deephash_faiss.index import BinaryIndex, IndexSpec
from deephash_faiss.fine import FineIndex, FineParams, default_cell_size
n = int(float(sys.argv[1])); rng = np.random.default_rng(0)
seed = realgen.load_seed(sys.argv[2])
codes, labels, parent, fits = realgen.grow_codes(seed, n, rng)
sf, qf = np.asarray(seed.feats, np.float32), np.ascontiguousarray(seed.q_feats[:200], np.float32)
feats = realgen.grow_features(sf, labels, parent, 0.3, rng, np.dtype("float32"))
b = BinaryIndex.build(codes, IndexSpec("buckets")); fine = FineIndex.build(b, feats, cell_size=default_cell_size(n), seed=0)
stats = []
orig = fine_mod._blocks
def spy(qown, lists, bounds, n_lists, limit):
    for r0, r1, union in orig(qown, lists, bounds, n_lists, limit):
        per_q = np.diff(bounds)[qown[r0:r1]]
        stats.append((r1 - r0, len(union), per_q.mean(), per_q.sum()))
        yield r0, r1, union
fine_mod._blocks = spy
fine.search(np.ascontiguousarray(seed.q_codes[:200]), qf, 10, 3, feats, FineParams.for_rows(n))
for s in stats: print("block queries %d union lists %d mean lists per query %.0f -> GEMM waste %.1fx" % (s[0], s[1], s[2], s[1]/max(s[2],1)))
gemm, need = sum(s[0] * s[1] for s in stats), sum(s[3] for s in stats)
print("batch: %d blocks, GEMM (query, list) pairs %d, reached pairs %d -> %.1fx"
      % (len(stats), gemm, need, gemm / max(need, 1)))
print("lists total", fine.n_lists)
