"""Training a :class:`~deephash_faiss.model.HashNet` with softmax loss.

:func:`fit` fine-tunes the whole network, as the paper: SGD with momentum 0.9 and weight
decay 5e-4, the new layers (H and the classifier) at 10x the base learning rate. Images
are held in memory as uint8 [N, S, S, 3] (decoded once at the model's ``load_size``);
augmentation (random crop with reflection padding, horizontal flip, optionally CutMix or
Mixup), resizing and normalisation run on the training device, batch by batch. bf16 autocast on CUDA.

:func:`fit_head` trains only H and the classifier on cached fc7 features of a frozen
backbone (laptop mode: seconds on a CPU).

Both save a checkpoint after every epoch (with the optimizer state) and resume from one.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DhfError
from .extract import backbone_features
from .model import HashNet, read_checkpoint, save_checkpoint


@dataclass
class TrainConfig:
    """Training settings. ``lr`` is the backbone's; new layers get ``lr * new_layer_lr_mult``."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    new_layer_lr_mult: float = 10.0
    optimizer: str = "sgd"  # "sgd" (the paper's) or "adamw"
    schedule: str = "cosine"  # "cosine", "step" (x0.1 at 50% and 75%), "constant"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    augment: bool = True
    hflip: bool = True
    crop_pad: float = 0.125  # random-crop padding as a fraction of the image side
    mix: str = "none"  # "none", "cutmix" (Yun et al. 2019) or "mixup" (Zhang et al. 2018), fit only
    mix_alpha: float = 1.0  # Beta(alpha, alpha) of the mixing ratio
    mix_prob: float = 0.5  # share of batches mixed
    #: fit only: random erasing (Zhong et al., AAAI 2020): each image, with this probability, gets
    #: a rectangle of 2-25 % of its area (aspect 0.3-3.3) filled with uniform noise (0: off)
    erase_prob: float = 0.0
    val_fraction: float = 0.1
    seed: int = 0
    amp: bool = True
    eval_batch_size: int = 512
    checkpoint_every_s: float = 2.0  # fit_head: save at most this often (and after the last epoch)
    micro_batch: int | None = None  # images per forward/backward (gradients accumulated); default: see micro_batch_size
    #: fit only: keep an exponential moving average of the weights (and BatchNorm statistics)
    #: over about this many epochs of steps, and end with it (0: off)
    ema_epochs: float = 0.0
    #: weights of the two code terms of Yang, Lin & Chen (SSDH, TPAMI 2017), the same authors'
    #: extension of the paper's softmax-only loss: ``binary_weight`` rewards H far from 0.5
    #: (- mean((h - 0.5)^2)), ``balance_weight`` asks each image's code to be half ones
    #: (mean over images of (mean over bits of h - 0.5)^2). 0: off (the paper's loss).
    binary_weight: float = 0.0
    balance_weight: float = 0.0

    def check(self) -> None:
        if self.epochs < 1:
            raise DhfError("--epochs must be at least 1")
        if self.batch_size < 1:
            raise DhfError("--batch-size must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise DhfError(f"--lr must be a positive number, got {self.lr}")
        if self.optimizer not in ("sgd", "adamw"):
            raise DhfError(f"unknown optimizer {self.optimizer!r} (sgd or adamw)")
        if self.schedule not in ("cosine", "step", "constant"):
            raise DhfError(f"unknown schedule {self.schedule!r} (cosine, step or constant)")
        if not 0 <= self.val_fraction < 1:
            raise DhfError("--val-fraction must be in [0, 1)")
        if self.seed < 0:
            raise DhfError("--seed must be zero or positive")
        if self.mix not in ("none", "cutmix", "mixup"):
            raise DhfError(f"unknown mix {self.mix!r} (none, cutmix or mixup)")
        if self.mix != "none" and not (self.mix_alpha > 0 and 0 <= self.mix_prob <= 1):
            raise DhfError("--mix-alpha must be positive and --mix-prob in [0, 1]")
        if not 0 <= self.erase_prob <= 1:
            raise DhfError("--erase-prob must be in [0, 1]")
        if not (self.ema_epochs >= 0 and math.isfinite(self.ema_epochs)):
            raise DhfError("--ema-epochs must be zero (off) or positive")
        if not (self.binary_weight >= 0 and self.balance_weight >= 0):
            raise DhfError("--binary-weight and --balance-weight must be zero (off) or positive")


#: Fine-tuning on a CPU keeps every activation of a batch for the backward pass: about
#: 1,750 bytes per input pixel per image for EfficientNet-Lite0 (88 MB for one 224-px image,
#: measured with resource.getrusage), so the default batch of 128 needed 12.7 GB. A batch is
#: split into micro-batches that fit ``CPU_ACTIVATION_BUDGET`` (gradients accumulated; BatchNorm
#: statistics per micro-batch). Inference keeps no graph: about 300 bytes per pixel per image.
CPU_TRAIN_BYTES_PER_PIXEL = 2000
CPU_EVAL_BYTES_PER_PIXEL = 300
CPU_ACTIVATION_BUDGET = 1.5e9


def cpu_batch_cap(input_size: int, train: bool) -> int:
    """Images per forward pass on a CPU within :data:`CPU_ACTIVATION_BUDGET` (at least 2)."""
    per = input_size * input_size * (CPU_TRAIN_BYTES_PER_PIXEL if train else CPU_EVAL_BYTES_PER_PIXEL)
    return max(2, int(CPU_ACTIVATION_BUDGET // per))


def micro_batch_size(cfg: "TrainConfig", input_size: int, device: torch.device) -> int:
    """Images per forward/backward pass: ``cfg.micro_batch``, else the whole batch on a GPU,
    else as many as :func:`cpu_batch_cap` allows."""
    if cfg.micro_batch:
        return max(1, min(cfg.micro_batch, cfg.batch_size))
    if device.type == "cuda":
        return cfg.batch_size
    return min(cfg.batch_size, cpu_batch_cap(input_size, train=True))


def _check_training_set(n: int, labels, num_classes: int, what: str) -> np.ndarray:
    """int64 labels [n] of a training set of ``n`` ``what`` (images or features), or DhfError."""
    labels = np.asarray(labels, dtype=np.int64)
    if n != len(labels):
        raise DhfError(f"{what} and labels differ in length")
    if n == 0:
        raise DhfError("no training images")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DhfError("labels out of range of the model's classes")
    return labels


def split_validation(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: (train positions int64, validation positions int64)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * fraction)) if len(idx) > 1 else 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    tr = np.sort(np.concatenate(train)) if train else np.zeros(0, np.int64)
    if len(labels) and not len(tr):
        raise DhfError(f"--val-fraction {fraction:g} leaves no training images (of {len(labels)})")
    return tr, np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)


def check_finite_loss(rec: dict) -> None:
    """DhfError when an epoch's mean loss is nan or infinite: the weights diverged, and a
    model saved from them would give every image the same code."""
    if not math.isfinite(rec["loss"]):
        raise DhfError(f"training diverged at epoch {rec['epoch']}: the loss is {rec['loss']} (try a lower --lr); "
                       f"this epoch is not saved")


def augment_batch(x: torch.Tensor, pad_frac: float, hflip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crop with reflection padding and optional horizontal flip.

    Args:
        x: uint8 [B, S, S, 3] on the training device.
    Returns:
        uint8 [B, S, S, 3].
    """
    b, s = x.shape[0], x.shape[1]
    pad = int(round(s * pad_frac))
    dev = x.device
    if pad > 0:
        xp = F.pad(x.permute(0, 3, 1, 2).float(), (pad, pad, pad, pad), mode="reflect")
        xp = xp.permute(0, 2, 3, 1)  # [B, S+2p, S+2p, 3]
        oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device="cpu").to(dev)
        ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device="cpu").to(dev)
        ar = torch.arange(s, device=dev)
        iy = (oy[:, None] + ar[None]).view(b, s, 1)
        ix = (ox[:, None] + ar[None]).view(b, 1, s)
        x = xp[torch.arange(b, device=dev).view(b, 1, 1), iy, ix].to(torch.uint8)
    if hflip:
        flip = (torch.rand(b, generator=gen) < 0.5).to(dev)
        x = torch.where(flip.view(b, 1, 1, 1), x.flip(2), x)
    return x


ERASE_AREA = (0.02, 0.25)  # random erasing: share of the image's area
ERASE_ASPECT = (0.3, 1 / 0.3)  # and the rectangle's height / width, log-uniform


def erase_batch(x: torch.Tensor, prob: float, gen: torch.Generator) -> torch.Tensor:
    """Random erasing: each image, with probability ``prob``, gets one rectangle (area a share
    :data:`ERASE_AREA` of the image, aspect :data:`ERASE_ASPECT`, clipped to the image, at a
    uniform position) replaced by uniform uint8 noise.

    Args:
        x: uint8 [B, S, S, 3] on the training device.
    Returns:
        uint8 [B, S, S, 3] (a new tensor; ``x`` when ``prob`` is 0).
    """
    if prob <= 0:
        return x
    b, s = x.shape[0], x.shape[1]
    on = torch.rand(b, generator=gen) < prob
    area = torch.empty(b).uniform_(*ERASE_AREA, generator=gen) * s * s
    aspect = torch.exp(torch.empty(b).uniform_(math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1]), generator=gen))
    h = (area * aspect).sqrt().round().clamp(1, s).long()
    w = (area / aspect).sqrt().round().clamp(1, s).long()
    y0 = (torch.rand(b, generator=gen) * (s - h + 1)).long()
    x0 = (torch.rand(b, generator=gen) * (s - w + 1)).long()
    dev = x.device  # the boxes are drawn from ``gen`` (CPU); masks and noise are made on the device
    y0, h, x0, w, on = (v.to(dev) for v in (y0, h, x0, w, on))
    ar = torch.arange(s, device=dev)
    rows = (ar[None] >= y0[:, None]) & (ar[None] < (y0 + h)[:, None])  # [B, S]
    cols = (ar[None] >= x0[:, None]) & (ar[None] < (x0 + w)[:, None])
    mask = rows[:, :, None] & cols[:, None, :] & on[:, None, None]  # [B, S, S]
    noise_gen = torch.Generator(device=dev).manual_seed(int(torch.randint(0, 2**62, (), generator=gen)))
    noise = torch.randint(0, 256, x.shape, generator=noise_gen, dtype=torch.uint8, device=dev)
    return torch.where(mask[..., None], noise, x)


def mix_batch(x: torch.Tensor, kind: str, alpha: float, prob: float, gen: torch.Generator):
    """CutMix or Mixup of a batch with a shuffled copy of itself.

    Args:
        x: uint8 [B, S, S, 3] on the training device.
    Returns:
        (x uint8 [B, S, S, 3], partner int64 [B] (positions in the batch) or None when this
        batch is not mixed, lam float: the weight of each image's own label).
    """
    b, s = x.shape[0], x.shape[1]
    if kind == "none" or b < 2 or float(torch.rand((), generator=gen)) >= prob:
        return x, None, 1.0
    lam = float(np.random.default_rng(int(torch.randint(0, 2**31 - 1, (), generator=gen))).beta(alpha, alpha))
    partner = torch.randperm(b, generator=gen).to(x.device)
    if kind == "mixup":
        mixed = x.float() * lam + x[partner].float() * (1 - lam)
        return mixed.round_().clamp_(0, 255).to(torch.uint8), partner, lam
    # cutmix: a box of area (1 - lam) S^2 at a uniform centre, clipped; lam from the clipped box
    cut = int(round(s * math.sqrt(1 - lam)))
    cy, cx = (int(v) for v in torch.randint(0, s, (2,), generator=gen))
    y0, y1 = max(0, cy - cut // 2), min(s, cy + (cut - cut // 2))
    x0, x1 = max(0, cx - cut // 2), min(s, cx + (cut - cut // 2))
    out = x.clone()
    out[:, y0:y1, x0:x1] = x[partner, y0:y1, x0:x1]
    return out, partner, 1.0 - (y1 - y0) * (x1 - x0) / (s * s)


def code_terms(h: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """The SSDH code terms of ``cfg`` on H outputs h float [B, bits] in (0, 1): a scalar,
    ``-binary_weight * mean((h - 0.5)^2) + balance_weight * mean_b((mean_k h[b, k] - 0.5)^2)``
    (0 when both weights are 0)."""
    h = h.float()
    out = h.new_zeros(())
    if cfg.binary_weight:
        out = out - cfg.binary_weight * (h - 0.5).pow(2).mean()
    if cfg.balance_weight:
        out = out + cfg.balance_weight * (h.mean(1) - 0.5).pow(2).mean()
    return out


def _lr_factor(cfg: TrainConfig, progress: float) -> float:
    """Multiplier of the base LR at a fraction ``progress`` in [0, 1] of training."""
    warm = cfg.warmup_epochs / cfg.epochs if cfg.epochs else 0.0
    if warm > 0 and progress < warm:
        return max(progress / warm, 1e-3)
    if cfg.schedule == "cosine":
        p = (progress - warm) / max(1e-9, 1 - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
    if cfg.schedule == "step":
        return 0.01 if progress >= 0.75 else 0.1 if progress >= 0.5 else 1.0
    return 1.0


def make_optimizer(model: HashNet, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = [
        {"params": model.backbone_parameters(), "lr": cfg.lr, "base_lr": cfg.lr},
        {"params": model.new_parameters(), "lr": cfg.lr * cfg.new_layer_lr_mult,
         "base_lr": cfg.lr * cfg.new_layer_lr_mult},
    ]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


class WeightAverage:
    """Exponential moving average of a model's floating-point state (parameters and BatchNorm
    statistics): after each optimizer step ``avg <- avg + (1 - d_t) (w - avg)``, with
    ``d_t = min(decay, (1 + t) / (10 + t))`` so that the first steps are not averaged with the
    random initial state. Integer buffers (BatchNorm's step counters) are copied as they are."""

    def __init__(self, model: torch.nn.Module, decay: float, state: dict | None = None):
        self.decay = float(decay)
        sd = model.state_dict()
        self.names = [k for k, v in sd.items() if v.dtype.is_floating_point]
        if state is not None:  # resuming
            self.steps = int(state["steps"])
            self.avg = [state["avg"][k].to(sd[k].device, sd[k].dtype).clone() for k in self.names]
        else:
            self.steps = 0
            self.avg = [sd[k].detach().clone() for k in self.names]

    @staticmethod
    def decay_for(ema_epochs: float, steps_per_epoch: int) -> float:
        """Per-step decay whose averaging horizon (1 / (1 - decay) steps) is ``ema_epochs``."""
        return 1.0 - 1.0 / max(1.0, ema_epochs * steps_per_epoch)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        sd = model.state_dict()
        self.steps += 1
        d = min(self.decay, (1.0 + self.steps) / (10.0 + self.steps))
        torch._foreach_lerp_(self.avg, [sd[k].detach() for k in self.names], 1.0 - d)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        sd = model.state_dict()
        for k, a in zip(self.names, self.avg):
            sd[k].copy_(a)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "avg": {k: a.detach().cpu() for k, a in zip(self.names, self.avg)}}


def epoch_hook(epoch: int) -> None:
    """Called after each epoch's checkpoint is written (0-based epoch). A test hook:
    tests replace it to simulate an interruption."""


def _resume_state(model, opt, resume: str) -> tuple[int, list, dict]:
    """Load an interrupted run: (next epoch, history, the checkpoint's train_state)."""
    obj = read_checkpoint(resume)
    state = obj.get("train_state")
    if not state:
        raise DhfError(f"{resume} holds no training state to resume from")
    model.load_state_dict(obj["state_dict"])
    opt.load_state_dict(state["optimizer"])
    return int(state["epoch"]) + 1, list(state.get("history", [])), state


def _log_epoch(rec: dict, cfg: "TrainConfig", progress: bool, log) -> None:
    if progress or log:
        from tqdm.auto import tqdm

        msg = f"epoch {rec['epoch']}/{cfg.epochs}: loss {rec['loss']:.4f} train acc {rec['train_acc']:.4f}"
        if "val_acc" in rec:
            msg += f" val acc {rec['val_acc']:.4f}"
        (log or tqdm.write)(msg + f" ({rec['seconds']:.2f} s)")


def fit_head(
    model: HashNet,
    features: np.ndarray,
    labels: np.ndarray,
    cfg: TrainConfig,
    device: torch.device,
    checkpoint_path: str | None = None,
    resume: str | None = None,
    progress: bool = True,
    log=None,
) -> list[dict[str, Any]]:
    """Train H and the classifier of ``model`` on fixed fc7 features (the backbone frozen).

    Same loss, optimiser settings and schedule as :func:`fit` (the new layers' learning
    rate is ``cfg.lr * cfg.new_layer_lr_mult``); no augmentation (the features are fixed).

    Args:
        features: float32 [N, D], fc7 of the training images as the model's backbone
            computes them (:func:`deephash_faiss.extract.encode_array`).
        labels: int [N] in [0, num_classes).
        checkpoint_path: the whole model saved after an epoch, with the optimizer state: after
            the last epoch and after any epoch ending ``cfg.checkpoint_every_s`` or more after the
            previous save (epochs on features take milliseconds; an interruption loses at most
            that much training).
        resume: a checkpoint written by an interrupted ``fit_head`` to continue from.
    Returns:
        History: one dict per epoch (loss, train accuracy, validation accuracy, seconds).
    """
    cfg.check()
    x = torch.as_tensor(np.ascontiguousarray(features, dtype=np.float32))
    labels = _check_training_set(len(x), labels, model.config.num_classes, "features")
    torch.manual_seed(cfg.seed)
    val_x = val_y = None
    if cfg.val_fraction > 0:
        tr, va = split_validation(labels, cfg.val_fraction, cfg.seed)
        val_x, val_y = x[va].to(device), torch.from_numpy(labels[va]).to(device)
        x, labels = x[tr], labels[tr]
    model.to(device).eval()  # the backbone stays in eval mode (frozen BatchNorm statistics)
    for p in model.backbone_parameters():
        p.requires_grad_(False)
    params = model.new_parameters()
    lr = cfg.lr * cfg.new_layer_lr_mult
    group = [{"params": params, "lr": lr, "base_lr": lr}]
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(group, lr=lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(group, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    start_epoch, history = 0, []
    if resume:
        start_epoch, history, _ = _resume_state(model, opt, resume)
    x, y = x.to(device), torch.from_numpy(labels).to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(x)
    steps = max(1, math.ceil(n / cfg.batch_size))
    total = steps * cfg.epochs
    last_save = time.perf_counter()
    try:
        for epoch in range(start_epoch, cfg.epochs):
            gen.manual_seed(cfg.seed * 1000 + epoch)
            perm = torch.randperm(n, generator=gen).to(device)
            t0 = time.perf_counter()
            tot_loss, correct, seen = 0.0, 0, 0
            for step in range(steps):
                idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * _lr_factor(cfg, (epoch * steps + step) / total)
                h, logits = model.head(x[idx])
                loss = F.cross_entropy(logits, y[idx], label_smoothing=cfg.label_smoothing) + code_terms(h, cfg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot_loss += float(loss.detach()) * len(idx)
                correct += int((logits.argmax(1) == y[idx]).sum())
                seen += len(idx)
            rec = {"epoch": epoch + 1, "loss": tot_loss / max(1, seen), "train_acc": correct / max(1, seen),
                   "seconds": round(time.perf_counter() - t0, 4)}
            if val_x is not None and len(val_x):
                with torch.no_grad():
                    rec["val_acc"] = float((model.head(val_x)[1].argmax(1) == val_y).float().mean())
            history.append(rec)
            _log_epoch(rec, cfg, progress, log)
            check_finite_loss(rec)
            if checkpoint_path and (epoch + 1 == cfg.epochs or time.perf_counter() - last_save >= cfg.checkpoint_every_s):
                last_save = time.perf_counter()
                save_checkpoint(model, checkpoint_path,
                                train_state={"epoch": epoch, "optimizer": opt.state_dict(), "history": history,
                                             "config": asdict(cfg), "method": "frozen"},
                                metrics=rec)
            epoch_hook(epoch)
    finally:
        for p in model.backbone_parameters():
            p.requires_grad_(True)
    model.eval()
    return history


@torch.no_grad()
def predict_logits(model: HashNet, images, device: torch.device, batch_size: int = 512, amp: bool = True) -> torch.Tensor:
    """Logits float32 [N, C] for uint8 images [N, S, S, 3] (numpy or tensor), from fc7 as the
    index encodes it (:func:`~deephash_faiss.extract.backbone_features`)."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        xb = torch.as_tensor(images[start:start + batch_size]).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            x = model.preprocess(xb).contiguous(memory_format=torch.channels_last)
            _, logits = model.head(backbone_features(model, x))
        out.append(logits.float().cpu())
    return torch.cat(out) if out else torch.zeros(0, model.config.num_classes)


def fit(
    model: HashNet,
    images: np.ndarray,
    labels: np.ndarray,
    cfg: TrainConfig,
    device: torch.device,
    checkpoint_path: str | None = None,
    resume: str | None = None,
    val_images: np.ndarray | None = None,
    val_labels: np.ndarray | None = None,
    progress: bool = True,
    log=None,
    raw_state_out: dict | None = None,
) -> list[dict[str, Any]]:
    """Fine-tune ``model`` in place. With ``cfg.ema_epochs`` the model ends with the moving
    average of its weights (:class:`WeightAverage`, kept in every checkpoint for a resume).

    Args:
        images: uint8 [N, S, S, 3], S = ``model.config.load_size``.
        labels: int [N] in [0, num_classes).
        cfg: the training settings.
        device: where to train (AMP bf16 on CUDA when ``cfg.amp``).
        checkpoint_path: saved after every epoch (atomic), with the optimizer state.
        resume: a checkpoint written by an interrupted ``fit`` to continue from.
        val_images, val_labels: a validation set; default: ``cfg.val_fraction`` of the
            training images, held out (stratified).
        raw_state_out: with ``cfg.ema_epochs``, filled with the last step's own weights
            (CPU tensors, a state dict) before the average replaces them (to compare both).
    Returns:
        History: one dict per epoch with loss, train accuracy, validation accuracy, seconds.
    """
    from tqdm.auto import tqdm

    cfg.check()
    labels = _check_training_set(len(images), labels, model.config.num_classes, "images")
    torch.manual_seed(cfg.seed)
    if val_images is None and cfg.val_fraction > 0:
        tr, va = split_validation(labels, cfg.val_fraction, cfg.seed)
        val_images, val_labels = images[va], labels[va]
        images, labels = images[tr], labels[tr]
    model.to(device).to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg)
    start_epoch, history, state = 0, [], {}
    if resume:
        start_epoch, history, state = _resume_state(model, opt, resume)
    # Keep the uint8 images on the GPU when they fit comfortably; else stream from RAM.
    on_dev = device.type == "cuda" and images.nbytes < 16e9
    data = torch.from_numpy(np.ascontiguousarray(images))
    if on_dev:
        data = data.to(device)
    ydata = torch.from_numpy(labels).to(data.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(data)
    steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
    total_steps = steps_per_epoch * cfg.epochs
    ema = None
    if cfg.ema_epochs > 0:
        if resume and state.get("ema") is None and start_epoch > 0:
            raise DhfError(f"{resume} was trained without --ema-epochs: resume it without")
        ema = WeightAverage(model, WeightAverage.decay_for(cfg.ema_epochs, steps_per_epoch), state.get("ema"))
    amp = cfg.amp and device.type == "cuda"
    micro = micro_batch_size(cfg, model.config.input_size, device)
    eval_bs = cfg.eval_batch_size if device.type == "cuda" else min(
        cfg.eval_batch_size, cpu_batch_cap(model.config.input_size, train=False))
    if micro < cfg.batch_size and (progress or log):
        (log or tqdm.write)(f"batches of {cfg.batch_size} run as micro-batches of {micro} on {device.type} "
                       f"(activation memory; gradients accumulated)")
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        gen.manual_seed(cfg.seed * 1000 + epoch)
        perm = torch.randperm(n, generator=gen).to(data.device)
        t0 = time.perf_counter()
        tot_loss = torch.zeros((), device=device)
        tot_correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                   disable=not progress, leave=False)
        for step in bar:
            idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            if len(idx) < 2 and step > 0:
                continue  # BatchNorm needs two samples
            xb = data[idx].to(device, non_blocking=True)
            yb = ydata[idx].to(device, non_blocking=True)
            if cfg.augment:
                xb = augment_batch(xb, cfg.crop_pad, cfg.hflip, gen)
                xb = erase_batch(xb, cfg.erase_prob, gen)
            xb, partner, lam = mix_batch(xb, cfg.mix, cfg.mix_alpha, cfg.mix_prob, gen)
            yb2 = yb[partner] if partner is not None else None
            factor = _lr_factor(cfg, (epoch * steps_per_epoch + step) / total_steps)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * factor
            opt.zero_grad(set_to_none=True)
            parts = -(-len(idx) // micro)  # near-equal micro-batches (>= 2 images each for BatchNorm)
            for sub in torch.arange(len(idx), device=xb.device).tensor_split(parts):
                x = model.preprocess(xb[sub]).contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    _, h, logits = model(x)
                    loss = F.cross_entropy(logits.float(), yb[sub], label_smoothing=cfg.label_smoothing)
                    if yb2 is not None:
                        loss = lam * loss + (1 - lam) * F.cross_entropy(
                            logits.float(), yb2[sub], label_smoothing=cfg.label_smoothing)
                    loss = loss + code_terms(h, cfg)
                (loss * (len(sub) / len(idx))).backward()
                tot_loss += loss.detach() * len(sub)
                tot_correct += (logits.argmax(1) == yb[sub]).sum()
                del x, logits
            opt.step()
            if ema is not None:
                ema.update(model)
            seen += len(idx)
            if progress and step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        rec = {
            "epoch": epoch + 1,
            "loss": float(tot_loss.item() / max(1, seen)),
            "train_acc": float(tot_correct.item() / max(1, seen)),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        last = epoch + 1 == cfg.epochs
        if ema is not None and last:  # the model ends with the averaged weights
            if raw_state_out is not None:
                raw_state_out.update({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
            ema.copy_to(model)
            rec["weights"] = "ema"
        if val_images is not None and len(val_images):
            pred = predict_logits(model, val_images, device, eval_bs, cfg.amp).argmax(1).numpy()
            rec["val_acc"] = float((pred == np.asarray(val_labels)).mean())
        history.append(rec)
        _log_epoch(rec, cfg, progress, log)
        check_finite_loss(rec)
        if checkpoint_path:
            ts = {"epoch": epoch, "optimizer": opt.state_dict(), "history": history, "config": asdict(cfg),
                  "method": "finetune"}
            if ema is not None:
                ts["ema"] = ema.state_dict()
            save_checkpoint(model, checkpoint_path, train_state=ts, metrics=rec)
        epoch_hook(epoch)
    model.eval()
    return history
