"""Benchmark BCS, HDS and ES (CPU, or L2 on CUDA through torch) on a synthetic database.

Example:
    python benchmarks/bench_search.py --n 1e6 --bits 48 --dim 1024 --queries 1000 \
        --json benchmarks/results/search_n1e6_d1024.json

Synthetic data shaped like supervised codes: C class centres (random codes); every
database/query code is its class centre with 0..--flips random bit flips; features are
the class mean (N(0,1)) plus N(0, --noise^2) noise, float32 (or --feature-dtype float16).
Queries are fresh draws of the same distribution (not database rows).

Timed (same queries in every mode; one warm-up call, then the median of --repeat):
  bcs      k-NN through BinaryIndex (flat / hash / multihash), raw faiss IndexBinaryFlat
           at the code's own width and zero-padded to 64 bits; batch and single query
  radius   BinaryIndex.range_search (no cap) per kind, radius 1..4, and recall of
           hash / multihash against flat
  hds      range_search(radius, max_candidates) + Hamming top-up + rank_pools_cpu
           (the functions Searcher.hds uses), caps 1,000 and 10,000, pool sizes
  es       faiss.knn (IndexFlatL2 kernel, BLAS for batches) over all features
With --device cuda everything runs on the GPU through the product's own functions, as
Searcher(device="cuda") runs them: BCS and radius pooling through search.GpuCodeIndex
(gpu.GpuBinaryIndex, Triton kernels), HDS = search.hds_device (pools kept on the GPU,
gpu.l2_rerank_ids with cached norms) on features held on the GPU, ES = gpu.l2_knn (flat L2);
features are drawn
on the GPU from the same distribution; times include the host<->device copies of queries
and results; BCS is checked against the CPU flat index, ES against float64.
(--device cpu:0 runs that torch path on CPU, for testing.)
With --codes-only, only BCS (flat) runs (for 1e8 codes).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

# Passive OpenMP waits: on a shared 2-core machine spinning threads cost 2-10x (measured).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import faiss  # noqa: E402
from common import mem_gb, write_json  # noqa: E402

from deephash_faiss.index import BinaryIndex, IndexSpec, pad_codes, padded_nbytes  # noqa: E402
from deephash_faiss.rerank import rank_pools_cpu  # noqa: E402


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timeit(fn, repeat=3, warmup=1):
    """Median seconds of fn() after warm-up calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def single_ms(fn, m, repeat=1):
    """Median ms of fn(i) over queries i < m (each run once after one warm-up)."""
    fn(0)
    ts = []
    for _ in range(repeat):
        for i in range(m):
            t = time.perf_counter()
            fn(i)
            ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


# -- synthetic data ---------------------------------------------------------------------
class Synth:
    def __init__(self, bits, dim, classes, flips, noise, seed):
        self.bits, self.dim, self.classes, self.flips, self.noise = bits, dim, classes, flips, noise
        self.rng = np.random.default_rng(seed)
        self.nbytes = bits // 8
        self.centres = self.rng.integers(0, 256, (classes, self.nbytes), dtype=np.uint8)
        self.means = self.rng.standard_normal((classes, dim), dtype=np.float32) if dim else None
        if bits <= 64:
            c8 = np.zeros((classes, 8), np.uint8)
            c8[:, :self.nbytes] = self.centres
            self.c64 = c8.view("<u8")[:, 0]

    def codes(self, labels):
        n = len(labels)
        rng = self.rng
        if self.bits <= 64:
            x = self.c64[labels]
            for _ in range(self.flips):  # each flip happens with prob 1/2 at a random bit
                pos = rng.integers(0, self.bits, n, dtype=np.uint64)
                on = rng.integers(0, 2, n, dtype=np.uint64)
                x ^= on << pos
            return np.ascontiguousarray(x.astype("<u8").view(np.uint8).reshape(n, 8)[:, :self.nbytes])
        b = np.unpackbits(self.centres[labels], axis=1, bitorder="little")
        for _ in range(self.flips):
            pos = rng.integers(0, self.bits, n)
            b[np.arange(n), pos] ^= rng.integers(0, 2, n).astype(np.uint8)
        return np.packbits(b, axis=1, bitorder="little")

    def features(self, labels, dtype):
        x = self.rng.standard_normal((len(labels), self.dim), dtype=np.float32)
        x *= self.noise
        x += self.means[labels]
        return x.astype(dtype, copy=False)


def lscpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine_info():
    import h5py
    info = {
        "cpu": lscpu_model(), "cores": os.cpu_count(), "faiss_threads": faiss.omp_get_max_threads(),
        "mem_gb": mem_gb(),
        "python": platform.python_version(), "faiss": faiss.__version__, "numpy": np.__version__,
        "h5py": h5py.__version__, "load_avg_at_start": os.getloadavg(),
    }
    try:
        import torch
        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def recall_vs(ref, got):
    """Fraction of the reference (lims, I) pairs also in got, over all queries."""
    lr, Ir = ref
    lg, Ig = got
    hit = tot = 0
    for i in range(len(lr) - 1):
        a, b = Ir[lr[i]:lr[i + 1]], Ig[lg[i]:lg[i + 1]]
        tot += len(a)
        hit += np.isin(a, b, assume_unique=True).sum()
    return 1.0 if tot == 0 else hit / tot


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=float, default=1e5)
    ap.add_argument("--bits", type=int, default=48)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--queries", type=int, default=1000, help="batch size for BCS / radius / HDS")
    ap.add_argument("--es-queries", type=int, default=200, help="first queries of the batch used for ES")
    ap.add_argument("--single", type=int, default=20, help="queries timed one at a time")
    ap.add_argument("--radius-queries", type=int, default=200)
    ap.add_argument("-k", type=int, default=100)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--flips", type=int, default=4, help="max random bit flips per code (each w.p. 1/2)")
    ap.add_argument("--noise", type=float, default=1.0)
    ap.add_argument("--radius", type=int, default=3, help="HDS radius (strict: distance < radius)")
    ap.add_argument("--caps", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--hash-b", type=int, default=16)
    ap.add_argument("--hash-nflip", type=int, default=2)
    ap.add_argument("--mh-nhash", type=int, default=2)
    ap.add_argument("--mh-b", type=int, default=24)
    ap.add_argument("--mh-nflip", type=int, default=1)
    ap.add_argument("--kinds", nargs="+", default=["flat", "hash", "multihash"])
    ap.add_argument("--device", default="cpu", help="cpu (faiss) or cuda (L2 via torch; cpu:0 = torch on CPU)")
    ap.add_argument("--feature-dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--codes-only", action="store_true", help="BCS only (no features)")
    ap.add_argument("--no-raw", action="store_true", help="skip raw faiss flat indexes (memory)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--index", help="a real dhf index directory instead of synthetic data")
    ap.add_argument("--json", required=True)
    ap.add_argument("--note", default="")
    a = ap.parse_args(argv)
    n = int(a.n)
    out = {"date": datetime.date.today().isoformat(), "machine": machine_info(), "args": vars(a),
           "note": a.note}
    t_start = time.perf_counter()
    log = lambda *s: print(f"[{time.perf_counter() - t_start:7.1f}s rss {rss_gb():5.1f}G]", *s, flush=True)  # noqa: E731

    if a.device != "cpu":  # "cuda", "cuda:1"; "cpu:0" runs the torch path on CPU (testing)
        return run_torch(a, out, log)
    fdt = np.float16 if a.feature_dtype == "float16" else np.float32
    kinds = list(a.kinds)
    specs = {"flat": IndexSpec("flat"),
             "hash": IndexSpec("hash", hash_bits=a.hash_b, nflip=a.hash_nflip),
             "multihash": IndexSpec("multihash", hash_bits=a.mh_b, nhash=a.mh_nhash, nflip=a.mh_nflip)}
    # ---- data -------------------------------------------------------------------------
    t0 = time.perf_counter()
    xb = None
    if a.index:
        from deephash_faiss.search import Searcher
        s = Searcher(a.index, device="cpu", features_in_memory=not a.codes_only)
        codes_all = s.codes()
        n, bits = len(codes_all), s.bits
        a.bits, a.dim = bits, s.store.dim
        xb = None if a.codes_only else s.store.load_features()
        rng = np.random.default_rng(a.seed)
        qi = rng.integers(0, n, a.queries)
        qcodes, qfeats = codes_all[qi], (None if xb is None else xb[qi].astype(np.float32))
        pidx = {kd: BinaryIndex.build(codes_all, specs[kd]) for kd in kinds}
        raw = {}
        if not a.no_raw:
            raw["faiss_flat"] = faiss.IndexBinaryFlat(bits)
            raw["faiss_flat"].add(codes_all)
            pb = padded_nbytes(bits // 8)
            if pb * 8 != bits:
                raw["faiss_flat_padded"] = faiss.IndexBinaryFlat(pb * 8)
                raw["faiss_flat_padded"].add(pad_codes(codes_all, pb))
        del codes_all
    else:
        syn = Synth(a.bits, 0 if a.codes_only else a.dim, a.classes, a.flips, a.noise, a.seed)
        # empty product indexes, filled chunk by chunk
        pidx = {kd: BinaryIndex.build(np.zeros((0, a.bits // 8), np.uint8), specs[kd]) for kd in kinds}
        raw = {}
        pb = padded_nbytes(a.bits // 8)
        if not a.no_raw:
            raw["faiss_flat"] = faiss.IndexBinaryFlat(a.bits)
            if pb * 8 != a.bits:
                raw["faiss_flat_padded"] = faiss.IndexBinaryFlat(pb * 8)
        if not a.codes_only:
            xb = np.empty((n, a.dim), fdt)
        for s0 in range(0, n, a.chunk):
            s1 = min(n, s0 + a.chunk)
            lab = syn.rng.integers(0, a.classes, s1 - s0)
            c = syn.codes(lab)
            for kd in kinds:
                pidx[kd].add(c)
            for name, r in raw.items():
                r.add(pad_codes(c, r.code_size))
            if xb is not None:
                xb[s0:s1] = syn.features(lab, fdt)
            if s0 // a.chunk % 10 == 0:
                log(f"generated {s1:,} rows")
        qlab = syn.rng.integers(0, a.classes, a.queries)
        qcodes = syn.codes(qlab)
        qfeats = None if a.codes_only else syn.features(qlab, np.float32)
    out.update(n=n, bits=a.bits, dim=None if a.codes_only else a.dim, device=a.device,
               feature_dtype=None if a.codes_only else a.feature_dtype, queries=a.queries, k=a.k,
               synthetic={"classes": a.classes, "max_flips": a.flips, "noise": a.noise} if not a.index else None,
               build_s=round(time.perf_counter() - t0, 2),
               padded_bits=pidx[kinds[0]].stored_nbytes * 8 if kinds else None)
    mem = {"codes_gb": n * a.bits / 8 / 2**30,
           "features_gb": 0 if xb is None else xb.nbytes / 2**30,
           "rss_after_build_gb": rss_gb()}
    log("built", out["build_s"], "s")
    m, k = a.queries, a.k
    bcs = {}
    # ---- BCS k-NN ---------------------------------------------------------------------
    ref = None
    # product and raw indexes timed round-robin (the machine is shared: load drifts)
    runners = {f"product_{kd}": (lambda ix=pidx[kd]: ix.search(qcodes, k)) for kd in kinds}
    runners.update({name: (lambda r=r, qq=pad_codes(qcodes, r.code_size): r.search(qq, k)) for name, r in raw.items()})
    nrep = max(5, a.repeat)
    tbs = {name: [] for name in runners}
    for name, fn in runners.items():
        fn()  # warm-up
    for _ in range(nrep):
        for name, fn in runners.items():
            t = time.perf_counter()
            fn()
            tbs[name].append(time.perf_counter() - t)
    singles = {name: [] for name in runners}
    sq = {name: (lambda i, ix=pidx[name[8:]]: ix.search(qcodes[i:i + 1], k)) for name in runners if name.startswith("product_")}
    sq.update({name: (lambda i, r=r, qq=pad_codes(qcodes, r.code_size): r.search(qq[i:i + 1], k)) for name, r in raw.items()})
    for i in range(a.single):
        for name, fn in sq.items():
            if i == 0:
                fn(0)
            t = time.perf_counter()
            fn(i)
            singles[name].append(time.perf_counter() - t)
    for name, fn in runners.items():
        tb = statistics.median(tbs[name])
        bcs[name] = {"batch_ms_per_query": tb / m * 1e3, "qps": m / tb,
                     "single_ms": statistics.median(singles[name]) * 1e3, "batch_times_s": tbs[name]}
        D, I = fn()
        if name == "product_flat":
            ref = I
        elif ref is not None and name.startswith("product_"):
            bcs[name]["knn_recall_vs_flat"] = float(np.mean([len(np.intersect1d(a_, b_)) / k for a_, b_ in zip(ref, I)]))
        elif ref is not None:
            bcs[name]["same_result_as_product"] = bool(np.array_equal(I, ref))
        log("bcs", name, {kk: v for kk, v in bcs[name].items() if kk != "batch_times_s"})
    out["bcs"] = bcs
    if "flat" in kinds:
        out["bcs_ms_per_query"] = bcs["product_flat"]["batch_ms_per_query"]
        out["bcs_single_ms"] = bcs["product_flat"]["single_ms"]
        if "faiss_flat" in bcs:
            out["wrapper_overhead"] = bcs["product_flat"]["batch_ms_per_query"] / bcs["faiss_flat"]["batch_ms_per_query"]
            out["wrapper_overhead_single"] = bcs["product_flat"]["single_ms"] / bcs["faiss_flat"]["single_ms"]
        if "faiss_flat_padded" in bcs:
            out["wrapper_overhead_vs_padded_raw"] = (bcs["product_flat"]["batch_ms_per_query"]
                                                     / bcs["faiss_flat_padded"]["batch_ms_per_query"])
            out["padding_speedup_raw"] = (bcs["faiss_flat"]["batch_ms_per_query"]
                                          / bcs["faiss_flat_padded"]["batch_ms_per_query"])
    for kd in kinds:
        if kd != "flat" and "flat" in kinds:
            out[f"bcs_{kd}_ms_per_query"] = bcs[f"product_{kd}"]["batch_ms_per_query"]
    mem["rss_after_bcs_gb"] = rss_gb()
    # ---- radius pooling + recall ------------------------------------------------------
    rq = qcodes[:a.radius_queries]
    mr = len(rq)
    rad = {}
    for r_ in (1, 2, 3, 4):
        row = {}
        ref_r = None
        for kd in kinds:
            ix = pidx[kd]
            t = timeit(lambda: ix.range_search(rq, r_), max(1, a.repeat - 1))
            lims, D, I = ix.range_search(rq, r_)
            rqp = pad_codes(rq, ix.stored_nbytes)
            traw = timeit(lambda: ix.index.range_search(rqp, r_), max(1, a.repeat - 1))
            row[kd] = {"ms_per_query": t / mr * 1e3, "raw_faiss_ms_per_query": traw / mr * 1e3,
                       "mean_pool": float(lims[-1] / mr),
                       "max_pool": int(np.diff(lims).max()) if mr else 0}
            if kd == "flat":
                ref_r = (lims, I)
            elif ref_r is not None:
                row[kd]["recall_vs_flat"] = recall_vs(ref_r, (lims, I))
                row[kd]["speedup_vs_flat"] = row["flat"]["ms_per_query"] / row[kd]["ms_per_query"]
                row[kd]["raw_speedup_vs_flat"] = row["flat"]["raw_faiss_ms_per_query"] / row[kd]["raw_faiss_ms_per_query"]
        rad[str(r_)] = row
        log("radius", r_, row)
    out["radius"] = rad
    out["radius_params"] = {kd: specs[kd].to_dict(a.bits) for kd in kinds}
    if xb is None:
        mem["peak_rss_gb"] = peak_rss_gb()
        out["memory"] = mem
        return finish(out, a)
    # ---- ES -------------------------------------------------------------------------
    me = min(a.es_queries, m)
    xq = np.ascontiguousarray(qfeats[:me], np.float32)
    xb32 = xb if xb.dtype == np.float32 else None

    def es_run(lo=0, hi=me):
        base = xb32 if xb32 is not None else np.ascontiguousarray(xb, np.float32)
        return faiss.knn(xq[lo:hi], base, k)
    te = timeit(es_run, max(1, a.repeat - 1))
    nsing = min(3, me)
    tes = single_ms(lambda i: es_run(i, i + 1), nsing)
    out["es"] = {"batch_ms_per_query": te / me * 1e3, "qps": me / te, "single_ms": tes,
                 "batch": me, "backend": "faiss.knn"}
    out["es_ms_per_query"] = out["es"]["batch_ms_per_query"]
    out["es_single_ms"] = tes
    log("es", out["es"])
    # ---- HDS --------------------------------------------------------------------------
    hds_kind = "hash" if "hash" in kinds else "flat"
    ix = pidx[hds_kind]
    hds = {}
    gather = lambda ids: xb[ids]  # noqa: E731  (FeatureStore with features in memory)

    def hds_run(cap, lo, hi):
        q = qcodes[lo:hi]
        t0_ = time.perf_counter()
        lims, D, I = ix.range_search(q, a.radius, cap)
        pools = [I[lims[i]:lims[i + 1]] for i in range(len(q))]
        short = [i for i in range(len(q)) if len(pools[i]) < k]
        if short:  # Searcher.pools top-up with the Hamming k-NN
            _, Ik = ix.search(q[short], k)
            for j, i in enumerate(short):
                extra = Ik[j][(Ik[j] >= 0) & ~np.isin(Ik[j], pools[i])]
                pools[i] = np.concatenate([pools[i], extra])
        t1_ = time.perf_counter()
        res = rank_pools_cpu(qfeats[lo:hi], pools, gather, k)
        t2_ = time.perf_counter()
        return pools, res, t1_ - t0_, t2_ - t1_

    for cap in a.caps:
        ts_ = []
        hds_run(cap, 0, min(m, 50))
        for _ in range(a.repeat):
            pools, res, tp, tr = hds_run(cap, 0, m)
            ts_.append((tp + tr, tp, tr))
        tt, tp, tr = sorted(ts_)[len(ts_) // 2]
        sizes = np.array([len(p) for p in pools])
        single = single_ms(lambda i: hds_run(cap, i, i + 1), a.single)
        # agreement of HDS top-k with ES top-k on the ES queries
        Des, Ies = es_run()
        ov = float(np.mean([len(np.intersect1d(pools[i][res[i][0]], Ies[i])) / k for i in range(me)]))
        hds[str(cap)] = {"batch_ms_per_query": tt / m * 1e3, "pool_ms_per_query": tp / m * 1e3,
                         "rerank_ms_per_query": tr / m * 1e3, "qps": m / tt, "single_ms": single,
                         "pool_mean": float(sizes.mean()), "pool_median": float(np.median(sizes)),
                         "pool_max": int(sizes.max()), "truncated_frac": float(np.mean(sizes >= cap)),
                         "overlap_with_es_topk": ov}
        log("hds cap", cap, hds[str(cap)])
    # uncapped pool size (how big the Hamming ball is)
    lims, _, _ = ix.range_search(qcodes[:a.radius_queries], a.radius)
    out["hds"] = hds
    out["hds_params"] = {"radius": a.radius, "pool_index": specs[hds_kind].to_dict(a.bits),
                         "uncapped_pool_mean": float(lims[-1] / len(lims[:-1])),
                         "uncapped_pool_max": int(np.diff(lims).max())}
    headline_speedups(out, hds, a.caps)
    for kd in kinds:
        if kd != "flat":
            out[f"speedup_bcs_{kd}_vs_es"] = out["es_ms_per_query"] / bcs[f"product_{kd}"]["batch_ms_per_query"]
    out["speedup_single_bcs_vs_es"] = out["es_single_ms"] / out["bcs_single_ms"]
    mem["peak_rss_gb"] = peak_rss_gb()
    out["memory"] = mem
    return finish(out, a)


def run_torch(a, out, log):
    """Everything on a torch device (the product's GPU search path); see the module doc."""
    import types

    import torch

    from deephash_faiss import gpu
    from deephash_faiss.rerank import rank_pools_torch_ids
    from deephash_faiss.search import GpuCodeIndex, hamming_pools, hds_device

    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    n, m, k = int(a.n), a.queries, a.k

    def gtime(fn, repeat):
        fn()
        sync()
        ts = []
        for _ in range(repeat):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    def gsingle(fn, count):
        fn(0)
        ts = []
        for i in range(count):
            sync()
            t = time.perf_counter()
            fn(i)
            sync()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts) * 1e3

    # ---- data: codes from Synth (numpy), features drawn on the device ------------------
    t0 = time.perf_counter()
    syn = Synth(a.bits, 0, a.classes, a.flips, a.noise, a.seed)
    rng = np.random.default_rng(a.seed + 1)
    means = torch.as_tensor(rng.standard_normal((a.classes, a.dim), dtype=np.float32), device=dev)
    tdt = torch.float16 if a.feature_dtype == "float16" else torch.float32
    lab = syn.rng.integers(0, a.classes, n)
    codes = syn.codes(lab)
    g = torch.Generator(device=dev)
    g.manual_seed(a.seed)

    def draw(labels):
        lt = torch.as_tensor(labels, device=dev)
        x = torch.randn((len(labels), a.dim), generator=g, device=dev)
        return x.mul_(a.noise).add_(means[lt])

    xb = torch.empty((n, a.dim), dtype=tdt, device=dev)
    step = max(1, (1 << 28) // a.dim)
    for s0 in range(0, n, step):
        xb[s0:s0 + step] = draw(lab[s0:s0 + step]).to(tdt)
    qlab = syn.rng.integers(0, a.classes, m)
    qcodes = syn.codes(qlab)
    qf = draw(qlab)  # float32 queries, as Searcher passes them
    cidx = GpuCodeIndex(codes, types.SimpleNamespace(deleted=None), dev)
    sync()
    out.update(n=n, bits=a.bits, dim=a.dim, device=a.device, feature_dtype=a.feature_dtype,
               queries=m, k=k, synthetic={"classes": a.classes, "max_flips": a.flips, "noise": a.noise},
               build_s=round(time.perf_counter() - t0, 2), padded_bits=cidx.gpu.kp,
               kernel={"triton": cidx.gpu.use_triton, "config": cidx.gpu.config,
                       "sample_size": cidx.gpu.sample_size, "target_factor": cidx.gpu.target_factor,
                       "min_rank": cidx.gpu.min_rank, "capacity": cidx.gpu.capacity})
    if dev.type == "cuda":
        out["machine"]["gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    log("built", out["build_s"], "s")
    # ---- BCS ------------------------------------------------------------------------
    tb = gtime(lambda: cidx.search(qcodes, k), max(3, a.repeat))
    tbs = gsingle(lambda i: cidx.search(qcodes[i:i + 1], k), a.single)
    D, I = cidx.search(qcodes, k)
    from deephash_faiss.index import BinaryIndex, IndexSpec
    nchk = min(m, 64)
    Dr, Ir = BinaryIndex.build(codes, IndexSpec("flat")).search(qcodes[:nchk], k)
    out["bcs"] = {"product_gpu": {"batch_ms_per_query": tb / m * 1e3, "qps": m / tb, "single_ms": tbs,
                                  "same_result_as_cpu_flat": bool(np.array_equal(D[:nchk], Dr)
                                                                  and np.array_equal(I[:nchk], Ir)),
                                  "passes": cidx.gpu.last_stats.get("passes")}}
    out["bcs_ms_per_query"], out["bcs_single_ms"] = tb / m * 1e3, tbs
    log("bcs", out["bcs"])
    # ---- radius pooling -------------------------------------------------------------
    rad = {}
    for r_ in (1, 2, 3, 4):
        t = gtime(lambda: cidx.range_search(qcodes, r_), max(1, a.repeat - 1))
        lims, _, _ = cidx.range_search(qcodes, r_)
        rad[str(r_)] = {"flat": {"ms_per_query": t / m * 1e3, "mean_pool": float(lims[-1] / m),
                                 "max_pool": int(np.diff(lims).max())}}
        log("radius", r_, rad[str(r_)])
    out["radius"] = rad
    # ---- ES -------------------------------------------------------------------------
    me = min(a.es_queries, m)

    def es_run(lo=0, hi=me):
        Dg, Ig = gpu.l2_knn(qf[lo:hi], xb, k)
        return Dg.cpu().numpy(), Ig.cpu().numpy()

    te = gtime(es_run, max(1, a.repeat - 1))
    tes = gsingle(lambda i: es_run(i, i + 1), min(5, me))
    Des, Ies = es_run()
    sub = min(8, me)  # exactness: float64 on a few queries
    q64 = qf[:sub].double()
    ref = torch.cat([(xc * xc).sum(1)[None] - 2 * q64 @ xc.T + (q64 * q64).sum(1)[:, None]
                     for xc in (xb[s0:s0 + 32768].double() for s0 in range(0, n, 32768))], 1)
    rv, ri = torch.topk(ref, k, 1, largest=False)
    out["es"] = {"batch_ms_per_query": te / me * 1e3, "qps": me / te, "single_ms": tes, "batch": me,
                 "backend": "gpu.l2_knn", "recall_vs_fp64": float(np.mean(
                     [len(np.intersect1d(Ies[i], ri[i].cpu().numpy())) / k for i in range(sub)]))}
    del ref
    out["es_ms_per_query"], out["es_single_ms"] = te / me * 1e3, tes
    log("es", out["es"])
    # ---- HDS (search.hds_device: what Searcher.hds runs on CUDA) ------------------------
    hds = {}
    t0 = time.perf_counter()
    norms = gpu.squared_norms(xb)  # Searcher computes these once, at the first HDS
    sync()
    out["feature_norms_s"] = time.perf_counter() - t0

    def hds_run(cap, lo, hi):
        return hds_device(cidx.gpu, xb, qcodes[lo:hi], qf[lo:hi], k, a.radius, cap, norms=norms)

    for cap in a.caps:
        t = gtime(lambda: hds_run(cap, 0, m), a.repeat)
        res = hds_run(cap, 0, m)
        sizes = np.array([r[3] for r in res])
        single = gsingle(lambda i: hds_run(cap, i, i + 1), a.single)
        ov = float(np.mean([len(np.intersect1d(res[i][0], Ies[i])) / k for i in range(me)]))
        hds[str(cap)] = {"batch_ms_per_query": t / m * 1e3, "qps": m / t, "single_ms": single,
                         "pool_mean": float(sizes.mean()), "pool_median": float(np.median(sizes)),
                         "pool_max": int(sizes.max()), "truncated_frac": float(np.mean([r[4] for r in res])),
                         "overlap_with_es_topk": ov}
        log("hds cap", cap, hds[str(cap)])
    # the same pools through the numpy-side path (hamming_pools + rank_pools_torch_ids),
    # which Searcher uses when rows are deleted: checks hds_device and times the difference
    cap = min(a.caps)
    t0 = time.perf_counter()
    pools = hamming_pools(cidx, qcodes, k, a.radius, cap, n)
    ranked = rank_pools_torch_ids(qf, xb, [p[0] for p in pools], k, norms=norms)
    sync()
    t_np = time.perf_counter() - t0
    res = hds_run(cap, 0, m)
    same = all(np.array_equal(pools[i][0][ranked[i][0]], res[i][0]) for i in range(m))
    hds[str(cap)]["numpy_pools_path_ms_per_query"] = t_np / m * 1e3
    hds[str(cap)]["same_as_numpy_pools_path"] = same
    log("hds numpy-pools path", round(t_np / m * 1e3, 4), "ms/query, same result:", same)
    out["hds"] = hds
    out["hds_params"] = {"radius": a.radius, "pool_index": "gpu flat (exact)",
                         "uncapped_pool_mean": rad[str(a.radius)]["flat"]["mean_pool"],
                         "uncapped_pool_max": rad[str(a.radius)]["flat"]["max_pool"]}
    main_cap = headline_speedups(out, hds, a.caps)
    out["speedup_single_bcs_vs_es"] = out["es_single_ms"] / out["bcs_single_ms"]
    out["speedup_single_hds_vs_es"] = out["es_single_ms"] / hds[main_cap]["single_ms"]
    out["memory"] = {"codes_gb": n * a.bits / 8 / 2**30, "features_gb": xb.numel() * xb.element_size() / 2**30,
                     "peak_rss_gb": peak_rss_gb()}
    if dev.type == "cuda":
        out["memory"]["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return finish(out, a)


def headline_speedups(out, hds, caps):
    """The JSON's headline keys: HDS at the smallest cap, BCS and HDS speedups over ES."""
    main_cap = str(min(caps))
    out["hds_ms_per_query"] = hds[main_cap]["batch_ms_per_query"]
    out["hds_cap_for_headline"] = int(main_cap)
    out["speedup_bcs_vs_es"] = out["es_ms_per_query"] / out["bcs_ms_per_query"]
    out["speedup_hds_vs_es"] = out["es_ms_per_query"] / out["hds_ms_per_query"]
    out["speedup_hds_vs_es_by_cap"] = {c: out["es_ms_per_query"] / v["batch_ms_per_query"] for c, v in hds.items()}
    return main_cap


def finish(out, a):
    out["machine"]["load_avg_at_end"] = os.getloadavg()
    write_json(a.json, out, default=float)
    keys = ["n", "bits", "dim", "bcs_ms_per_query", "hds_ms_per_query", "es_ms_per_query",
            "speedup_bcs_vs_es", "speedup_hds_vs_es", "wrapper_overhead", "wrapper_overhead_vs_padded_raw"]
    print(json.dumps({kk: out.get(kk) for kk in keys}, default=float))
    return out


if __name__ == "__main__":
    main()
