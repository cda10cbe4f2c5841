"""Make a photo-sized JPEG set (640x480, quality 90) from the CIFAR-10 archive.

Each output image is a 4 x 3 grid of distinct CIFAR-10 train images, each upscaled to
160 x 160 (bicubic): real image content at a photo's size and JPEG statistics. The class
folder is the class of the grid's first tile. The first 4,166 photos use every train image
once, in archive order; beyond that the tiles are reused in a new shuffled order per round
(``--n 40000``: every photo still a distinct grid). ``--workers`` processes encode in parallel.

    python benchmarks/make_photos.py --archive /work/shared/data/cifar10-jpg.tar.gz \
        --n 4000 --out /tmp/photos

Also writes ``--cifar-out DIR`` (optional): the first ``--cifar-n`` CIFAR-10 train images
extracted as they are (for the small-image benchmark).
"""
from __future__ import annotations

import argparse
import io
import os
import tarfile
from multiprocessing import get_context

import numpy as np
from PIL import Image


def cifar_members(archive: str, split: str = "train"):
    """Yield (class name, JPEG bytes) of the archive's ``cifar10/<split>/<class>/*.jpg``,
    classes interleaved (deterministic: sorted by name, then round-robin over classes)."""
    by_class: dict[str, list[tuple[str, bytes]]] = {}
    with tarfile.open(archive) as tf:
        for m in tf:
            parts = m.name.split("/")
            if m.isfile() and len(parts) >= 4 and parts[-3] == split and parts[-1].endswith(".jpg"):
                by_class.setdefault(parts[-2], []).append((parts[-1], tf.extractfile(m).read()))
    lists = [sorted(v) for _, v in sorted(by_class.items())]
    names = sorted(by_class)
    for j in range(max(len(v) for v in lists)):
        for c, v in zip(names, lists):
            if j < len(v):
                yield c, v[j][1]


_TILES: list[tuple[str, bytes]] = []
_OUT, _QUALITY = "", 90


def photo_tiles(i: int, n_tiles: int) -> list[int]:
    """The 12 tile indices of photo ``i``: consecutive in round 0, a shuffled order after."""
    r, at = divmod(12 * i, n_tiles - n_tiles % 12)
    order = np.arange(n_tiles) if r == 0 else np.random.default_rng(r).permutation(n_tiles)
    return [int(order[at + t]) for t in range(12)]


def _write_range(span: tuple[int, int]) -> None:
    for i in range(*span):
        canvas = np.zeros((480, 640, 3), np.uint8)
        group = [_TILES[j] for j in photo_tiles(i, len(_TILES))]
        for t, (_, data) in enumerate(group):
            img = Image.open(io.BytesIO(data)).convert("RGB").resize((160, 160), Image.BICUBIC)
            r, col = divmod(t, 4)
            canvas[r * 160:(r + 1) * 160, col * 160:(col + 1) * 160] = np.asarray(img)
        d = os.path.join(_OUT, group[0][0])
        os.makedirs(d, exist_ok=True)
        Image.fromarray(canvas).save(os.path.join(d, f"{i:05d}.jpg"), quality=_QUALITY)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archive", default="/work/shared/data/cifar10-jpg.tar.gz")
    ap.add_argument("--n", type=int, default=4000, help="photo-sized images to write")
    ap.add_argument("--out", default=None, help="folder for the photo-sized set")
    ap.add_argument("--cifar-out", default=None, help="also extract CIFAR-10 train images here")
    ap.add_argument("--cifar-n", type=int, default=50_000)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes writing photos")
    a = ap.parse_args()
    tiles: list[tuple[str, bytes]] = []
    need = 1 << 62 if a.out else 0  # every train image: tiles are reused beyond 4,166 photos
    for k, (c, data) in enumerate(cifar_members(a.archive)):
        if a.cifar_out and k < a.cifar_n:
            d = os.path.join(a.cifar_out, c)
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, f"{k:05d}.jpg"), "wb") as f:
                f.write(data)
        if len(tiles) < need:
            tiles.append((c, data))
        if len(tiles) >= need and (not a.cifar_out or k + 1 >= a.cifar_n):
            break
    if a.out:
        global _TILES, _OUT, _QUALITY
        _TILES, _OUT, _QUALITY = tiles, a.out, a.quality
        with get_context("fork").Pool(max(1, a.workers)) as pool:
            for _ in pool.imap_unordered(_write_range, [(lo, min(a.n, lo + 256)) for lo in range(0, a.n, 256)]):
                pass
        print(f"wrote {a.n} photo-sized JPEGs (640x480 q{a.quality}) to {a.out}")
    if a.cifar_out:
        print(f"extracted {min(a.cifar_n, k + 1)} CIFAR-10 train images to {a.cifar_out}")


if __name__ == "__main__":
    main()
