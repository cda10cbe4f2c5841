#!/usr/bin/env python3
"""Render the H200 tables of docs/benchmarks.md from bench_gpu.py's and
bench_search.py --device cuda's JSON.

    python benchmarks/gpu_tables.py [benchmarks/results/gpu_h200.json]
"""

import glob
import json
import os
import sys


def main(path="benchmarks/results/gpu_h200.json"):
    b = json.load(open(path))
    print(f"{b['device']}, torch {b['torch']}, Triton {b['triton']}, CUDA {b['cuda']}, {b['date']}; "
          f"device-to-device copy {b['copy_bw_GBps'] / 1e3:.2f} TB/s (read + write).\n")
    a = b["args"]
    print(f"Hamming k-NN and radius search, {a['bits']}-bit codes, {a['queries']} queries per batch, "
          f"k = {a['k']}, radius < {a['radius']} (queries/s, median of {a['repeat']} after warm-up):\n")
    print("| codes | n | Triton k-NN | Triton radius | torch `_int_mm` tiled | torch XOR + LUT | "
          "k-NN effective int8 TOPS | exact vs reference |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for h in b["hamming"]:
        naive = f"{h['naive_qps']:,.0f}" if h.get("naive_qps") else "—"
        ok = all(h.get("correct", {}).values())
        print(f"| {h['kind']} | {h['n']:.0e} | {h['triton_qps']:,.0f} | {h['radius_qps']:,.0f} | "
              f"{h['intmm_qps']:,.0f} | {naive} | {h['triton_TOPS']:.0f} | {'yes' if ok else 'NO'} "
              f"({', '.join(k for k, v in h['correct'].items() if v)}) |")
    print("\nGPU flat L2 (`gpu.l2_knn`, the ES and rerank kernel), n = 1e6, 1,024 queries, k = 100:\n")
    print("| D | dtype | queries/s | ms / batch | TFLOP/s | recall vs float64 |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for r in b["l2"]:
        print(f"| {r['D']} | {r['dtype']} | {r['qps']:,.0f} | {r['ms']:.1f} | {r['TFLOPS']:.0f} | "
              f"{r['recall_vs_fp64']:.3f} |")
    tune = b.get("tune", [])
    if tune:
        print("\nThreshold-estimate settings (`--tune`), k-NN ms per batch of 1,024 (passes = queries "
              "per scan; S = sample rows, T = codes aimed at; `None` = the sqrt rule, the default):\n")
        print("| codes | n | sample_size | min_rank | S | T | estimate ms | search ms | passes |")
        print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |")
        for r in tune:
            if "S" in r:
                print(f"| {r['kind']} | {r['n']:.0e} | {r['S']} | {r['jmin']} | {r['sample_rows']:,} | "
                      f"{r['target']:,.0f} | {r['estimate_ms']:.1f} | {r['search_ms']:.1f} | {r['passes']} |")
        print("\nTime breakdown of one k-NN batch with the defaults (ms; the marking scan vs a scan "
              "that selects nothing shows the cost of marked tiles; emit variants: slot atomics "
              "per element (slots1) or per row + prefix sum (slots0), warps per program):\n")
        print("| codes | n | total | estimate | marking scan | scan, nothing selected | emit | "
              "marked tiles | selected / query (mean, max) | final topk | emit variants |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |")
        for r in tune:
            if "S" not in r:
                ev = ", ".join(f"{k} {v:.1f}" for k, v in r.get("emit_variants_ms", {}).items())
                print(f"| {r['kind']} | {r['n']:.0e} | {r['search_ms']:.1f} | {r['estimate_ms']:.1f} | "
                      f"{r['flag_pass_ms']:.1f} | {r['no_hit_pass_ms']:.1f} | {r['emit_only_ms']:.1f} | "
                      f"{100 * r['flagged_frac']:.0f} % | {r['selected_mean']:,.0f}, {r['selected_max']:,} | "
                      f"{r['final_topk_ms']:.2f} | {ev} |")
    t = b["ties"]
    print(f"\nAdversarial ties: {t['n']:,} codes with tens of thousands of exact duplicates of the "
          f"queries: k-NN exact = {t['correct_knn']}, capped radius exact = {t['correct_radius_capped']} "
          f"({t['ms']:.1f} ms for {t['queries']} queries).")


    search_tables(os.path.dirname(path) or ".")


def search_tables(results_dir):
    """BCS / HDS / ES through the product on the GPU (bench_search.py --device cuda)."""
    files = sorted(glob.glob(os.path.join(results_dir, "search_cuda_*.json")))
    if not files:
        return
    print("\nBCS, HDS and ES through the product on the GPU (`bench_search.py --device cuda`, "
          "48-bit codes, 1,024 queries per batch, k = 100; ms per query, batched; single-query ms "
          "in brackets):\n")
    print("| n x D | features | BCS | HDS cap 1,000 | HDS cap 10,000 | ES | BCS/ES | HDS/ES (cap 1,000) | "
          "BCS/ES 1 query | BCS = CPU flat | ES recall vs float64 | HDS via numpy-side pools (same result) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |")
    for f in files:
        d = json.load(open(f))
        h1, h2 = d["hds"]["1000"], d["hds"]["10000"]
        print(f"| {d['n']:.2g} x {d['dim']} | {d['feature_dtype']} | {d['bcs_ms_per_query']:.4f} "
              f"({d['bcs_single_ms']:.2f}) | {h1['batch_ms_per_query']:.4f} ({h1['single_ms']:.2f}) | "
              f"{h2['batch_ms_per_query']:.4f} | {d['es_ms_per_query']:.4f} ({d['es_single_ms']:.2f}) | "
              f"{d['speedup_bcs_vs_es']:.1f}x | {d['speedup_hds_vs_es']:.1f}x | "
              f"{d['speedup_single_bcs_vs_es']:.1f}x | "
              f"{d['bcs']['product_gpu']['same_result_as_cpu_flat']} | {d['es']['recall_vs_fp64']:.3f} | "
              f"{h1.get('numpy_pools_path_ms_per_query', float('nan')):.4f} "
              f"({h1.get('same_as_numpy_pools_path')}) |")


if __name__ == "__main__":
    main(*sys.argv[1:])
