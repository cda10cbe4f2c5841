#!/usr/bin/env python3
"""Average the weights of fine-tuned models ("model soup", Wortsman et al., ICML 2022) and score
the average beside each model on the cifar10-1 protocol (issue 13).

    python benchmarks/soup.py --data ../shared/data --models a.pt b.pt c.pt --split-seed 0 \
        --flip-average --json benchmarks/results/reproduce/soup.json

The models must come from the same pretrained backbone and the same initial H and classifier
(``reproduce.py --init-seed``, ``--save-model``): runs that differ only in their training seed
(data order, augmentation). The soup averages every floating-point tensor (weights and batch-norm
statistics); ``soup_bn`` also re-estimates the batch-norm statistics on the training images. Each
entry of the JSON has full mAP (BCS / HDS / ES), mAP@1000, query-set accuracy and distinct codes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reproduce  # noqa: E402

from deephash_faiss.model import load_model, resolve_device  # noqa: E402


def average_states(states: list[dict]) -> dict:
    """The mean of every floating-point tensor over ``states``; other tensors (batch-norm
    counters) from the first."""
    out = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            out[k] = sum(s[k].double() for s in states).div(len(states)).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def recalibrate_bn(model, images: np.ndarray, device, batch_size: int = 256) -> None:
    """Re-estimate every batch-norm layer's running mean and variance as the plain average over
    ``images`` (uint8 [N, S, S, 3], no augmentation)."""
    import torch

    from deephash_faiss.extract import backbone_features

    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for a in range(0, len(images), batch_size):
            xb = torch.as_tensor(images[a:a + batch_size]).to(device)
            backbone_features(model, model.preprocess(xb).contiguous(memory_format=torch.channels_last))
    model.eval()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder holding cifar10-jpg.tar.gz")
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--flip-average", action="store_true")
    p.add_argument("--feature-dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--hds-radius", type=int, default=3)
    p.add_argument("--max-candidates", type=int, default=10_000)
    p.add_argument("--skip-members", action="store_true", help="score the soups only")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    data, _ = reproduce.load_archive(os.path.join(args.data, reproduce.ARCHIVES["cifar10"]), reproduce.NATIVE["cifar10"])
    (tr_x, _, _), (db_x, db_y, _), (q_x, q_y, _) = reproduce.cifar10_1_split(data, args.split_seed)
    models = [load_model(m) for m in args.models]
    out = {"models": args.models, "split_seed": args.split_seed, "flip_average": args.flip_average,
           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "versions": reproduce.versions(device),
           "command": " ".join(sys.argv), "scores": {}}

    def score(name, model):
        model.to(device).eval()
        model.config.flip_average = args.flip_average
        t0 = time.perf_counter()
        out["scores"][name] = r = reproduce.score_variant(model, db_x, db_y, q_x, q_y, device, args, None)
        print(f"{name}: full mAP BCS {r['map_full']['bcs']:.4f} HDS {r['map_full']['hds']:.4f} "
              f"ES {r['map_full']['es']:.4f}; accuracy {r['query_accuracy']:.4f}; "
              f"{r['unique_database_codes']} codes ({time.perf_counter() - t0:.0f} s)", flush=True)
        model.cpu()

    if not args.skip_members:
        for path, m in zip(args.models, models):
            score(os.path.basename(path), m)
    soup = load_model(args.models[0])
    soup.load_state_dict(average_states([m.state_dict() for m in models]))
    score("soup", soup)
    soup.to(device)
    recalibrate_bn(soup, tr_x, device)
    score("soup_bn", soup)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2, default=float)


if __name__ == "__main__":
    main()
