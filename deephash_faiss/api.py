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
import re
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .data import ImageList, load_images, probe_load_size, scan_images
from .errors import DhfError
from .index import BinaryIndex, IndexSpec
from .model import BACKBONES, build_model, file_sha256, load_model, read_checkpoint, resolve_device, save_checkpoint
from .search import Searcher
from .store import (FORMAT, FORMAT_VERSION, MANIFEST, now_iso, read_manifest, read_shard, write_manifest,
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
        train_kwargs: fields of :class:`deephash_faiss.train.TrainConfig` (``epochs`` default:
            10 fine-tuning, 30 frozen).
    Returns:
        (model, history).
    """
    images = scan_images(data_dir)
    if len(images) == 0:
        raise DhfError(f"no images found under {data_dir}")
    model, history, _ = _train(images, data_dir, out, backbone, bits, weights, resolve_device(device), input_size,
                               load_size, resume, progress, log, method, None, train_kwargs)
    return model, history


def _train(images: ImageList, data_dir: str, out: str, backbone: str, bits: int | None, weights, dev,
           input_size, load_size, resume: str | None, progress: bool, log: Log, method: str, work_dir: str | None,
           train_kwargs: dict[str, Any], plan: tuple[str, str] | None = None):
    """train_model's work; returns (model, history, CachedFeatures or None). With ``work_dir``
    the fc7 cache is kept there (for the build to reuse); without, it sits beside ``out`` and
    is removed once the model is saved."""
    from . import featurecache, itq
    from .train import fit_head

    labelled = images.labelled and len(images.classes) >= 2
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
        method, reason = plan or featurecache.choose_method(method, labelled, dev, w not in (None, "none"))
        if bits is None:
            bits = itq.DEFAULT_UNSUPERVISED_BITS if method == "itq" else 48
        isize = input_size or BACKBONES[backbone].input_size
        lsize = load_size or probe_load_size(images.paths, isize)
        classes = [] if method == "itq" else images.classes
        model = build_model(backbone, bits, classes, weights, isize, lsize,
                            seed=int(train_kwargs.get("seed", 0)), method=method)
    kw = dict(train_kwargs)
    if kw.get("epochs") is None:
        kw["epochs"] = DEFAULT_EPOCHS.get(method, 1)
    cfg = TrainConfig(**kw)
    cfg.check()
    what = {"finetune": "fine-tuning the whole network", "frozen": "frozen backbone, training H and the classifier "
            "on cached fc7", "itq": "no labels: PCA + ITQ codes on the pretrained backbone's fc7"}[method]
    log(f"training mode: {what} ({reason})")
    log(f"{model.config.backbone}, {model.config.bits} bits, "
        + (f"{len(images.classes)} classes, " if method != "itq" else "")
        + f"{len(images)} images from {data_dir}, decoded at {model.config.load_size}px, input "
        f"{model.config.input_size}px, device {dev}")
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
    cache_dir = work_dir or os.path.join(os.path.dirname(os.path.abspath(out)),
                                         f".{os.path.basename(out)}.fc7-cache")
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
    if work_dir is None:
        shutil.rmtree(cache_dir, ignore_errors=True)
    model.eval()
    return model, history, feats


@dataclass
class BuildReport:
    index_dir: str
    count: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    shards_written: int = 0
    shards_reused: int = 0
    seconds: float = 0.0
    trained: bool = False


def _job_key(model_sha: str, paths: list[str], shard_size: int, feature_dtype: str, extra: str = "") -> str:
    """Identifies a resumable encoding job; ``extra`` adds e.g. file stamps or the base generation."""
    h = hashlib.sha256()
    h.update(f"{model_sha}\n{shard_size}\n{feature_dtype}\n".encode())
    for p in paths:
        h.update(p.encode("utf-8", "surrogateescape") + b"\n")
    if extra:
        h.update(extra.encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def file_stamps(paths: list[str]) -> str:
    """(size, mtime) of every file: a partial shard is not reused once its images changed."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append(f"{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            out.append("-")
    return "\n".join(out)


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
) -> tuple[int, int]:
    """Encode ``paths`` into ``part_dir/part-NNNNN.h5`` (+ ``.skip.json``), resumably.

    Shard ``s`` holds the decodable images among positions ``[s * shard_size, (s+1) * shard_size)``;
    a shard already on disk (complete: files are only ever renamed into place) is reused.
    Its ``ids`` are positions in ``paths`` until :func:`finalize_build` numbers the rows.
    ``encode``: a function with :func:`deephash_faiss.extract.encode_paths`'s signature
    (default: that one; the laptop/unsupervised build passes one reading cached fc7).
    Returns (shards written, shards reused).
    """
    from tqdm.auto import tqdm

    from .extract import encode_paths

    encode_paths = encode or encode_paths

    os.makedirs(part_dir, exist_ok=True)
    nshards = (len(paths) + shard_size - 1) // shard_size
    todo = shard_range if shard_range is not None else range(nshards)
    written = reused = 0
    with tqdm(total=sum(min(shard_size, len(paths) - s * shard_size) for s in todo), desc="encode", unit="img",
              disable=not progress) as bar:
        for s in todo:
            lo, hi = s * shard_size, min(len(paths), (s + 1) * shard_size)
            shard_path = os.path.join(part_dir, f"part-{s:05d}.h5")
            skip_path = os.path.join(part_dir, f"part-{s:05d}.skip.json")
            if os.path.exists(shard_path) and os.path.exists(skip_path):
                reused += 1
                bar.update(hi - lo)
                continue
            sub = paths[lo:hi]
            codes, feats, pos, bad = [], [], [], []
            for p, c, f, b in encode_paths(model, sub, device, batch_size, feature_dtype):
                pos.append(p + lo)
                codes.append(c)
                feats.append(f)
                bad.extend((i + lo, r) for i, r in b)
                bar.update(len(p) + len(b))
            pos_a = np.concatenate(pos) if pos else np.zeros(0, np.int64)
            codes_a = np.concatenate(codes) if codes else np.zeros((0, model.config.bits // 8), np.uint8)
            feats_a = (np.concatenate(feats) if feats
                       else np.zeros((0, model.config.feature_dim), feature_dtype))
            from .store import atomic_write_bytes

            atomic_write_bytes(skip_path, json.dumps([[paths[i], r] for i, r in bad]).encode())
            crash_point(f"mid-shard-{s}")
            write_shard(shard_path, codes_a, feats_a, pos_a, [paths[i] for i in pos_a], labels[pos_a])
            written += 1
            crash_point(f"shard-{s}")
    return written, reused


def _unique(dirpath: str, stem: str, ext: str, tag: str) -> str:
    name = f"{stem}{ext}"
    if os.path.exists(os.path.join(dirpath, name)):
        name = f"{stem}-{tag}{ext}"
    return name


# ---------------------------------------------------------------- crash safety
#
# Files of an index generation are never overwritten: every commit (build, add, remove,
# compact) takes a generation number above any found in the directory and names its new
# files with it (generation 1 keeps the plain names part-00000.h5, codes.index,
# skipped.tsv). The partial directory is only read by finalize (shards are copied, not
# moved), so a crash at any point before the manifest rename leaves the old index intact
# and the partial shards reusable; the rerun simply finalizes again. Orphans of a crashed
# attempt are removed by the next commit's garbage collection.

CRASH_ENV = "DHF_TEST_CRASH_AT"
_GEN_RE = re.compile(r"-g(\d+)\.(?:h5|index|tsv)$")


def crash_point(name: str) -> None:
    """Test hook: ``DHF_TEST_CRASH_AT=<name>`` SIGKILLs this process here (like ``kill -9``).

    Points: ``shard-<s>`` (shard s written to the partial dir), ``mid-shard-<s>`` (its skip
    list written, its HDF5 file not yet), ``finalize-shard-<s>`` (shard s copied into the
    index), ``before-manifest`` (all files written, manifest not yet renamed),
    ``after-manifest`` (committed, before garbage collection and partial-dir cleanup).
    """
    if os.environ.get(CRASH_ENV) == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


class IndexLock:
    """An exclusive writer lock on ``INDEX/.lock`` (flock; released by the OS if the process dies)."""

    def __init__(self, index_dir: str):
        self.path = os.path.join(index_dir, ".lock")
        self.fd: int | None = None

    def __enter__(self) -> "IndexLock":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - not POSIX: no lock
            pass
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise DhfError(f"another dhf command is writing {os.path.dirname(self.path)} (lock held); "
                           f"wait for it to finish") from None
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None


def current_manifest(index_dir: str) -> dict[str, Any] | None:
    """The committed manifest, None when there is none or it is unreadable; an index of a
    newer format is refused (a build must not overwrite what it cannot read)."""
    if not os.path.exists(os.path.join(index_dir, MANIFEST)):
        return None
    try:
        return read_manifest(index_dir)
    except DhfError as err:
        if "format version" in str(err):
            raise DhfError(f"{err}; refusing to overwrite it") from None
        return None


def next_generation(index_dir: str, old: dict[str, Any] | None) -> int:
    """A generation number above the current manifest's and above any file in the directory."""
    gen = int(old.get("generation", 1)) if old else 0
    names = os.listdir(index_dir) if os.path.isdir(index_dir) else []
    sd = os.path.join(index_dir, "shards")
    names += os.listdir(sd) if os.path.isdir(sd) else []
    for n in names:
        m = _GEN_RE.search(n)
        if m:
            gen = max(gen, int(m.group(1)))
        elif n.endswith((".h5", ".index", ".tsv")) and not n.startswith("."):
            gen = max(gen, 1)
    return gen + 1


def gen_name(stem: str, ext: str, gen: int) -> str:
    return f"{stem}{ext}" if gen <= 1 else f"{stem}-g{gen}{ext}"


def _fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def tsv_field(text: str) -> str:
    """A path or reason as one TSV field: backslash, tab and newline escaped."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def read_skip_report(index_dir: str, manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """[(path, reason)] from the manifest's skip report (escapes undone)."""
    p = os.path.join(index_dir, manifest.get("skipped_file", "skipped.tsv"))
    if not os.path.exists(p):
        return []
    with open(p, encoding="utf-8", errors="surrogateescape") as f:
        lines = f.read().split("\n")
    out = []
    for line in lines:
        if line:
            path, _, reason = line.partition("\t")
            out.append((_untsv(path), _untsv(reason)))
    return out


def _untsv(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"t": "\t", "n": "\n", "r": "\r"}.get(m.group(1), m.group(1)), text)


def write_skip_report(index_dir: str, name: str, skipped: list[tuple[str, str]]) -> None:
    from .data import one_line
    from .store import atomic_write_bytes

    atomic_write_bytes(os.path.join(index_dir, name), "".join(
        f"{tsv_field(p)}\t{tsv_field(one_line(r))}\n" for p, r in skipped).encode("utf-8", "surrogateescape"))


def publish_shards(index_dir: str, part_dir: str, shard_numbers, start: int, gen: int, name_offset: int = 0):
    """Copy partial shards into ``index_dir/shards`` under generation-``gen`` names with
    global row ids from ``start``. The partial shards are not modified.

    Returns (shard entries, list of code arrays, skipped [(path, reason)], next start).
    """
    import h5py

    shard_dir = os.path.join(index_dir, "shards")
    os.makedirs(shard_dir, exist_ok=True)
    shards, codes, skipped = [], [], []
    for s in shard_numbers:
        src = os.path.join(part_dir, f"part-{s:05d}.h5")
        with open(os.path.join(part_dir, f"part-{s:05d}.skip.json")) as f:
            skipped.extend((p, r) for p, r in json.load(f))
        name = gen_name(f"part-{s + name_offset:05d}", ".h5", gen)
        dst = os.path.join(shard_dir, name)
        tmp = os.path.join(shard_dir, f".tmp-{name}")
        shutil.copyfile(src, tmp)
        with h5py.File(tmp, "r+") as f:
            rows = len(f["codes"])
            f["ids"][...] = np.arange(start, start + rows, dtype=np.int64)
            codes.append(f["codes"][()])
        _fsync_file(tmp)
        sha = file_sha256(tmp)
        os.replace(tmp, dst)
        crash_point(f"finalize-shard-{s}")
        shards.append({"file": name, "rows": rows, "start": start, "sha256": sha})
        start += rows
    return shards, codes, skipped, start


def save_code_index(index_dir: str, index: BinaryIndex, gen: int) -> dict[str, str]:
    """Write the FAISS code index under a generation name; returns {"file", "sha256"}."""
    name = gen_name("codes", ".index", gen)
    tmp = os.path.join(index_dir, f".tmp-{name}")
    index.save(tmp)
    _fsync_file(tmp)
    sha = file_sha256(tmp)
    os.replace(tmp, os.path.join(index_dir, name))
    return {"file": name, "sha256": sha}


def store_model(index_dir: str, model_path: str) -> tuple[str, str]:
    """Copy the model into the index (content-addressed; reused when present). Returns (file, sha256)."""
    model_sha = file_sha256(model_path)
    for name in ("model.pt", f"model-{model_sha[:12]}.pt"):
        mp = os.path.join(index_dir, name)
        if os.path.exists(mp) and file_sha256(mp) == model_sha:
            return name, model_sha
    name = "model.pt" if not os.path.exists(os.path.join(index_dir, "model.pt")) else f"model-{model_sha[:12]}.pt"
    tmp = os.path.join(index_dir, f".tmp-{name}")
    shutil.copyfile(model_path, tmp)
    _fsync_file(tmp)
    os.replace(tmp, os.path.join(index_dir, name))
    return name, model_sha


def commit_manifest(index_dir: str, manifest: dict[str, Any], old: dict[str, Any] | None) -> None:
    """The one atomic step: rename the new manifest into place, then collect garbage."""
    crash_point("before-manifest")
    write_manifest(index_dir, manifest)
    crash_point("after-manifest")
    _collect_garbage(index_dir, manifest, old)


def finalize_build(
    index_dir: str,
    part_dir: str,
    nshards: int,
    model_path: str,
    model_cfg,
    spec: IndexSpec,
    feature_dtype: str,
    classes: list[str],
    source: str,
    scan_skipped: list[tuple[str, str]],
    tag: str = "",
) -> dict[str, Any]:
    """Number the rows, copy shards and model into ``index_dir``, build the code index,
    and commit by writing the manifest (the one atomic step). Returns the manifest.

    Crash-safe: the partial shards are copied, never moved or modified, and new files get
    names of a fresh generation, so a crash anywhere leaves the previous index intact and
    a rerun finalizes again from the same partial shards. ``tag`` is unused (kept for
    callers of the earlier signature).
    """
    os.makedirs(os.path.join(index_dir, "shards"), exist_ok=True)
    old = current_manifest(index_dir)
    gen = next_generation(index_dir, old)
    shards, codes, skipped, count = publish_shards(index_dir, part_dir, range(nshards), 0, gen)
    skipped = list(scan_skipped) + skipped
    all_codes = np.concatenate(codes) if codes else np.zeros((0, model_cfg.bits // 8), np.uint8)
    index_entry = save_code_index(index_dir, BinaryIndex.build(all_codes, spec), gen)
    model_name, model_sha = store_model(index_dir, model_path)
    skip_name = gen_name("skipped", ".tsv", gen)
    write_skip_report(index_dir, skip_name, skipped)
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "generation": gen,
        "created": now_iso(),
        "source": os.path.abspath(source),
        "model": {"file": model_name, "sha256": model_sha, "backbone": model_cfg.backbone,
                  "input_size": model_cfg.input_size, "load_size": model_cfg.load_size},
        "bits": model_cfg.bits,
        "bit_order": "little (faiss): bit j in byte j//8 at position j%8",
        "feature_dim": model_cfg.feature_dim,
        "feature_dtype": feature_dtype,
        "count": count,
        "classes": classes,
        "shards": shards,
        "index": {**spec.to_dict(model_cfg.bits), **index_entry},
        "skipped": len(skipped),
        "skipped_file": skip_name,
        "deleted": [],
    }
    commit_manifest(index_dir, manifest, old)
    return manifest


def manifest_files(m: dict[str, Any]) -> set[str]:
    """Files (relative to the index dir) that a manifest refers to."""
    files = {m["index"]["file"], m.get("skipped_file", "skipped.tsv")}
    if m["model"].get("file"):
        files.add(m["model"]["file"])
    files |= {os.path.join("shards", s["file"]) for s in m["shards"]}
    return files


_OWN_FILE_RE = re.compile(r"^(?:part-\d+.*\.h5|codes.*\.index|skipped.*\.tsv|model.*\.pt|\.tmp-.*)$")


def _collect_garbage(index_dir: str, new: dict[str, Any], old: dict[str, Any] | None) -> None:
    """Remove files of generations before ``old`` and leftovers of crashed attempts
    (``.tmp-*``): readers that opened ``old`` keep working. Only names dhf writes are
    touched. Call with the writer lock held (or from the only writer)."""
    keep = manifest_files(new) | (manifest_files(old) if old else set()) | {MANIFEST}
    shard_dir = os.path.join(index_dir, "shards")
    rels = list(os.listdir(index_dir)) + ([os.path.join("shards", f) for f in os.listdir(shard_dir)]
                                          if os.path.isdir(shard_dir) else [])
    for rel in rels:
        p = os.path.join(index_dir, rel)
        if rel in keep or os.path.isdir(p) or not _OWN_FILE_RE.match(os.path.basename(rel)):
            continue
        try:
            os.unlink(p)
        except OSError:
            pass


def prepare_build(images_dir: str, index_dir: str, spec: IndexSpec | None, feature_dtype: str, shard_size: int,
                  batch_size: int) -> tuple[IndexSpec, ImageList]:
    """Check build arguments, scan the images and create ``index_dir``: (spec, images)."""
    if feature_dtype not in ("float32", "float16"):
        raise DhfError("--feature-dtype must be float32 or float16")
    if shard_size < 1 or batch_size < 1:
        raise DhfError("--shard-size and --batch-size must be at least 1")
    images = scan_images(images_dir)
    if len(images) == 0:
        raise DhfError(f"no images found under {images_dir}")
    os.makedirs(index_dir, exist_ok=True)
    return spec or IndexSpec(), images


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
) -> BuildReport:
    """Encode every image under ``images_dir`` and write an index directory.

    Without ``model_path``, a folder with class subfolders is used to fine-tune a model
    first (``train_options`` go to :func:`train_model`); the model is saved in the index.
    An interrupted build is resumed by running the same call again: complete shards are
    kept in ``index_dir/.partial-<key>/``. An existing index in ``index_dir`` stays
    intact and searchable until the new manifest replaces it.
    """
    t0 = time.perf_counter()
    spec, images = prepare_build(images_dir, index_dir, spec, feature_dtype, shard_size, batch_size)
    with IndexLock(index_dir):
        current_manifest(index_dir)  # refuses to overwrite an index of a newer format
        return _build_locked(images, images_dir, index_dir, model_path, spec, batch_size, shard_size, feature_dtype,
                             device, progress, log, train_options, t0)


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
    plan = featurecache.choose_method(requested, labelled, dev, w not in (None, "none"))
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
    kw = {k: opts.pop(k) for k in ("bits", "weights", "input_size", "load_size") if k in opts}
    _, _, feats = _train(images, images_dir, model_path, backbone, kw.get("bits"), kw.get("weights", "default"),
                         dev, kw.get("input_size"), kw.get("load_size"), resume, progress, log, requested,
                         os.path.join(work, "fc7"), opts, plan=None if resume else plan)
    if feats is None:
        return model_path, work, None
    model = load_model(model_path, dev)
    return model_path, work, featurecache.cached_encoder(model, feats, images.paths, dev)


def _remove_train_dirs(index_dir: str) -> None:
    """Remove the training work dirs of builds into ``index_dir`` (after a commit, lock held)."""
    for name in os.listdir(index_dir):
        if name.startswith(TRAIN_DIR_PREFIX) and os.path.isdir(os.path.join(index_dir, name)):
            shutil.rmtree(os.path.join(index_dir, name), ignore_errors=True)


def _build_locked(images, images_dir, index_dir, model_path, spec, batch_size, shard_size, feature_dtype, device,
                  progress, log, train_options, t0) -> BuildReport:
    trained = False
    encode = None
    work = None
    dev = resolve_device(device)
    if model_path is None:
        model_path, work, encode = _train_for_build(images, images_dir, index_dir, dev, progress, log,
                                                    dict(train_options or {}))
        trained = True
    model = load_model(model_path)
    spec.check(model.config.bits)
    model.to(dev)
    key = _job_key(file_sha256(model_path), images.paths, shard_size, feature_dtype, file_stamps(images.paths))
    part_dir = os.path.join(index_dir, f".partial-{key[:16]}")
    nshards = (len(images) + shard_size - 1) // shard_size
    log(f"encoding {len(images)} images in {nshards} shard(s) with {model.config.backbone} "
        f"({model.config.bits} bits) on {dev}" + (" from the cached fc7 (no second decode)" if encode else ""))
    written, reused = encode_shards(model, images.paths, images.labels, part_dir, shard_size, batch_size, dev,
                                    feature_dtype, progress, encode=encode)
    if reused:
        log(f"resumed: reused {reused} complete shard(s) from an interrupted build")
    manifest = finalize_build(index_dir, part_dir, nshards, model_path, model.config, spec, feature_dtype,
                              images.classes, images_dir, images.skipped, key[:8])
    shutil.rmtree(part_dir, ignore_errors=True)
    if trained:
        _remove_train_dirs(index_dir)
    skipped = read_skip_report(index_dir, manifest)
    return BuildReport(index_dir, manifest["count"], skipped, written, reused, time.perf_counter() - t0, trained)


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
    paths = [f"row-{i}" for i in range(n)] if paths is None else list(paths)
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
        model = {"file": "model.pt", "sha256": file_sha256(model_path), "backbone": load_model(model_path).config.backbone}
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "created": now_iso(), "source": "arrays",
        "model": model, "bits": bits, "bit_order": "little (faiss): bit j in byte j//8 at position j%8",
        "feature_dim": int(features.shape[1]), "feature_dtype": str(np.dtype(features.dtype)), "count": n,
        "classes": list(classes or []), "shards": shards, "index": {**spec.to_dict(bits), "file": "codes.index"},
        "skipped": 0, "skipped_file": "skipped.tsv", "deleted": [],
    }
    write_manifest(index_dir, manifest)
    return manifest


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
