"""Weight averaging (TrainConfig.ema_epochs) and test-time flip averaging (ModelConfig.flip_average)."""

import numpy as np
import pytest
import torch

from deephash_faiss import train
from deephash_faiss.extract import encode_array
from deephash_faiss.featurecache import job_key
from deephash_faiss.model import build_model, load_model, read_checkpoint, save_checkpoint
from deephash_faiss.train import TrainConfig, WeightAverage, fit
from test_train import _toy


def test_weight_average_follows_the_recurrence():
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    rng = np.random.default_rng(0)
    names = ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"]
    ref = {k: net.state_dict()[k].numpy().astype(np.float64).copy() for k in names}
    avg = WeightAverage(net, decay=0.9)
    for t in range(1, 31):
        with torch.no_grad():
            for k in names:
                net.state_dict()[k].copy_(torch.from_numpy(rng.normal(size=ref[k].shape).astype(np.float32)))
            net.state_dict()["1.num_batches_tracked"].fill_(t)
        avg.update(net)
        d = min(0.9, (1 + t) / (10 + t))
        for k in names:
            ref[k] = d * ref[k] + (1 - d) * net.state_dict()[k].numpy()
    avg.copy_to(net)
    for k in names:
        np.testing.assert_allclose(net.state_dict()[k].numpy(), ref[k], rtol=1e-5, atol=1e-6)
    assert int(net.state_dict()["1.num_batches_tracked"]) == 30  # integer buffers: the model's own
    assert WeightAverage.decay_for(2, 50) == pytest.approx(1 - 1 / 100)


def test_fit_ends_with_the_average_and_resumes_to_the_same_weights(tmp_path, monkeypatch):
    imgs, labels = _toy(n_per=20)
    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.005, val_fraction=0.2, seed=0, ema_epochs=1.0)
    make = lambda: build_model("smallcnn", 16, ["r", "g", "b"], weights="none", input_size=16, load_size=16, seed=0)
    m, raw = make(), {}
    ck = str(tmp_path / "a.pt")
    hist = fit(m, imgs, labels, cfg, torch.device("cpu"), checkpoint_path=ck, progress=False, raw_state_out=raw)
    assert hist[-1]["weights"] == "ema" and "weights" not in hist[0]
    final = {k: v.detach().clone() for k, v in m.state_dict().items()}
    assert set(raw) == set(final)
    assert any(not torch.equal(raw[k], final[k]) for k in final if final[k].dtype.is_floating_point)
    saved = read_checkpoint(ck)
    steps = 3 * -(-48 // 8)  # 48 training images after the 20% validation split, 6 steps per epoch
    assert saved["train_state"]["ema"]["steps"] == steps
    for k, v in final.items():
        torch.testing.assert_close(saved["state_dict"][k], v)  # the checkpoint holds the averaged model

    def crash(epoch):
        if epoch == 1:
            raise KeyboardInterrupt("simulated Ctrl-C after epoch 2")

    ck2 = str(tmp_path / "b.pt")
    monkeypatch.setattr(train, "epoch_hook", crash)
    with pytest.raises(KeyboardInterrupt):
        fit(make(), imgs, labels, cfg, torch.device("cpu"), checkpoint_path=ck2, progress=False)
    assert read_checkpoint(ck2)["train_state"]["ema"]["steps"] == 2 * 6
    monkeypatch.setattr(train, "epoch_hook", lambda epoch: None)
    m2 = make()
    fit(m2, imgs, labels, cfg, torch.device("cpu"), checkpoint_path=ck2, resume=ck2, progress=False)
    for k, v in final.items():
        torch.testing.assert_close(m2.state_dict()[k], v)


def test_resume_with_averaging_of_a_run_without_is_refused(tmp_path):
    imgs, labels = _toy(n_per=6)
    m = build_model("smallcnn", 16, ["r", "g", "b"], weights="none", input_size=16, load_size=16, seed=0)
    ck = str(tmp_path / "a.pt")
    fit(m, imgs, labels, TrainConfig(epochs=1, batch_size=8, val_fraction=0, seed=0), torch.device("cpu"),
        checkpoint_path=ck, progress=False)
    from deephash_faiss.errors import DhfError

    with pytest.raises(DhfError, match="without --ema-epochs"):
        fit(m, imgs, labels, TrainConfig(epochs=2, batch_size=8, val_fraction=0, seed=0, ema_epochs=1),
            torch.device("cpu"), checkpoint_path=ck, resume=ck, progress=False)


def test_flip_average_encodes_the_mean_fc7_of_image_and_mirror(tmp_path):
    imgs, _ = _toy(n_per=4)
    m = build_model("smallcnn", 16, ["r", "g", "b"], weights="none", input_size=16, load_size=16, seed=3).eval()
    m.config.flip_average = True
    codes, feats, h = encode_array(m, imgs, torch.device("cpu"), batch_size=5)
    # reference: the backbone on the image and on its mirror (uint8 HWC: flip the width axis)
    with torch.no_grad():
        f1 = m.backbone(m.preprocess(torch.from_numpy(imgs))).numpy()
        f2 = m.backbone(m.preprocess(torch.from_numpy(imgs[:, :, ::-1].copy()))).numpy()
        ref = (f1 + f2) / 2
        w, b = m.latent.weight.numpy(), m.latent.bias.numpy()
    np.testing.assert_allclose(feats, ref, rtol=1e-4, atol=1e-5)
    ref_h = 1 / (1 + np.exp(-(ref @ w.T + b)))
    np.testing.assert_allclose(h, ref_h, rtol=1e-4, atol=1e-5)
    bits = np.unpackbits(codes, axis=1, bitorder="little").astype(bool)
    sure = np.abs(ref_h - 0.5) > 1e-4  # bits away from the threshold
    assert (bits[sure] == (ref_h > 0.5)[sure]).all()
    # the setting travels with the model file, and the fc7 cache keys it
    path = str(tmp_path / "m.pt")
    save_checkpoint(m, path)
    assert load_model(path).config.flip_average is True
    plain = build_model("smallcnn", 16, ["r", "g", "b"], weights="none", input_size=16, load_size=16, seed=3)
    assert job_key(m, ["a.jpg"]) != job_key(plain, ["a.jpg"])


def test_options_a_frozen_model_ignores_are_reported(image_folder, tmp_path):
    from deephash_faiss import api

    lines = []
    model, _ = api.train_model(image_folder, str(tmp_path / "m.pt"), backbone="smallcnn", bits=16, weights="none",
                               device="cpu", method="frozen", epochs=1, ema_epochs=1.0, mix="cutmix",
                               flip_average=True, progress=False, log=lines.append)
    assert any("--mix and --ema-epochs only apply to fine-tuning: ignored" in ln for ln in lines), lines
    assert any("flip-averaged encoding" in ln for ln in lines) and model.config.flip_average


def test_code_terms_match_a_numpy_reference():
    rng = np.random.default_rng(3)
    h = rng.uniform(0.01, 0.99, (7, 16))
    cfg = TrainConfig(binary_weight=0.7, balance_weight=1.3)
    want = -0.7 * np.mean((h - 0.5) ** 2) + 1.3 * np.mean((h.mean(1) - 0.5) ** 2)
    got = float(train.code_terms(torch.tensor(h, dtype=torch.float32), cfg))
    assert got == pytest.approx(want, rel=1e-5)
    assert float(train.code_terms(torch.tensor(h), TrainConfig())) == 0.0  # the paper's loss: off


def test_code_terms_push_h_away_from_one_half(tmp_path):
    # The same toy run with and without the binarising term: with it, H ends farther from 0.5
    # (a property of the gradient, not a tuned number).
    x, y = _toy(n_per=12)
    dist = []
    for w in (0.0, 5.0):
        m = build_model("smallcnn", 16, ["a", "b", "c"], weights="none", seed=0)
        cfg = TrainConfig(epochs=3, batch_size=12, lr=0.005, val_fraction=0.0, binary_weight=w)
        fit(m, x, y, cfg, torch.device("cpu"), progress=False)
        with torch.no_grad():
            _, h, _ = m(m.preprocess(torch.from_numpy(x)))
        dist.append(float((h - 0.5).abs().mean()))
    assert dist[1] > dist[0]


def test_negative_code_term_weights_are_refused():
    from deephash_faiss.errors import DhfError

    with pytest.raises(DhfError, match="binary-weight"):
        TrainConfig(binary_weight=-1).check()
