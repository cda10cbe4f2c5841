"""Markdown tables from benchmarks/results/scale/*.json (bench_scale.py runs), for
docs/benchmarks.md and docs/scaling.md.

    python benchmarks/scale_tables.py [benchmarks/results/scale]
"""
from __future__ import annotations

import glob
import json
import os
import sys


def load(d):
    runs = []
    for p in sorted(glob.glob(os.path.join(d, "*.json"))):
        with open(p) as f:
            r = json.load(f)
        r["_file"] = os.path.basename(p)
        runs.append(r)
    return sorted(runs, key=lambda r: (r["source"], r.get("codes_only", "dim" not in r), r["n"]))


def source_label(source: str) -> str:
    """'real CIFAR-10 stats' for the EfficientNet-Lite0 seed, the seed's name for other real
    seeds (e.g. cifar10_smallcnn_48), the generator's name for synthetic sources."""
    name = os.path.basename(os.path.normpath(source))
    if "cifar" not in source:
        return source
    return "real CIFAR-10 stats" if name == "cifar10_lite0_48" else f"real CIFAR-10 stats ({name})"


def fmt_n(n):
    return f"{n:.0e}".replace("e+0", "e").replace("e+", "e")


def f(x, nd=3):
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if x >= 100:
            return f"{x:,.0f}"
        return f"{x:.{nd}g}" if x < 1 else f"{x:.{nd}g}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "results", "scale")
    runs = load(d)
    print("| source | N | distinct codes | radius-3 pool (mean) | BCS ms/q | flat ms/q | ES ms/q | HDS ivf ms/q "
          "| HDS exact ms/q | HDS recall@10 vs exact | BCS exact | BCS/ES | HDS/ES | BCS/flat | file |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: | ---: | ---: | ---: | --- |")
    for r in runs:
        src = source_label(r["source"])
        print(f"| {src} | {fmt_n(r['n'])} | {f(r.get('distinct_codes'))} | {f(r.get('pool_mean'))} "
              f"| {f(r.get('bcs_ms_per_query'))} | {f(r.get('flat_ms_per_query'))} | {f(r.get('es_ms_per_query'))} "
              f"| {f(r.get('hds_ms_per_query'))} | {f(r.get('hds_exact_ms_per_query'))} "
              f"| {f(r.get('hds_recall_at10_vs_exact'))} | {f(r.get('bcs_exact'))} "
              f"| {f(r.get('speedup_bcs_vs_es'))}x | {f(r.get('speedup_hds_vs_es'))}x "
              f"| {f(r.get('speedup_bcs_vs_flat'))}x | `{r['_file']}` |".replace("| -x", "| -"))
    print()
    print("| source | N | ES recall=1 ms/q | HDS ivf ms/q (recall vs exact / vs ES) | HNSW32 ms/q (recall vs ES, build s) "
          "| IVF-PQ+refine ms/q (recall vs ES, build s) | class P@10 BCS / HDS / ES |")
    print("| --- | ---: | ---: | --- | --- | --- | --- |")
    for r in runs:
        if "es_ms_per_query" not in r:
            continue
        p = r.get("peers", {})
        h, v = p.get("hnsw32"), p.get("ivfpq_refine")
        src = source_label(r["source"])
        hs = (f(h['ms_per_query']) + ' (' + f(h['recall_at10_vs_es'])
              + (f", efSearch {h['efSearch']}" if h.get("efSearch") else "")
              + (', ' + f(h['build_s']) if h.get('build_s') is not None else '') + ')') if h else '-'
        print(f"| {src} | {fmt_n(r['n'])} | {f(r['es_ms_per_query'])} "
              f"| {f(r['hds_ms_per_query'])} ({f(r['hds_recall_at10_vs_exact'])} / {f(r['hds_recall_at10_vs_es'])}) "
              f"| {hs} "
              f"| {(f(v['ms_per_query']) + ' (' + f(v['recall_at10_vs_es']) + ', ' + f(v['build_s']) + ')') if v else '-'} "
              f"| {f(r.get('bcs_class_p10'))} / {f(r.get('hds_class_p10'))} / {f(r.get('es_class_p10'))} |")
    if any(r.get("hds_sweep") for r in runs):
        print()
        print("| N | fine index (cell size x nprobe = rows budget, refine) | lists | build s | HDS ms/q "
              "| rows examined | recall@10 vs exact HDS | vs ES |")
        print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in runs:
            fd = r.get("fine", {})
            rows = [{"cell_size": fd.get("cell_size"), "nprobe": fd.get("nprobe"), "refine": fd.get("refine"),
                     "lists": fd.get("lists"), "build_s": r.get("fine_build_s"), "ms_per_query": r.get("hds_ms_per_query"),
                     "examined_mean": r.get("hds_examined_mean"), "recall_at10_vs_exact": r.get("hds_recall_at10_vs_exact"),
                     "recall_at10_vs_es": r.get("hds_recall_at10_vs_es"), "default": True}] if r.get("hds_sweep") else []
            for x in rows + r.get("hds_sweep", []):
                budget = (x["cell_size"] or 0) * (x["nprobe"] or 0)
                print(f"| {fmt_n(r['n'])} | {x['cell_size']} x {x['nprobe']} = {budget:,}, refine {x['refine']}"
                      f"{' (**defaults**, incl. small-pool exact path)' if x.get('default') else ''} | {f(x['lists'])} "
                      f"| {f(x['build_s'])} | {f(x['ms_per_query'])} | {f(x['examined_mean'])} "
                      f"| {f(x['recall_at10_vs_exact'])} | {f(x['recall_at10_vs_es'])} |")
    print()
    print("Machine: " + "; ".join(sorted({f"{r['machine']['cpus']} CPUs, {r['machine']['mem_gb']} GB, "
                                           f"faiss {r['faiss']}, numpy {r['numpy']}" for r in runs})))
    print("Dates: " + ", ".join(sorted({r["date"][:16] for r in runs})) + "; load average at start: "
          + ", ".join(f"{fmt_n(r['n'])}: {r['loadavg_start'][0]:.1f}" for r in runs))


if __name__ == "__main__":
    main()
