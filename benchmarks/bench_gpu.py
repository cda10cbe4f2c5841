"""Benchmark the GPU Hamming / L2 search of deephash_faiss.gpu.

Example (H200):
    python benchmarks/bench_gpu.py --n 1e6 1e7 1e8 --bits 64 --queries 1024 -k 100 \
        --radius 3 --json OUT.json

Methods timed per database size (random codes, and a clustered "supervised-like"
variant: class centres + bit noise):
  naive   torch XOR + byte-lookup popcount, tiled, exact key top-k
  intmm   +-1 int8 codes through torch._int_mm, tiled, exact key top-k
  triton  GpuBinaryIndex.search (fused int8 tensor-core tile + threshold selection)
  radius  GpuBinaryIndex.range_search(radius)
plus l2_knn (GPU flat L2) at --l2-n rows, D in --l2-dims, float32 and float16, and a
device-to-device copy bandwidth. Times: CUDA events after warm-up, median of repeats.
Correctness: every method's k-NN is compared with a reference on a query subset
(numpy XOR + unpackbits + stable argsort where the size allows, else the exact
torch path of the index).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from deephash_faiss import gpu  # noqa: E402

ID_BITS = 40


def cuda_time(fn, repeat=5, warmup=1):
    """Median wall time (s) of fn() measured with CUDA events (or perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def copy_bandwidth(dev, nbytes=4 << 30):
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    a.random_(0, 255)
    b = torch.empty_like(a)
    t = cuda_time(lambda: b.copy_(a), repeat=10, warmup=2)
    del a, b
    return 2 * nbytes / t


def pack_bits(bits):
    """bool/uint8 [n, nbits] -> uint8 [n, nbits/8] little bit order (torch)."""
    n, nb = bits.shape
    w = (1 << torch.arange(8, device=bits.device, dtype=torch.uint8))
    return (bits.view(n, nb // 8, 8).to(torch.uint8) * w).sum(2, dtype=torch.uint8)


def make_codes(n, nbytes, dev, kind, seed, nclass=100, flip=0.05):
    """Random or clustered uint8 codes [n, nbytes] on dev (+ labels for clustered)."""
    g = torch.Generator(device=dev)
    g.manual_seed(seed)
    out = torch.empty((n, nbytes), dtype=torch.uint8, device=dev)
    chunk = 1 << 23
    if kind == "random":
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            out[s:e] = torch.randint(0, 256, (e - s, nbytes), generator=g, device=dev,
                                     dtype=torch.uint8)
        return out
    gc = torch.Generator(device=dev)
    gc.manual_seed(12345)  # same centres for database and queries
    centres = torch.randint(0, 256, (nclass, nbytes), generator=gc, device=dev, dtype=torch.uint8)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        lab = torch.randint(0, nclass, (e - s,), generator=g, device=dev)
        noise = torch.rand((e - s, nbytes * 8), generator=g, device=dev) < flip
        out[s:e] = centres[lab] ^ pack_bits(noise)
    return out


# ---- baselines --------------------------------------------------------------
_LUT = None


def naive_knn(db, q, k, bits):
    """XOR + byte LUT popcount, tiled; exact (distance, id) top-k. db/q uint8 packed."""
    global _LUT
    if _LUT is None or _LUT.device != db.device:
        _LUT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.uint8,
                            device=db.device)
    m, n = q.shape[0], db.shape[0]
    chunk = max(1024, (1 << 28) // (m * db.shape[1]))
    best = None
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        d = _LUT[(q[:, None, :] ^ db[None, s:e, :]).int()].sum(2, dtype=torch.int64)
        keys = (d << ID_BITS) | torch.arange(s, e, device=db.device)[None, :]
        part = torch.topk(keys, min(k, e - s), 1, largest=False).values
        best = part if best is None else torch.topk(torch.cat([best, part], 1), k, 1,
                                                    largest=False).values
    return best


def intmm_knn(x, qp, k, bits, n):
    """+-1 int8 through torch._int_mm, tiled (< 2**31 outputs); exact key top-k."""
    m = qp.shape[0]
    mp = max(32, -(-m // 8) * 8)
    qq = torch.zeros((mp, qp.shape[1]), dtype=torch.int8, device=qp.device)
    qq[:m] = qp
    chunk = min(n, (1 << 30) // mp) // 8 * 8
    best = None
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        e8 = s + -(-(e - s) // 8) * 8  # storage is padded, so rows up to e8 exist
        dot = torch._int_mm(qq, x[s:e8].t())[:m, : e - s]
        keys = (((bits - dot) >> 1).to(torch.int64) << ID_BITS) | torch.arange(
            s, e, device=qp.device)[None, :]
        part = torch.topk(keys, min(k, e - s), 1, largest=False).values
        best = part if best is None else torch.topk(torch.cat([best, part], 1), k, 1,
                                                    largest=False).values
    return best


def np_ref(db_np, q_np, k):
    d = np.unpackbits(q_np[:, None, :] ^ db_np[None, :, :], axis=2).sum(2)
    I = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, I, 1), I


def keys_of(D, I):
    return (D.astype(np.int64) << ID_BITS) | I


# ---- main ------------------------------------------------------------------
def bench_hamming(args, dev, res, copy_bw):
    nbytes = args.bits // 8
    m, k = args.queries, args.k
    for kind in args.kinds:
        for nf in args.n:
            n = int(float(nf))
            row = {"kind": kind, "n": n, "bits": args.bits, "queries": m, "k": k}
            t0 = time.time()
            db = make_codes(n, nbytes, dev, kind, seed=1)
            q = make_codes(m, nbytes, dev, kind, seed=2)
            idx = gpu.GpuBinaryIndex(db, device=dev)
            kp = idx.kp
            row["build_s"] = time.time() - t0
            ops_pass = 2.0 * m * n * kp
            # --- triton knn
            D, I = idx.search(q, k)
            row["triton_passes"] = list(idx.last_stats.get("passes", []))
            t = cuda_time(lambda: idx.search(q, k), repeat=args.repeat)
            row["triton_qps"] = m / t
            row["triton_ms"] = t * 1e3
            npass = sum(row["triton_passes"]) / m if row["triton_passes"] else 1
            row["triton_TOPS"] = ops_pass * npass / t / 1e12
            row["triton_db_GBps"] = n * kp * npass / t / 1e9
            # --- correctness of triton vs references
            ok = {}
            ms = min(m, 64)
            keys_t = keys_of(D[:ms].cpu().numpy(), I[:ms].cpu().numpy())
            if n <= 2_000_000:
                Dr, Ir = np_ref(db.cpu().numpy(), q[:ms].cpu().numpy(), k)
                ok["triton_vs_numpy"] = bool((keys_t == keys_of(Dr, Ir)).all())
            ref = intmm_knn(idx._x, idx._queries(q[:ms])[0], k, args.bits, n).cpu().numpy()
            ok["triton_vs_intmm"] = bool((keys_t == ref).all())
            # --- radius
            lims, RD, RI = idx.range_search(q, args.radius)
            tr = cuda_time(lambda: idx.range_search(q, args.radius), repeat=args.repeat)
            row["radius_qps"] = m / tr
            row["radius_ms"] = tr * 1e3
            row["radius_results"] = int(lims[-1])
            row["radius_TOPS"] = 2 * ops_pass / tr / 1e12
            # radius check on a few queries: same as knn distances < r
            lims_c = lims.cpu().numpy()
            Dc = RD.cpu().numpy()
            Ic = RI.cpu().numpy()
            good = True
            big = min(m, 16)
            kk = int(max(1, (lims_c[1:big + 1] - lims_c[:big]).max()))
            if kk <= 100000:
                Dk, Ik = idx.search(q[:big], kk)
                Dk, Ik = Dk.cpu().numpy(), Ik.cpu().numpy()
                for i in range(big):
                    sel = Dk[i] < args.radius
                    a = keys_of(Dk[i][sel], Ik[i][sel])
                    b = keys_of(Dc[lims_c[i]:lims_c[i + 1]], Ic[lims_c[i]:lims_c[i + 1]])
                    good &= bool(a.shape == b.shape and (a == b).all())
                ok["radius_vs_knn"] = good
            # --- baselines (on a query subset at large n)
            mb = m if n <= 10_000_000 else min(m, args.baseline_queries)
            qb = q[:mb]
            qpb = idx._queries(qb)[0]
            tb = cuda_time(lambda: intmm_knn(idx._x, qpb, k, args.bits, n), repeat=2)
            row["intmm_qps"] = mb / tb
            row["intmm_queries_timed"] = mb
            row["intmm_TOPS"] = 2.0 * mb * n * kp / tb / 1e12
            if n <= 10_000_000 or args.naive_all:
                mn = min(mb, 64) if n > 1_000_000 else mb
                tn = cuda_time(lambda: naive_knn(db, q[:mn], k, args.bits), repeat=1)
                row["naive_qps"] = mn / tn
                row["naive_queries_timed"] = mn
                nk = naive_knn(db, q[:min(mn, ms)], k, args.bits).cpu().numpy()
                ok["naive_vs_intmm"] = bool((nk == ref[: nk.shape[0]]).all())
            row["correct"] = ok
            row["copy_bw_GBps"] = copy_bw / 1e9
            res["hamming"].append(row)
            print(json.dumps(row), flush=True)
            del idx, db, q
            torch.cuda.empty_cache()


def bench_ties(args, dev, res):
    """Adversarial ties: many database rows equal to / near the queries."""
    nbytes = args.bits // 8
    n = int(float(args.ties_n))
    db = make_codes(n, nbytes, dev, "random", seed=3)
    q = make_codes(64, nbytes, dev, "random", seed=4)
    # 50k copies of query 0, 30k codes at distance 1 of query 1 scattered, 200k copies
    # of query 2 in a contiguous block
    a, b, c = n // 40, n // 66, n // 10
    pos = torch.randperm(n, device=dev)[: a + b]
    db[pos[:a]] = q[0]
    near = q[1:2].repeat(b, 1)
    near[:, 0] ^= 1
    db[pos[a:a + b]] = near
    db[n // 200: n // 200 + c] = q[2]
    idx = gpu.GpuBinaryIndex(db, device=dev)
    D, I = idx.search(q, args.k)
    ref = intmm_knn(idx._x, idx._queries(q)[0], args.k, args.bits, n).cpu().numpy()
    ok = bool((keys_of(D.cpu().numpy(), I.cpu().numpy()) == ref).all())
    t = cuda_time(lambda: idx.search(q, args.k), repeat=3)
    lims, RD, RI = idx.range_search(q, 2, max_candidates=1000)
    Dk, Ik = idx.search(q, 1000)
    okr = True
    for i in range(8):
        sel = Dk[i].cpu().numpy() < 2
        a = keys_of(Dk[i].cpu().numpy()[sel], Ik[i].cpu().numpy()[sel])
        lc = lims.cpu().numpy()
        b = keys_of(RD.cpu().numpy()[lc[i]:lc[i + 1]], RI.cpu().numpy()[lc[i]:lc[i + 1]])
        okr &= bool(a.shape == b.shape and (a == b).all())
    row = {"n": n, "queries": 64, "correct_knn": ok, "correct_radius_capped": okr,
           "ms": t * 1e3, "passes": idx.last_stats.get("passes")}
    res["ties"] = row
    print(json.dumps(row), flush=True)


def bench_l2(args, dev, res):
    n = int(float(args.l2_n))
    m, k = args.queries, args.k
    for D in args.l2_dims:
        for dt in (torch.float32, torch.float16):
            g = torch.Generator(device=dev)
            g.manual_seed(5)
            xb = torch.randn((n, D), generator=g, device=dev, dtype=dt)
            xq = torch.randn((m, D), generator=g, device=dev, dtype=dt)
            Dd, Ii = gpu.l2_knn(xq, xb, k)
            t = cuda_time(lambda: gpu.l2_knn(xq, xb, k), repeat=3)
            # check a few queries against float64
            sub = 8
            ref = torch.cat([torch.cdist(xq[:sub].double(), xb[s:s + 65536].double(),
                                         compute_mode="donot_use_mm_for_euclid_dist").pow(2)
                             for s in range(0, n, 65536)], 1)
            rv, ri = torch.topk(ref, k, 1, largest=False)
            rel = float((Dd[:sub].double() - rv).norm() / rv.norm())
            recall = float((Ii[:sub, :, None] == ri[:, None, :]).any(2).float().mean())
            row = {"n": n, "D": D, "dtype": str(dt).replace("torch.", ""), "queries": m,
                   "k": k, "qps": m / t, "ms": t * 1e3,
                   "TFLOPS": 2.0 * m * n * D / t / 1e12,
                   "db_GBps": n * D * xb.element_size() / t / 1e9,
                   "rel_err_D": rel, "recall_vs_fp64": recall}
            res["l2"].append(row)
            print(json.dumps(row), flush=True)
            del xb, xq, ref
            torch.cuda.empty_cache()


def sweep(args, dev, res):
    """Time the selection kernel (one counting pass, and a whole k-NN search) for several
    launch configurations at --sweep-n random codes; keeps the fastest counting pass."""
    nbytes = args.bits // 8
    n = int(float(args.sweep_n))
    db = make_codes(n, nbytes, dev, "random", seed=1)
    q = make_codes(args.queries, nbytes, dev, "random", seed=2)
    base = gpu.GpuBinaryIndex(db, device=dev)
    qp = base._queries(q)[0]
    kk = args.k
    s_key = base._estimate_key(qp, kk, max(base.capacity, 8 * kk))
    configs = [
        (64, 64, 4, 4, 8), (64, 64, 4, 3, 8), (64, 64, 4, 2, 8), (64, 128, 4, 4, 8),
        (64, 128, 8, 3, 8), (128, 64, 8, 4, 8), (128, 128, 8, 3, 4), (64, 256, 8, 3, 4),
        (64, 64, 4, 4, 4), (64, 64, 4, 4, 16), (32, 64, 4, 4, 8),
    ]
    out = []
    for bm, bn, w, st, pps in configs:
        base.config = {"BM": bm, "BN": bn, "num_warps": w, "num_stages": st, "progs_per_sm": pps}
        try:
            t = cuda_time(lambda: base._launch(qp, s_key, False), repeat=5)
            tk = cuda_time(lambda: base.search(q, kk), repeat=3)
            row = {"n": n, "config": dict(base.config), "count_pass_ms": t * 1e3,
                   "search_ms": tk * 1e3, "qps": args.queries / tk}
        except Exception as e:  # noqa: BLE001
            row = {"config": dict(base.config), "error": repr(e)[:300]}
        out.append(row)
        print(json.dumps(row), flush=True)
    res["sweep"] = out
    good = [r for r in out if "count_pass_ms" in r]
    if good:
        best = min(good, key=lambda r: r["count_pass_ms"])
        gpu.DEFAULT_CONFIG.update(best["config"])
        res["chosen_config"] = best["config"]
    del base, db
    torch.cuda.empty_cache()


ESTIMATE_GRID = [  # (sample_size, target_factor, min_rank, capacity); None = sqrt rule;
    # the first row is the product default
    (None, 3.0, 3, 16384), (None, 3.0, 2, 16384), (None, 3.0, 4, 16384),
    (1 << 17, 3.0, 2, 16384), (1 << 18, 3.0, 3, 16384), (1 << 16, 3.0, 4, 16384),
]


def _set_estimate(idx, S, f, jm, cap):
    idx.sample_size, idx.target_factor, idx.min_rank, idx.capacity = S, f, jm, cap
    idx._sample_cache = None


def tune(args, dev, res):
    """Threshold-estimate settings (sample size, target factor, min rank, capacity) at
    every --n and kind, plus a time breakdown of one search with the first grid row (the
    product default); reports the settings with the least normalised time (sum over
    (n, kind) of time / best time there). Later runs keep the product defaults."""
    nbytes = args.bits // 8
    out = []
    for kind in args.kinds:
        for nf in args.n:
            n = int(float(nf))
            db = make_codes(n, nbytes, dev, kind, seed=1)
            q = make_codes(args.queries, nbytes, dev, kind, seed=2)
            idx = gpu.GpuBinaryIndex(db, device=dev)
            qp = idx._queries(q)[0]
            kk = args.k
            for S, f, jm, cap in ESTIMATE_GRID:
                _set_estimate(idx, S, f, jm, cap)
                t = cuda_time(lambda: idx.search(q, kk), repeat=3)
                C = max(cap, 8 * kk)
                te = cuda_time(lambda: idx._estimate_key(qp, kk, C), repeat=3)
                Sx, T = idx._plan(kk, C)
                row = {"kind": kind, "n": n, "S": S, "f": f, "jmin": jm, "capacity": cap,
                       "sample_rows": Sx, "target": T,
                       "search_ms": t * 1e3, "qps": args.queries / t, "estimate_ms": te * 1e3,
                       "passes": idx.last_stats.get("passes")}
                out.append(row)
                print(json.dumps(row), flush=True)
            # breakdown with the first grid row
            S, f, jm, cap = ESTIMATE_GRID[0]
            _set_estimate(idx, S, f, jm, cap)
            C = max(cap, 8 * kk)
            s_key = idx._estimate_key(qp, kk, C)
            buf = torch.full((qp.shape[0], C), 2**63 - 1, dtype=torch.int64, device=dev)
            ro = torch.arange(qp.shape[0], device=dev, dtype=torch.int64) * C
            co = torch.full((qp.shape[0],), C, dtype=torch.int32, device=dev)
            te = cuda_time(lambda: idx._launch(qp, s_key, True, out=buf, row_off=ro, cap_out=co),
                           repeat=3)
            tf = cuda_time(lambda: idx._count_pass(qp, s_key, True, count=False), repeat=3)
            _, ctx = idx._count_pass(qp, s_key, True, count=False)
            tm = cuda_time(lambda: idx._emit_pass(ctx, buf, ro, co), repeat=3)
            flagged = int(ctx["flags"].sum())
            emit_variants = {}
            base_cfg = dict(idx.config)
            for sl in (0, 1):
                for ew in (2, 4, 8):
                    idx.config = dict(base_cfg, slots=sl, emit_warps=ew)
                    emit_variants[f"slots{sl}_warps{ew}"] = cuda_time(
                        lambda: idx._emit_pass(ctx, buf, ro, co), repeat=3) * 1e3
            idx.config = base_cfg
            cnt = idx._launch(qp, s_key, False)
            used = int(cnt.max())
            tc = cuda_time(lambda: idx._launch(qp, s_key, False), repeat=3)
            tn = cuda_time(lambda: idx._launch(qp, torch.zeros_like(s_key), False), repeat=3)
            tk = cuda_time(lambda: torch.topk(buf[:, :used], kk, 1, largest=False), repeat=3)
            tq = cuda_time(lambda: idx._queries(q), repeat=3)
            ttot = cuda_time(lambda: idx.search(q, kk), repeat=3)
            row = {"kind": kind, "n": n, "estimate": list(ESTIMATE_GRID[0]), "search_ms": ttot * 1e3,
                   "unpack_queries_ms": tq * 1e3,
                   "estimate_ms": cuda_time(lambda: idx._estimate_key(qp, kk, C), repeat=3) * 1e3,
                   "flag_and_emit_ms": te * 1e3, "flag_pass_ms": tf * 1e3,
                   "emit_only_ms": tm * 1e3, "emit_variants_ms": emit_variants, "flagged_tiles": flagged,
                   "flagged_frac": flagged / max(1, ctx["num_tiles"] * (ctx["q"].shape[0] // idx.config["BM"])),
                   "count_pass_ms": tc * 1e3, "no_hit_pass_ms": tn * 1e3,
                   "final_topk_ms": tk * 1e3, "selected_mean": float(cnt.float().mean()),
                   "selected_max": used, "selected_min": int(cnt.min())}
            out.append(row)
            print(json.dumps(row), flush=True)
            del idx, db, q, buf
            torch.cuda.empty_cache()
    res["tune"] = out
    rows = [r for r in out if "S" in r]
    best_at = {}
    for r in rows:
        key = (r["kind"], r["n"])
        best_at[key] = min(best_at.get(key, float("inf")), r["search_ms"])
    score = {}
    for r in rows:
        key = (r["S"], r["f"], r["jmin"], r["capacity"])
        score[key] = score.get(key, 0.0) + r["search_ms"] / best_at[(r["kind"], r["n"])]
    S, f, jm, cap = min(score, key=score.get)
    res["best_estimate"] = {"sample_size": S, "target_factor": f, "min_rank": jm, "capacity": cap,
                              "normalised_score": score[(S, f, jm, cap)],
                              "default_score": score[tuple(ESTIMATE_GRID[0])]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", nargs="+", default=["1e6", "1e7", "1e8"])
    p.add_argument("--bits", type=int, default=64)
    p.add_argument("--queries", type=int, default=1024)
    p.add_argument("-k", type=int, default=100)
    p.add_argument("--radius", type=int, default=3)
    p.add_argument("--kinds", nargs="+", default=["random", "clustered"])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--baseline-queries", type=int, default=128)
    p.add_argument("--naive-all", action="store_true")
    p.add_argument("--l2-n", default="1e6")
    p.add_argument("--l2-dims", type=int, nargs="*", default=[4096, 1024])
    p.add_argument("--sweep", action="store_true", help="try kernel launch configs first")
    p.add_argument("--sweep-n", default="1e8")
    p.add_argument("--tune", action="store_true", help="tune the threshold estimate at max n")
    p.add_argument("--ties-n", default="2e6")
    p.add_argument("--skip", nargs="*", default=[], help="parts to skip: hamming ties l2")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        import triton
        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = None
    res = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           "torch": torch.__version__, "triton": tv, "cuda": torch.version.cuda,
           "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "args": vars(args), "hamming": [], "l2": []}
    copy_bw = copy_bandwidth(dev) if dev.type == "cuda" else float("nan")
    res["copy_bw_GBps"] = copy_bw / 1e9
    print(f"device {res['device']} torch {res['torch']} triton {tv} copy {copy_bw/1e9:.0f} GB/s",
          flush=True)

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)

    if args.sweep:
        sweep(args, dev, res)
        save()
    if args.tune:
        tune(args, dev, res)
        save()
    if "ties" not in args.skip:
        bench_ties(args, dev, res)
        save()
    if "hamming" not in args.skip:
        bench_hamming(args, dev, res, copy_bw)
        save()
    if "l2" not in args.skip:
        bench_l2(args, dev, res)
        save()
    # table
    print("\nkind       n           triton q/s  radius q/s  intmm q/s  naive q/s  TOPS  passes  ok")
    for r in res["hamming"]:
        print(f"{r['kind']:10s} {r['n']:<11d} {r['triton_qps']:11.0f} {r['radius_qps']:11.0f} "
              f"{r['intmm_qps']:10.0f} {r.get('naive_qps', float('nan')):10.1f} "
              f"{r['triton_TOPS']:5.0f}  {sum(r['triton_passes'])/r['queries']:.2f}  "
              f"{all(r['correct'].values())}")
    for r in res["l2"]:
        print(f"l2 n={r['n']} D={r['D']} {r['dtype']}: {r['qps']:.0f} q/s {r['TFLOPS']:.1f} TFLOP/s "
              f"rel_err {r['rel_err_D']:.1e} recall {r['recall_vs_fp64']:.3f}")
    save()
    return res


if __name__ == "__main__":
    main()
