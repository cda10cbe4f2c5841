"""Published numbers of the paper (Lin et al., CVPRW 2015) and of the baselines it compares with.

Only numbers, no code. All values are fractions in [0, 1] unless a name says
``_PERCENT``.

Sources
-------
* ``CIFAR10_48BIT_PRECISION_AT_K``: the official repository
  ``kevinlin311tw/caffe-cvprw15``, folder ``analysis/``, files
  ``<METHOD>-p-at-k.txt`` (commit 0d9846670c3fa826d2e29356d0535bfbbed6b415),
  one ``k precision`` pair a line. These are the baseline curves that
  ``analysis/plot-p-at-k.gnuplot`` draws next to "Ours" in the paper's CIFAR-10
  precision@k figure (48-bit codes). The files hold only k = 100, 200, 400,
  600, 800, 1000 and two or three significant digits (they appear to be read
  off the published figures of the baseline papers); the official plot draws
  straight lines between them. Nothing here is interpolated.
* ``CIFAR10_MAP_AT_1000_PERCENT``: the paper's CIFAR-10 mAP@1000 of the
  proposed method per code length, as quoted in this project's
  ``DESIGN.md``/data README (the official protocol: 10,000 test queries against
  the 50,000 training images, Hamming ranking, mAP over the top 1000).
* MNIST: the per-method numbers of the paper's MNIST table were not found in
  the official repository (it holds CIFAR-10 files only), so none are given
  here rather than numbers from memory.
"""

from __future__ import annotations

__all__ = [
    "BASELINE_SOURCE",
    "CIFAR10_48BIT_PRECISION_AT_K",
    "CIFAR10_MAP_AT_1000",
    "CIFAR10_MAP_AT_1000_PERCENT",
    "MNIST_MAP_PERCENT",
    "PAPER_ANCHORS",
    "baseline_precision_at_k",
]

#: Where the precision@k curves come from (repository, folder, commit).
BASELINE_SOURCE = (
    "github.com/kevinlin311tw/caffe-cvprw15, analysis/<METHOD>-p-at-k.txt "
    "(commit 0d9846670c3fa826d2e29356d0535bfbbed6b415)"
)

#: CIFAR-10, 48-bit codes: method -> {k: precision@k}. Source: BASELINE_SOURCE.
#: Order as in the official plot's legend.
CIFAR10_48BIT_PRECISION_AT_K: dict[str, dict[int, float]] = {
    # analysis/CNNH+-p-at-k.txt
    "CNNH+": {100: 0.59, 200: 0.595, 400: 0.599, 600: 0.602, 800: 0.605, 1000: 0.608},
    # analysis/CNNH-p-at-k.txt
    "CNNH": {100: 0.58, 200: 0.585, 400: 0.589, 600: 0.592, 800: 0.595, 1000: 0.598},
    # analysis/KSH-p-at-k.txt
    "KSH": {100: 0.45, 200: 0.45, 400: 0.451, 600: 0.45, 800: 0.449, 1000: 0.45},
    # analysis/ITQ-CCA-p-at-k.txt
    "ITQ-CCA": {100: 0.40, 200: 0.40, 400: 0.398, 600: 0.395, 800: 0.390, 1000: 0.388},
    # analysis/MLH-p-at-k.txt
    "MLH": {100: 0.37, 200: 0.36, 400: 0.358, 600: 0.355, 800: 0.351, 1000: 0.34},
    # analysis/BRE-p-at-k.txt
    "BRE": {100: 0.32, 200: 0.319, 400: 0.314, 600: 0.31, 800: 0.305, 1000: 0.30},
    # analysis/ITQ-p-at-k.txt
    "ITQ": {100: 0.305, 200: 0.30, 400: 0.29, 600: 0.285, 800: 0.283, 1000: 0.28},
    # analysis/SH-p-at-k.txt
    "SH": {100: 0.25, 200: 0.23, 400: 0.22, 600: 0.21, 800: 0.20, 1000: 0.19},
    # analysis/LSH-p-at-k.txt
    "LSH": {100: 0.18, 200: 0.17, 400: 0.168, 600: 0.166, 800: 0.164, 1000: 0.162},
}

#: The paper's CIFAR-10 mAP@1000 of the proposed method (percent) by code length.
CIFAR10_MAP_AT_1000_PERCENT: dict[int, float] = {
    12: 89.30,
    16: 89.77,
    32: 89.72,
    48: 89.73,
    64: 89.79,
    128: 89.68,
}

#: Same as CIFAR10_MAP_AT_1000_PERCENT, as fractions (what ``metrics`` returns).
CIFAR10_MAP_AT_1000: dict[int, float] = {
    bits: round(v / 100.0, 6) for bits, v in CIFAR10_MAP_AT_1000_PERCENT.items()
}

#: MNIST numbers of the paper: not found in the official repository; left empty
#: on purpose rather than filled from memory.
MNIST_MAP_PERCENT: dict[int, float] = {}

#: Handy single numbers for reports (48-bit CIFAR-10).
PAPER_ANCHORS: dict[str, float] = {
    "cifar10_48bit_map_at_1000": CIFAR10_MAP_AT_1000[48],
    "cnnh+_48bit_p_at_100": CIFAR10_48BIT_PRECISION_AT_K["CNNH+"][100],
    "cnnh+_48bit_p_at_1000": CIFAR10_48BIT_PRECISION_AT_K["CNNH+"][1000],
}


def baseline_precision_at_k(
    dataset: str = "cifar10", bits: int = 48
) -> dict[str, dict[int, float]]:
    """Copies of the published precision@k curves: method -> {k: precision}.

    Only CIFAR-10 at 48 bits is published in the official repository; other
    combinations raise ``KeyError``.
    """
    if dataset.lower().replace("-", "") != "cifar10" or int(bits) != 48:
        raise KeyError(
            f"no published precision@k baselines for dataset={dataset!r}, bits={bits} "
            "(only cifar10 at 48 bits)"
        )
    return {name: dict(curve) for name, curve in CIFAR10_48BIT_PRECISION_AT_K.items()}
