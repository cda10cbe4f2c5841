"""Batch inference: images -> (binary codes, fc7 features)."""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np
import torch

from .index import pack_codes
from .model import HashNet


CUDA_LAYOUTS = ("channels_last", "contiguous")
NHWC_MIN_IMAGES = 50_000  # depthwise models: channels_last from this many images of one job on
#: the streaming encoder, depthwise models, jobs of more images than this: "hybrid" -- the job's
#: first HYBRID_NCHW_IMAGES images (whole batches) run NCHW while NHWC's plans are built in
#: another thread, the rest NHWC (:func:`stream_layout`)
HYBRID_NCHW_IMAGES = 25_000
STREAM_LAYOUTS = CUDA_LAYOUTS + ("hybrid",)
LAYOUT_ENV = "DHF_CUDA_LAYOUT"


def has_depthwise(model: torch.nn.Module) -> bool:
    """Whether ``model`` has depthwise convolutions (groups == in_channels > 1)."""
    return any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
               for m in model.modules())


def cuda_layout(model: torch.nn.Module, n: int) -> str:
    """The convolutions' memory layout on CUDA for a job of ``n`` images: "channels_last"
    (NHWC) or "contiguous" (NCHW).

    NHWC is the fast layout on tensor cores, but cuDNN builds its NHWC depthwise plans at their
    first call in every thread. Measured on the H200 (EfficientNet-Lite0, 224 px, batch 256,
    ``benchmarks/bench_first_batch.py``, issue 12): first forward pass 2.3-5.0 s in NHWC
    (the longer with CUDA's kernel cache cold), against 0.5 s in NCHW; then 18,500 against
    11,400 img/s. With the warm-up and the batches in one thread (``stream.model_thread``), the
    CIFAR-10 build (50,000 images) was faster in NHWC than in NCHW in 5 of 6 pairs with CUDA's
    kernel cache warm (by 0.2-1.3 s; 0.7 s slower in the sixth; mean 0.4 s faster), and 1.7-2.6 s
    slower in a machine's first NHWC process (``benchmarks/device/h200_model_thread*.sh``,
    ``h200_layout50k.sh``; break-even 35,000-53,000 images, derived). A
    model with depthwise convolutions therefore runs NCHW below :data:`NHWC_MIN_IMAGES` images,
    NHWC from there; others always NHWC. This is the rule of the whole-array encoders
    (:func:`encode_array`, one thread); the streaming encoder of builds uses
    :func:`stream_layout`. ``DHF_CUDA_LAYOUT`` (one of :data:`CUDA_LAYOUTS`) overrides it."""
    forced = _forced_layout()
    if forced in CUDA_LAYOUTS:
        return forced
    if n < NHWC_MIN_IMAGES and has_depthwise(model):
        return "contiguous"
    return "channels_last"


def _forced_layout() -> str | None:
    forced = os.environ.get(LAYOUT_ENV)
    if forced and forced not in STREAM_LAYOUTS:
        raise ValueError(f"{LAYOUT_ENV} must be one of {STREAM_LAYOUTS}, not {forced!r}")
    return forced or None


def stream_layout(model: torch.nn.Module, n: int) -> str:
    """The streaming encoder's layout for a job of ``n`` images: :func:`cuda_layout`'s, or
    "hybrid" for a model with depthwise convolutions and more than :data:`HYBRID_NCHW_IMAGES`
    images: batches starting below that position of the job run NCHW (0.5 s first pass), the
    rest NHWC, whose plans (2.3-5 s) are built meanwhile in a thread of their own
    (:class:`deephash_faiss.stream._CudaRunner`). Which batch runs which layout depends only on
    its position in the job (:func:`batch_layout`), so a resume, a Ray actor and the local build
    encode every batch alike. ``DHF_CUDA_LAYOUT`` (one of :data:`STREAM_LAYOUTS`) overrides it."""
    forced = _forced_layout()
    if forced:
        return forced
    if n > HYBRID_NCHW_IMAGES and has_depthwise(model):
        return "hybrid"
    return cuda_layout(model, n)


def batch_layout(layout: str, position: int) -> str:
    """The layout (one of :data:`CUDA_LAYOUTS`) of a batch whose first image is at ``position`` of
    a job encoded in ``layout`` (:func:`stream_layout`)."""
    if layout != "hybrid":
        return layout
    return "contiguous" if position < HYBRID_NCHW_IMAGES else "channels_last"


def backbone_features(model: HashNet, x: torch.Tensor) -> torch.Tensor:
    """fc7 float32 [b, D] of normalised images x [b, 3, I, I]; with ``model.config.flip_average``
    the mean of the image's and its horizontal mirror's fc7 (one pass over both)."""
    if not model.config.flip_average:
        return model.backbone(x).float()
    b = len(x)
    both = model.backbone(torch.cat([x, x.flip(3)])).float()
    return (both[:b] + both[b:]) * 0.5


@torch.no_grad()
def forward_batch(model: HashNet, xb: torch.Tensor, device: torch.device, amp: bool = True, to_host: bool = True,
                  layout: str | None = None):
    """The model on one batch: uint8 [b, S, S, 3] (any device) -> (fc7 float32 [b, D], h float32 [b, bits]),
    fc7 by :func:`backbone_features` (flip-averaged when the model says so), on the host
    (``to_host``) or left on ``device``. bf16 autocast on CUDA when ``amp``.
    ``layout``: the convolutions' memory layout on CUDA (default :func:`cuda_layout` for ``b``
    images); on the CPU always channels_last."""
    if device.type != "cuda":
        layout = "channels_last"
    elif layout is None:
        layout = cuda_layout(model, len(xb))
    fmt = torch.contiguous_format if layout == "contiguous" else torch.channels_last
    x = model.preprocess(xb.to(device, non_blocking=True)).contiguous(memory_format=fmt)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
        fc7 = backbone_features(model, x)
    h = torch.sigmoid(model.latent(fc7))
    if to_host:
        return fc7.cpu(), h.cpu()
    return fc7, h


def pack_codes_torch(h: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """:func:`deephash_faiss.index.pack_codes` on the device: float [n, bits] -> uint8 [n, bits / 8]
    (FAISS bit order: bit j in byte j // 8 at position j % 8)."""
    n, bits = h.shape
    b = (h > threshold).view(n, bits // 8, 8).to(torch.uint8)
    w = (1 << torch.arange(8, device=h.device, dtype=torch.uint8)).view(1, 1, 8)
    return (b * w).sum(-1, dtype=torch.uint8)


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
    lay = cuda_layout(model, len(images)) if torch.device(device).type == "cuda" else None
    for start in range(0, len(images), batch_size):
        fc7, h = forward_batch(model, torch.as_tensor(images[start:start + batch_size]), device, amp, layout=lay)
        h = h.numpy()
        hs.append(h)
        codes.append(pack_codes(h))
        feats.append(fc7.numpy().astype(feature_dtype, copy=False))
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
    decoder: str = "pil",
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, str]]]]:
    """Decode and encode image files batch by batch, in order (the streaming encoder,
    :func:`deephash_faiss.stream.encode_stream`).

    ``decoder``: "pil" or "nvjpeg" (the index's ``decoder``; "nvjpeg" needs CUDA and falls
    back to "pil" on a CPU device).

    Yields:
        (positions int64 [b] into ``paths`` that encoded, codes uint8 [b, bits / 8],
        features [b, D], bad [(position, reason)] of files that could not be decoded).
    """
    from .stream import encode_stream

    if decoder == "nvjpeg" and torch.device(device).type != "cuda":
        decoder = "pil"
    for _, _, pos, codes, feats, bad in encode_stream(model, paths, device, batch_size, feature_dtype, decoder,
                                                      workers, decode_kind="thread"):
        yield pos, codes, feats, bad
