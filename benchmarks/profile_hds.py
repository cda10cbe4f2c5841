"""Where HDS (the fine index) spends a query: cProfile of FineIndex.search on real CIFAR-10
statistics grown to N rows (256-d PCA features, float32 in RAM), 200 queries, product defaults (FineParams.for_rows).

    python benchmarks/profile_hds.py 1e6 [SEED_DIR]

SEED_DIR: a real index harvest as bench_scale.py --source takes (default /work/harvest/cifar10_lite0_48).
"""
import sys, time, cProfile, pstats, numpy as np
sys.path.insert(0, "benchmarks")
import realgen
from deephash_faiss.index import BinaryIndex, IndexSpec
from deephash_faiss.fine import FineIndex, FineParams, default_cell_size
n = int(float(sys.argv[1])); dim = 256
rng = np.random.default_rng(0)
seed = realgen.load_seed(sys.argv[2] if len(sys.argv) > 2 else "/work/harvest/cifar10_lite0_48")
codes, labels, parent, fits = realgen.grow_codes(seed, n, rng)
q = seed.q_codes[:200]
sf, qf = np.asarray(seed.feats, np.float32), np.asarray(seed.q_feats[:200], np.float32)
mu, comp = realgen.pca(sf[:50000], dim); sf, qf = (sf - mu) @ comp, (qf - mu) @ comp
feats = realgen.grow_features(sf, labels, parent, 0.3, rng, np.dtype("float32"))
qf = np.ascontiguousarray(qf, np.float32)
bidx = BinaryIndex.build(codes, IndexSpec("buckets"))
t=time.perf_counter()
fine = FineIndex.build(bidx, feats, cell_size=default_cell_size(n), seed=0)
print("fine build", time.perf_counter()-t)
gather = lambda ids: feats[ids]
fp = FineParams.for_rows(n)  # the product defaults for this size
fine.search(q, qf, 10, 3, gather, fp)
for _ in range(2):
    t = time.perf_counter(); fine.search(q, qf, 10, 3, gather, fp); print("hds ms/q", (time.perf_counter()-t)/len(q)*1e3)
cProfile.run("fine.search(q, qf, 10, 3, gather, fp)", "/tmp/dhf_hds.prof")
pstats.Stats("/tmp/dhf_hds.prof").sort_stats("tottime").print_stats(22)
