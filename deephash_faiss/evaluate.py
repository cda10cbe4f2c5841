"""Retrieval evaluation of BCS, HDS and ES rankings with the paper's protocol.

Every query ranks the whole database. BCS ranks by Hamming distance with a stable
sort (ties keep database order). HDS's ranking is its pool (codes at Hamming
distance < ``hds_radius``, nearest first, capped at ``max_candidates`` — a prefix of
the BCS ranking) ordered by squared L2 on fc7, followed by the rest of the BCS
ranking. ES ranks everything by squared L2 on fc7. Metrics are those of
:mod:`deephash_faiss.metrics` (mAP@k with the official divisor, P@k, full mAP,
precision within Hamming radius 2 for the codes).
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Sequence

import numpy as np

from . import metrics
from .errors import DhfError

MODES = ("bcs", "hds", "es")


def _weighted_merge(parts: list[tuple[int, dict]]) -> dict[str, Any]:
    """Average per-block metric dicts weighted by their query counts."""
    total = sum(n for n, _ in parts)
    out: dict[str, Any] = {}
    first = parts[0][1]
    for key in ("map_at_k", "map_full"):
        if first.get(key) is not None:
            out[key] = float(sum(n * p[key] for n, p in parts) / total)
        else:
            out[key] = None
    out["precision_at_k"] = {int(k): float(sum(n * p["precision_at_k"][k] for n, p in parts) / total)
                             for k in first["precision_at_k"]}
    if "pr_curve" in first and first["pr_curve"]:
        pr = first["pr_curve"]
        out["pr_curve"] = {
            "cutoff": list(pr["cutoff"]),
            "precision": [float(sum(n * np.asarray(p["pr_curve"]["precision"])[i] for n, p in parts) / total)
                          for i in range(len(pr["cutoff"]))],
            "recall": [float(sum(n * np.asarray(p["pr_curve"]["recall"])[i] for n, p in parts) / total)
                       for i in range(len(pr["cutoff"]))],
        }
    return out


def evaluate_arrays(
    db_codes: np.ndarray,
    db_feats: np.ndarray | None,
    db_labels: np.ndarray,
    q_codes: np.ndarray,
    q_feats: np.ndarray | None,
    q_labels: np.ndarray,
    modes: Sequence[str] = MODES,
    top_k: int = 1000,
    ks: Iterable[int] = tuple(range(100, 1001, 100)),
    radius: int = 2,
    hds_radius: int = 3,
    max_candidates: int | None = 10_000,
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate the rankings of each mode.

    Args:
        db_codes: uint8 [n, B]; db_feats: float [n, D] (needed for hds/es); db_labels: int [n].
        q_codes: uint8 [m, B]; q_feats: float [m, D]; q_labels: int [m] (-1: never relevant).
        modes: subset of ("bcs", "hds", "es").
        top_k: K of mAP@K (1000 in the paper); ks: P@k cut-offs.
        radius: Hamming radius (inclusive) of "precision within radius" (2 in the literature).
        hds_radius: HDS pools distance < hds_radius; max_candidates caps the pool.
        device: where the L2 work runs ("cpu" or "cuda").
    Returns:
        {mode: metrics dict} plus "hds_pool": {"mean", "median", "max", "truncated_fraction"}.
    """
    import torch
    from tqdm.auto import tqdm

    ks = [int(k) for k in ks]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise DhfError(f"unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    out: dict[str, Any] = {}
    if "bcs" in modes:
        t0 = time.perf_counter()
        out["bcs"] = metrics.evaluate_codes(q_codes, db_codes, q_labels, db_labels, top_k=top_k, ks=ks,
                                            radius=radius)
        out["bcs"]["eval_seconds"] = round(time.perf_counter() - t0, 3)
    l2_modes = [m for m in modes if m in ("hds", "es")]
    if not l2_modes:
        return out
    if db_feats is None or q_feats is None:
        raise DhfError("HDS and ES need features")
    dev = torch.device(device)
    fdt = torch.float16 if (dev.type == "cuda" and db_feats.dtype == np.float16) else torch.float32
    F = torch.as_tensor(np.asarray(db_feats), device=dev).to(fdt)
    Fn = (F.float() ** 2).sum(1)
    Q = torch.as_tensor(np.asarray(q_feats, dtype=np.float32), device=dev)
    n, D = F.shape
    cap = n if max_candidates is None else min(n, int(max_candidates))
    # memory budget for the gathered pools [b, cap, D] and the [b, n] rankings
    budget = (2 << 30) if dev.type == "cuda" else (384 << 20)
    block = int(max(1, min(512, budget // max(1, cap * D * 4), budget // max(1, n * 24))))
    parts: dict[str, list] = {m: [] for m in l2_modes}
    pool_sizes, truncated = [], []
    t_mode = {m: 0.0 for m in l2_modes}
    m_total = len(q_codes)
    bar = tqdm(total=m_total, desc="evaluate hds/es", unit="q", disable=not progress)
    for s in range(0, m_total, block):
        e = min(m_total, s + block)
        ql = np.asarray(q_labels[s:e])
        ham = torch.as_tensor(metrics.hamming_distance_matrix(q_codes[s:e], db_codes).astype(np.int16),
                              device=dev)
        qb = Q[s:e]
        if "hds" in l2_modes:
            t0 = time.perf_counter()
            bcs_order = torch.sort(ham, dim=1, stable=True).indices  # [b, n]
            P = torch.clamp((ham < hds_radius).sum(1), max=cap)  # pool sizes
            pmax = int(P.max().item()) if len(P) else 0
            if pmax > 0:
                pref = bcs_order[:, :pmax]
                X = F[pref].float()  # [b, pmax, D]
                d = Fn[pref] - 2 * torch.bmm(X, qb[:, :, None])[..., 0] + (qb * qb).sum(1, keepdim=True)
                inpool = torch.arange(pmax, device=dev)[None] < P[:, None]
                d = torch.where(inpool, d, torch.full_like(d, float("inf")))
                o = torch.sort(d, dim=1, stable=True).indices
                hds_rank = torch.cat([torch.gather(pref, 1, o), bcs_order[:, pmax:]], 1)
            else:
                hds_rank = bcs_order
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t_mode["hds"] += time.perf_counter() - t0
            pool_sizes.append(P.cpu().numpy())
            truncated.append(((ham < hds_radius).sum(1) > cap).cpu().numpy())
            parts["hds"].append((e - s, metrics.evaluate_ranking(hds_rank.cpu().numpy(), ql, db_labels, top_k, ks)))
        if "es" in l2_modes:
            t0 = time.perf_counter()
            d = Fn[None] - 2 * (qb @ F.float().T) + (qb * qb).sum(1, keepdim=True)
            es_rank = torch.sort(d, dim=1, stable=True).indices
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t_mode["es"] += time.perf_counter() - t0
            parts["es"].append((e - s, metrics.evaluate_ranking(es_rank.cpu().numpy(), ql, db_labels, top_k, ks)))
        bar.update(e - s)
    bar.close()
    for mname in l2_modes:
        out[mname] = _weighted_merge(parts[mname])
        out[mname]["eval_seconds"] = round(t_mode[mname], 3)
    if "hds" in l2_modes:
        ps = np.concatenate(pool_sizes)
        out["hds_pool"] = {"mean": float(ps.mean()), "median": float(np.median(ps)), "max": int(ps.max()),
                           "truncated_fraction": float(np.concatenate(truncated).mean()),
                           "radius": hds_radius, "max_candidates": max_candidates}
    return out


def time_modes(searcher, q_codes: np.ndarray, q_feats: np.ndarray, modes: Sequence[str], k: int = 100,
               radius: int = 3, max_candidates: int | None = 10_000, n_queries: int = 1000,
               repeats: int = 3) -> dict[str, float]:
    """Mean search time per query (ms) of each mode through :class:`Searcher`, a batch of
    up to ``n_queries`` queries, median of ``repeats`` after a warm-up."""
    qc, qf = q_codes[:n_queries], q_feats[:n_queries]
    out = {}
    for mode in modes:
        searcher.search(mode, qc[:8], qf[:8], k, radius, max_candidates)  # warm-up
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            searcher.search(mode, qc, qf, k, radius, max_candidates)
            ts.append(time.perf_counter() - t0)
        out[mode] = float(np.median(ts) / len(qc) * 1e3)
    return out


def write_plots(result: dict[str, Any], out_dir: str, title: str, grid: dict | None = None,
                baselines_for: tuple[str, int] | None = None) -> list[str]:
    """P@k curves (with the paper's baselines), PR curves and an optional query grid.

    ``baselines_for``: (dataset, bits) whose published curves to draw, e.g. ("cifar10", 48).

    ``grid``: {"queries": [images], "results": [[(image, correct), ...], ...]}.
    Returns the written file paths.
    """
    import os

    from . import baselines, plots

    os.makedirs(out_dir, exist_ok=True)
    files = []
    curves = {f"ours {m.upper()}": result[m]["precision_at_k"] for m in MODES if m in result}
    ours = list(curves)
    if baselines_for:
        try:
            base = baselines.baseline_precision_at_k(*baselines_for)
            curves.update({f"{k} (paper, {baselines_for[1]} bits)": v for k, v in base.items()})
        except KeyError:
            pass
    files.append(str(plots.plot_precision_at_k(curves, os.path.join(out_dir, "precision_at_k.png"), title,
                                               ours=ours)))
    pr = {}
    if "bcs" in result and result["bcs"].get("pr_curve"):
        c = result["bcs"]["pr_curve"]
        pr["BCS (Hamming radius)"] = (np.asarray(c["recall"]), np.asarray(c["precision"]))
    for m in ("hds", "es"):
        if m in result and result[m].get("pr_curve"):
            c = result[m]["pr_curve"]
            pr[f"{m.upper()} (cut-offs)"] = (np.asarray(c["recall"]), np.asarray(c["precision"]))
    if pr:
        files.append(str(plots.plot_pr_curve(pr, os.path.join(out_dir, "pr_curve.png"))))
    if grid:
        files.append(str(plots.plot_query_grid(grid["queries"], grid["results"],
                                               os.path.join(out_dir, "query_grid.png"), k=10)))
    return files
