"""A tiny index for the serve, browser and load tests (built once per test session)."""

from __future__ import annotations

import contextlib
import os
import socket

import numpy as np

CLASSES = ("circles", "stripes", "checks")


def draw(cls: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """One generated image of class ``cls`` (0..2): uint8 [size, size, 3].

    circles: a red disc on yellow; stripes: green/white horizontal bands; checks: a blue/black
    checkerboard. Position, scale and noise vary per image.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    img = np.zeros((size, size, 3))
    if cls == 0:
        cy, cx = rng.uniform(size * .35, size * .65, 2)
        r = rng.uniform(size * .2, size * .35)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img[:] = (240, 210, 60)
        img[disc] = (210, 40, 40)
    elif cls == 1:
        period = rng.integers(4, 8)
        band = ((yy + rng.integers(0, period)) // (period / 2)) % 2 == 0
        img[:] = (235, 240, 235)
        img[band] = (40, 160, 70)
    else:
        cell = rng.integers(3, 6)
        chk = ((yy // cell + xx // cell) % 2) == 0
        img[:] = (20, 20, 30)
        img[chk] = (60, 90, 220)
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_images(root: str, per_class: int = 20, seed: int = 0) -> list[str]:
    """Write ``root/<class>/<i>.png`` (3 classes); returns the paths."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for c, name in enumerate(CLASSES):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            p = os.path.join(root, name, f"{i:03d}.png")
            Image.fromarray(draw(c, rng)).save(p)
            paths.append(p)
    return paths


def build_tiny_index(base: str, per_class: int = 20, bits: int = 16, epochs: int = 3) -> str:
    """Generate images under ``base/images``, train a smallcnn, index them into ``base/index``.

    Reuses ``base/index`` when its manifest exists (so several test files share one build).
    Returns the index directory.
    """
    from deephash_faiss import api

    index_dir = os.path.join(base, "index")
    if os.path.exists(os.path.join(index_dir, "manifest.json")):
        return index_dir
    import torch

    images = os.path.join(base, "images")
    write_images(images, per_class)
    model = os.path.join(base, "model.pt")
    # Tiny batches train far faster on one thread than on two contended ones (spin waits).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        api.train_model(images, model, backbone="smallcnn", bits=bits, epochs=epochs, batch_size=8, lr=0.05,
                        device="cpu", progress=False, val_fraction=0.0, hflip=False)
        api.build_index(images, index_dir, model, device="cpu", progress=False)
    finally:
        torch.set_num_threads(threads)
    return index_dir


def write_query(path: str, cls: int, seed: int = 123, fmt: str | None = None) -> str:
    """A fresh query image of class ``cls`` (not in the index) at ``path``."""
    from PIL import Image

    Image.fromarray(draw(cls, np.random.default_rng(seed), size=48)).save(path, format=fmt)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_in_thread(app, limit_s: float = 20.0):
    """Run ``app`` with uvicorn on 127.0.0.1 (a free port) in a daemon thread; yields the port.
    Raises RuntimeError when it does not start within ``limit_s``."""
    import threading
    import time

    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    deadline = time.monotonic() + limit_s
    while not srv.started:
        if time.monotonic() > deadline or not t.is_alive():
            srv.should_exit = True
            raise RuntimeError(f"the server did not start within {limit_s:g} s")
        time.sleep(0.05)
    try:
        yield port
    finally:
        srv.should_exit = True
        t.join(10)
