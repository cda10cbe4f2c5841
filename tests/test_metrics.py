"""Tests of deephash_faiss.metrics (and the small plots / baselines modules).

The reference is a naive pure-Python implementation of the paper's official
protocol: Hamming distance by popcount on Python ints, ranking with
``sorted(range(n), key=lambda j: (dist[j], j))`` (stable: ties keep database
order), AP divided by the number of relevant items found in the top K.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from deephash_faiss import baselines, metrics, plots
from deephash_faiss.metrics import (
    average_precision,
    evaluate_codes,
    evaluate_ranking,
    hamming_distance_matrix,
    pr_curve,
    pr_curve_at_cutoffs,
    precision_at_k,
    precision_within_radius,
)


# --------------------------------------------------------------------------- #
# naive reference
# --------------------------------------------------------------------------- #
def naive_dist(a: np.ndarray, b: np.ndarray) -> int:
    return sum(bin(int(x) ^ int(y)).count("1") for x, y in zip(a, b))


def naive_ap(rel: list[bool], top_k: int | None) -> float:
    rel = rel if top_k is None else rel[:top_k]
    found, acc = 0, 0.0
    for j, r in enumerate(rel, start=1):
        if r:
            found += 1
            acc += found / j
    return acc / found if found else 0.0


def naive_eval(q_codes, db_codes, q_labels, db_labels, top_k, ks, radius):
    m, n = len(q_codes), len(db_codes)
    nbits = 8 * q_codes.shape[1]
    aps_k, aps_full, p_at_k, prec_rad = [], [], {k: [] for k in ks}, []
    pr_p = [[] for _ in range(nbits + 1)]
    pr_r = [[] for _ in range(nbits + 1)]
    rankings = []
    for i in range(m):
        d = [naive_dist(q_codes[i], db_codes[j]) for j in range(n)]
        order = sorted(range(n), key=lambda j: (d[j], j))
        rankings.append(order)
        rel = [db_labels[j] == q_labels[i] for j in order]
        aps_k.append(naive_ap(rel, top_k))
        aps_full.append(naive_ap(rel, None))
        for k in ks:
            p_at_k[k].append(sum(rel[:k]) / k)
        n_rel = sum(rel)
        for r in range(nbits + 1):
            inside = [j for j in range(n) if d[j] <= r]
            hit = sum(db_labels[j] == q_labels[i] for j in inside)
            pr_p[r].append(hit / len(inside) if inside else 0.0)
            pr_r[r].append(hit / n_rel if n_rel else 0.0)
        prec_rad.append(pr_p[min(radius, nbits)][-1])
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {
        "map_at_k": mean(aps_k),
        "map_full": mean(aps_full),
        "precision_at_k": {k: mean(v) for k, v in p_at_k.items()},
        "precision_radius": mean(prec_rad),
        "pr_precision": [mean(v) for v in pr_p],
        "pr_recall": [mean(v) for v in pr_r],
        "rankings": np.array(rankings, dtype=np.int64),
    }


def random_case(seed: int, m: int = 15, n: int = 240, nbytes: int = 1, n_classes: int = 4):
    """Few bits -> many ties; labels correlated with codes a little."""
    rng = np.random.default_rng(seed)
    q_codes = rng.integers(0, 256, (m, nbytes), dtype=np.uint8)
    db_codes = rng.integers(0, 256, (n, nbytes), dtype=np.uint8)
    q_labels = (q_codes[:, 0] % n_classes).astype(np.int64)
    db_labels = np.where(
        rng.random(n) < 0.5, db_codes[:, 0] % n_classes, rng.integers(0, n_classes, n)
    ).astype(np.int64)
    return q_codes, db_codes, q_labels, db_labels


def assert_matches_naive(res, ref, ks):
    assert res["map_at_k"] == pytest.approx(ref["map_at_k"], abs=1e-12)
    assert res["map_full"] == pytest.approx(ref["map_full"], abs=1e-12)
    for k in ks:
        assert res["precision_at_k"][k] == pytest.approx(ref["precision_at_k"][k], abs=1e-12)
    assert res["precision_radius"] == pytest.approx(ref["precision_radius"], abs=1e-12)
    np.testing.assert_allclose(res["pr_curve"]["precision"], ref["pr_precision"], atol=1e-12)
    np.testing.assert_allclose(res["pr_curve"]["recall"], ref["pr_recall"], atol=1e-12)


# --------------------------------------------------------------------------- #
# hand-computed examples
# --------------------------------------------------------------------------- #
def test_average_precision_by_hand():
    # relevance 1,0,1,1,0:
    #   relevant at positions 1, 3, 4 with precisions 1/1, 2/3, 3/4
    #   AP (whole row)  = (1/1 + 2/3 + 3/4) / 3
    #   AP@3            = (1/1 + 2/3) / 2        (divide by relevant FOUND in top 3)
    #   AP@2            = (1/1) / 1 = 1
    # relevance 0,0,0,0,0 -> 0 (no relevant item found)
    # relevance 0,1,0,0,0 -> AP@1 = 0 (none in top 1), AP = 1/2
    rel = np.array(
        [[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0]],
        dtype=bool,
    )
    full = average_precision(rel, None)
    assert full.dtype == np.float64 and full.shape == (3,)
    assert full[0] == pytest.approx((1 + 2 / 3 + 3 / 4) / 3, abs=1e-15)
    assert full[1] == 0.0
    assert full[2] == pytest.approx(0.5, abs=1e-15)
    assert average_precision(rel, 3)[0] == pytest.approx((1 + 2 / 3) / 2, abs=1e-15)
    assert average_precision(rel, 2)[0] == 1.0
    np.testing.assert_array_equal(average_precision(rel, 1), [1.0, 0.0, 0.0])
    # top_k beyond the row length = whole row
    np.testing.assert_allclose(average_precision(rel, 1000), full, atol=1e-15)


def test_precision_at_k_by_hand():
    # row 1,0,1,1,0: P@1 = 1, P@2 = 1/2, P@5 = 3/5, P@10 = 3/10 (missing slots are misses)
    # row 0,0,0,0,1: P@1 = 0, P@2 = 0,   P@5 = 1/5, P@10 = 1/10
    rel = np.array([[1, 0, 1, 1, 0], [0, 0, 0, 0, 1]], dtype=bool)
    p = precision_at_k(rel, [1, 2, 5, 10])
    np.testing.assert_allclose(p, [0.5, 0.25, 0.4, 0.2], atol=1e-15)
    pr = pr_curve_at_cutoffs(rel, [1, 5], n_relevant=np.array([3, 2]))
    np.testing.assert_allclose(pr["precision"], [0.5, 0.4], atol=1e-15)
    # recall@1 = (1/3 + 0)/2 ; recall@5 = (3/3 + 1/2)/2
    np.testing.assert_allclose(pr["recall"], [1 / 6, 0.75], atol=1e-15)


def _code(v: int) -> np.ndarray:
    return np.array([v], dtype=np.uint8)


def test_hamming_ties_stable_by_hand():
    # 8-bit codes, query 0b00000000 with label A (=1). Database:
    #   idx 0: 0b00000011  d=2  A
    #   idx 1: 0b00000001  d=1  A
    #   idx 2: 0b00000010  d=1  B
    #   idx 3: 0b00000000  d=0  B
    #   idx 4: 0b00000100  d=1  B
    # stable ranking by (d, idx): 3(B) 1(A) 2(B) 4(B) 0(A) -> relevance 0,1,0,0,1
    # (a non-stable tie order 3,4,2,1,0 would give 0,0,0,1,1 instead)
    #   AP full = (1/2 + 2/5) / 2 = 0.45
    #   AP@4    = (1/2) / 1 = 0.5 ;  AP@1 = 0
    #   P@1 = 0, P@2 = 1/2, P@5 = 2/5
    #   radius 0: {3}          precision 0,   recall 0
    #   radius 1: {3,1,2,4}    precision 1/4, recall 1/2
    #   radius 2+: everything  precision 2/5, recall 1
    q = np.stack([_code(0)])
    db = np.stack([_code(0b11), _code(0b1), _code(0b10), _code(0), _code(0b100)])
    ql = np.array([1])
    dl = np.array([1, 1, 2, 2, 2])
    d = hamming_distance_matrix(q, db)
    np.testing.assert_array_equal(d, [[2, 1, 1, 0, 1]])
    res = evaluate_codes(q, db, ql, dl, top_k=4, ks=[1, 2, 5], radius=1)
    assert res["map_full"] == pytest.approx(0.45, abs=1e-15)
    assert res["map_at_k"] == pytest.approx(0.5, abs=1e-15)
    assert res["precision_at_k"] == {1: 0.0, 2: 0.5, 5: pytest.approx(0.4)}
    assert res["precision_radius"] == pytest.approx(0.25, abs=1e-15)
    assert res["mean_retrieved_radius"] == 4.0
    assert res["pr_curve"]["radius"] == list(range(9))
    np.testing.assert_allclose(res["pr_curve"]["precision"], [0, 0.25] + [0.4] * 7, atol=1e-15)
    np.testing.assert_allclose(res["pr_curve"]["recall"], [0, 0.5] + [1.0] * 7, atol=1e-15)
    assert evaluate_codes(q, db, ql, dl, top_k=1)["map_at_k"] == 0.0
    assert precision_within_radius(d, ql, dl, radius=0) == 0.0
    assert precision_within_radius(d, ql, dl, radius=1) == pytest.approx(0.25)
    # the same ranking through evaluate_ranking
    r = evaluate_ranking(np.array([[3, 1, 2, 4, 0]]), ql, dl, top_k=4, ks=[1, 2, 5])
    assert r["map_full"] == pytest.approx(0.45) and r["map_at_k"] == pytest.approx(0.5)
    assert r["precision_at_k"][2] == 0.5


def test_empty_radius_scores_zero_and_missing_class():
    # query 0 finds nothing within radius 0; query 1 has a label absent from the db
    q = np.stack([_code(0b11111111), _code(0)])
    db = np.stack([_code(0), _code(1)])
    ql, dl = np.array([5, 9]), np.array([5, 5])
    d = hamming_distance_matrix(q, db)
    assert precision_within_radius(d, ql, dl, radius=0) == 0.0
    res = evaluate_codes(q, db, ql, dl, top_k=2, ks=[1, 2], radius=0)
    assert res["precision_radius"] == 0.0
    # query 0: relevance 1,1 -> AP 1; query 1: nothing relevant -> 0
    assert res["map_at_k"] == 0.5 and res["map_full"] == 0.5
    assert res["pr_curve"]["recall"][-1] == 0.5  # query 1 has recall 0 by convention


# --------------------------------------------------------------------------- #
# Hamming distances
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("nbytes", [1, 2, 6, 8, 9, 16, 32, 40])
def test_hamming_matches_unpackbits(nbytes):
    rng = np.random.default_rng(nbytes)
    bits_q = rng.integers(0, 2, (7, 8 * nbytes), dtype=np.uint8)
    bits_db = rng.integers(0, 2, (33, 8 * nbytes), dtype=np.uint8)
    q = np.packbits(bits_q, axis=1, bitorder="little")
    db = np.packbits(bits_db, axis=1, bitorder="little")
    want = (bits_q[:, None, :] != bits_db[None, :, :]).sum(-1)
    got = hamming_distance_matrix(q, db, chunk_size=3)
    np.testing.assert_array_equal(got, want)
    assert got.dtype == (np.uint8 if 8 * nbytes <= 255 else np.uint16)
    # bit order: packbits little puts bit i of the code into byte i//8, bit i%8
    assert int(q[0, 0]) == sum(int(b) << i for i, b in enumerate(bits_q[0, :8]))


def test_hamming_lookup_table_fallback(monkeypatch):
    q_codes, db_codes, *_ = random_case(1, nbytes=6)
    want = hamming_distance_matrix(q_codes, db_codes)
    monkeypatch.setattr(metrics, "_HAS_BITWISE_COUNT", False)
    np.testing.assert_array_equal(hamming_distance_matrix(q_codes, db_codes), want)
    # the full evaluation on the fallback path as well
    a = evaluate_codes(q_codes, db_codes, q_codes[:, 0] % 3, db_codes[:, 0] % 3, top_k=20)
    monkeypatch.setattr(metrics, "_HAS_BITWISE_COUNT", True)
    b = evaluate_codes(q_codes, db_codes, q_codes[:, 0] % 3, db_codes[:, 0] % 3, top_k=20)
    assert a == b


def test_hamming_rejects_bad_input():
    with pytest.raises(TypeError):
        hamming_distance_matrix(np.zeros((2, 1), np.int64), np.zeros((2, 1), np.uint8))
    with pytest.raises(ValueError):
        hamming_distance_matrix(np.zeros((2, 1), np.uint8), np.zeros((2, 2), np.uint8))


# --------------------------------------------------------------------------- #
# against the naive reference
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_evaluate_codes_matches_naive(seed):
    q_codes, db_codes, ql, dl = random_case(seed)
    ks = [1, 5, 10, 50, 100, 300]  # 300 > n: missing slots count as misses
    res = evaluate_codes(q_codes, db_codes, ql, dl, top_k=50, ks=ks, radius=2, block_size=4)
    ref = naive_eval(q_codes, db_codes, ql, dl, 50, ks, 2)
    assert_matches_naive(res, ref, ks)
    # ranking evaluation of the naive (stable) ranking gives the same numbers
    rk = evaluate_ranking(ref["rankings"], ql, dl, top_k=50, ks=ks)
    assert rk["map_at_k"] == pytest.approx(ref["map_at_k"], abs=1e-12)
    assert rk["map_full"] == pytest.approx(ref["map_full"], abs=1e-12)
    assert rk["precision_at_k"] == pytest.approx(ref["precision_at_k"], abs=1e-12)
    # standalone functions on the naive distances
    d = hamming_distance_matrix(q_codes, db_codes)
    assert precision_within_radius(d, ql, dl, 2) == pytest.approx(ref["precision_radius"])
    pr = pr_curve(d, ql, dl, max_radius=8)
    np.testing.assert_allclose(pr["precision"], ref["pr_precision"], atol=1e-12)
    np.testing.assert_allclose(pr["recall"], ref["pr_recall"], atol=1e-12)


def test_evaluate_codes_two_bytes_matches_naive():
    q_codes, db_codes, ql, dl = random_case(7, m=8, n=150, nbytes=2)
    ks = [10, 100]
    res = evaluate_codes(q_codes, db_codes, ql, dl, top_k=None, ks=ks, radius=3)
    ref = naive_eval(q_codes, db_codes, ql, dl, None, ks, 3)
    assert_matches_naive(res, ref, ks)
    assert res["map_at_k"] == res["map_full"]


def test_threads_and_blocks_do_not_change_results():
    q_codes, db_codes, ql, dl = random_case(11, m=37, n=500)
    base = evaluate_codes(q_codes, db_codes, ql, dl, top_k=100, n_threads=1, block_size=37)
    for th, bs in [(2, 1), (2, 5), (3, 16), (None, 64)]:
        assert evaluate_codes(q_codes, db_codes, ql, dl, top_k=100, n_threads=th, block_size=bs) == base


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, 6),
    st.integers(1, 60),
    st.integers(1, 5),
    st.integers(1, 70),
    st.integers(0, 8),
)
def test_property_evaluate_codes_vs_naive(seed, m, n, n_classes, top_k, radius):
    rng = np.random.default_rng(seed)
    # very few distinct codes -> heavy ties
    palette = rng.integers(0, 256, (3, 1), dtype=np.uint8)
    q_codes = palette[rng.integers(0, 3, m)]
    db_codes = palette[rng.integers(0, 3, n)]
    ql = rng.integers(0, n_classes, m)
    dl = rng.integers(0, n_classes, n)
    ks = sorted({1, max(1, n // 2), n, n + 3})
    res = evaluate_codes(q_codes, db_codes, ql, dl, top_k=top_k, ks=ks, radius=radius)
    ref = naive_eval(q_codes, db_codes, ql, dl, top_k, ks, radius)
    assert_matches_naive(res, ref, ks)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.lists(st.booleans(), min_size=1, max_size=30), min_size=1, max_size=8).filter(
        lambda rows: len({len(r) for r in rows}) == 1
    ),
    st.one_of(st.none(), st.integers(1, 40)),
)
def test_property_average_precision_vs_naive(rows, top_k):
    rel = np.array(rows, dtype=bool)
    got = average_precision(rel, top_k)
    want = [naive_ap(list(r), top_k) for r in rows]
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert ((got >= 0) & (got <= 1)).all()
    ks = [1, 3, rel.shape[1], rel.shape[1] + 5]
    want_p = [sum(sum(r[:k]) / k for r in rows) / len(rows) for k in ks]
    np.testing.assert_allclose(precision_at_k(rel, ks), want_p, atol=1e-12)


def test_evaluate_ranking_partial_lists_and_padding():
    dl = np.array([0, 1, 0, 1, 0, 0])
    ql = np.array([0, 1])
    ids = np.array([[0, 1, -1], [3, 2, 1]])  # -1 = FAISS padding, not relevant
    res = evaluate_ranking(ids, ql, dl, top_k=3, ks=[1, 2, 3, 4])
    assert res["map_full"] is None  # L < n
    # q0: 1,0,0 -> AP 1 ; q1: 1,0,1 -> (1 + 2/3)/2
    assert res["map_at_k"] == pytest.approx((1 + (1 + 2 / 3) / 2) / 2)
    assert res["precision_at_k"] == pytest.approx({1: 1.0, 2: 0.5, 3: 0.5, 4: 0.375})
    # recall at 3: q0 1/4 ; q1 2/2
    assert res["pr_curve"]["recall"][2] == pytest.approx((0.25 + 1.0) / 2)
    with pytest.raises(ValueError):
        evaluate_ranking(np.array([[6]]), ql[:1], dl)


def test_evaluate_codes_returns_plain_python():
    q_codes, db_codes, ql, dl = random_case(5, m=4, n=40, nbytes=6)
    res = evaluate_codes(q_codes, db_codes, ql, dl, top_k=10, ks=[5, 10])
    assert set(res) >= {"map_at_k", "map_full", "precision_at_k", "precision_radius", "pr_curve"}
    for key in ("map_at_k", "map_full", "precision_radius"):
        assert type(res[key]) is float and 0.0 <= res[key] <= 1.0
    assert all(type(k) is int and type(v) is float for k, v in res["precision_at_k"].items())
    assert len(res["pr_curve"]["precision"]) == 49
    assert all(type(v) is float for v in res["pr_curve"]["recall"])
    assert res["pr_curve"]["recall"][-1] == pytest.approx(1.0)


def test_evaluate_codes_moderate_size_fast():
    """A 48-bit run of 1,000 x 20,000 with clustered codes stays well below a second or two."""
    import time

    rng = np.random.default_rng(0)
    centers = rng.integers(0, 2, (10, 48), dtype=np.uint8)

    def make(count):
        lab = rng.integers(0, 10, count)
        bits = centers[lab] ^ (rng.random((count, 48)) < 0.2).astype(np.uint8)
        return np.packbits(bits, axis=1, bitorder="little"), lab

    db, dl = make(20000)
    q, ql = make(1000)
    t = time.perf_counter()
    res = evaluate_codes(q, db, ql, dl)
    assert time.perf_counter() - t < 10.0
    assert 0.5 < res["map_at_k"] <= 1.0
    assert res["precision_at_k"][100] >= res["precision_at_k"][1000] - 0.05


# --------------------------------------------------------------------------- #
# baselines and plots
# --------------------------------------------------------------------------- #
def test_baselines_anchors():
    cur = baselines.baseline_precision_at_k("cifar10", 48)
    assert cur["CNNH+"][100] == 0.59 and cur["CNNH+"][1000] == 0.608
    assert cur["KSH"][100] == 0.45 and cur["ITQ-CCA"][100] == 0.40
    assert list(cur) == ["CNNH+", "CNNH", "KSH", "ITQ-CCA", "MLH", "BRE", "ITQ", "SH", "LSH"]
    assert all(0 < v < 1 for c in cur.values() for v in c.values())
    assert baselines.CIFAR10_MAP_AT_1000[48] == pytest.approx(0.8973)
    with pytest.raises(KeyError):
        baselines.baseline_precision_at_k("mnist", 48)


def test_plot_precision_at_k(tmp_path):
    curves = {"ours (BCS)": {k: 0.85 for k in range(100, 1001, 100)}}
    curves.update(baselines.baseline_precision_at_k())
    out = plots.plot_precision_at_k(curves, tmp_path / "p_at_k.png", "CIFAR-10, 48 bits")
    assert out.exists() and out.stat().st_size > 1000


def test_plot_pr_curve(tmp_path):
    r = np.linspace(0, 1, 20)
    out = plots.plot_pr_curve({"ours": (r, 1 - 0.5 * r), "other": (r, 0.5 - 0.2 * r)}, tmp_path / "pr.png")
    assert out.exists() and out.stat().st_size > 1000


def test_plot_query_grid(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(12)]
    png = tmp_path / "img.png"
    Image.fromarray(imgs[0]).save(png)
    gray = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    results = [
        [(imgs[i], i % 3 != 0) for i in range(10)],
        [(png, True, "d=0")] + [(gray, False)] * 4,  # fewer than k results, a path, grayscale
    ]
    out = plots.plot_query_grid([imgs[11], str(png)], results, tmp_path / "grid.png", k=10)
    assert out.exists() and out.stat().st_size > 1000
    assert math.isfinite(out.stat().st_size)
