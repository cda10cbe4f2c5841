#!/usr/bin/env python3
"""Unlabelled quality: PCA + ITQ codes on a pretrained (not fine-tuned) backbone's fc7 (issue 13).

CIFAR-10 with its labels hidden from the model (labels only score the rankings). The
database is the train split (or ``--n-db`` of it), the queries the test split (``--n-queries``).
For each code length, the product's own path learns the codes: ``itq.fit_latent`` on the
database fc7 (stored as the latent layer H), codes = H > 0.5 (``featurecache.codes_from_features``).

Reported, beside exhaustive fc7 search (ES):

* **HDS recall@10 against ES** measured as Qdrant / Vespa measure binary quantization:
  oversample the ``pool`` nearest codes by Hamming distance, rescore them with exact fc7 L2,
  keep the top 10; recall = |top-10 ∩ ES top-10| / 10. The distance computations are the
  ``pool`` fc7 rescorings per query against ES's ``n`` (a Hamming pass is not counted, as
  they don't count it). Pools of n/25, n/50, n/100 and n/200 (all below 1/20 of ES's).
* **mAP@1000** of BCS (Hamming ranking), HDS (pool n/25 reranked, then the Hamming order)
  and ES, the paper's protocol (:func:`deephash_faiss.evaluate.evaluate_arrays`).

fc7 of 60k CIFAR images is slow on a small CPU: ``--save-features F.npz`` keeps them,
``--features F.npz`` reuses them (arrays db_fc7, db_labels, q_fc7, q_labels, backbone).

    # H200 (full protocol: 50,000 database, 10,000 queries)
    python benchmarks/bench_unsupervised.py --archive cifar10-jpg.tar.gz --device cuda \
        --bits 48 64 128 --json benchmarks/results/unsupervised/cifar10_full_lite0.json
    # CPU validation (reduced)
    python benchmarks/bench_unsupervised.py --archive /work/shared/data/cifar10-jpg.tar.gz \
        --n-db 5000 --n-queries 500 --json benchmarks/results/unsupervised/cifar10_5k_cpu.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine_basics, write_json  # noqa: E402


def subsample(x, y, n, seed):
    """n rows, an equal share per class (all rows when n is None or >= len)."""
    if n is None or n >= len(y):
        return x, y
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    per = n // len(classes)
    idx = np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), per, replace=False) for c in classes]))
    return x[idx], y[idx]


def extract_features(args, device):
    """(db_fc7, db_labels, q_fc7, q_labels, info) from the archive through the product's encoder."""
    from reproduce import load_archive

    from deephash_faiss.extract import encode_array
    from deephash_faiss.model import build_model

    t0 = time.perf_counter()
    data, classes = load_archive(args.archive, 32)
    decode_s = time.perf_counter() - t0
    db_x, db_y = subsample(data["train"][0], data["train"][1], args.n_db, args.seed)
    q_x, q_y = subsample(data["test"][0], data["test"][1], args.n_queries, args.seed + 1)
    model = build_model(args.backbone, 8, [], weights="default", input_size=args.input_size, load_size=32,
                        method="itq").to(device)
    t0 = time.perf_counter()
    _, db_f, _ = encode_array(model, db_x, device, args.batch_size)
    _, q_f, _ = encode_array(model, q_x, device, args.batch_size)
    enc_s = time.perf_counter() - t0
    info = {"decode_seconds": round(decode_s, 2), "fc7_seconds": round(enc_s, 2),
            "fc7_img_s": round((len(db_x) + len(q_x)) / enc_s, 1), "input_size": model.config.input_size,
            "classes": classes}
    return db_f, db_y, q_f, q_y, info


def exact_topk(db, q, k, device, block=1024):
    """ES: exact squared-L2 top-k ids int64 [m, k] (ties by id)."""
    import torch

    D = torch.as_tensor(db, device=device)
    dn = (D * D).sum(1)
    out = []
    for s in range(0, len(q), block):
        Q = torch.as_tensor(q[s:s + block], device=device)
        d = dn[None] - 2 * Q @ D.T
        out.append(torch.sort(d, dim=1, stable=True).indices[:, :k].cpu().numpy())
    return np.concatenate(out)


def hds_topk(db, q, db_codes, q_codes, pool, k, device, block=256):
    """Oversample ``pool`` nearest codes by Hamming (ties by id), rescore with fc7 L2: ids [m, k]."""
    import torch

    from deephash_faiss.metrics import hamming_distance_matrix

    D = torch.as_tensor(db, device=device)
    out = []
    for s in range(0, len(q), block):
        ham = torch.as_tensor(hamming_distance_matrix(q_codes[s:s + block], db_codes).astype(np.int32),
                              device=device)
        cand = torch.sort(ham, dim=1, stable=True).indices[:, :pool]  # [b, pool]
        Q = torch.as_tensor(q[s:s + block], device=device)
        X = D[cand]  # [b, pool, d]
        d = (X * X).sum(2) - 2 * torch.bmm(X, Q[:, :, None])[..., 0]
        o = torch.sort(d, dim=1, stable=True).indices[:, :k]
        out.append(torch.gather(cand, 1, o).cpu().numpy())
    return np.concatenate(out)


def recall(got, ref):
    k = ref.shape[1]
    return float(np.mean([len(np.intersect1d(a[:k], b)) / k for a, b in zip(got, ref)]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archive", help="cifar10-jpg.tar.gz (CIFAR-10 as <name>/<split>/<class>/<file>)")
    ap.add_argument("--features", help="an npz from --save-features (skips decoding and the backbone)")
    ap.add_argument("--save-features", help="write the fc7 arrays here (npz)")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--input-size", type=int, default=None, help="network input side (default: the backbone's)")
    ap.add_argument("--bits", type=int, nargs="+", default=[48, 64, 128])
    ap.add_argument("--n-db", type=int, default=None, help="database size (default: all 50,000 train images)")
    ap.add_argument("--n-queries", type=int, default=None, help="queries (default: all 10,000 test images)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    if not args.archive and not args.features:
        ap.error("give --archive or --features")
    import torch

    from deephash_faiss import __version__
    from deephash_faiss.evaluate import evaluate_arrays
    from deephash_faiss.featurecache import codes_from_features
    from deephash_faiss.itq import fit_latent
    from deephash_faiss.model import build_model, resolve_device

    device = resolve_device(args.device)
    if args.features:
        z = np.load(args.features, allow_pickle=False)
        db_f, db_y, q_f, q_y = z["db_fc7"], z["db_labels"], z["q_fc7"], z["q_labels"]
        db_f, db_y = subsample(db_f, db_y, args.n_db, args.seed)
        q_f, q_y = subsample(q_f, q_y, args.n_queries, args.seed + 1)
        feat_info = {"features_file": os.path.abspath(args.features)}
        if "backbone" in z.files:
            args.backbone = str(z["backbone"])
    else:
        db_f, db_y, q_f, q_y, feat_info = extract_features(args, device)
        if args.save_features:
            np.savez(args.save_features, db_fc7=db_f, db_labels=db_y, q_fc7=q_f, q_labels=q_y,
                     backbone=np.array(args.backbone))
    db_f, q_f = np.ascontiguousarray(db_f, np.float32), np.ascontiguousarray(q_f, np.float32)
    n, m = len(db_f), len(q_f)
    print(f"database {n} x {db_f.shape[1]}, queries {m}", flush=True)
    k = 10
    t0 = time.perf_counter()
    es10 = exact_topk(db_f, q_f, k, device)
    es_s = time.perf_counter() - t0
    pools = sorted({max(k, n // d) for d in (25, 50, 100, 200)}, reverse=True)
    runs = []
    for bits in args.bits:
        model = build_model(args.backbone, bits, [], weights="none", method="itq")  # only H is used here
        t0 = time.perf_counter()
        summary = fit_latent(model, db_f, seed=args.seed)  # labels never seen
        fit_s = time.perf_counter() - t0
        model.to(device)
        db_c = codes_from_features(model, db_f, device)
        q_c = codes_from_features(model, q_f, device)
        rec = {"bits": bits, "itq_fit_seconds": round(fit_s, 2), "itq": summary,
               "unique_database_codes": int(len(np.unique(db_c, axis=0))), "recall_at_10": {}}
        for pool in pools:
            got = hds_topk(db_f, q_f, db_c, q_c, pool, k, device)
            rec["recall_at_10"][str(pool)] = {"pool": pool, "fraction_of_es_distances": round(pool / n, 4),
                                              "recall": round(recall(got, es10), 4)}
        pool20 = pools[0]
        t0 = time.perf_counter()
        res = evaluate_arrays(db_c, db_f, db_y, q_c, q_f, q_y, ("bcs", "hds", "es"), top_k=1000,
                              hds_radius=bits + 1, max_candidates=pool20, device=str(device))
        rec["eval_seconds"] = round(time.perf_counter() - t0, 2)
        rec["map_at_1000"] = {mode: round(res[mode]["map_at_k"], 4) for mode in ("bcs", "hds", "es")}
        rec["hds_pool"] = pool20
        runs.append(rec)
        r20 = rec["recall_at_10"][str(pools[0])]["recall"]
        print(f"{bits} bits: recall@10 (pool n/25 = {pools[0]}) {r20:.4f}; "
              + ", ".join(f"n/{n // p}: {v['recall']:.3f}" for p, v in
                          ((int(kk), vv) for kk, vv in rec["recall_at_10"].items()))
              + f"; mAP@1000 BCS {rec['map_at_1000']['bcs']:.4f} HDS {rec['map_at_1000']['hds']:.4f} "
              f"ES {rec['map_at_1000']['es']:.4f}", flush=True)
    best = max(runs, key=lambda r: (r["recall_at_10"][str(pools[0])]["recall"], -r["bits"]))
    out = {
        "benchmark": "unsupervised PCA+ITQ codes on pretrained fc7 (labels hidden from the model)",
        "dataset": "CIFAR-10 from the JPEG copy (quality ~75) in shared/data, not the official binary",
        "backbone": args.backbone, "pretrained": "ImageNet (not fine-tuned)", "n_database": n, "n_queries": m,
        "feature_dim": int(db_f.shape[1]), "features": feat_info, "es_top10_seconds": round(es_s, 2),
        "recall_definition": "HDS top-10 (pool nearest by Hamming, rescored by exact fc7 L2) vs ES top-10",
        "runs": runs,
        "best_bits_by_recall_at_n_over_25": best["bits"],
        "goal_recall_ge_0.95_below_1_20_distances": any(
            v["recall"] >= 0.95 and v["fraction_of_es_distances"] < 0.05
            for r in runs for v in r["recall_at_10"].values()),
        "machine": {**machine_basics(), "torch": torch.__version__, "device": str(device),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "deephash_faiss": __version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    write_json(args.json, out, default=float)
    print(f"-> {args.json}")


if __name__ == "__main__":
    main()
