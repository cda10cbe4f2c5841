"""fc7 of a frozen backbone, computed once per image and cached on disk (resumably).

Laptop mode (a frozen backbone, H and the classifier trained on fc7) and unsupervised
codes (PCA + ITQ on fc7) both need the backbone's features of every image; the build
then reuses the same features for the index, so each image is decoded and encoded once.

The cache is a folder of chunks ``chunk-NNNNN.npz`` (fc7 float32 [b, D], positions int64
[b], the chunk's undecodable files) plus ``meta.json`` naming the job (backbone weights,
preprocessing, image list with file stamps). Chunks are renamed into place when complete,
so an interrupted run keeps every finished chunk and recomputes only the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from .errors import DhfError

CHUNK = 2048


@dataclass
class CachedFeatures:
    """fc7 of the decodable images of a path list.

    Attributes:
        fc7: float32 [n_ok, D], as :func:`deephash_faiss.extract.encode_array` computes it.
        pos: int64 [n_ok], positions into the path list.
        bad: [(position, reason)] of the files that could not be decoded.
    """

    fc7: np.ndarray
    pos: np.ndarray
    bad: list[tuple[int, str]] = field(default_factory=list)


def choose_method(requested: str, labelled: bool, device: torch.device, pretrained: bool,
                  why_unlabelled: str = "the folder has no class subfolders") -> tuple[str, str]:
    """Pick how H is learned: (method, the reason, one phrase for the user).

    Args:
        requested: "auto", "finetune", "frozen" or "itq" (``--unsupervised``).
        labelled: the folder has class subfolders (at least two classes).
        device: where training runs.
        pretrained: the backbone has pretrained weights (a frozen random net is useless).
        why_unlabelled: the reason given when ``labelled`` is false.
    """
    if requested not in ("auto", "finetune", "frozen", "itq"):
        raise DhfError(f"unknown training mode {requested!r} (auto, finetune, frozen or unsupervised)")
    if requested == "itq":
        return "itq", "--unsupervised asked for"
    if not labelled:
        if requested != "auto":
            raise DhfError(f"--{requested} needs a folder with one subfolder per class (at least two); "
                           f"use --unsupervised (or no option) to learn codes without labels")
        return "itq", why_unlabelled + ("" if pretrained else "; the backbone has no pretrained weights, so its "
                                        "fc7 is of a random network")
    if requested != "auto":
        return requested, f"--{requested} asked for"
    if device.type == "cuda":
        return "finetune", "a GPU is available: the whole network is fine-tuned (the paper's method)"
    if not pretrained:
        return "finetune", "the backbone has no pretrained weights to freeze"
    return "frozen", ("no GPU: the backbone stays frozen, fc7 of every image is computed once and H and the "
                      "classifier train on the cached features (--finetune to fine-tune anyway)")


def job_key(model, paths: Sequence[str], stamps: str = "") -> str:
    """sha256 of the backbone's weights, its preprocessing (flip averaging included) and the
    image list (+ file stamps)."""
    h = hashlib.sha256()
    cfg = model.config
    h.update(f"{cfg.backbone}\n{cfg.input_size}\n{cfg.load_size}\n{cfg.mean}\n{cfg.std}\n".encode())
    if cfg.flip_average:  # other fc7 (keys of older caches unchanged)
        h.update(b"flip_average\n")
    for name, t in model.backbone.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    for p in paths:
        h.update(p.encode("utf-8", "surrogateescape") + b"\n")
    h.update(stamps.encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def compute_features(
    model,
    paths: Sequence[str],
    cache_dir: str,
    device: torch.device,
    batch_size: int = 128,
    stamps: str = "",
    progress: bool = True,
    log=None,
    chunk: int = CHUNK,
) -> CachedFeatures:
    """fc7 of every image in ``paths`` through ``model``'s backbone, cached in ``cache_dir``.

    Images are decoded and encoded by :func:`deephash_faiss.extract.encode_paths` (the
    build's own path), chunk by chunk; finished chunks of an interrupted run are reused.
    A cache of another job (other weights, images or preprocessing) is replaced.
    """
    from tqdm.auto import tqdm

    from .extract import encode_paths
    from .store import atomic_write_bytes

    key = job_key(model, paths, stamps)
    meta_path = os.path.join(cache_dir, "meta.json")
    meta = {"key": key, "chunk": int(chunk), "n": len(paths), "dim": model.config.feature_dim}
    if os.path.isdir(cache_dir):
        try:
            with open(meta_path) as f:
                same = json.load(f) == meta
        except (OSError, ValueError):
            same = False
        if not same:
            shutil.rmtree(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    atomic_write_bytes(meta_path, json.dumps(meta).encode())
    if device.type != "cuda":  # bound inference activations on a CPU (see train.cpu_batch_cap)
        from .train import cpu_batch_cap

        batch_size = min(batch_size, cpu_batch_cap(model.config.input_size, train=False))
    nchunks = (len(paths) + chunk - 1) // chunk
    feats, pos, bad = [], [], []
    reused = 0
    model.to(device).eval()
    with tqdm(total=len(paths), desc="fc7", unit="img", disable=not progress) as bar:
        for c in range(nchunks):
            lo, hi = c * chunk, min(len(paths), (c + 1) * chunk)
            p = os.path.join(cache_dir, f"chunk-{c:05d}.npz")
            if os.path.exists(p):
                with np.load(p) as z:
                    f_c, pos_c, bad_c = z["fc7"], z["pos"], json.loads(str(z["bad"]))
                reused += 1
                bar.update(hi - lo)
            else:
                fs, ps, bad_c = [], [], []
                for pp, _, ff, bb in encode_paths(model, list(paths[lo:hi]), device, batch_size, "float32"):
                    fs.append(ff)
                    ps.append(pp + lo)
                    bad_c.extend([int(i) + lo, r] for i, r in bb)
                    bar.update(len(pp) + len(bb))
                f_c = np.concatenate(fs) if fs else np.zeros((0, model.config.feature_dim), np.float32)
                pos_c = np.concatenate(ps) if ps else np.zeros(0, np.int64)
                tmp = os.path.join(cache_dir, f".tmp-chunk-{c:05d}.npz")
                with open(tmp, "wb") as fh:
                    np.savez(fh, fc7=f_c, pos=pos_c, bad=np.array(json.dumps(bad_c)))
                os.replace(tmp, p)
            feats.append(f_c)
            pos.append(pos_c)
            bad.extend((int(i), str(r)) for i, r in bad_c)
    if reused and log:
        log(f"reused the fc7 of {reused} cached chunk(s) from an interrupted run")
    fc7 = np.concatenate(feats) if feats else np.zeros((0, model.config.feature_dim), np.float32)
    return CachedFeatures(fc7, np.concatenate(pos) if pos else np.zeros(0, np.int64), bad)


@torch.no_grad()
def codes_from_features(model, fc7: np.ndarray, device: torch.device, batch_size: int = 65536) -> np.ndarray:
    """Packed codes uint8 [n, bits / 8] of fc7 float32 [n, D]: ``pack(sigmoid(latent(fc7)) > 0.5)``,
    the same float32 computation :func:`deephash_faiss.extract.encode_array` does after the backbone."""
    from .index import pack_codes

    model.eval()
    out = [np.zeros((0, model.config.bits // 8), np.uint8)]
    for s in range(0, len(fc7), batch_size):
        x = torch.as_tensor(np.ascontiguousarray(fc7[s:s + batch_size], dtype=np.float32)).to(device)
        out.append(pack_codes(torch.sigmoid(model.latent(x)).cpu().numpy()))
    return np.concatenate(out)


def cached_encoder(model, feats: CachedFeatures, paths: Sequence[str], device: torch.device):
    """An encoder with the signature of :func:`deephash_faiss.extract.encode_paths` that reads
    fc7 from ``feats`` (computed for ``paths``) instead of decoding and running the backbone.

    The returned function takes (model, sub_paths, device, batch_size, feature_dtype) and yields
    (positions int64 [b] into ``sub_paths``, codes uint8 [b, bits / 8], features [b, D], bad).
    """
    row = {paths[int(p)]: i for i, p in enumerate(feats.pos)}
    reasons = {paths[int(p)]: r for p, r in feats.bad}
    codes_all = codes_from_features(model, feats.fc7, device)

    def encode(_model, sub: Sequence[str], _device=None, batch_size: int = 128,
               feature_dtype: str = "float32", workers=None) -> Iterator:
        for s in range(0, len(sub), max(1, batch_size)):
            part = sub[s:s + batch_size]
            ok = [(j, row[p]) for j, p in enumerate(part) if p in row]
            bad = [(s + j, reasons.get(p, "not in the feature cache")) for j, p in enumerate(part) if p not in row]
            rows = np.asarray([r for _, r in ok], dtype=np.int64)
            yield (np.asarray([s + j for j, _ in ok], dtype=np.int64), codes_all[rows],
                   feats.fc7[rows].astype(feature_dtype, copy=False), bad)

    return encode
