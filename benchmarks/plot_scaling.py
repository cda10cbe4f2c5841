"""Plot time and memory vs database size from bench_search.py JSON files.

    python benchmarks/plot_scaling.py [--results benchmarks/results] [--prefix scaling]

Writes <results>/<prefix>_time.png (ms per query vs N, log-log, one line per mode;
batch timings, feature dim in the point labels) and <results>/<prefix>_memory.png
(codes, features and peak RSS vs N). float16 runs are drawn as separate markers.
"""
from __future__ import annotations

import argparse
import glob
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(results):
    runs = []
    for p in sorted(glob.glob(os.path.join(results, "search_*.json")) + glob.glob(os.path.join(results, "f16_*.json"))):
        with open(p) as f:
            r = json.load(f)
        if r.get("device", "cpu") == "cpu":
            runs.append(r)
    return sorted(runs, key=lambda r: r["n"])


def series(runs, get):
    xs, ys, labels = [], [], []
    for r in runs:
        try:
            y = get(r)
        except (KeyError, TypeError):
            continue
        if y is None:
            continue
        xs.append(r["n"])
        ys.append(y)
        labels.append(f"{r['dim']}-d" if r.get("dim") else "codes")
    return xs, ys, labels


def fmt(x, nd=3):
    if x is None:
        return "–"
    if isinstance(x, float):
        if x >= 100:
            return f"{x:,.0f}"
        return f"{x:.{nd}g}"
    return str(x)


def markdown(results):
    """Markdown tables of every bench_search JSON in ``results`` (for docs/benchmarks.md)."""
    files = sorted(f for pat in ("search_*.json", "f16_*.json", "codes_*.json")
                   for f in glob.glob(os.path.join(results, pat)))
    runs = []
    for p in files:
        with open(p) as f:
            r = json.load(f)
        if "bcs" in r:
            r["_file"] = os.path.basename(p)
            runs.append(r)
    runs.sort(key=lambda r: (r["n"], r.get("dim") or 0))
    out = ["| run | N | D | BCS flat (product) | BCS raw faiss 48b | raw faiss 64b | wrapper overhead "
           "| BCS hash k-NN (recall) | HDS cap 1k | HDS cap 10k | ES batch | ES 1 query | BCS/ES | HDS/ES (1k) "
           "| BCS/ES 1 query | peak RSS GB |",
           "|" + "---|" * 16]
    for r in runs:
        b = r["bcs"]
        hd = r.get("hds", {})
        h = b.get("product_hash", {})
        out.append("| " + " | ".join([
            r["_file"].replace(".json", ""), f"{r['n']:.2g}", fmt(r.get("dim")) + (" f16" if r.get("feature_dtype") == "float16" else ""),
            fmt(b["product_flat"]["batch_ms_per_query"]),
            fmt(b.get("faiss_flat", {}).get("batch_ms_per_query")),
            fmt(b.get("faiss_flat_padded", {}).get("batch_ms_per_query")),
            fmt(r.get("wrapper_overhead")),
            (fmt(h.get("batch_ms_per_query")) + f" ({h['knn_recall_vs_flat']:.2f})") if h else "–",
            fmt(hd.get("1000", {}).get("batch_ms_per_query")),
            fmt(hd.get("10000", {}).get("batch_ms_per_query")),
            fmt(r.get("es", {}).get("batch_ms_per_query")),
            fmt(r.get("es", {}).get("single_ms")),
            fmt(r.get("speedup_bcs_vs_es")), fmt(r.get("speedup_hds_vs_es")),
            fmt(r.get("speedup_single_bcs_vs_es")),
            fmt(r["memory"]["peak_rss_gb"]),
        ]) + " |")
    out.append("")
    out.append("Single-query latency (ms, median over single queries):")
    out.append("")
    out.append("| run | BCS flat | raw faiss 48b | BCS hash | HDS cap 1k | HDS cap 10k | ES |")
    out.append("|---|---|---|---|---|---|---|")
    for r in runs:
        b, hd = r["bcs"], r.get("hds", {})
        out.append("| " + " | ".join([r["_file"].replace(".json", ""), fmt(b["product_flat"]["single_ms"]),
                                      fmt(b.get("faiss_flat", {}).get("single_ms")),
                                      fmt(b.get("product_hash", {}).get("single_ms")),
                                      fmt(hd.get("1000", {}).get("single_ms")), fmt(hd.get("10000", {}).get("single_ms")),
                                      fmt(r.get("es", {}).get("single_ms"))]) + " |")
    out.append("")
    out.append("Radius pooling (distance < r), product BinaryIndex.range_search (raw faiss in brackets), ms/query; "
               "recall of hash / multihash vs flat:")
    out.append("")
    out.append("| run | r | mean pool | flat | hash | hash speedup | hash recall | multihash | multihash recall |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        for rr, row in r["radius"].items():
            f, h, mh = row.get("flat", {}), row.get("hash", {}), row.get("multihash", {})
            out.append("| " + " | ".join([
                r["_file"].replace(".json", ""), rr, fmt(f.get("mean_pool")),
                f"{fmt(f.get('ms_per_query'))} ({fmt(f.get('raw_faiss_ms_per_query'))})",
                f"{fmt(h.get('ms_per_query'))} ({fmt(h.get('raw_faiss_ms_per_query'))})" if h else "–",
                (f"{fmt(h.get('speedup_vs_flat'))} ({fmt(h.get('raw_speedup_vs_flat'))})") if h else "–",
                fmt(h.get("recall_vs_flat"), 4) if h else "–",
                f"{fmt(mh.get('ms_per_query'))} ({fmt(mh.get('raw_faiss_ms_per_query'))})" if mh else "–",
                fmt(mh.get("recall_vs_flat"), 4) if mh else "–"]) + " |")
    out.append("")
    out.append("HDS (radius < 3, hash pool index, rerank rank_pools_cpu), ms/query and pool sizes:")
    out.append("")
    out.append("| run | cap | total | pool | rerank | pool mean | pool median | pool max | truncated | uncapped pool mean | top-k overlap with ES |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        for cap, v in r.get("hds", {}).items():
            out.append("| " + " | ".join([r["_file"].replace(".json", ""), cap, fmt(v["batch_ms_per_query"]),
                                          fmt(v["pool_ms_per_query"]), fmt(v["rerank_ms_per_query"]),
                                          fmt(v["pool_mean"]), fmt(v["pool_median"]), fmt(v["pool_max"]),
                                          f"{v['truncated_frac']:.0%}", fmt(r["hds_params"]["uncapped_pool_mean"]),
                                          fmt(v["overlap_with_es_topk"])]) + " |")
    for p in sorted(glob.glob(os.path.join(results, "gather_*.json"))):
        with open(p) as f:
            g = json.load(f)
        out += ["", f"Feature gather ({os.path.basename(p)}: N = {g['n']:,}, D = {g['dim']}, {g['shards']} shards; "
                f"page cache: {g.get('drop_caches')}), rows/s (speedup vs naive h5py):", "",
                "| dtype | ids | naive h5py warm | gather warm (fresh map) | gather warm (mapped store) "
                "| naive h5py cold | gather cold | gather cold, no prefetch |",
                "|---|---|---|---|---|---|---|---|"]
        for r in g["results"]:
            def c(meth, cache):
                v = r.get(f"{meth}_{cache}_rows_per_s")
                if v is None:
                    return "–"
                sp = r.get(f"speedup_{meth}_{cache}")
                return f"{v:,.0f}" + (f" ({sp:.1f}x)" if sp else "")
            out.append("| " + " | ".join([r["dtype"], f"{r['ids']:,}", c("naive", "warm"), c("gather", "warm"),
                                          c("gather_mapped", "warm"), c("naive", "cold"), c("gather", "cold"),
                                          c("gather_noprefetch", "cold")]) + " |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--prefix", default="scaling")
    ap.add_argument("--markdown", action="store_true", help="print result tables instead of plotting")
    a = ap.parse_args(argv)
    if a.markdown:
        print(markdown(a.results))
        return
    runs = load(a.results)
    f32 = [r for r in runs if r.get("feature_dtype") in (None, "float32")]
    f16 = [r for r in runs if r.get("feature_dtype") == "float16"]
    panels = {
        "BCS k-NN (k=100)": [
            ("flat, product (48->64 padded)", lambda r: r["bcs"]["product_flat"]["batch_ms_per_query"], "o-", False),
            ("raw faiss IndexBinaryFlat(48)", lambda r: r["bcs"]["faiss_flat"]["batch_ms_per_query"], "x--", False),
            ("hash k-NN (approx.)", lambda r: r["bcs"]["product_hash"]["batch_ms_per_query"], "s-", False),
            ("flat, 1 query", lambda r: r["bcs"]["product_flat"]["single_ms"], "o:", False),
        ],
        "Radius pooling, distance < 3": [
            ("flat", lambda r: r["radius"]["3"]["flat"]["ms_per_query"], "^-", False),
            ("hash b=16 nflip=2 (exact)", lambda r: r["radius"]["3"]["hash"]["ms_per_query"], "v-", False),
        ],
        "HDS (r<3 pool + L2 rerank)": [
            ("cap 1,000", lambda r: r["hds"]["1000"]["batch_ms_per_query"], "D-", True),
            ("cap 10,000", lambda r: r["hds"]["10000"]["batch_ms_per_query"], "d--", True),
        ],
        "ES (exact L2, faiss.knn)": [
            ("batch", lambda r: r["es"]["batch_ms_per_query"], "P-", True),
            ("1 query", lambda r: r["es"]["single_ms"], "*--", True),
        ],
    }
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for ax, (title, modes) in zip(axes.flat, panels.items()):
        for name, get, style, by_dim in modes:
            if not by_dim:
                xs, ys, _ = series(f32, get)
                if xs:
                    ax.plot(xs, ys, style, label=name)
                continue
            for dim in sorted({r.get("dim") for r in f32 if r.get("dim")}):
                xs, ys, _ = series([r for r in f32 if r.get("dim") == dim], get)
                if xs:
                    ax.plot(xs, ys, style, label=f"{name}, {dim}-d")
            xs, ys, labels = series(f16, get)
            if xs:
                ax.plot(xs, ys, style[0], mfc="none", ms=10, label=f"{name}, {labels[0]} float16")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("database size N")
        ax.set_ylabel("ms per query (batch; median)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("CPU search time vs N (48-bit codes, 100 classes, 2 shared cores)")
    fig.tight_layout()
    p1 = os.path.join(a.results, f"{a.prefix}_time.png")
    fig.savefig(p1, dpi=110)

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, get, style in [
        ("codes (48 bits)", lambda r: r["memory"]["codes_gb"], "o-"),
        ("features", lambda r: r["memory"]["features_gb"] or None, "s-"),
        ("peak RSS (process)", lambda r: r["memory"]["peak_rss_gb"], "^-"),
    ]:
        xs, ys, labels = series(f32, get)
        if xs:
            ax.plot(xs, ys, style, label=name)
            if name == "features":
                for x, y, lab in zip(xs, ys, labels):
                    ax.annotate(lab, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(24, color="red", ls="--", lw=1, label="machine RAM (24 GB)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("database size N")
    ax.set_ylabel("GB")
    ax.set_title("Memory vs N")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p2 = os.path.join(a.results, f"{a.prefix}_memory.png")
    fig.savefig(p2, dpi=120)
    print(p1, p2)


if __name__ == "__main__":
    main()
