#!/usr/bin/env python3
"""Render the H200 tables of docs/benchmarks.md from bench_gpu.py's JSON.

    python benchmarks/gpu_tables.py [benchmarks/results/gpu_h200.json]
"""

import json
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
    t = b["ties"]
    print(f"\nAdversarial ties: {t['n']:,} codes with tens of thousands of exact duplicates of the "
          f"queries: k-NN exact = {t['correct_knn']}, capped radius exact = {t['correct_radius_capped']} "
          f"({t['ms']:.1f} ms for {t['queries']} queries).")


if __name__ == "__main__":
    main(*sys.argv[1:])
