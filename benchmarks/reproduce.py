#!/usr/bin/env python3
"""Reproduce the paper's retrieval experiments (Lin et al., CVPRW 2015) on MNIST and CIFAR-10.

    python benchmarks/reproduce.py --data ../shared/data --dataset cifar10 --bits 48 128 \
        --backbone efficientnet_lite0 --out benchmarks/results/

For each code length: train on the train split (ImageNet-pretrained backbone + latent layer
H + classifier, softmax loss), encode the train split as the database and the test split as
queries (the paper's 10,000 queries against 50,000 / 60,000), evaluate BCS, HDS and ES with
the official protocol, time the three search modes through the product's Searcher, and
write one JSON per run (every metric, the settings, versions, device, date) with plots.

``--protocol cifar10-1``: 1,000 queries (100 per class) against the other 59,000 images,
training on 5,000 of them (500 per class); mAP over the whole database.

Images are decoded once from the archive into memory at their native size; resizing to the
network input, augmentation and normalisation run on the GPU (bf16 autocast).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from deephash_faiss import __version__, api  # noqa: E402
from deephash_faiss.evaluate import evaluate_arrays, time_modes, write_plots  # noqa: E402
from deephash_faiss.extract import encode_array  # noqa: E402
from deephash_faiss.model import build_model, resolve_device, save_checkpoint  # noqa: E402
from deephash_faiss.model import BACKBONES  # noqa: E402
from deephash_faiss.train import TrainConfig, fit, fit_head, predict_logits  # noqa: E402

ARCHIVES = {"mnist": "mnist-png.tar.gz", "cifar10": "cifar10-jpg.tar.gz"}
NATIVE = {"mnist": 28, "cifar10": 32}
PAPER_MAP = {"cifar10": {12: 0.8930, 16: 0.8977, 32: 0.8972, 48: 0.8973, 64: 0.8979, 128: 0.8968}}


def load_archive(path: str, size: int, limit: int | None = None, workers: int = 16):
    """Decode a `<name>/<split>/<class>/<file>` archive into memory.

    Returns {split: (images uint8 [n, size, size, 3], labels int32 [n], paths list)}, classes.
    """
    from PIL import Image

    members = []
    with tarfile.open(path, "r:gz") as tar:
        for m in tar:
            if not m.isfile():
                continue
            parts = m.name.split("/")
            if len(parts) < 4:
                continue
            members.append((m.name, parts[-3], parts[-2], tar.extractfile(m).read()))
    members.sort(key=lambda x: (x[1], x[2], _num(x[0])))
    classes = sorted({c for _, _, c, _ in members}, key=_num)

    def dec(item):
        name, split, cls, data = item
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)

    out = {}
    for split in sorted({s for _, s, _, _ in members}):
        items = [m for m in members if m[1] == split]
        if limit:
            rng = np.random.default_rng(0)
            items = [items[i] for i in np.sort(rng.choice(len(items), min(limit, len(items)), replace=False))]
        with ThreadPoolExecutor(workers) as pool:
            imgs = np.stack(list(pool.map(dec, items, chunksize=256)))
        labels = np.array([classes.index(c) for _, _, c, _ in items], dtype=np.int32)
        out[split] = (imgs, labels, [n for n, _, _, _ in items])
    return out, classes


def _num(s: str):
    base = os.path.splitext(os.path.basename(s))[0]
    return (0, int(base), s) if base.isdigit() else (1, 0, s)


def cifar10_1_split(data, seed=0):
    """The "cifar10-1" protocol: all 60k images; 100 queries/class; the rest the database;
    500/class of the database for training."""
    imgs = np.concatenate([data["train"][0], data["test"][0]])
    labels = np.concatenate([data["train"][1], data["test"][1]])
    paths = data["train"][2] + data["test"][2]
    rng = np.random.default_rng(seed)
    q, tr = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        q.append(idx[:100])
        tr.append(idx[100:600])
    q = np.sort(np.concatenate(q))
    db = np.setdiff1d(np.arange(len(labels)), q)
    tr = np.sort(np.concatenate(tr))
    pick = lambda ix: (imgs[ix], labels[ix], [paths[i] for i in ix])  # noqa: E731
    return pick(tr), pick(db), pick(q)


def versions(device) -> dict:
    import torch

    try:
        import faiss

        fv = faiss.__version__
    except ImportError:
        fv = None
    v = {"deephash_faiss": __version__, "python": platform.python_version(), "torch": torch.__version__,
         "numpy": np.__version__, "faiss": fv, "platform": platform.platform()}
    if device.type == "cuda":
        v["cuda"] = torch.version.cuda
        v["gpu"] = torch.cuda.get_device_name(device)
    else:
        v["cpu"] = platform.processor() or "unknown"
    v["cpu_count"] = os.cpu_count()
    return v


def export_arrays(out_dir, model, db_codes, db_feats, db_y, q_codes, q_feats, q_y, classes, dim):
    """Write a trained run's arrays for benchmarks that need real code statistics.

    Files (each under 16 MB, so they come back from a GPU machine one by one):
      codes.npz: db_codes uint8 [n, bits/8], q_codes uint8 [m, bits/8], db_labels int32 [n],
                 q_labels int32 [m], classes, pca_mean float32 [D], pca_components float32 [dim, D]
      feats_db_<i>.npy: float16 [<=25000, dim] db fc7 projected on the top-`dim` PCA axes
                 (fitted on the database), in database order
      feats_q.npy: float16 [m, dim], the queries' fc7 projected the same way
      model.pt: the trained model
    """
    import torch

    os.makedirs(out_dir, exist_ok=True)
    x = torch.from_numpy(np.asarray(db_feats, dtype=np.float32))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = x.to(dev)
    mean = x.mean(0)
    _, _, vt = torch.linalg.svd(x - mean, full_matrices=False)
    comp = vt[:dim]
    proj = lambda f: ((torch.as_tensor(np.asarray(f, dtype=np.float32), device=dev) - mean) @ comp.T)  # noqa: E731
    db_p = proj(db_feats).half().cpu().numpy()
    for i, a in enumerate(range(0, len(db_p), 25000)):
        np.save(os.path.join(out_dir, f"feats_db_{i}.npy"), db_p[a:a + 25000])
    np.save(os.path.join(out_dir, "feats_q.npy"), proj(q_feats).half().cpu().numpy())
    np.savez(os.path.join(out_dir, "codes.npz"), db_codes=db_codes, q_codes=q_codes,
             db_labels=np.asarray(db_y, np.int32), q_labels=np.asarray(q_y, np.int32),
             classes=np.array(classes), pca_mean=mean.cpu().numpy(), pca_components=comp.cpu().numpy())
    save_checkpoint(model, os.path.join(out_dir, "model.pt"))


def score_variant(model, db_x, db_y, q_x, q_y, device, args, top_k) -> dict:
    """BCS / HDS / ES mAP (at 1000 and full), query-set accuracy and distinct database codes of
    ``model`` as it is now (weights, flip averaging)."""
    acc = float((predict_logits(model, q_x, device).argmax(1).numpy() == q_y).mean())
    db_codes, db_feats, _ = encode_array(model, db_x, device, 512, args.feature_dtype)
    q_codes, q_feats, _ = encode_array(model, q_x, device, 512, "float32")
    res = evaluate_arrays(db_codes, db_feats, db_y, q_codes, q_feats, q_y, ("bcs", "hds", "es"),
                          top_k=top_k or len(db_codes), ks=(100,), hds_radius=args.hds_radius,
                          max_candidates=args.max_candidates, device=str(device))
    return {"query_accuracy": acc, "unique_database_codes": int(len(np.unique(db_codes, axis=0))),
            "map_at_k": {m: float(res[m]["map_at_k"]) for m in ("bcs", "hds", "es")},
            "map_full": {m: float(res[m]["map_full"]) for m in ("bcs", "hds", "es")}}


def run_one(args, dataset, bits, train, db, queries, classes, device, protocol, log):
    import torch

    tr_x, tr_y, _ = train
    db_x, db_y, db_paths = db
    q_x, q_y, _ = queries
    hflip = dataset != "mnist"
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                      schedule="cosine", warmup_epochs=args.warmup, label_smoothing=args.label_smoothing,
                      hflip=hflip, crop_pad=0.125, val_fraction=0.0, seed=args.seed, amp=True,
                      weight_decay=args.weight_decay, new_layer_lr_mult=args.new_layer_lr_mult,
                      mix=args.mix, mix_alpha=args.mix_alpha, mix_prob=args.mix_prob, erase_prob=args.erase_prob,
                      ema_epochs=args.ema_epochs,
                      binary_weight=args.binary_weight, balance_weight=args.balance_weight)
    weights = "none" if args.from_scratch else "default"
    method = "frozen" if args.frozen else "finetune"
    init_seed = args.seed if args.init_seed is None else args.init_seed
    model = build_model(args.backbone, bits, classes, weights=weights, input_size=args.input_size,
                        load_size=NATIVE[dataset], seed=init_seed, method=method)
    log(f"== {dataset} {protocol} {bits} bits: {args.backbone} ({'scratch' if args.from_scratch else 'ImageNet'}, "
        f"{method}) train {len(tr_x)}, database {len(db_x)}, queries {len(q_x)}")
    t0 = time.perf_counter()
    raw_state = {}
    if args.frozen:  # laptop mode: fc7 of the training images once, H + classifier trained on it
        model.to(device)
        _, tr_f, _ = encode_array(model, tr_x, device, 512, "float32")
        hist = fit_head(model, tr_f, tr_y, cfg, device, progress=not args.quiet, log=log)
    else:
        hist = fit(model, tr_x, tr_y, cfg, device, progress=not args.quiet, log=log, raw_state_out=raw_state)
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    top_k = None if protocol == "cifar10-1" else 1000
    variants = {}
    if args.variants:  # the same training run encoded four ways: last / averaged weights x plain / flip-averaged
        own = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        for wname, state in (("last", raw_state or own), ("ema", own if raw_state else None)):
            if state is None:
                continue
            model.load_state_dict(state)
            for flip in (False, True):
                model.config.flip_average = flip
                variants[f"{wname}{'_flip' if flip else ''}"] = score_variant(
                    model, db_x, db_y, q_x, q_y, device, args, top_k)
                log(f"variant {wname}{' flip' if flip else ''}: {variants[list(variants)[-1]]}")
        model.load_state_dict(own)
    model.config.flip_average = args.flip_average
    if args.save_model:  # the weights as the run ended (not averaged), for benchmarks/soup.py
        now = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if raw_state:
            model.load_state_dict(raw_state)
        save_checkpoint(model, args.save_model)
        model.load_state_dict(now)
    test_acc = float((predict_logits(model, q_x, device).argmax(1).numpy() == q_y).mean())
    log(f"trained in {train_s:.1f} s; query-set accuracy {test_acc:.4f}")
    t0 = time.perf_counter()
    db_codes, db_feats, _ = encode_array(model, db_x, device, 512, args.feature_dtype)
    q_codes, q_feats, _ = encode_array(model, q_x, device, 512, "float32")
    enc_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = evaluate_arrays(db_codes, db_feats, db_y, q_codes, q_feats, q_y, ("bcs", "hds", "es"),
                          top_k=top_k or len(db_codes), ks=range(100, 1001, 100), hds_radius=args.hds_radius,
                          max_candidates=args.max_candidates, device=str(device))
    eval_s = time.perf_counter() - t0
    # search timing through the product (index dir on local disk); needs faiss
    try:
        import faiss  # noqa: F401
    except ImportError:
        faiss = None
    qms = {"bcs": float("nan"), "hds": float("nan"), "es": float("nan")}
    s = None
    if faiss is not None and not args.no_timing:
        tmp = tempfile.mkdtemp(prefix="dhf-repro-")
        mpath = os.path.join(tmp, "model.pt")
        save_checkpoint(model, mpath)
        idx_dir = os.path.join(tmp, "index")
        api.index_from_arrays(idx_dir, db_codes, db_feats, db_y, db_paths, classes=classes, model_path=mpath)
        s = api.open_index(idx_dir, device=str(device), features_in_memory=True)
        qms = time_modes(s, q_codes, q_feats, ("bcs", "hds", "es"), k=100, radius=args.hds_radius,
                         max_candidates=args.max_candidates, n_queries=1000)
    uniq_codes = len(np.unique(db_codes, axis=0))
    if args.export:
        export_arrays(args.export, model, db_codes, db_feats, db_y, q_codes, q_feats, q_y, classes,
                      args.export_dim)
    rec = {
        "dataset": dataset, "protocol": protocol, "bits": bits, "backbone": args.backbone, "method": method,
        "pretrained": not args.from_scratch, "input_size": args.input_size, "native_size": NATIVE[dataset],
        "n_train": int(len(tr_x)), "n_database": int(len(db_x)), "n_queries": int(len(q_x)),
        "train_config": cfg.__dict__, "train_seconds": round(train_s, 2), "history": hist,
        "query_accuracy": test_acc, "encode_seconds": round(enc_s, 2), "eval_seconds": round(eval_s, 2),
        "metrics": res, "variants": variants, "flip_average": bool(args.flip_average), "query_ms": qms,
        "unique_database_codes": int(uniq_codes),
        "paper_map_at_1000": PAPER_MAP.get(dataset, {}).get(bits) if protocol == "paper" else None,
        "data_note": ("CIFAR-10 from the JPEG copy (quality ~75) in shared/data, not the official binary"
                      if dataset == "cifar10" else "MNIST PNG, exact pixels"),
        "versions": versions(device), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": " ".join(sys.argv),
    }
    name = (f"{dataset}{'-1' if protocol == 'cifar10-1' else ''}_{args.backbone}"
            f"{'_scratch' if args.from_scratch else ''}{'_frozen' if args.frozen else ''}"
            f"{'_' + args.mix if args.mix != 'none' and not args.frozen else ''}"
            f"{'_erase' if args.erase_prob and not args.frozen else ''}"
            f"{'_ema' if args.ema_epochs and not args.frozen else ''}"
            f"{'_ssdh' if args.binary_weight or args.balance_weight else ''}{'_flip' if args.flip_average else ''}_{bits}bits")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, name + ".json"), "w") as f:
        json.dump(rec, f, indent=2, default=float)
    if not args.no_plots:
        # query grid: the first test image of each of 5 classes, HDS top 10 (needs the index)
        grid = None
        if s is not None:
            grid_q, grid_r = [], []
            for c in range(min(5, len(classes))):
                qi = int(np.flatnonzero(q_y == c)[0])
                r = s.hds(q_codes[qi:qi + 1], q_feats[qi:qi + 1], 10, args.hds_radius,
                          args.max_candidates).results[0]
                grid_q.append(q_x[qi])
                grid_r.append([(db_x[i], bool(db_y[i] == c)) for i in r.ids])
            grid = {"queries": grid_q, "results": grid_r}
        base = ("cifar10", bits) if dataset == "cifar10" and protocol == "paper" else None
        write_plots(res, os.path.join(args.out, name), f"{dataset} {bits} bits ({args.backbone})",
                    grid=grid, baselines_for=base)
    m = res
    top = "mAP@1000" if top_k else "mAP(full)"
    key = "map_at_k"
    log(f"{name}: {top} BCS {m['bcs'][key]:.4f}  HDS {m['hds'][key]:.4f}  ES {m['es'][key]:.4f}  "
        f"(full mAP BCS {m['bcs']['map_full']:.4f}); P@r2 {m['bcs']['precision_radius']:.4f}; "
        f"ms/query BCS {qms['bcs']:.3f} HDS {qms['hds']:.3f} ES {qms['es']:.3f}; train {train_s:.0f} s")
    return rec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder holding mnist-png.tar.gz / cifar10-jpg.tar.gz")
    p.add_argument("--dataset", required=True, choices=sorted(ARCHIVES))
    p.add_argument("--bits", type=int, nargs="+", default=[48])
    p.add_argument("--backbone", default="efficientnet_lite0", choices=sorted(BACKBONES),
                   help="efficientnet_lite1 (240 px) and efficientnet_lite2 (260 px) are the stronger offline ones")
    p.add_argument("--frozen", action="store_true",
                   help="laptop mode: backbone frozen, H + classifier trained on its fc7 (no augmentation)")
    p.add_argument("--from-scratch", action="store_true", help="no ImageNet weights")
    p.add_argument("--protocol", default="paper", choices=["paper", "cifar10-1"])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--new-layer-lr-mult", type=float, default=10.0)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--mix", default="none", choices=["none", "cutmix", "mixup"],
                   help="CutMix or Mixup of training batches (train.mix_batch)")
    p.add_argument("--mix-alpha", type=float, default=1.0)
    p.add_argument("--mix-prob", type=float, default=0.5)
    p.add_argument("--erase-prob", type=float, default=0.0, help="random erasing per image (0: off)")
    p.add_argument("--ema-epochs", type=float, default=0.0,
                   help="end with a moving average of the weights over about this many epochs (TrainConfig.ema_epochs)")
    p.add_argument("--binary-weight", type=float, default=0.0,
                   help="SSDH code term: reward H outputs far from 0.5 (TrainConfig.binary_weight)")
    p.add_argument("--balance-weight", type=float, default=0.0,
                   help="SSDH code term: each code half ones (TrainConfig.balance_weight)")
    p.add_argument("--flip-average", action="store_true",
                   help="encode database and queries as the mean fc7 of each image and its mirror")
    p.add_argument("--variants", action="store_true",
                   help="also score the run's last and averaged weights, each with and without flip averaging")
    p.add_argument("--input-size", type=int, default=None, help="network input side (default: the backbone's)")
    p.add_argument("--feature-dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--hds-radius", type=int, default=3)
    p.add_argument("--max-candidates", type=int, default=10_000)
    p.add_argument("--limit", type=int, default=None, help="at most this many images per split (smoke tests)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0, help="training seed; also the split's and the new layers' "
                   "unless --split-seed / --init-seed are given")
    p.add_argument("--split-seed", type=int, default=None, help="seed of the cifar10-1 split (default: --seed)")
    p.add_argument("--init-seed", type=int, default=None, help="seed of H's and the classifier's initial weights "
                   "(default: --seed); runs that share it can be averaged (benchmarks/soup.py)")
    p.add_argument("--save-model", default=None, metavar="PATH", help="also save the trained model (last weights)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-timing", action="store_true", help="skip search timing (also skipped without faiss)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--export", default=None, metavar="DIR",
                   help="also write the codes, labels, PCA-reduced fc7 and the model there (see export_arrays)")
    p.add_argument("--export-dim", type=int, default=256, help="PCA dimensions of the exported features")
    args = p.parse_args(argv)
    args.input_size = args.input_size or BACKBONES[args.backbone].input_size
    if args.protocol == "cifar10-1" and args.dataset != "cifar10":
        p.error("--protocol cifar10-1 needs --dataset cifar10")
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    device = resolve_device(args.device)
    path = os.path.join(args.data, ARCHIVES[args.dataset])
    if not os.path.exists(path):
        p.error(f"archive not found: {path}")
    t0 = time.perf_counter()
    data, classes = load_archive(path, NATIVE[args.dataset], args.limit)
    log(f"decoded {sum(len(v[0]) for v in data.values())} images from {path} in {time.perf_counter() - t0:.1f} s")
    if args.protocol == "cifar10-1":
        train, db, queries = cifar10_1_split(data, args.seed if args.split_seed is None else args.split_seed)
    else:
        train, db, queries = data["train"], data["train"], data["test"]
    for bits in args.bits:
        run_one(args, args.dataset, bits, train, db, queries, classes, device, args.protocol, log)


if __name__ == "__main__":
    main()
