"""Batch inference: images -> (binary codes, fc7 features)."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from .data import iter_decoded
from .index import pack_codes
from .model import HashNet


@torch.no_grad()
def encode_array(
    model: HashNet,
    images,
    device: torch.device,
    batch_size: int = 256,
    feature_dtype: str = "float32",
    amp: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encode decoded images.

    Args:
        images: uint8 [n, S, S, 3] (numpy or torch, any device), S = ``model.config.load_size``.
        feature_dtype: "float32" or "float16" for the returned features.
        amp: bf16 autocast on CUDA (codes from H > 0.5 are computed in float32 either way).
    Returns:
        (codes uint8 [n, bits / 8], features [n, D] of ``feature_dtype``, h float32 [n, bits]).
    """
    model.eval()
    codes, feats, hs = [], [], []
    use_amp = amp and device.type == "cuda"
    for start in range(0, len(images), batch_size):
        xb = torch.as_tensor(images[start:start + batch_size]).to(device, non_blocking=True)
        x = model.preprocess(xb).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            fc7 = model.backbone(x)
        fc7 = fc7.float()
        h = torch.sigmoid(model.latent(fc7)).cpu().numpy()
        hs.append(h)
        codes.append(pack_codes(h))
        feats.append(fc7.cpu().numpy().astype(feature_dtype, copy=False))
    bits, dim = model.config.bits, model.config.feature_dim
    if not codes:
        return np.zeros((0, bits // 8), np.uint8), np.zeros((0, dim), feature_dtype), np.zeros((0, bits), np.float32)
    return np.concatenate(codes), np.concatenate(feats), np.concatenate(hs)


def encode_paths(
    model: HashNet,
    paths: Sequence[str],
    device: torch.device,
    batch_size: int = 256,
    feature_dtype: str = "float32",
    workers: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, str]]]]:
    """Decode and encode image files batch by batch, in order.

    Yields:
        (positions int64 [b] into ``paths`` that encoded, codes uint8 [b, bits / 8],
        features [b, D], bad [(position, reason)] of files that could not be decoded).
    """
    size = model.config.load_size
    for imgs, pos, bad in iter_decoded(paths, size, batch_size, workers):
        codes, feats, _ = encode_array(model, imgs, device, batch_size, feature_dtype)
        yield pos, codes, feats, bad
