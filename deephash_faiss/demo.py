"""The embedded default: the whole method on scikit-learn's handwritten digits."""

from __future__ import annotations

import os
import time
from typing import Callable

import numpy as np


def write_digits(root: str, test_fraction: float = 0.2, seed: int = 0, size: int = 32) -> tuple[str, str]:
    """Write sklearn's 1,797 8x8 digits as ``root/{train,test}/<digit>/<n>.png`` (upscaled to ``size``).

    Returns (train_dir, test_dir). Existing files are kept (the split is deterministic).
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = (d.images / 16.0 * 255).round().astype(np.uint8)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(imgs))
    n_test = int(len(imgs) * test_fraction)
    split = {"test": order[:n_test], "train": order[n_test:]}
    for name, idx in split.items():
        for i in idx:
            p = os.path.join(root, name, str(d.target[i]), f"{i:04d}.png")
            if not os.path.exists(p):
                os.makedirs(os.path.dirname(p), exist_ok=True)
                Image.fromarray(imgs[i], "L").resize((size, size), Image.BILINEAR).save(p)
    return os.path.join(root, "train"), os.path.join(root, "test")


def run_demo(out: str, epochs: int = 8, bits: int = 48, device: str = "auto", progress: bool = True,
             echo: Callable[[str], None] = print) -> dict:
    """Train, build, search and evaluate on the digits; returns the metrics printed."""
    from . import api
    from .data import scan_images
    from .errors import DhfError
    from .index import IndexSpec
    from .metrics import evaluate_codes, evaluate_ranking
    from .store import check_output_path

    if epochs < 1:  # before the digits are written
        raise DhfError("--epochs must be at least 1")
    if bits < 8 or bits % 8:
        raise DhfError(f"--bits must be a positive multiple of 8, got {bits}")
    check_output_path(out, "-o", folder=True)
    t0 = time.perf_counter()
    train_dir, test_dir = write_digits(os.path.join(out, "digits"))
    echo(f"[1/4] wrote scikit-learn digits to {out}/digits (train/test, 10 classes)")
    model_path = os.path.join(out, "model.pt")
    _, hist = api.train_model(train_dir, model_path, backbone="smallcnn", bits=bits, epochs=epochs,
                              batch_size=64, lr=0.05, hflip=False, device=device, progress=progress,
                              val_fraction=0.1)
    echo(f"[2/4] trained smallcnn with a {bits}-bit latent layer: {epochs} epochs, "
         f"val acc {hist[-1].get('val_acc', float('nan')):.3f}")
    index_dir = os.path.join(out, "index")
    rep = api.build_index(train_dir, index_dir, model_path, IndexSpec("flat"), device=device, progress=progress)
    echo(f"[3/4] indexed {rep.count} training images into {index_dir}")
    s = api.open_index(index_dir, device=device, features_in_memory=True)
    test = scan_images(test_dir)
    q_codes, q_feats, _ = s.encode(test.paths)
    q_labels = test.labels
    db_labels = s.store.labels()
    res = {"bcs": evaluate_codes(q_codes, s.codes(), q_labels, db_labels, top_k=100, ks=[10, 50, 100])}
    for mode in ("hds", "es"):
        b = s.search(mode, q_codes, q_feats, k=100)
        ids = np.stack([np.pad(r.ids, (0, 100 - len(r.ids)), constant_values=-1) for r in b.results])
        res[mode] = evaluate_ranking(ids, q_labels, db_labels, top_k=100, ks=[10, 50, 100])
    echo(f"[4/4] {len(test)} test queries against {rep.count} images (mAP@100, P@10):")
    for mode, r in res.items():
        echo(f"      {mode.upper():<4} mAP@100 {r['map_at_k']:.4f}   P@10 {r['precision_at_k'][10]:.4f}")
    one = s.search("hds", q_codes[:1], q_feats[:1], k=5).results[0]
    paths, labels = s.store.paths(), s.store.labels()
    echo(f"example: query {test.paths[0]} (class {test.classes[q_labels[0]]}), HDS top 5:")
    for rank, (i, h, d) in enumerate(zip(one.ids, one.hamming, one.distance), 1):
        echo(f"      {rank}. class {s.manifest['classes'][labels[i]]}  hamming {h}  L2^2 {d:.3g}  {paths[i]}")
    echo(f"done in {time.perf_counter() - t0:.1f} s. Try: dhf search --index {index_dir} --query {test.paths[0]}")
    return res
