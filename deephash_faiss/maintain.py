"""Keeping an index directory alive: add images, remove rows, compact, verify.

Every change is a new *generation*: new files get new names (see
:func:`deephash_faiss.api.gen_name`), existing files are never modified, and the new
``manifest.json`` is renamed into place as the one atomic commit. Readers that opened
the previous generation keep working: its files are kept until the next commit
(:func:`deephash_faiss.api._collect_garbage`). Writers take ``INDEX/.lock``
(:class:`deephash_faiss.api.IndexLock`), so two writers never interleave.

* :func:`add_images` encodes new images with the index's own model into new shards
  (resumable like a build: ``INDEX/.partial-add-<key>/``), appends their codes to the
  code index and commits. Images whose path is already indexed (a live row, compared
  as absolute normalised paths) are not indexed again: they are listed in the skip
  report as "already indexed". A ``--model`` other than the index's (by sha256) is refused.
* :func:`remove` marks rows deleted (manifest ``deleted``); every search mode hides them.
  Ids stay stable.
* :func:`compact` rewrites the shards without the deleted rows and rebuilds the code
  index: ids are renumbered (0..n-1 in the old order).
* :func:`verify` checks checksums, row counts, the code index and the model.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .errors import DhfError

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def norm_path(p: str) -> str:
    """How paths are compared for ``add``/``remove``: absolute (from the current
    directory) and normalised; symlinks are not resolved."""
    return os.path.normpath(os.path.abspath(p))


def _live_paths(store, deleted: set[int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for i, p in enumerate(store.paths()):
        if i not in deleted:
            out.setdefault(norm_path(p), i)
    return out


@dataclass
class AddReport:
    index_dir: str
    added: int
    count: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # bad files (this run)
    already: list[str] = field(default_factory=list)  # paths already indexed, not added again
    shards_written: int = 0
    shards_reused: int = 0
    generation: int = 0
    seconds: float = 0.0


def add_images(
    index_dir: str,
    images_dir: str,
    model_path: str | None = None,
    batch_size: int = 128,
    shard_size: int = 50_000,
    device: str = "auto",
    progress: bool = True,
    log: Log = _quiet,
) -> AddReport:
    """Append the images under ``images_dir`` to an existing index (a new generation).

    Class subfolders of ``images_dir`` map to the index's classes by name (new names are
    appended to the class list); images directly in ``images_dir`` are unlabelled.

    Raises:
        DhfError: no index, another writer holds the lock, ``model_path`` differs from
            the index's model, no images found.
    """
    from . import api
    from .data import scan_images
    from .index import BinaryIndex, IndexSpec
    from .model import file_sha256, load_model, resolve_device
    from .store import FeatureStore, read_manifest

    t0 = time.perf_counter()
    if shard_size < 1 or batch_size < 1:
        raise DhfError("--shard-size and --batch-size must be at least 1")
    read_manifest(index_dir)  # clear error for a missing / foreign index before locking
    images = scan_images(images_dir)
    if len(images) == 0:
        raise DhfError(f"no images found under {images_dir}")
    with api.IndexLock(index_dir):
        old = read_manifest(index_dir)
        if not old["model"].get("file"):
            raise DhfError(f"{index_dir} has no model (built from arrays): images cannot be added")
        index_model = os.path.join(index_dir, old["model"]["file"])
        if model_path is not None:
            sha = file_sha256(model_path) if os.path.exists(model_path) else None
            if sha is None:
                raise DhfError(f"model file not found: {model_path}")
            if sha != old["model"]["sha256"]:
                raise DhfError(f"{model_path} is not the model this index was built with (sha256 {sha[:12]}… vs "
                               f"{old['model']['sha256'][:12]}…): codes would not be comparable; rebuild instead")
        store = FeatureStore(index_dir, old)
        deleted = set(int(i) for i in old.get("deleted", []))
        live = _live_paths(store, deleted)
        classes = list(old.get("classes", []))
        new_paths, new_labels, already = [], [], []
        for p, lab in zip(images.paths, images.labels):
            if norm_path(p) in live:
                already.append(p)
                continue
            if lab >= 0:
                name = images.classes[lab]
                if name not in classes:
                    classes.append(name)
                lab = classes.index(name)
            new_paths.append(p)
            new_labels.append(int(lab))
        if already:
            log(f"{len(already)} image(s) already in the index: not added again")
        if not new_paths:
            return AddReport(index_dir, 0, int(old["count"]), list(images.skipped), already,
                             seconds=time.perf_counter() - t0, generation=int(old.get("generation", 1)))
        model = load_model(index_model)
        if model_path is None and file_sha256(index_model) != old["model"]["sha256"]:
            raise DhfError(f"{index_model} does not match the manifest's sha256 (run `dhf verify`)")
        dev = resolve_device(device)
        model.to(dev)
        dtype = old["feature_dtype"]
        key = api._job_key(old["model"]["sha256"], new_paths, shard_size, dtype,
                           f"add:{old.get('generation', 1)}:{old['count']}\n" + api.file_stamps(new_paths))
        part_dir = os.path.join(index_dir, f".partial-add-{key[:16]}")
        nshards = (len(new_paths) + shard_size - 1) // shard_size
        log(f"adding {len(new_paths)} image(s) in {nshards} shard(s) to {index_dir} ({old['count']} rows)")
        labels = np.asarray(new_labels, dtype=np.int32)
        written, reused = api.encode_shards(model, new_paths, labels, part_dir, shard_size, batch_size, dev, dtype,
                                            progress)
        if reused:
            log(f"resumed: reused {reused} complete shard(s) from an interrupted add")
        gen = api.next_generation(index_dir, old)
        shards, codes, bad, count = api.publish_shards(index_dir, part_dir, range(nshards), int(old["count"]), gen,
                                                       name_offset=len(old["shards"]))
        spec = IndexSpec.from_dict(old["index"])
        idx = BinaryIndex.load(os.path.join(index_dir, old["index"]["file"]), spec, int(old["bits"]))
        if idx.ntotal != int(old["count"]):
            raise DhfError(f"{index_dir}: code index holds {idx.ntotal} codes, the manifest {old['count']} "
                           f"(run `dhf verify`)")
        for c in codes:
            idx.add(c)
        index_entry = api.save_code_index(index_dir, idx, gen)
        skipped_now = list(images.skipped) + bad
        report = api.read_skip_report(index_dir, old) + skipped_now + [
            (p, "already indexed (dhf add does not index a path twice)") for p in already]
        skip_name = api.gen_name("skipped", ".tsv", gen)
        api.write_skip_report(index_dir, skip_name, report)
        manifest = dict(old)
        manifest.update(
            generation=gen, updated=api.now_iso(), count=count, classes=classes, shards=old["shards"] + shards,
            index={**spec.to_dict(int(old["bits"])), **index_entry}, skipped=len(report), skipped_file=skip_name,
        )
        api.commit_manifest(index_dir, manifest, old)
        shutil.rmtree(part_dir, ignore_errors=True)
    return AddReport(index_dir, count - int(old["count"]), count, skipped_now, already, written, reused, gen,
                     time.perf_counter() - t0)


@dataclass
class RemoveReport:
    index_dir: str
    removed: list[int]
    live: int
    generation: int


def remove(index_dir: str, paths: Sequence[str] = (), ids: Sequence[int] = ()) -> RemoveReport:
    """Mark rows deleted by path (as indexed, compared like :func:`norm_path`) or by id.

    All-or-nothing: an unknown path or id, or one already removed, is an error and
    nothing changes.
    """
    from . import api
    from .store import FeatureStore, read_manifest

    if not paths and not ids:
        raise DhfError("give --paths or --ids to remove")
    read_manifest(index_dir)
    with api.IndexLock(index_dir):
        old = read_manifest(index_dir)
        n = int(old["count"])
        deleted = set(int(i) for i in old.get("deleted", []))
        want: list[int] = []
        problems: list[str] = []
        for i in ids:
            i = int(i)
            if not 0 <= i < n:
                problems.append(f"id {i} is not in the index (0..{n - 1})")
            elif i in deleted:
                problems.append(f"id {i} was already removed")
            else:
                want.append(i)
        if paths:
            live = _live_paths(FeatureStore(index_dir, old), deleted)
            for p in paths:
                i = live.get(norm_path(p))
                if i is None:
                    problems.append(f"path {p} is not in the index (or already removed)")
                else:
                    want.append(i)
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise DhfError("; ".join(problems[:3]) + more + "; nothing removed")
        want = sorted(set(want))
        manifest = dict(old)
        manifest.update(generation=api.next_generation(index_dir, old), updated=api.now_iso(),
                        deleted=sorted(deleted | set(want)))
        api.commit_manifest(index_dir, manifest, old)
    return RemoveReport(index_dir, want, n - len(manifest["deleted"]), manifest["generation"])


@dataclass
class CompactReport:
    index_dir: str
    dropped: int
    count: int
    generation: int


def compact(index_dir: str) -> CompactReport:
    """Rewrite the index without its deleted rows (ids are renumbered 0..n-1, order kept)."""
    from . import api
    from .index import BinaryIndex, IndexSpec
    from .store import read_manifest, read_shard, write_shard

    read_manifest(index_dir)
    with api.IndexLock(index_dir):
        old = read_manifest(index_dir)
        deleted = np.zeros(int(old["count"]), bool)
        if old.get("deleted"):
            deleted[np.asarray(old["deleted"], np.int64)] = True
        if not deleted.any():
            return CompactReport(index_dir, 0, int(old["count"]), int(old.get("generation", 1)))
        gen = api.next_generation(index_dir, old)
        shards, codes, start = [], [], 0
        for j, s in enumerate(old["shards"]):
            d = read_shard(os.path.join(index_dir, "shards", s["file"]))
            keep = ~deleted[int(s["start"]):int(s["start"]) + int(s["rows"])]
            rows = int(keep.sum())
            if rows == 0:
                continue
            name = api.gen_name(f"part-{len(shards):05d}", ".h5", gen)
            info = write_shard(os.path.join(index_dir, "shards", name), d["codes"][keep], d["features"][keep],
                               np.arange(start, start + rows, dtype=np.int64),
                               [p for p, k in zip(d["paths"], keep) if k], d["labels"][keep])
            shards.append({**info, "start": start})
            codes.append(d["codes"][keep])
            start += rows
        spec = IndexSpec.from_dict(old["index"])
        nb = int(old["bits"]) // 8
        idx = BinaryIndex.build(np.concatenate(codes) if codes else np.zeros((0, nb), np.uint8), spec)
        index_entry = api.save_code_index(index_dir, idx, gen)
        manifest = dict(old)
        manifest.update(generation=gen, updated=api.now_iso(), count=start, shards=shards, deleted=[],
                        index={**spec.to_dict(int(old["bits"])), **index_entry})
        api.commit_manifest(index_dir, manifest, old)
    return CompactReport(index_dir, int(deleted.sum()), start, gen)


def verify(index_dir: str, check_model: bool = True) -> list[str]:
    """Check an index directory; returns one line per problem (empty: all good).

    Checks: the manifest (readable, known format and version), every shard's sha256
    and row counts (all five datasets), shard starts and the total count, code width and
    feature dimension/dtype of every shard, the code index (present, sha256 when recorded,
    readable, ntotal = count, bits), deleted ids in range, the model file (present,
    sha256, loadable, same bits and feature size), the skip report.
    """
    from .index import BinaryIndex, IndexSpec
    from .model import file_sha256
    from .store import read_manifest, verify_shard_checksums

    try:
        m = read_manifest(index_dir)
    except DhfError as err:
        return [str(err)]
    problems: list[str] = []
    try:
        bits, count, dim = int(m["bits"]), int(m["count"]), int(m["feature_dim"])
        dtype = np.dtype(m["feature_dtype"])
        shards = list(m["shards"])
        index_entry = dict(m["index"])
    except (KeyError, TypeError, ValueError) as err:
        return [f"manifest is incomplete or malformed: {type(err).__name__}: {err}"]
    shard_problems = verify_shard_checksums(index_dir, m)
    problems += shard_problems
    bad_files = {p.split(":", 1)[0].removeprefix("shard ") for p in shard_problems}
    start = 0
    for s in shards:
        if int(s.get("start", start)) != start:
            problems.append(f"shard {s['file']}: starts at row {s.get('start')}, expected {start}")
        start += int(s["rows"])
        if s["file"] in bad_files:
            continue
        try:
            import h5py

            with h5py.File(os.path.join(index_dir, "shards", s["file"]), "r") as f:
                cshape, fshape, fdtype = f["codes"].shape, f["features"].shape, f["features"].dtype
        except (OSError, KeyError) as err:
            problems.append(f"shard {s['file']}: unreadable ({err})")
            continue
        if len(cshape) != 2 or cshape[1] != bits // 8:
            problems.append(f"shard {s['file']}: codes are {cshape}, expected [n, {bits // 8}] for {bits} bits")
        if len(fshape) != 2 or fshape[1] != dim:
            problems.append(f"shard {s['file']}: features are {fshape}, expected [n, {dim}]")
        if fdtype != dtype:
            problems.append(f"shard {s['file']}: features are {fdtype}, the manifest says {dtype}")
    if start != count:
        problems.append(f"shards hold {start} rows, the manifest says {count}")
    ipath = os.path.join(index_dir, str(index_entry.get("file")))
    if not os.path.exists(ipath):
        problems.append(f"code index {index_entry.get('file')}: missing")
    elif index_entry.get("sha256") and file_sha256(ipath) != index_entry["sha256"]:
        problems.append(f"code index {index_entry['file']}: checksum mismatch (modified or truncated)")
    else:
        try:
            idx = BinaryIndex.load(ipath, IndexSpec.from_dict(index_entry), bits)
            if idx.ntotal != count:
                problems.append(f"code index {index_entry['file']}: holds {idx.ntotal} codes, the manifest {count}")
            from . import index as index_mod

            pad = getattr(index_mod, "padded_nbytes", lambda nb: nb)(bits // 8) * 8
            if int(idx.index.d) not in (bits, pad):
                problems.append(f"code index {index_entry['file']}: {idx.index.d} bits, the manifest {bits}")
        except DhfError as err:
            problems.append(str(err))
    deleted = m.get("deleted") or []
    if any(not (0 <= int(i) < count) for i in deleted):
        problems.append(f"deleted ids out of range 0..{count - 1}")
    if len(set(int(i) for i in deleted)) != len(deleted):
        problems.append("deleted ids repeat")
    mod = m.get("model") or {}
    if mod.get("file"):
        mpath = os.path.join(index_dir, mod["file"])
        if not os.path.exists(mpath):
            problems.append(f"model {mod['file']}: missing")
        elif file_sha256(mpath) != mod.get("sha256"):
            problems.append(f"model {mod['file']}: sha256 differs from the manifest (modified or replaced)")
        elif check_model:
            from .model import read_checkpoint

            try:
                cfg = read_checkpoint(mpath)["config"]
                if int(cfg["bits"]) != bits:
                    problems.append(f"model {mod['file']}: {cfg['bits']} bits, the index {bits}")
                if int(cfg["feature_dim"]) != dim:
                    problems.append(f"model {mod['file']}: {cfg['feature_dim']}-d features, the index {dim}-d")
            except (DhfError, KeyError, TypeError, ValueError) as err:
                problems.append(f"model {mod['file']}: {err}")
    sk = m.get("skipped_file")
    if sk and not os.path.exists(os.path.join(index_dir, sk)):
        problems.append(f"skip report {sk}: missing")
    return problems


def index_summary(index_dir: str) -> dict[str, Any]:
    from .store import read_manifest

    m = read_manifest(index_dir)
    return {"count": int(m["count"]), "deleted": len(m.get("deleted", [])), "generation": m.get("generation", 1),
            "shards": len(m["shards"])}
