"""A generator of awkward and broken image corpora for the reliability tests.

``make_good(root)`` writes a small labelled collection (two classes) of valid but
unusual images: CMYK JPEG, 16-bit PNG, palette, alpha (RGBA, LA, P with
transparency), 1x1, very wide (4000x2) and very tall images, non-UTF-8 and spaced
file names, duplicate files, a symlink to a valid image.

``make_bad(root)`` adds files that must be skipped: zero-byte files, truncated JPEG
and PNG, text files named .jpg, decompression bombs (a PNG whose header declares more
pixels than PIL's ``MAX_IMAGE_PIXELS`` — crafted bytes, the limit is untouched),
broken symlinks, a self-referencing symlink, a directory symlink pointing to its
parent (a loop), a FIFO and a directory named like an image, and a chmod-000 file
(only where permissions are enforced: as root they are not, so that case is left
out and reported in the return value).

Both return a :class:`Corpus` describing what was written.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

SIZE = 24  # side of the ordinary images


@dataclass
class Corpus:
    root: str
    good: list[str] = field(default_factory=list)  # files that must be indexed
    bad: dict[str, str] = field(default_factory=dict)  # path -> kind, must be skipped (one line each)
    ignored: list[str] = field(default_factory=list)  # entries never reported (dir symlinks: not followed)
    notes: list[str] = field(default_factory=list)  # cases that could not be made here (e.g. as root)

    @property
    def bad_kinds(self) -> set[str]:
        return set(self.bad.values())


def running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _pattern(seed: int, w: int = SIZE, h: int = SIZE, cls: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.zeros((h, w, 3), np.float64)
    yy, xx = np.mgrid[0:h, 0:w]
    if cls == 0:  # horizontal stripes, reddish
        base[..., 0] = 180 + 60 * np.sin(yy / 2.0)
        base[..., 1] = 60
    else:  # vertical stripes, bluish
        base[..., 2] = 180 + 60 * np.sin(xx / 2.0)
        base[..., 1] = 90
    base += rng.normal(0, 20, base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


def _save(img: Image.Image, path: str, fmt: str | None = None, **kw) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, format=fmt, **kw)
    return path


def _bytes_of(img: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, format=fmt, **kw)
    return b.getvalue()


def plain_images(root: str, per_class: int = 6, seed: int = 0, classes=("a_class", "b_class")) -> list[str]:
    """Ordinary RGB PNG/JPEG images, ``per_class`` in each class subfolder."""
    out = []
    for c, name in enumerate(classes):
        for i in range(per_class):
            arr = _pattern(seed * 1000 + c * 100 + i, cls=c)
            ext = ".png" if i % 2 == 0 else ".jpg"
            out.append(_save(Image.fromarray(arr), os.path.join(root, name, f"img{seed}_{i:03d}{ext}")))
    return out


def make_good(root: str, per_class: int = 6, seed: int = 0) -> Corpus:
    """Valid images, ordinary and unusual; every one of them must be indexed."""
    c = Corpus(root)
    c.good += plain_images(root, per_class, seed)
    a = os.path.join(root, "a_class")
    b = os.path.join(root, "b_class")
    rgb = Image.fromarray(_pattern(seed + 7, cls=0))
    c.good.append(_save(rgb.convert("CMYK"), os.path.join(a, "cmyk.jpg"), "JPEG"))
    arr16 = (_pattern(seed + 8, cls=1)[..., 2].astype(np.uint16) * 257)
    c.good.append(_save(Image.fromarray(arr16), os.path.join(b, "sixteen_bit.png"), "PNG"))
    c.good.append(_save(rgb.convert("P", palette=Image.ADAPTIVE, colors=16), os.path.join(a, "palette.png")))
    p = rgb.convert("P", palette=Image.ADAPTIVE, colors=16)
    c.good.append(_save(p, os.path.join(a, "palette_transparent.png"), transparency=0))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.arange(SIZE, dtype=np.uint8) * 10, (SIZE, 1))))
    c.good.append(_save(rgba, os.path.join(a, "alpha_rgba.png")))
    c.good.append(_save(rgba.convert("LA"), os.path.join(b, "alpha_la.png")))
    c.good.append(_save(Image.new("RGB", (1, 1), (200, 10, 10)), os.path.join(a, "one_pixel.png")))
    wide = np.tile(_pattern(seed + 9, 40, 2, 1), (1, 100, 1))  # 4000 x 2
    c.good.append(_save(Image.fromarray(wide), os.path.join(b, "very_wide.png")))
    c.good.append(_save(Image.fromarray(np.ascontiguousarray(wide.transpose(1, 0, 2))), os.path.join(b, "very_tall.png")))
    c.good.append(_save(Image.fromarray(_pattern(seed + 10, cls=0)).convert("L"), os.path.join(a, "gray.jpg")))
    c.good.append(_save(Image.fromarray(_pattern(seed + 11, cls=1)), os.path.join(b, "file with  spaces.png")))
    c.good.append(_save(Image.fromarray(_pattern(seed + 12, cls=1)), os.path.join(b, "ünïcødé 名前.png")))
    # a name that is not valid UTF-8 (bytes on disk; Python sees surrogate escapes)
    raw = os.path.join(os.fsencode(b), b"latin1-\xe9\xff.png")
    with open(raw, "wb") as f:
        f.write(_bytes_of(Image.fromarray(_pattern(seed + 13, cls=1)), "PNG"))
    c.good.append(os.fsdecode(raw))
    # duplicates: same bytes under two names (both are indexed; they are different paths)
    dup_src = c.good[0]
    with open(dup_src, "rb") as f:
        data = f.read()
    dup = os.path.join(a, "zz_duplicate" + os.path.splitext(dup_src)[1])
    with open(dup, "wb") as f:
        f.write(data)
    c.good.append(dup)
    # a valid symlink to an image (indexed under the link's path)
    link = os.path.join(a, "zz_link_to_first.png")
    os.symlink(os.path.abspath(c.good[0]), link)
    c.good.append(link)
    # uppercase extension
    c.good.append(_save(Image.fromarray(_pattern(seed + 14, cls=0)), os.path.join(a, "UPPER.PNG"), "PNG"))
    return c


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG file whose header declares ``width`` x ``height`` pixels (RGB 8-bit)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def crafted_png(width: int, height: int, color_type: int = 0) -> bytes:
    """A valid all-black PNG of any size that stays small (zlib of zero rows), written
    without ever holding the raster: ``color_type`` 0 = L, 2 = RGB, 6 = RGBA (8-bit).
    A 9400 x 9400 grayscale one is the tryout's 86 KB upload."""
    bpp = {0: 1, 2: 3, 6: 4}[color_type]
    co = zlib.compressobj(9)
    row = b"\0" * (1 + width * bpp)
    idat = b"".join([co.compress(row) for _ in range(height)] + [co.flush()])
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


_MEASURE_DECODE = r"""
import inspect, json, resource, sys, threading
sys.path.insert(0, sys.argv[1])
from deephash_faiss.data import decode_image
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
data = open(sys.argv[2], "rb").read()
threads, max_pixels, size, repeat = int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
kw = {} if max_pixels == "none" or "max_pixels" not in inspect.signature(decode_image).parameters else \
    {"max_pixels": int(max_pixels)}
peak0, rss0, errors = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rss(), []
def go():
    for _ in range(repeat):
        try:
            decode_image(data, size, **kw)
        except Exception as err:
            errors.append(f"{type(err).__name__}: {err}")
workers = [threading.Thread(target=go) for _ in range(threads)]
[t.start() for t in workers]
[t.join() for t in workers]
print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - peak0,
                  "after_mib": rss() - rss0, "errors": errors}))
"""


def measure_decode(path: str, threads: int = 1, max_pixels: int | None = None, size: int = 224,
                   repeat: int = 2, repo: str | None = None) -> dict:
    """Decode the file ``path`` with ``data.decode_image`` in a fresh Python process:
    ``threads`` threads at once, each ``repeat`` times in a row (as a server does: glibc
    keeps the memory of a second large decode where it mmapped the first). ``repo``: the
    checkout to import (default this one; an older one without ``max_pixels`` is called
    without it).

    Returns {"peak_mib": growth of the process's peak RSS, "after_mib": growth of its RSS
    once the decodes are done, "errors": ["Type: message", ...]}. Linux only (/proc)."""
    import json
    import subprocess
    import sys

    repo = repo or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _MEASURE_DECODE, repo, path, str(threads),
                          "none" if max_pixels is None else str(max_pixels), str(size), str(repeat)],
                         capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"measurement failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout)


def make_bad(root: str, cls_dirs=("a_class", "b_class")) -> Corpus:
    """Files that must be skipped with a reason (never crash, never indexed)."""
    c = Corpus(root)
    a = os.path.join(root, cls_dirs[0])
    b = os.path.join(root, cls_dirs[1])
    for d in (a, b):
        os.makedirs(d, exist_ok=True)

    def put(path: str, data: bytes, kind: str) -> None:
        with open(path, "wb") as f:
            f.write(data)
        c.bad[path] = kind

    img = Image.fromarray(_pattern(99, 64, 64, 0))
    jpg, png = _bytes_of(img, "JPEG", quality=90), _bytes_of(img, "PNG")
    put(os.path.join(a, "empty.jpg"), b"", "zero-byte file")
    put(os.path.join(b, "empty.png"), b"", "zero-byte file")
    put(os.path.join(a, "truncated.jpg"), jpg[: len(jpg) // 2], "truncated JPEG")
    put(os.path.join(b, "truncated.png"), png[: len(png) // 2], "truncated PNG")
    put(os.path.join(a, "header_only.png"), png[:40], "PNG header only")
    put(os.path.join(a, "notes.jpg"), b"this is a text file, not an image\n" * 10, "text named .jpg")
    put(os.path.join(b, "page.png"), b"<html><body>not a png</body></html>\n", "HTML named .png")
    max_px = Image.MAX_IMAGE_PIXELS or 89_478_485
    side = int((2 * max_px) ** 0.5) + 100  # past 2x the limit: PIL raises DecompressionBombError
    put(os.path.join(a, "bomb.png"), bomb_png(side, side), "decompression bomb (error)")
    side1 = int((1.5 * max_px) ** 0.5)  # between 1x and 2x the limit: PIL only warns
    put(os.path.join(b, "bomb_warn.png"), bomb_png(side1, side1), "decompression bomb (warning)")
    put(os.path.join(b, "huge_header.png"), bomb_png(2**31 - 1, 2**31 - 1), "absurd declared size")
    os.symlink(os.path.join(root, "does-not-exist.png"), os.path.join(a, "broken_link.png"))
    c.bad[os.path.join(a, "broken_link.png")] = "broken symlink"
    os.symlink("self_loop.jpg", os.path.join(b, "self_loop.jpg"))
    c.bad[os.path.join(b, "self_loop.jpg")] = "symlink loop (file)"
    os.symlink(os.path.join(root, "missing.jpg"), os.path.join(root, "top_broken.jpg"))
    c.bad[os.path.join(root, "top_broken.jpg")] = "broken symlink (top level)"
    loop = os.path.join(a, "loop_dir")
    os.symlink("..", loop)  # a directory symlink pointing to its parent
    c.bad[loop] = "symlink loop (directory)"
    os.makedirs(os.path.join(b, "folder.jpg"))  # an (empty) folder with an image-like name: just walked
    c.ignored.append(os.path.join(b, "folder.jpg"))
    if hasattr(os, "mkfifo"):
        fifo = os.path.join(b, "pipe.png")
        os.mkfifo(fifo)
        c.bad[fifo] = "FIFO named .png"
    if running_as_root():
        c.notes.append("chmod 000 file not made: running as root, where permissions do not block reads")
    else:
        p = os.path.join(a, "unreadable.png")
        put(p, png, "unreadable (chmod 000)")
        os.chmod(p, 0)
    return c


def train_tiny_model(images_root: str, out: str, bits: int = 16, seed: int = 0) -> str:
    """A 1-epoch smallcnn on ``images_root`` (two classes): fast, deterministic enough for tests."""
    from deephash_faiss import api

    api.train_model(images_root, out, backbone="smallcnn", bits=bits, weights="none", epochs=1, batch_size=8,
                    progress=False, device="cpu", seed=seed, val_fraction=0.0)
    return out


def read_index(index_dir: str) -> dict:
    """Everything an index holds, by row: codes, features, ids, paths, labels, deleted, count."""
    from deephash_faiss.store import FeatureStore, read_manifest

    m = read_manifest(index_dir)
    st = FeatureStore(index_dir, m)
    return {"codes": st.codes(), "features": st.load_features(), "paths": st.paths(), "labels": st.labels(),
            "count": st.count, "deleted": list(m.get("deleted", [])), "ids": np.arange(st.count)}


def search_all(index_dir: str, qcodes: np.ndarray, qfeats: np.ndarray, k: int = 5) -> dict:
    """BCS / HDS / ES results (ids and paths) for fixed query codes and features."""
    from deephash_faiss.search import Searcher

    s = Searcher(index_dir, device="cpu")
    paths = s.store.paths()
    out = {}
    for mode in ("bcs", "hds", "es"):
        b = s.search(mode, qcodes, qfeats, k=min(k, s.live_count()))
        out[mode] = [[paths[i] for i in r.ids] for r in b.results]
    return out
