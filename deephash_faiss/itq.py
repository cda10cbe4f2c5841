"""Binary codes learned without labels: PCA + ITQ (Gong & Lazebnik, CVPR 2011) on fc7.

ITQ centres the features, projects them on the top ``bits`` principal directions and
rotates that projection so that binarising it by sign loses the least (an orthogonal
Procrustes iteration). The whole map is one linear function::

    code bits = sign(W (x - mean)) > 0,     W float32 [bits, D] (PCA then rotation)

It is stored as the model's latent layer H so the rest of the pipeline (codes = H > 0.5,
queries encoded like the database) is unchanged::

    H(x) = sigmoid(s * W (x - mean)) = sigmoid(Linear(x)),  weight = s W, bias = -s W mean

``s > 0`` only scales H away from 0.5 (it does not change a code). The fitting is
faiss's ``PCAMatrix`` (on the centred features) then ``ITQMatrix`` (50 iterations).
"""

from __future__ import annotations

import numpy as np

from .errors import DhfError

#: Code length of unsupervised models when none is asked for (measured in
#: benchmarks/bench_unsupervised.py; docs/results.md "Unlabelled folders").
DEFAULT_UNSUPERVISED_BITS = 128


def fit_itq(features: np.ndarray, bits: int, seed: int = 0, max_train: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fit PCA + ITQ on features.

    Args:
        features: float [n, D] (fc7 of the images), n >= 2.
        bits: code length (<= D and <= n).
        seed: ITQ's random initial rotation.
        max_train: at most this many rows are used (default: faiss's 10 per dimension,
            at least 20,000).
    Returns:
        (mean float32 [D], W float32 [bits, D]): code bit j of x is ``(W (x - mean))[j] > 0``.
    """
    import faiss

    x = np.ascontiguousarray(features, dtype=np.float32)
    if x.ndim != 2 or len(x) < 2:
        raise DhfError("ITQ needs at least two feature vectors")
    n, d = x.shape
    if not 0 < bits <= d:
        raise DhfError(f"--bits {bits} must be at most the feature dimension {d} for unsupervised codes")
    check_enough_images(bits, n)
    if not np.isfinite(x).all():
        raise DhfError("features hold NaN or infinite values")
    limit = max_train or max(20_000, 10 * d)
    if n > limit:
        x = x[np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))]
    pca = faiss.PCAMatrix(d, bits)
    pca.train(x)
    mean = faiss.vector_to_array(pca.mean).astype(np.float32)
    p = faiss.vector_to_array(pca.A).reshape(-1, d)[:bits]  # rows: the top principal directions
    rot = faiss.ITQMatrix(bits)
    rot.seed = int(seed)
    rot.train(np.ascontiguousarray(pca.apply(x)))
    r = faiss.vector_to_array(rot.A).reshape(bits, bits)
    w = (r.astype(np.float64) @ p.astype(np.float64)).astype(np.float32)
    return mean, w


def check_enough_images(bits: int, n: int) -> None:
    """Refuse ``bits``-bit unsupervised codes from ``n`` images (PCA gives at most n directions)."""
    if n < 8:
        raise DhfError(f"unsupervised codes need at least 8 images (the shortest code is 8 bits), {n} given: "
                       f"add images")
    if bits > n:
        raise DhfError(f"{bits}-bit unsupervised codes need at least {bits} images ({n} given): "
                       f"add images or pass --bits {n // 8 * 8}")


def default_bits(n_images: int) -> int:
    """The code length of an unsupervised model for ``n_images`` images:
    :data:`DEFAULT_UNSUPERVISED_BITS`, lowered to a multiple of 8 within the image count
    (PCA yields at most one direction per image)."""
    return int(min(DEFAULT_UNSUPERVISED_BITS, max(8, n_images // 8 * 8)))


def projection_scale(features: np.ndarray, mean: np.ndarray, w: np.ndarray) -> float:
    """``s`` such that ``s * W (x - mean)`` has unit RMS over ``features`` (H not saturated)."""
    z = (np.asarray(features[:20_000], np.float32) - mean) @ w.T
    rms = float(np.sqrt(np.mean(z.astype(np.float64) ** 2))) if z.size else 0.0
    return 1.0 / rms if rms > 0 else 1.0


def set_latent(model, mean: np.ndarray, w: np.ndarray, scale: float = 1.0) -> None:
    """Make ``model.latent`` compute ``scale * W (x - mean)`` (in place; float32)."""
    import torch

    bits, d = w.shape
    if (model.latent.out_features, model.latent.in_features) != (bits, d):
        raise DhfError(f"ITQ projection {bits}x{d} does not fit the latent layer "
                       f"{model.latent.out_features}x{model.latent.in_features}")
    w64 = np.asarray(w, np.float64) * float(scale)
    with torch.no_grad():
        model.latent.weight.copy_(torch.from_numpy(w64.astype(np.float32)))
        model.latent.bias.copy_(torch.from_numpy((-(w64 @ np.asarray(mean, np.float64))).astype(np.float32)))


def fit_latent(model, features: np.ndarray, seed: int = 0) -> dict:
    """Fit PCA + ITQ on ``features`` float [n, D] and store it in ``model.latent``.

    Returns a summary: {"method", "bits", "n_train", "scale"}.
    """
    mean, w = fit_itq(features, model.config.bits, seed)
    s = projection_scale(features, mean, w)
    set_latent(model, mean, w, s)
    return {"method": "pca-itq", "bits": int(w.shape[0]), "n_train": int(min(len(features), max(20_000, 10 * w.shape[1]))),
            "scale": s}
