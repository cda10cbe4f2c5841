"""Grow a real index to N rows keeping its statistics (the "real-statistics generator").

Supervised hash codes collapse a class onto a few codes with a long tail of rare ones, and
new rare codes keep appearing as the database grows. :func:`grow` reproduces that per class:

* **Codes: a Pitman-Yor (two-parameter Chinese-restaurant) process per class**, seeded with
  the class's real code counts. A new row opens a new code with probability
  ``(theta + sigma K) / (n + theta)`` (K codes, n rows so far), else takes existing code j
  with probability ``(count_j - sigma) / (n + theta)``. ``sigma`` and ``theta`` are fitted
  per class to the real counts: ``sigma`` = the share of codes seen once (the PY limit of
  that share), ``theta`` solves E[K(n_real)] = K_real. A new code is an existing code of the
  class (drawn by count) with ``f`` bits flipped, ``f`` drawn from the real Hamming distances
  of the class's single-row codes to their nearest more frequent code. Rows are drawn in
  blocks (probabilities frozen within a block of size n / 8), so N = 1e8 takes seconds.
* **Features: the real class structure plus noise.** Each new row copies the feature of a
  real row of its class (one holding the same code when there is one, else any) plus
  Gaussian noise of ``noise`` x the class's per-dimension standard deviation. Optionally
  PCA-reduced (:func:`pca`) and stored as float16.

Queries stay the real test rows. ``spread_codes`` keeps the old generator (random class
centres + random flips: the "unsupervised codes" case).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np


@dataclass
class Seed:
    """A real index's arrays: codes uint8 [n, B], labels int [n], features float [n, D]
    (database), and the same for the queries (q_*)."""

    codes: np.ndarray
    labels: np.ndarray
    feats: np.ndarray | None
    q_codes: np.ndarray
    q_labels: np.ndarray
    q_feats: np.ndarray | None
    name: str = ""


def load_seed(source: str, dim: int | None = None) -> Seed:
    """Read a seed: the arrays of ``benchmarks/reproduce.py --export`` (codes.npz +
    feats_db_<i>.npy + feats_q.npy), a directory of .npy arrays named train_*/test_* (codes,
    labels, feats; matched loosely), or a dhf index directory (its rows are the database;
    queries = a held-out 10% of its rows)."""
    if os.path.exists(os.path.join(source, "manifest.json")):
        from deephash_faiss.store import FeatureStore, read_manifest

        m = read_manifest(source)
        st = FeatureStore(source, m)
        codes, labels, feats = st.codes(), st.labels(), np.asarray(st.load_features())
        rng = np.random.default_rng(0)
        qsel = np.zeros(len(codes), bool)
        qsel[rng.choice(len(codes), max(1, len(codes) // 10), replace=False)] = True
        return Seed(codes[~qsel], labels[~qsel], feats[~qsel], codes[qsel], labels[qsel], feats[qsel],
                    os.path.basename(os.path.abspath(source)))
    if os.path.exists(os.path.join(source, "codes.npz")):  # benchmarks/reproduce.py --export
        z = np.load(os.path.join(source, "codes.npz"))
        parts = sorted((f for f in os.listdir(source) if f.startswith("feats_db_") and f.endswith(".npy")),
                       key=lambda f: int(f[len("feats_db_"):-4]))
        feats = np.concatenate([np.load(os.path.join(source, f)) for f in parts]) if parts else None
        qf = os.path.join(source, "feats_q.npy")
        return Seed(z["db_codes"], z["db_labels"], feats, z["q_codes"], z["q_labels"],
                    np.load(qf) if os.path.exists(qf) else None, os.path.basename(os.path.abspath(source)))
    files = {f: os.path.join(source, f) for f in os.listdir(source) if f.endswith((".npy", ".npz"))}

    def pick(*words, required=True):
        for f, p in sorted(files.items()):
            low = f.lower()
            if all(w in low for w in words):
                return np.load(p)
        if required:
            raise FileNotFoundError(f"{source}: no array named like {'*'.join(words)} in {sorted(files)}")
        return None

    tr = lambda w, req=True: pick("train", w, required=req)  # noqa: E731
    te = lambda w, req=True: pick("test", w, required=req)  # noqa: E731
    return Seed(tr("code"), tr("label"), tr("feat", False), te("code"), te("label"), te("feat", False),
                os.path.basename(os.path.abspath(source)))


# ------------------------------------------------------------------------ Pitman-Yor fit

def _expected_tables(theta: float, sigma: float, n: int) -> float:
    """E[K_n] of a Pitman-Yor process (sigma > 0), of a Dirichlet process (sigma = 0:
    theta log(1 + n / theta), the large-n form)."""
    if sigma <= 1e-9:
        return theta * math.log1p(n / theta)
    lg = math.lgamma
    return theta / sigma * (math.exp(lg(theta + sigma + n) + lg(theta + 1) - lg(theta + sigma) - lg(theta + n)) - 1)


def fit_pitman_yor(counts: np.ndarray) -> tuple[float, float]:
    """(theta, sigma) for one class's code counts: sigma = share of single-row codes,
    theta from E[K(n)] = K by bisection."""
    counts = np.asarray(counts, np.int64)
    n, K = int(counts.sum()), len(counts)
    if K <= 1 or n <= 1:
        return 0.01, 0.0
    sigma = float(min(0.95, (counts == 1).sum() / K))
    lo, hi = 1e-6, 1e7
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if _expected_tables(mid, sigma, n) < K:
            lo = mid
        else:
            hi = mid
    return float(math.sqrt(lo * hi)), sigma


def _flip_distances(codes_u: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Hamming distance of each single-row code to its nearest code with more rows."""
    from deephash_faiss.index import hamming_numpy

    single = np.flatnonzero(counts == 1)
    multi = np.flatnonzero(counts > 1)
    if len(single) == 0 or len(multi) == 0:
        return np.array([1, 2, 3])
    d = hamming_numpy(codes_u[single[:2000]], codes_u[multi]).min(1)
    return np.maximum(d, 1)


@dataclass
class ClassModel:
    codes: np.ndarray     # uint8 [K, B] distinct codes of the class (grows)
    counts: np.ndarray    # int64 [K] rows per code
    root: np.ndarray      # int64 [K] the real code each code descends from
    theta: float
    sigma: float
    flips: np.ndarray     # empirical flip counts for new codes
    rows_by_code: list    # real row ids per real code


def _class_models(seed: Seed) -> dict[int, ClassModel]:
    from deephash_faiss.index import _row_keys

    out = {}
    for c in np.unique(seed.labels):
        rows = np.flatnonzero(seed.labels == c)
        keys = _row_keys(seed.codes[rows])
        _, first, inv = np.unique(keys, return_index=True, return_inverse=True)
        counts = np.bincount(inv).astype(np.int64)
        theta, sigma = fit_pitman_yor(counts)
        codes_u = seed.codes[rows[first]]
        order = np.argsort(inv, kind="stable")
        splits = np.split(rows[order], np.cumsum(counts)[:-1])
        out[int(c)] = ClassModel(codes_u.copy(), counts, np.arange(len(counts)), theta, sigma,
                                 _flip_distances(codes_u, counts), splits)
    return out


def grow_codes(seed: Seed, n: int, rng: np.random.Generator):
    """Codes for n rows: the real rows first (ids 0..n_real-1), then Pitman-Yor draws per
    class (classes in the real proportions), rows of a class in draw order.

    Returns (codes uint8 [n, B], labels int32 [n], parent int64 [n]: the real row whose
    feature the row copies, fits {class: (theta, sigma, real codes, real rows)})."""
    n0, B = seed.codes.shape
    bits = B * 8
    models = _class_models(seed)
    classes = np.array(sorted(models))
    share = np.array([len(np.concatenate(models[c].rows_by_code)) for c in classes], np.float64)
    share /= share.sum()
    extra = max(0, n - n0)
    per_class = rng.multinomial(extra, share) if extra else np.zeros(len(classes), np.int64)
    N = max(n, n0)
    codes = np.empty((N, B), np.uint8)
    labels = np.empty(N, np.int32)
    parent = np.empty(N, np.int64)
    codes[:n0], labels[:n0], parent[:n0] = seed.codes, seed.labels, np.arange(n0)
    pos = n0
    fits = {}
    for c, todo in zip(classes, per_class):
        cm = models[int(c)]
        fits[int(c)] = (cm.theta, cm.sigma, len(cm.counts), int(cm.counts.sum()))
        sizes = np.array([len(r) for r in cm.rows_by_code])
        flat_rows = np.concatenate(cm.rows_by_code)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        nc = int(cm.counts.sum())
        while todo > 0:
            b = int(min(todo, max(64, nc // 8)))
            K = len(cm.counts)
            p_new = min(1.0, (cm.theta + cm.sigma * K) / (nc + cm.theta))
            n_new = int(rng.binomial(b, p_new))
            w = np.maximum(cm.counts - cm.sigma, 1e-12)
            old = rng.choice(K, b - n_new, p=w / w.sum())
            par = rng.choice(K, n_new, p=cm.counts / cm.counts.sum())
            newc = cm.codes[par].copy()
            if n_new:
                f = rng.choice(cm.flips, n_new)
                bitsm = np.zeros((n_new, bits), np.uint8)
                for j in range(int(f.max())):
                    sel = np.flatnonzero(f > j)
                    bitsm[sel, rng.integers(0, bits, len(sel))] = 1
                newc ^= np.packbits(bitsm, axis=1, bitorder="little")
            idx = np.concatenate([old, K + np.arange(n_new)])
            rng.shuffle(idx)
            cm.codes = np.vstack([cm.codes, newc])
            cm.counts = np.concatenate([cm.counts + np.bincount(old, minlength=K), np.ones(n_new, np.int64)])
            cm.root = np.concatenate([cm.root, cm.root[par]])
            sl = slice(pos, pos + b)
            codes[sl], labels[sl] = cm.codes[idx], c
            r0 = cm.root[idx]
            parent[sl] = flat_rows[starts[r0] + (rng.random(b) * sizes[r0]).astype(np.int64)]
            pos += b
            nc += b
            todo -= b
    return codes[:n], labels[:n], parent[:n], fits


def grow_features(seed_feats: np.ndarray, labels: np.ndarray, parent: np.ndarray, noise: float,
                  rng: np.random.Generator, dtype=np.float32, out: np.ndarray | None = None,
                  chunk: int = 1 << 18) -> np.ndarray:
    """Features for grown rows: the parent real row's feature plus N(0, (noise x class std)^2)
    per dimension; real rows (parent == own id) are copied exactly."""
    n = len(parent)
    D = seed_feats.shape[1]
    base = np.asarray(seed_feats, np.float32)
    seed_labels = labels[:len(base)]
    std = np.zeros((int(labels.max()) + 1, D), np.float32)
    for c in np.unique(seed_labels):
        std[c] = base[seed_labels == c].std(0)
    if out is None:
        out = np.empty((n, D), dtype)
    n0 = len(base)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        x = base[parent[s:e]]
        grown = np.arange(s, e) >= n0
        if grown.any():
            x[grown] += noise * std[labels[s:e][grown]] * rng.standard_normal((int(grown.sum()), D), np.float32)
        out[s:e] = x
    return out


def grow_index(seed: Seed, n: int, rng: np.random.Generator, noise: float = 0.3):
    """The seed grown to n rows, codes and features (float32 in RAM), as the profile scripts use
    it: (codes uint8 [n, B], features float32 [n, D])."""
    codes, labels, parent, _ = grow_codes(seed, n, rng)
    return codes, grow_features(np.asarray(seed.feats, np.float32), labels, parent, noise, rng, np.dtype("float32"))


def grow_real(seed: Seed, n: int, dim: int, rng: np.random.Generator, noise: float = 0.3,
              queries: int | None = None):
    """The seed grown to n rows as bench_scale.py grows it (same draws from ``rng``: the same
    rows for the same seed), features PCA-reduced to ``dim`` when wider.

    Returns:
        (codes uint8 [n, B], features float32 [n, D], query codes uint8 [q, B], query features
        float32 [q, D]): the seed's first ``queries`` real queries (all by default)."""
    codes, labels, parent, _ = grow_codes(seed, n, rng)
    sf, qf = np.asarray(seed.feats, np.float32), np.asarray(seed.q_feats[:queries], np.float32)
    if sf.shape[1] > dim:
        mu, comp = pca(sf[: min(len(sf), 50_000)], dim)
        sf, qf = (sf - mu) @ comp, (qf - mu) @ comp
    feats = grow_features(sf, labels, parent, noise, rng, np.dtype("float32"))
    return codes, feats, np.ascontiguousarray(seed.q_codes[:queries]), np.ascontiguousarray(qf, np.float32)


def grow_fine_index(source: str, n: int, dim: int, rng: np.random.Generator, noise: float = 0.3,
                    queries: int | None = None, seed: int = 0):
    """:func:`grow_real` of the seed at ``source`` (draws from ``rng``), its codes in a code
    dictionary and its features in a fine index at the default cell size for n rows (k-means
    ``seed``).

    Returns:
        (codes uint8 [n, B], features float32 [n, D], query codes uint8 [q, B], query features
        float32 [q, D], the BinaryIndex ("buckets"), the FineIndex)."""
    from deephash_faiss.fine import FineIndex, default_cell_size
    from deephash_faiss.index import BinaryIndex, IndexSpec

    codes, feats, qc, qf = grow_real(load_seed(source), n, dim, rng, noise, queries)
    bidx = BinaryIndex.build(codes, IndexSpec("buckets"))
    return codes, feats, qc, qf, bidx, FineIndex.build(bidx, feats, cell_size=default_cell_size(n), seed=seed)


def grow_for_search(source: str, n: int, dim: int):
    """:func:`grow_fine_index` of the seed at ``source`` (rng seed 0), its fine index warmed,
    and the fine parameters the product uses at n rows (k = 10): the setup of the single-query
    benchmarks. Returns (features float32 [n, D], query codes uint8 [q, B], query features
    float32 [q, D], the FineIndex, its FineParams)."""
    from deephash_faiss.fine import FineParams

    _, feats, qc, qf, _, fine = grow_fine_index(source, n, dim, np.random.default_rng(0))
    fine.warm()
    return feats, qc, qf, fine, FineParams.for_rows(n, exact_max=max(10, FineParams.exact_max))


def add_grow_args(ap, n: float = 1e5, dim: int = 256) -> None:
    """The arguments of the benchmarks that grow a real index with :func:`grow_fine_index`:
    ``--source`` (a real index's export or directory), ``--n`` rows, ``--dim`` (PCA)."""
    ap.add_argument("--source", required=True, help="real arrays (reproduce.py --export) or index dir")
    ap.add_argument("--n", type=float, default=n)
    ap.add_argument("--dim", type=int, default=dim)


def pca(train: np.ndarray, dim: int):
    """(mean float32 [D], components float32 [D, dim]) of the top ``dim`` principal axes."""
    x = np.asarray(train, np.float64)
    mu = x.mean(0)
    _, _, vt = np.linalg.svd(x - mu, full_matrices=False)
    return mu.astype(np.float32), vt[:dim].T.astype(np.float32)


def spread_codes(n: int, bits: int, rng: np.random.Generator, centres: int = 100, flips: int = 4):
    """The old generator ("unsupervised" codes): random centres, 0..flips random bit flips."""
    cent = rng.integers(0, 2, (centres, bits), dtype=np.uint8)
    lab = rng.integers(0, centres, n).astype(np.int32)
    out = np.empty((n, bits // 8), np.uint8)
    for s in range(0, n, 1 << 20):
        e = min(n, s + (1 << 20))
        b = cent[lab[s:e]].copy()
        nf = rng.integers(0, flips + 1, e - s)
        for j in range(flips):
            sel = np.flatnonzero(nf > j)
            b[sel, rng.integers(0, bits, len(sel))] ^= 1
        out[s:e] = np.packbits(b, axis=1, bitorder="little")
    return out, lab


def synthetic_seed(rng: np.random.Generator, n: int = 50_000, n_query: int = 2_000, classes: int = 10,
                   bits: int = 48, dim: int = 64) -> Seed:
    """A stand-in for a real index when none is at hand (development, tests): per class a
    mode code, a Zipf-distributed set of nearby codes and single-row outliers; features =
    class mean + within-class spread."""
    B = bits // 8
    cent = rng.integers(0, 2, (classes, bits), dtype=np.uint8)
    means = rng.standard_normal((classes, dim)).astype(np.float32) * 3

    def draw(m):
        lab = rng.integers(0, classes, m).astype(np.int32)
        b = cent[lab].copy()
        nf = np.minimum(rng.zipf(1.6, m) - 1, 6)
        for j in range(6):
            sel = np.flatnonzero(nf > j)
            b[sel, rng.integers(0, bits, len(sel))] ^= 1
        f = means[lab] + rng.standard_normal((m, dim)).astype(np.float32)
        return np.packbits(b, axis=1, bitorder="little"), lab, f

    c, l, f = draw(n)
    qc, ql, qf = draw(n_query)
    return Seed(c, l, f, qc, ql, qf, "synthetic-supervised")
