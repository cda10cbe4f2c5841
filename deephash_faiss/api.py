"""The Python API behind the ``dhf`` command line.

>>> from deephash_faiss import api
>>> model, history = api.train_model("images/", "model.pt", backbone="smallcnn", bits=48, epochs=2)
>>> api.build_index("images/", "dhf-index", model_path="model.pt")
>>> s = api.open_index("dhf-index")
>>> codes, feats, _ = s.encode(["query.jpg"])
>>> s.search("hds", codes, feats, k=10).results[0].ids
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable

import numpy as np

from .data import ImageList, load_images, probe_load_size, scan_images
from .errors import DhfError
from .index import BinaryIndex, IndexSpec
from .model import BACKBONES, build_model, file_sha256, load_model, read_checkpoint, resolve_device, save_checkpoint
from .search import Searcher
from .store import (FORMAT, FORMAT_VERSION, now_iso, read_manifest, read_shard, write_manifest,
                    write_shard)
from .train import TrainConfig, fit

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


DEFAULT_EPOCHS = {"finetune": 10, "frozen": 30}


def train_model(
    data_dir: str,
    out: str,
    backbone: str = "efficientnet_lite0",
    bits: int | None = None,
    weights: str | None = "default",
    device: str = "auto",
    input_size: int | None = None,
    load_size: int | None = None,
    resume: str | None = None,
    progress: bool = True,
    log: Log = _quiet,
    method: str = "auto",
    flip_average: bool = False,
    **train_kwargs: Any,
):
    """Train a hashing model on a folder: one subfolder per class, or none (no labels).

    Args:
        data_dir: image folder.
        out: checkpoint path (written after every epoch, atomically).
        backbone, bits, weights, input_size, load_size: see :func:`deephash_faiss.model.build_model`
            (``load_size`` default: the images' own size, capped at the input size; ``bits``
            default: 48, or :data:`deephash_faiss.itq.DEFAULT_UNSUPERVISED_BITS` without labels).
        resume: continue an interrupted run from its checkpoint.
        method: "auto" (below), "finetune" (the paper's: the whole net, softmax loss),
            "frozen" (laptop mode: fc7 of a frozen backbone computed once, H and the classifier
            trained on it) or "itq" (no labels: PCA + ITQ on fc7 as H). "auto": fine-tune on a
            GPU, frozen on a CPU (fine-tune when the backbone has no pretrained weights),
            "itq" when the folder has no class subfolders.
        flip_average: the model encodes each image as the mean fc7 of it and its mirror
            (:attr:`deephash_faiss.model.ModelConfig.flip_average`; a resumed model keeps its own).
        train_kwargs: fields of :class:`deephash_faiss.train.TrainConfig` (``epochs`` default:
            10 fine-tuning, 30 frozen).
    Returns:
        (model, history).
    """
    from .store import check_output_path

    check_output_path(out, "-o")  # before training: a checkpoint that cannot be saved wastes the run
    images = scan_images(data_dir)
    if len(images) == 0:
        raise DhfError(f"no images found under {data_dir}")
    model, history, _ = _train(images, data_dir, out, backbone, bits, weights, resolve_device(device), input_size,
                               load_size, resume, progress, log, method, None, train_kwargs,
                               flip_average=flip_average)
    return model, history


def _train(images: ImageList, data_dir: str, out: str, backbone: str, bits: int | None, weights, dev,
           input_size, load_size, resume: str | None, progress: bool, log: Log, method: str, work_dir: str | None,
           train_kwargs: dict[str, Any], plan: tuple[str, str] | None = None, flip_average: bool = False):
    """train_model's work; returns (model, history, CachedFeatures or None). With ``work_dir``
    the fc7 cache is kept there (for the build to reuse); without, it sits beside ``out`` and
    is removed once the model is saved."""
    from . import featurecache, itq
    from .train import fit_head

    labelled = images.labelled and len(images.classes) >= 2
    for opt, size in (("--input-size", input_size), ("--load-size", load_size)):
        if size is not None and size < 1:
            raise DhfError(f"{opt} must be at least 1 pixel, got {size}")
    if resume:
        model = load_model(resume)
        if method not in ("auto", model.config.method):
            raise DhfError(f"{resume} was trained with --{model.config.method}, not --{method}")
        method, reason = model.config.method, f"resuming {resume}"
        if method != "itq" and model.config.class_names != images.classes:
            raise DhfError(f"{resume} was trained on other classes than {data_dir}")
    else:
        if backbone not in BACKBONES:
            raise DhfError(f"unknown backbone {backbone!r}; choose from {', '.join(BACKBONES)}")
        w = BACKBONES[backbone].default_weights if weights == "default" else weights
        method, reason = plan or featurecache.choose_method(method, labelled, dev, w not in (None, "none"),
                                                            images.unlabelled_reason())
        if bits is None:
            bits = itq.default_bits(len(images)) if method == "itq" else 48
            if method == "itq" and bits < itq.DEFAULT_UNSUPERVISED_BITS:
                log(f"{bits}-bit codes: {len(images)} images give at most that many PCA directions "
                    f"(the default is {itq.DEFAULT_UNSUPERVISED_BITS})")
        isize = input_size or BACKBONES[backbone].input_size
        lsize = load_size or probe_load_size(images.paths, isize)
        classes = [] if method == "itq" else images.classes
        model = build_model(backbone, bits, classes, weights, isize, lsize,
                            seed=int(train_kwargs.get("seed", 0)), method=method)
        model.config.flip_average = bool(flip_average)
    kw = dict(train_kwargs)
    if method == "itq" and kw.get("epochs") is not None:
        log("note: --epochs has no effect on unsupervised codes (PCA + ITQ is fitted in one pass)")
    if kw.get("epochs") is None:
        kw["epochs"] = DEFAULT_EPOCHS.get(method, 1)
    cfg = TrainConfig(**kw)
    cfg.check()
    what = {"finetune": "fine-tuning the whole network", "frozen": "frozen backbone, training H and the classifier "
            "on cached fc7", "itq": "no labels: PCA + ITQ codes on the backbone's fc7"}[method]
    log(f"training mode: {what} ({reason})")
    log(f"{model.config.backbone}, {model.config.bits} bits, "
        + (f"{len(images.classes)} classes, " if method != "itq" else "")
        + f"{len(images)} images from {data_dir}, decoded at {model.config.load_size}px, input "
        f"{model.config.input_size}px, device {dev}"
        + (", flip-averaged encoding (image + mirror)" if model.config.flip_average else ""))
    ignored = [o for o, on in (("--mix", cfg.mix != "none"), ("--ema-epochs", cfg.ema_epochs > 0)) if on]
    if method != "finetune" and ignored:
        log(f"{' and '.join(ignored)} only apply to fine-tuning: ignored by this {method} model")
    if method == "finetune":
        arr, pos, bad = load_images(images.paths, model.config.load_size, progress=progress, desc="decode")
        for i, reason in bad:
            log(f"skipped {images.paths[i]}: {reason}")
        history = fit(model, arr, images.labels[pos], cfg, dev, checkpoint_path=out, resume=resume,
                      progress=progress)
        return model, history, None
    done = False
    if resume:
        state = read_checkpoint(resume).get("train_state") or {}
        done = method == "itq" or int(state.get("epoch", -1)) + 1 >= cfg.epochs
        history = list(state.get("history", []))
    if method == "itq" and not done:
        itq.check_enough_images(model.config.bits, len(images))  # before computing fc7 for nothing
    cache_dir = work_dir or os.path.join(os.path.dirname(os.path.abspath(out)),
                                         f".{os.path.basename(out)}.fc7-cache")
    try:
        feats = featurecache.compute_features(model, images.paths, cache_dir, dev, cfg.batch_size,
                                              stamps=file_stamps(images.paths), progress=progress, log=log)
        for i, reason in feats.bad:
            log(f"skipped {images.paths[i]}: {reason}")
        if len(feats.pos) < 2:
            raise DhfError(f"fewer than two decodable images under {data_dir}")
        if done:
            log(f"training already complete in {resume}")
        elif method == "frozen":
            history = fit_head(model, feats.fc7, images.labels[feats.pos], cfg, dev, checkpoint_path=out,
                               resume=resume, progress=progress)
        else:
            t0 = time.perf_counter()
            summary = itq.fit_latent(model, feats.fc7, seed=cfg.seed)
            history = [{**summary, "epoch": 1, "seconds": round(time.perf_counter() - t0, 3)}]
            save_checkpoint(model, out, train_state={"epoch": 0, "history": history, "method": "itq"},
                            metrics=history[-1])
    except DhfError:  # bad input: no fc7 cache left beside OUT (an interrupted run keeps it, to resume)
        if work_dir is None:
            shutil.rmtree(cache_dir, ignore_errors=True)
        raise
    if work_dir is None:
        shutil.rmtree(cache_dir, ignore_errors=True)
    model.eval()
    return model, history, feats


from .layout import (CRASH_ENV, IndexLock, collect_garbage, commit_manifest, crash_point,  # noqa: F401
                     current_manifest, file_stamps, finalize_build, gen_name, manifest_files, next_generation,
                     publish_shards, read_skip_report, save_code_index, save_fine_index, store_model, tsv_field,
                     write_skip_report)
from .layout import fsync_file as _fsync_file  # noqa: F401
from .layout import job_key as _job_key  # noqa: F401
from .pipeline import BuildReport, prepare_build  # noqa: F401

_collect_garbage = collect_garbage  # earlier name


def encode_shards(
    model,
    paths: list[str],
    labels: np.ndarray,
    part_dir: str,
    shard_size: int,
    batch_size: int,
    device,
    feature_dtype: str,
    progress: bool = True,
    shard_range: range | None = None,
    encode=None,
    decoder: str = "pil",
) -> tuple[int, int]:
    """Encode ``paths`` into ``part_dir/part-NNNNN.h5`` (+ ``.skip.json``), resumably, in this
    process (:func:`deephash_faiss.pipeline.encode_local`).

    Shard ``s`` holds the decodable images among positions ``[s * shard_size, (s+1) * shard_size)``;
    a shard already on disk (complete: files are only ever renamed into place) is reused.
    Its ``ids`` are positions in ``paths`` until :func:`finalize_build` numbers the rows.
    ``encode``: a function with :func:`deephash_faiss.extract.encode_paths`'s signature
    (default: that one; the laptop/unsupervised build passes one reading cached fc7).
    Returns (shards written, shards reused).
    """
    from tqdm.auto import tqdm

    from .pipeline import EncodeJob, encode_local

    job = EncodeJob("", list(paths), np.asarray(labels), part_dir, shard_size, batch_size, feature_dtype, decoder)
    todo = list(shard_range if shard_range is not None else range(job.nshards))
    with tqdm(total=sum(job.bounds(s)[1] - job.bounds(s)[0] for s in todo), desc="encode", unit="img",
              disable=not progress) as bar:
        return encode_local(model, job, todo, device, bar.update, encode=encode)


def build_index(
    images_dir: str,
    index_dir: str = "dhf-index",
    model_path: str | None = None,
    spec: IndexSpec | None = None,
    batch_size: int = 128,
    shard_size: int = 50_000,
    feature_dtype: str = "float32",
    device: str = "auto",
    progress: bool = True,
    log: Log = _quiet,
    train_options: dict[str, Any] | None = None,
    decoder: str = "auto",
    decode_workers: int | None = None,
) -> BuildReport:
    """Encode every image under ``images_dir`` and write an index directory.

    Without ``model_path``, a folder with class subfolders is used to fine-tune a model
    first (``train_options`` go to :func:`train_model`); the model is saved in the index.
    An interrupted build is resumed by running the same call again: complete shards are
    kept in ``index_dir/.partial-<key>/``. An existing index in ``index_dir`` stays
    intact and searchable until the new manifest replaces it. A non-empty folder that is
    not a dhf index is refused.

    ``decoder``: "auto" (:func:`deephash_faiss.pipeline.resolve_decoder`: nvjpeg on CUDA for
    30,000+ photo-sized JPEGs, else PIL), "pil" or "nvjpeg";
    recorded in the manifest. Runs :func:`deephash_faiss.pipeline.build` with a
    :class:`~deephash_faiss.pipeline.LocalExecutor`.
    """
    from .pipeline import LocalExecutor, build

    return build(images_dir, index_dir, model_path, spec, batch_size, shard_size, feature_dtype,
                 LocalExecutor(device, workers=decode_workers), decoder, progress, log, train_options)


TRAIN_DIR_PREFIX = ".train-"


def _train_for_build(images: ImageList, images_dir: str, index_dir: str, dev, progress: bool, log: Log,
                     opts: dict[str, Any]):
    """Train the model of a build without ``--model``: (model path, work dir, encoder or None).

    The work dir ``INDEX/.train-<key>/`` holds the checkpoint (saved every epoch) and the fc7
    cache, so rerunning an interrupted build resumes both; it is removed when the index is
    committed. Frozen and unsupervised models return an encoder that writes the index from
    the cached fc7 (each image decoded and encoded once).
    """
    from . import featurecache

    requested = opts.pop("method", "auto")
    backbone = opts.pop("backbone", "efficientnet_lite0")
    weights = opts.get("weights", "default")
    w = BACKBONES[backbone].default_weights if backbone in BACKBONES and weights == "default" else weights
    labelled = images.labelled and len(images.classes) >= 2
    plan = featurecache.choose_method(requested, labelled, dev, w not in (None, "none"), images.unlabelled_reason())
    method = plan[0]
    h = hashlib.sha256(json.dumps({"method": method, "backbone": backbone, **opts}, sort_keys=True,
                                  default=str).encode())
    h.update(_job_key("", images.paths, 0, "", file_stamps(images.paths)).encode())
    work = os.path.join(index_dir, f"{TRAIN_DIR_PREFIX}{h.hexdigest()[:16]}")
    model_path = os.path.join(work, "model.pt")
    resume = model_path if os.path.exists(model_path) else None
    what = {"finetune": f"fine-tuning a model on the {len(images.classes)} classes of {images_dir} first",
            "frozen": f"training a model on the {len(images.classes)} classes of {images_dir} first",
            "itq": f"learning binary codes without labels from {images_dir} first"}[method]
    log(f"no --model given: {what}" + (" (resuming an interrupted run)" if resume else ""))
    os.makedirs(work, exist_ok=True)
    kw = {k: opts.pop(k) for k in ("bits", "weights", "input_size", "load_size", "flip_average") if k in opts}
    _, _, feats = _train(images, images_dir, model_path, backbone, kw.get("bits"), kw.get("weights", "default"),
                         dev, kw.get("input_size"), kw.get("load_size"), resume, progress, log, requested,
                         os.path.join(work, "fc7"), opts, plan=None if resume else plan,
                         flip_average=kw.get("flip_average", False))
    if feats is None:
        return model_path, work, None
    model = load_model(model_path, dev)
    return model_path, work, featurecache.cached_encoder(model, feats, images.paths, dev)


def _remove_train_dirs(index_dir: str) -> None:
    """Remove the training work dirs of builds into ``index_dir`` (after a commit, lock held)."""
    for name in os.listdir(index_dir):
        if name.startswith(TRAIN_DIR_PREFIX) and os.path.isdir(os.path.join(index_dir, name)):
            shutil.rmtree(os.path.join(index_dir, name), ignore_errors=True)




def index_from_arrays(
    index_dir: str,
    codes: np.ndarray,
    features: np.ndarray,
    labels: np.ndarray | None = None,
    paths: list[str] | None = None,
    spec: IndexSpec | None = None,
    shard_size: int = 1_000_000,
    classes: list[str] | None = None,
    model_path: str | None = None,
) -> dict[str, Any]:
    """Write an index directory straight from arrays (synthetic data, benchmarks, tests).

    Args:
        codes: uint8 [n, B]; features: float32/float16 [n, D]; labels: int32 [n] (default -1);
        paths: n strings (default ``"row-<id>"``); model_path: optional model to store
            (without one, the index can be searched by codes/features but not by images).
    Returns:
        The manifest.
    """
    from .store import atomic_write_bytes

    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    n = len(codes)
    labels = np.full(n, -1, np.int32) if labels is None else np.asarray(labels, np.int32)
    paths = _RowNames(n) if paths is None else list(paths)
    if len(paths) != n:
        raise DhfError(f"{len(paths)} paths for {n} codes")
    spec = spec or IndexSpec()
    bits = codes.shape[1] * 8
    os.makedirs(os.path.join(index_dir, "shards"), exist_ok=True)
    shards = []
    for s, lo in enumerate(range(0, max(n, 1), shard_size)):
        hi = min(n, lo + shard_size)
        info = write_shard(os.path.join(index_dir, "shards", f"part-{s:05d}.h5"), codes[lo:hi], features[lo:hi],
                           np.arange(lo, hi, dtype=np.int64), paths[lo:hi], labels[lo:hi])
        shards.append({**info, "start": lo})
    idx = BinaryIndex.build(codes, spec)
    idx.save(os.path.join(index_dir, "codes.index"))
    atomic_write_bytes(os.path.join(index_dir, "skipped.tsv"), b"")
    model = {"file": None, "sha256": None, "backbone": None}
    if model_path:
        shutil.copyfile(model_path, os.path.join(index_dir, "model.pt"))
        cfg = load_model(model_path).config
        model = {"file": "model.pt", "sha256": file_sha256(model_path), "backbone": cfg.backbone,
                 "flip_average": cfg.flip_average}
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "created": now_iso(), "source": "arrays",
        "model": model, "bits": bits, "bit_order": "little (faiss): bit j in byte j//8 at position j%8",
        "feature_dim": int(features.shape[1]), "feature_dtype": str(np.dtype(features.dtype)), "count": n,
        "classes": list(classes or []), "shards": shards, "index": {**spec.to_dict(bits), "file": "codes.index"},
        "skipped": 0, "skipped_file": "skipped.tsv", "deleted": [],
    }
    write_manifest(index_dir, manifest)
    return manifest


class _RowNames:
    """``"row-<id>"`` for ids [0, n), made per slice (index_from_arrays writes shard by shard, so
    a 1e8-row benchmark index never holds 1e8 strings at once)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, sl: slice) -> list[str]:
        return [f"row-{i}" for i in range(*sl.indices(self.n))]


def open_index(index_dir: str, device: str = "auto", features_in_memory: bool = False) -> Searcher:
    """Open an index directory for searching (see :class:`deephash_faiss.search.Searcher`)."""
    return Searcher(index_dir, device=device, features_in_memory=features_in_memory)


def index_info(index_dir: str) -> dict[str, Any]:
    """The manifest plus sizes on disk."""
    m = read_manifest(index_dir)
    sizes = {}
    for rel in sorted(manifest_files(m)):
        p = os.path.join(index_dir, rel)
        sizes[rel] = os.path.getsize(p) if os.path.exists(p) else None
    return {"manifest": m, "sizes": sizes, "total_bytes": sum(v or 0 for v in sizes.values())}


def shard_rows(index_dir: str, shard_file: str) -> dict[str, Any]:
    return read_shard(os.path.join(index_dir, "shards", shard_file))
