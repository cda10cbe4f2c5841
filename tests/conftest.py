"""Shared fixtures: small generated labelled image folders (no ../shared needed)."""

from __future__ import annotations

import os

import numpy as np
import pytest


def make_image_folder(root, classes=("red", "green", "blue"), per_class=24, size=24, seed=0, ext=".png"):
    """Write ``root/<class>/<i>.png``: each class a distinct colour and stripe pattern plus noise.

    Returns the list of written paths.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = {
        0: np.array([200, 40, 40]), 1: np.array([40, 190, 60]), 2: np.array([50, 60, 210]),
        3: np.array([200, 200, 50]), 4: np.array([160, 60, 190]),
    }
    paths = []
    for c, name in enumerate(classes):
        d = os.path.join(root, name)
        os.makedirs(d, exist_ok=True)
        for i in range(per_class):
            img = np.tile(base[c % 5], (size, size, 1)).astype(np.float64)
            stripes = (np.arange(size) // (2 + c)) % 2
            img[stripes.astype(bool)] *= 0.55
            img += rng.normal(0, 18, img.shape)
            p = os.path.join(d, f"{i:03d}{ext}")
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p)
            paths.append(p)
    return paths


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    make_image_folder(str(root))
    return str(root)


@pytest.fixture(scope="session")
def trained_model(image_folder, tmp_path_factory):
    """A smallcnn with 16-bit codes trained 2 epochs on ``image_folder`` (CPU, a few seconds)."""
    from deephash_faiss import api

    out = str(tmp_path_factory.mktemp("model") / "model.pt")
    api.train_model(image_folder, out, backbone="smallcnn", bits=16, epochs=3, batch_size=16, lr=0.05,
                    device="cpu", progress=False, val_fraction=0.0)
    return out
