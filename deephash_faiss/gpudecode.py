"""JPEG decode on the GPU (nvjpeg through ``torchvision.io.decode_jpeg``), with the CPU path
as the fallback.

A batch of encoded files is screened on the host (:func:`gpu_decodable`: a baseline,
extended or progressive JPEG with 1 or 3 components, within PIL's pixel limit, no EXIF
rotation, not an extreme aspect ratio); the screened files are decoded in one
``decode_jpeg(list, device="cuda")`` call and squared on the device the way
:func:`deephash_faiss.data.decode_image` squares on the CPU (shorter side resized to the
load size, bilinear with antialiasing when shrinking, centre crop). Everything else -- other
formats, CMYK, EXIF-rotated or corrupt files, anything nvjpeg rejects -- goes through
:func:`deephash_faiss.data.decode_image`, so skip reasons are the CPU path's.

The result differs from PIL's by resampling details (PIL decodes JPEGs at a reduced DCT
scale first): an index records its ``decoder`` ("pil" or "nvjpeg") in the manifest and its
queries are decoded the same way. ``benchmarks/bench_build.py --compare-decoders`` measures
how close the codes and features are.

``torchvision``'s CPU ``decode_jpeg`` runs the same logic on CPU tensors, which is how the
CPU tests exercise screening, fallback and ordering.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import struct
from typing import Sequence

import numpy as np

RGB = 3  # torchvision.io.ImageReadMode.RGB
_OPS: list = []  # torch.ops.image once loaded

_SOF_OK = {0xC0, 0xC1, 0xC2}  # baseline, extended sequential, progressive (Huffman)
_SOF_ALL = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_header(data: bytes) -> dict | None:
    """Parse a JPEG's markers up to its frame header.

    Returns:
        {"sof": marker, "width", "height", "components", "orientation" (EXIF, or None)},
        or None when ``data`` is not a well-formed JPEG header.
    """
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i, n, orientation = 2, len(data), None
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        seglen = struct.unpack(">H", data[i + 2:i + 4])[0]
        if seglen < 2 or i + 2 + seglen > n:
            return None
        seg = data[i + 4:i + 2 + seglen]
        if marker == 0xE1 and seg[:6] == b"Exif\x00\x00":
            orientation = _exif_orientation(seg[6:])
        elif marker in _SOF_ALL:
            if len(seg) < 6:
                return None
            h, w = struct.unpack(">HH", seg[1:5])
            return {"sof": marker, "width": w, "height": h, "components": seg[5], "orientation": orientation}
        elif marker == 0xDA:  # start of scan before a frame header
            return None
        i += 2 + seglen
    return None


def _exif_orientation(tiff: bytes) -> int | None:
    try:
        endian = {b"II": "<", b"MM": ">"}[tiff[:2]]
        (off,) = struct.unpack(endian + "I", tiff[4:8])
        (count,) = struct.unpack(endian + "H", tiff[off:off + 2])
        for k in range(count):
            e = off + 2 + 12 * k
            tag, typ = struct.unpack(endian + "HH", tiff[e:e + 4])
            if tag == 0x0112:
                return int(struct.unpack(endian + "H", tiff[e + 8:e + 10])[0])
    except (KeyError, struct.error, IndexError):
        return -1  # unreadable EXIF: let the CPU path decide
    return None


def gpu_decodable(data: bytes, size: int) -> bool:
    """Whether ``data`` (encoded bytes) goes to the GPU decoder for a ``size`` square."""
    from PIL import Image

    h = jpeg_header(data)
    if h is None or h["sof"] not in _SOF_OK or h["components"] not in (1, 3):
        return False
    if h["orientation"] not in (None, 1):
        return False
    w, hh = h["width"], h["height"]
    if w < 1 or hh < 1:
        return False
    limit = Image.MAX_IMAGE_PIXELS
    if limit and w * hh > limit:
        return False
    scale = size / min(w, hh)
    return max(round(w * scale), round(hh * scale)) <= 16 * size


def square_tensor(img, size: int):
    """uint8 [3, H, W] (any device) -> uint8 [size, size, 3]: shorter side resized to ``size``
    (bilinear, antialiased when shrinking), centre crop, as :func:`deephash_faiss.data._square`."""
    return square_batch(img.unsqueeze(0), size)[0]


def square_batch(imgs, size: int):
    """:func:`square_tensor` on images of one shape at once: uint8 [m, 3, H, W] ->
    uint8 [m, size, size, 3] (one resize for the group; the same values per image)."""
    import torch
    import torch.nn.functional as F

    _, _, h, w = imgs.shape
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    x = imgs
    if (nw, nh) != (w, h):
        x = F.interpolate(imgs.float(), size=(nh, nw), mode="bilinear", align_corners=False,
                          antialias=nw < w or nh < h)
        x = x.round_().clamp_(0, 255).to(torch.uint8)
    left, top = (nw - size) // 2, (nh - size) // 2
    return x[:, :, top:top + size, left:left + size].permute(0, 2, 3, 1)


def image_ops():
    """torchvision's JPEG operators (``torch.ops.image``), loaded without importing the
    ``torchvision`` package.

    ``import torchvision`` runs its ``__init__``: models, datasets and ``torchvision.ops``, which
    imports ``torch._dynamo`` -- 1.4 s on the 2-core machine with bytecode cached, 6.4-8.9 s of
    the first nvjpeg batch in the H200 builds of issue 12 (py-spy: ``_GpuHalf._warmup`` compiling
    ``torch/_dynamo`` while holding the GIL). The operator library alone loads in milliseconds.
    Falls back to ``import torchvision.io`` (which loads the same library) where the library
    is not found under its usual name.
    """
    if _OPS:
        return _OPS[0]
    import torch

    ops = torch.ops.image
    if not hasattr(ops, "decode_jpeg"):
        spec = importlib.util.find_spec("torchvision")  # finds the package without running it
        libs = []
        if spec is not None and spec.origin:
            root = os.path.dirname(spec.origin)
            libs = sorted(glob.glob(os.path.join(root, "image*.so")) + glob.glob(os.path.join(root, "image*.pyd")))
        for lib in libs:
            try:
                torch.ops.load_library(lib)
                break
            except (OSError, RuntimeError):
                continue
        if not (hasattr(ops, "decode_jpeg") and hasattr(ops, "decode_jpegs_cuda")):
            import warnings

            warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                                    category=DeprecationWarning)
            import torchvision.io  # noqa: F401 - loads the operators
    _OPS.append(ops)
    return ops


def decode_jpegs(tensors: list, device) -> list:
    """JPEG bytes (uint8 CPU tensors [L]) -> RGB images uint8 [3, H, W] on ``device``: one
    batched nvjpeg call on CUDA, one CPU decode per image otherwise; what
    ``torchvision.io.decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)`` does, without
    its package import (:func:`image_ops`). Raises if any file does not decode."""
    import torch

    ops = image_ops()
    device = torch.device(device)
    if device.type == "cuda":
        return list(ops.decode_jpegs_cuda(tensors, RGB, device))
    return [ops.decode_jpeg(t, RGB, False) for t in tensors]


def decode_batch(datas: Sequence[bytes], size: int, device) -> tuple[object, list[int]]:
    """Decode screened JPEG bytes on ``device`` in one batch.

    Returns:
        (uint8 [m, size, size, 3] on ``device`` for the files that decoded, in input order
        without the failures; positions (into ``datas``) that failed -- decode them on the CPU).
    """
    import torch

    if not datas:
        return torch.zeros((0, size, size, 3), dtype=torch.uint8, device=device), []
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        imgs = decode_jpegs(tensors, device)
        failed: list[int] = []
    except Exception:  # noqa: BLE001 - one bad file fails the batch: find it file by file
        imgs, failed = [], []
        for j, t in enumerate(tensors):
            try:
                imgs.append(decode_jpegs([t], device)[0])
            except Exception:  # noqa: BLE001
                imgs.append(None)
                failed.append(j)
    groups: dict[tuple[int, int], list[int]] = {}  # images of one shape are resized together
    for j, im in enumerate(imgs):
        if im is None:
            continue
        if im.ndim != 3 or im.shape[0] != 3:
            failed.append(j)
            continue
        groups.setdefault(tuple(im.shape[1:]), []).append(j)
    failed.sort()
    kept = sorted(j for js in groups.values() for j in js)
    if not kept:
        return torch.zeros((0, size, size, 3), dtype=torch.uint8, device=device), failed
    if len(groups) == 1:  # one shape (the usual case): no scatter, no index copied to the device
        (js,) = groups.values()
        return square_batch(torch.stack([imgs[j] for j in js]), size), failed
    out = torch.empty((len(kept), size, size, 3), dtype=torch.uint8, device=imgs[kept[0]].device)
    slot = {j: i for i, j in enumerate(kept)}
    for js in groups.values():
        sq = square_batch(torch.stack([imgs[j] for j in js]), size)
        out[torch.as_tensor([slot[j] for j in js], device=out.device)] = sq
    return out, failed


def read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def nvjpeg_available() -> bool:
    """Whether torchvision can decode JPEGs on this machine's GPU."""
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="JPEG")
        img, failed = decode_batch([buf.getvalue()], 8, "cuda")
        return not failed and tuple(img.shape) == (1, 8, 8, 3)
    except Exception:  # noqa: BLE001 - any failure: not available
        return False
