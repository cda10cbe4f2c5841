"""Unsupervised codes (PCA + ITQ on fc7 as the latent layer) and building unlabelled folders."""

import os
import shutil

import numpy as np
import pytest
import torch

from deephash_faiss import DhfError, api, itq
from deephash_faiss.featurecache import choose_method, codes_from_features
from deephash_faiss.index import unpack_codes
from deephash_faiss.itq import fit_itq, fit_latent, set_latent
from deephash_faiss.model import build_model, load_model


def _features(n=600, d=64, rank=12, seed=0):
    """Low-rank Gaussian features with an offset (so centring matters)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, rank)) * np.linspace(3, 1, rank)
    return (z @ rng.normal(size=(rank, d)) + rng.normal(0, 0.1, (n, d)) + 5.0).astype(np.float32)


def test_itq_is_pca_subspace_and_beats_pca_quantisation():
    x = _features()
    bits = 8
    mean, w = fit_itq(x, bits, seed=0)
    xc = x.astype(np.float64) - x.mean(0)
    assert np.allclose(mean, x.mean(0), atol=1e-4)
    # rows of W are orthonormal and span the top-`bits` principal directions (numpy eigh)
    assert np.allclose(w @ w.T, np.eye(bits), atol=1e-4)
    evals, evecs = np.linalg.eigh(xc.T @ xc)
    top = evecs[:, ::-1][:, :bits]  # [d, bits]
    assert np.allclose((w.astype(np.float64) @ top) @ (top.T @ w.T), np.eye(bits), atol=1e-3)
    # ITQ's rotation quantises no worse than the unrotated PCA projection (its objective)
    def qerr(v):
        z = xc @ v.T
        return float(((np.sign(z) - z) ** 2).sum())
    assert qerr(w.astype(np.float64)) <= qerr(top.T) + 1e-6


def test_latent_codes_equal_numpy_sign():
    x = _features(d=512)
    m = build_model("smallcnn", 16, [], weights="none", method="itq")
    info = fit_latent(m, x, seed=0)
    assert info["method"] == "pca-itq" and info["scale"] > 0
    mean, w = fit_itq(x, 16, seed=0)  # same seed: same projection
    ref = (x.astype(np.float64) - mean) @ w.T.astype(np.float64)  # independent numpy, float64
    got = unpack_codes(codes_from_features(m, x, torch.device("cpu")))
    margin = np.abs(ref) > 1e-4  # float32 rounding can only flip bits at the threshold itself
    assert margin.mean() > 0.99
    assert np.array_equal(got[margin], (ref > 0)[margin])
    # H itself is sigmoid(s * W (x - mean))
    with torch.no_grad():
        h = torch.sigmoid(m.latent(torch.from_numpy(x))).numpy()
    assert np.allclose(h, 1 / (1 + np.exp(-info["scale"] * ref)), atol=1e-4)


def test_set_latent_checks_shape():
    m = build_model("smallcnn", 16, [], weights="none", method="itq")
    with pytest.raises(DhfError, match="does not fit"):
        set_latent(m, np.zeros(512, np.float32), np.zeros((8, 512), np.float32))
    with pytest.raises(DhfError, match="at most the feature dimension"):
        fit_itq(np.zeros((10, 4), np.float32), 8)


def test_choose_method():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_method("auto", True, cuda, True)[0] == "finetune"
    assert choose_method("auto", True, cpu, True)[0] == "frozen"
    assert choose_method("auto", True, cpu, False)[0] == "finetune"  # nothing pretrained to freeze
    assert choose_method("auto", False, cpu, True)[0] == "itq"
    assert choose_method("itq", True, cuda, True)[0] == "itq"
    assert choose_method("finetune", True, cpu, True)[0] == "finetune"
    with pytest.raises(DhfError, match="--unsupervised"):
        choose_method("frozen", False, cpu, True)


def _flat_folder(image_folder, dest):
    os.makedirs(dest, exist_ok=True)
    for c in sorted(os.listdir(image_folder)):
        for f in sorted(os.listdir(os.path.join(image_folder, c)))[:12]:
            shutil.copy(os.path.join(image_folder, c, f), os.path.join(dest, f"{c}-{f}"))
    return dest


def test_unlabelled_folder_builds_and_queries_encode_like_database(image_folder, tmp_path):
    flat = _flat_folder(image_folder, str(tmp_path / "photos"))
    out = str(tmp_path / "idx")
    logs = []
    rep = api.build_index(flat, out, device="cpu", progress=False, log=logs.append,
                          train_options={"backbone": "smallcnn", "bits": 16})
    assert rep.count == 36 and rep.trained
    assert any("without labels" in line for line in logs)
    s = api.open_index(out, device="cpu")
    model = s.model
    assert model.config.method == "itq" and model.config.num_classes == 0 and model.config.bits == 16
    shard = api.shard_rows(out, api.index_info(out)["manifest"]["shards"][0]["file"])
    # queries (the search path's encoder) are encoded exactly like the database
    qc, qf, _ = s.encode(shard["paths"])
    assert np.array_equal(qc, shard["codes"]) and np.allclose(qf, shard["features"], atol=1e-5)
    # and the stored codes are sign(W fc7 + b) of the model's latent layer, in float64 numpy
    w = model.latent.weight.detach().double().numpy()
    b = model.latent.bias.detach().double().numpy()
    z = shard["features"].astype(np.float64) @ w.T + b
    keep = np.abs(z) > 1e-4 * np.abs(z).max()
    assert np.array_equal(unpack_codes(shard["codes"])[keep], (z > 0)[keep])
    # nothing is left behind that `dhf info` does not count
    info = api.index_info(out)
    found = {os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs}
    assert found - set(info["sizes"]) <= {"manifest.json", ".lock", ".dhf-files"}  # + the ledger of written files
    assert not [n for n in os.listdir(out) if n.startswith(".train-") or n.startswith(".partial-")]


def test_unsupervised_on_labelled_folder_and_train_command(image_folder, tmp_path):
    out = str(tmp_path / "m.pt")
    model, hist = api.train_model(image_folder, out, backbone="smallcnn", bits=24, device="cpu", progress=False,
                                  method="itq")
    assert model.config.method == "itq" and hist[0]["method"] == "pca-itq"
    m2 = load_model(out)
    assert m2.config.method == "itq" and m2.config.bits == 24
    assert not [n for n in os.listdir(tmp_path) if "fc7-cache" in n]  # the cache is removed


def test_small_unlabelled_folder_lowers_the_default_bits_and_refuses_too_many(image_folder, tmp_path):
    from click.testing import CliRunner

    from deephash_faiss.cli import main

    flat = _flat_folder(image_folder, str(tmp_path / "photos"))  # 36 images, default 128 bits
    assert itq.default_bits(36) == 32 and itq.default_bits(10_000) == itq.DEFAULT_UNSUPERVISED_BITS
    logs = []
    rep = api.build_index(flat, str(tmp_path / "idx"), device="cpu", progress=False, log=logs.append,
                          train_options={"backbone": "smallcnn"})
    assert rep.count == 36 and api.open_index(str(tmp_path / "idx"), device="cpu").model.config.bits == 32
    assert any("32-bit codes: 36 images" in line for line in logs)
    # asked for more bits than images: one line, no traceback, non-zero exit
    r = CliRunner().invoke(main, ["build-index", flat, "--out", str(tmp_path / "idx2"), "--backbone", "smallcnn",
                                  "--bits", "64", "--device", "cpu", "-q"])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "64-bit unsupervised codes need at least 64 images (36 given)" in r.output
