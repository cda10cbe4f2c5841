"""Plots for retrieval results: precision@k, precision-recall, query grids.

matplotlib is imported lazily inside each function and drawn through the Agg
canvas directly (``matplotlib.figure.Figure`` + ``FigureCanvasAgg``), so these
functions work headless, from threads, and never change the global pyplot
backend of the caller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np

__all__ = ["plot_pr_curve", "plot_precision_at_k", "plot_query_grid"]

ImageLike = Union[np.ndarray, str, Path]


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Union[str, Path], dpi: int = 120) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=dpi, bbox_inches="tight")
    return path


def plot_precision_at_k(
    curves: Mapping[str, Mapping[int, float]],
    path: Union[str, Path],
    title: str = "Image retrieval precision@k",
    *,
    ours: Sequence[str] | None = None,
) -> Path:
    """Precision@k curves, one line per method / search mode.

    Args:
        curves: name -> {k: precision in [0, 1]} (e.g. our BCS/HDS/ES results
            plus ``baselines.baseline_precision_at_k()``).
        path: output image file (PNG by extension).
        title: figure title.
        ours: names drawn thick with markers; default: names not in the
            published baselines.

    Returns:
        The written path.
    """
    from . import baselines

    if ours is None:
        ours = [n for n in curves if n not in baselines.CIFAR10_48BIT_PRECISION_AT_K]
    fig = _new_figure(6.4, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    for name, curve in curves.items():
        if not curve:
            continue
        ks = sorted(int(k) for k in curve)
        vals = [float(curve[k]) for k in ks]
        mine = name in ours
        ax.plot(
            ks,
            vals,
            label=name,
            linewidth=2.6 if mine else 1.4,
            marker="o" if mine else None,
            markersize=4,
            linestyle="-" if mine else "--",
        )
    ax.set_xlabel("# of top images retrieved (k)")
    ax.set_ylabel("Precision")
    ax.set_ylim(0.0, 1.0)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    return _save(fig, path)


def plot_pr_curve(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: Union[str, Path],
    title: str = "Precision-recall",
) -> Path:
    """Precision-recall curves.

    Args:
        curves: name -> (recall [P] floats, precision [P] floats), e.g.
            ``(res["pr_curve"]["recall"], res["pr_curve"]["precision"])`` from
            ``metrics.evaluate_codes``.
        path: output image file.
        title: figure title.

    Returns:
        The written path.
    """
    fig = _new_figure(5.6, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    for name, (recall, precision) in curves.items():
        r = np.asarray(recall, dtype=float)
        p = np.asarray(precision, dtype=float)
        if r.shape != p.shape:
            raise ValueError(f"{name}: recall and precision lengths differ ({r.shape} vs {p.shape})")
        ax.plot(r, p, label=name, linewidth=2.0, marker=".", markersize=4)
    ax.set_xlabel("Recall")
    ax.set_ylabel("Precision")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def _load_image(img: ImageLike) -> np.ndarray:
    """HxWx3 uint8 RGB from an array (HxW, HxWx1, HxWx3, HxWx4) or an image file."""
    if isinstance(img, (str, Path)):
        from PIL import Image

        from .data import PIL_FORMATS

        with Image.open(img, formats=PIL_FORMATS) as im:
            return np.asarray(im.convert("RGB"))
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {arr.shape}")
    return arr


def _framed(ax, color: str, width: float) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_edgecolor(color)
        spine.set_linewidth(width)


def plot_query_grid(
    query_images: Sequence[ImageLike],
    results: Sequence[Sequence[tuple]],
    path: Union[str, Path],
    k: int = 10,
    title: str | None = None,
) -> Path:
    """A grid of queries and their top-k results.

    Each row: the query (black frame), then its first ``k`` results, right ones
    in a green frame, wrong ones in a red frame.

    Args:
        query_images: one per row; HxWx3 uint8 arrays (HxW grayscale and float
            images in [0, 1] are converted) or image file paths.
        results: per query, a list of ``(image, correct: bool)`` or
            ``(image, correct, caption)`` tuples, best first.
        path: output image file.
        k: results shown per row.
        title: optional figure title.

    Returns:
        The written path.
    """
    if len(query_images) != len(results):
        raise ValueError(f"{len(query_images)} queries but {len(results)} result lists")
    if k < 1:
        raise ValueError("k must be >= 1")
    rows = max(1, len(query_images))
    cols = k + 1
    fig = _new_figure(1.3 * cols, 1.4 * rows + (0.4 if title else 0.0))
    for r, (q_img, res) in enumerate(zip(query_images, results)):
        ax = fig.add_subplot(rows, cols, r * cols + 1)
        ax.imshow(_load_image(q_img), interpolation="nearest")
        _framed(ax, "black", 2.0)
        ax.set_title("query", fontsize=8)
        for c in range(k):
            ax = fig.add_subplot(rows, cols, r * cols + c + 2)
            if c >= len(res):
                ax.axis("off")
                continue
            item = res[c]
            img, correct = item[0], bool(item[1])
            ax.imshow(_load_image(img), interpolation="nearest")
            _framed(ax, "#1a9641" if correct else "#d7191c", 4.0)
            if len(item) > 2 and item[2] is not None:
                ax.set_title(str(item[2]), fontsize=7)
    if title:
        fig.suptitle(title)
    fig.subplots_adjust(wspace=0.08, hspace=0.25)
    return _save(fig, path, dpi=100)
