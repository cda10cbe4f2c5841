"""Make a photo-sized JPEG set (640x480, quality 90) from the CIFAR-10 archive.

Each output image is a 4 x 3 grid of distinct CIFAR-10 train images, each upscaled to
160 x 160 (bicubic): real image content at a photo's size and JPEG statistics. The class
folder is the class of the grid's first tile.

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archive", default="/work/shared/data/cifar10-jpg.tar.gz")
    ap.add_argument("--n", type=int, default=4000, help="photo-sized images to write")
    ap.add_argument("--out", default=None, help="folder for the photo-sized set")
    ap.add_argument("--cifar-out", default=None, help="also extract CIFAR-10 train images here")
    ap.add_argument("--cifar-n", type=int, default=50_000)
    ap.add_argument("--quality", type=int, default=90)
    a = ap.parse_args()
    tiles: list[tuple[str, bytes]] = []
    need = 12 * a.n if a.out else 0
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
        if len(tiles) < need:
            raise SystemExit(f"the archive has {len(tiles)} images; {need} needed for {a.n} photos")
        for i in range(a.n):
            canvas = np.zeros((480, 640, 3), np.uint8)
            group = tiles[12 * i:12 * i + 12]
            for t, (_, data) in enumerate(group):
                img = Image.open(io.BytesIO(data)).convert("RGB").resize((160, 160), Image.BICUBIC)
                r, col = divmod(t, 4)
                canvas[r * 160:(r + 1) * 160, col * 160:(col + 1) * 160] = np.asarray(img)
            d = os.path.join(a.out, group[0][0])
            os.makedirs(d, exist_ok=True)
            Image.fromarray(canvas).save(os.path.join(d, f"{i:05d}.jpg"), quality=a.quality)
        print(f"wrote {a.n} photo-sized JPEGs (640x480 q{a.quality}) to {a.out}")
    if a.cifar_out:
        print(f"extracted {min(a.cifar_n, k + 1)} CIFAR-10 train images to {a.cifar_out}")


if __name__ == "__main__":
    main()
