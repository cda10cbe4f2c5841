"""Keeping an index directory alive: add images, remove rows, compact, verify.

Every change is a new *generation*: new files get new names (see
:func:`deephash_faiss.layout.gen_name`), existing files are never modified, and the new
``manifest.json`` is renamed into place as the one atomic commit. Readers that opened
the previous generation keep working: its files are kept until the next commit
(:func:`deephash_faiss.layout.collect_garbage`). Writers take ``INDEX/.lock``
(:class:`deephash_faiss.layout.IndexLock`), so two writers never interleave.

* :func:`add_images` encodes new images with the index's own model into new shards
  (resumable like a build: ``INDEX/.partial-add-<key>/``), appends their codes to the
  code index and commits. Images whose path is already indexed (a live row, compared
  as absolute normalised paths) are not indexed again: they are listed in the skip
  report as "already indexed". A ``--model`` other than the index's (by sha256) is refused.
* :func:`remove` marks rows deleted (manifest ``deleted``); every search mode hides them.
  Ids stay stable.
* :func:`compact` rewrites the shards without the deleted rows and rebuilds the code
  index: ids are renumbered (0..n-1 in the old order).
* :func:`verify` checks checksums, row counts, the code index, the model and the fine index.
* :func:`build_fine` (``dhf fine-index``) builds the HDS fine index
  (:class:`deephash_faiss.fine.FineIndex`) and saves it with the index (manifest ``fine``);
  ``add`` puts the new rows into it, ``compact`` renumbers it, ``remove`` leaves it (removed
  rows are filtered at search). One that cannot be read is dropped by ``add`` / ``compact``
  with one line saying so, never carried over stale.
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
    """How a path given by the user is compared for ``add``/``remove``: the stored form,
    :func:`deephash_faiss.store.canonical_path` (absolute from the current directory,
    normalised, symlinks not resolved)."""
    from .store import canonical_path

    return canonical_path(p)


def _legacy_resolve(source: str, p: str) -> str | None:
    """Where a relative path stored by an older dhf (relative to the build's working
    directory, unknown) lies, from the manifest's ``source`` (the absolute images folder).

    The stored path was ``ROOT/tail`` with ``ROOT`` as typed and ``source`` =
    abspath(``ROOT``): after ``ROOT``'s leading ``..`` parts, its remaining parts are the last
    parts of ``source``; the longest such overlap with the path's first parts is taken.
    """
    if not os.path.isabs(source):
        return None
    parts = [x for x in os.path.normpath(p).split(os.sep) if x not in ("", ".")]
    while parts and parts[0] == "..":
        parts.pop(0)
    src = [x for x in source.split(os.sep) if x]
    for m in range(min(len(src), len(parts) - 1), -1, -1):
        if src[len(src) - m:] == parts[:m]:
            return os.path.join(source, *parts[m:])
    return None


def _live_paths(store, deleted: set[int]) -> dict[str, int]:
    """Canonical path -> id of every live row. Paths stored relative by an older dhf are
    entered both resolved from the current directory (as they were compared before) and
    from the manifest's ``source`` (:func:`_legacy_resolve`)."""
    source = str(store.manifest.get("source") or "")
    out: dict[str, int] = {}
    for i, p in enumerate(store.paths()):
        if i in deleted:
            continue
        out.setdefault(norm_path(p), i)
        if not os.path.isabs(p):
            q = _legacy_resolve(source, p)
            if q is not None:
                out.setdefault(q, i)
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
    executor=None,
) -> AddReport:
    """Append the images under ``images_dir`` to an existing index (a new generation).

    Runs the build pipeline (:mod:`deephash_faiss.pipeline`): lock, job key, encode through
    ``executor`` (default: a :class:`~deephash_faiss.pipeline.LocalExecutor` on ``device``;
    the index's decoder), then publish and commit here.

    Class subfolders of ``images_dir`` map to the index's classes by name (new names are
    appended to the class list); images directly in ``images_dir`` are unlabelled.

    Raises:
        DhfError: no index, another writer holds the lock, ``model_path`` differs from
            the index's model, no images found.
    """
    from . import api, layout, pipeline
    from .data import scan_images
    from .index import BinaryIndex, IndexSpec
    from .model import file_sha256
    from .store import FeatureStore, check_open, checked_code_index_path, read_manifest

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
        # the new code index is the old one plus the new codes: check it (sha256) and the
        # shards' sizes before building on them, or a tampered file would be committed with
        # a fresh checksum and `verify` would call it OK
        check_open(index_dir, _without_fine(old))  # the fine index: _fine_for_update (dropped if unusable)
        code_index_path = checked_code_index_path(index_dir, old)
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
        if model_path is None and file_sha256(index_model) != old["model"]["sha256"]:
            raise DhfError(f"{index_model} does not match the manifest's sha256 (run `dhf verify`)")
        executor = executor or pipeline.LocalExecutor(device)
        job = pipeline.add_job(index_dir, old, new_paths, np.asarray(new_labels, dtype=np.int32), shard_size,
                               batch_size)
        pipeline.check_executor_decoder(executor, job.decoder)
        part_dir, nshards = job.part_dir, job.nshards
        log(f"adding {len(new_paths)} image(s) in {nshards} shard(s) to {index_dir} ({old['count']} rows)")
        written, reused = pipeline.encode(job, executor, progress, log)
        bad_now = [b for sh in range(nshards) for b in layout.read_part_skips(part_dir, sh)]
        if len(bad_now) >= len(new_paths) and not already:  # as a build: a folder of nothing usable is an error
            shutil.rmtree(part_dir, ignore_errors=True)
            raise DhfError(f"none of the {len(new_paths)} new images under {images_dir} could be decoded "
                           f"({bad_now[0][0]}: {bad_now[0][1]}); {index_dir} was not changed")
        gen = api.next_generation(index_dir, old)
        shards, codes, bad, count = api.publish_shards(index_dir, part_dir, range(nshards), int(old["count"]), gen,
                                                       name_offset=len(old["shards"]))
        spec = IndexSpec.from_dict(old["index"])
        idx = BinaryIndex.load(code_index_path, spec, int(old["bits"]))
        if idx.ntotal != int(old["count"]):
            raise DhfError(f"{index_dir}: code index holds {idx.ntotal} codes, the manifest {old['count']} "
                           f"(run `dhf verify`)")
        for c in codes:
            idx.add(c)
        index_entry = api.save_code_index(index_dir, idx, gen)
        fine = _fine_for_update(index_dir, old, log)
        if fine is not None:
            from .store import read_shard as _rs

            new_codes = np.concatenate(codes) if codes else np.zeros((0, int(old["bits"]) // 8), np.uint8)
            new_feats = [_rs(os.path.join(index_dir, "shards", s["file"]))["features"] for s in shards]
            fine.add(new_codes, np.concatenate(new_feats) if new_feats else np.zeros((0, int(old["feature_dim"]))))
            fine_entry = api.save_fine_index(index_dir, fine, gen, index_entry)
            log(f"fine index: {len(new_codes)} row(s) added ({fine.n_lists} lists)")
        skipped_now = list(images.skipped) + bad
        report = api.read_skip_report(index_dir, old) + skipped_now + [
            (p, "already indexed (dhf add does not index a path twice)") for p in already]
        skip_name = api.gen_name("skipped", ".tsv", gen)
        api.write_skip_report(index_dir, skip_name, report)
        manifest = dict(old)
        manifest.pop("fine", None)
        manifest.update(
            generation=gen, updated=api.now_iso(), count=count, classes=classes, shards=old["shards"] + shards,
            index={**spec.to_dict(int(old["bits"])), **index_entry}, skipped=len(report), skipped_file=skip_name,
        )
        if fine is not None:
            manifest["fine"] = fine_entry
        api.commit_manifest(index_dir, manifest, old, keep_partial=part_dir)
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


def compact(index_dir: str, log: Log = _quiet) -> CompactReport:
    """Rewrite the index without its deleted rows (ids are renumbered 0..n-1, order kept)."""
    from . import api
    from .index import BinaryIndex, IndexSpec
    from .layout import own
    from .store import check_open, read_manifest, read_shard, write_shard

    read_manifest(index_dir)
    with api.IndexLock(index_dir):
        old = read_manifest(index_dir)
        deleted = np.zeros(int(old["count"]), bool)
        if old.get("deleted"):
            deleted[np.asarray(old["deleted"], np.int64)] = True
        if not deleted.any():
            return CompactReport(index_dir, 0, int(old["count"]), int(old.get("generation", 1)))
        # compact rewrites every shard and the code index from the shards: check them all
        # (sha256) first, or tampered rows would be committed under fresh checksums
        check_open(index_dir, _without_fine(old), full=True)
        gen = api.next_generation(index_dir, old)
        shards, codes, start = [], [], 0
        for j, s in enumerate(old["shards"]):
            d = read_shard(os.path.join(index_dir, "shards", s["file"]))
            keep = ~deleted[int(s["start"]):int(s["start"]) + int(s["rows"])]
            rows = int(keep.sum())
            if rows == 0:
                continue
            name = api.gen_name(f"part-{len(shards):05d}", ".h5", gen)
            own(index_dir, [os.path.join("shards", name)])  # in the ledger before it exists
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
        manifest.pop("fine", None)
        manifest.update(generation=gen, updated=api.now_iso(), count=start, shards=shards, deleted=[],
                        index={**spec.to_dict(int(old["bits"])), **index_entry})
        fine = _fine_for_update(index_dir, old, log)
        if fine is not None:
            fine.compact(~deleted)
            manifest["fine"] = api.save_fine_index(index_dir, fine, gen, index_entry)
            log(f"fine index: renumbered ({fine.rows} rows)")
        api.commit_manifest(index_dir, manifest, old)
    return CompactReport(index_dir, int(deleted.sum()), start, gen)


def _without_fine(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if k != "fine"}


def _fine_for_update(index_dir: str, old: dict[str, Any], log: Log):
    """The saved fine index, fully checked (sha256), to be updated by a writer; None when there
    is none or it cannot be used (then it is dropped from the new generation, with one line)."""
    fe = old.get("fine")
    if not fe:
        return None
    from .fine import FineIndex
    from .layout import fine_entry_problem
    from .store import check_fine_file

    try:
        problem = fine_entry_problem(old)
        if problem:
            raise DhfError(problem)
        return FineIndex.load(check_fine_file(index_dir, fe, full=True))
    except DhfError as err:
        log(f"fine index dropped: {err}; build a new one with `dhf fine-index`")
        return None


@dataclass
class FineReport:
    index_dir: str
    cell_size: int
    lists: int
    rows: int
    file: str | None
    bytes: int
    generation: int
    seconds: float
    storage: str = ""  # the list storage built ("pq4", "sq8", "fp16": "auto" resolved)


class _RowSource:
    """Feature rows of an index by id through :meth:`FeatureStore.gather` (``x[ids]``,
    ``x[a:b]``), so a build reads shards row block by row block instead of loading them all."""

    def __init__(self, store):
        self.store, self.shape = store, (store.count, store.dim)

    def __getitem__(self, key):
        if isinstance(key, slice):
            key = np.arange(*key.indices(self.store.count))
        return self.store.gather(np.asarray(key, np.int64))


def build_fine(index_dir: str, cell_size: int | None = None, storage: str = "auto", drop: bool = False,
               log: Log = _quiet) -> FineReport:
    """Build the HDS fine index of ``index_dir`` (k-means cells of fc7 inside the codes of
    more than ``cell_size`` rows (None: :func:`deephash_faiss.fine.default_cell_size` of the
    live rows), ``storage`` "pq4", "sq8" or "fp16" lists; see
    :mod:`deephash_faiss.fine`) and commit it with the index as a new generation; ``drop``
    removes it instead. Deleted rows are left out.

    Raises:
        DhfError: no index, another writer holds the lock, a shard or the code index does not
            match its checksum, bad ``cell_size`` / ``storage``."""
    from . import api
    from .fine import STORAGES, FineIndex
    from .index import BinaryIndex, BucketIndex, IndexSpec
    from .store import FeatureStore, check_open, read_manifest

    t0 = time.perf_counter()
    if storage not in STORAGES + ("auto",):
        raise DhfError(f"unknown fine-index storage {storage!r}; choose from {', '.join(STORAGES)} (--storage)")
    if cell_size is not None and cell_size < 1:
        raise DhfError("the cell size must be at least 1 (--cell-size)")
    read_manifest(index_dir)
    with api.IndexLock(index_dir):
        old = read_manifest(index_dir)
        gen = api.next_generation(index_dir, old)
        manifest = dict(old)
        manifest.pop("fine", None)
        manifest.update(generation=gen, updated=api.now_iso())
        if drop:
            if not old.get("fine"):
                raise DhfError(f"{index_dir} has no fine index to drop")
            api.commit_manifest(index_dir, manifest, old)
            return FineReport(index_dir, 0, 0, 0, None, 0, gen, time.perf_counter() - t0)
        # the lists are built from the shards' features and the codes: check them all first
        check_open(index_dir, _without_fine(old), full=True)
        store = FeatureStore(index_dir, old)
        idx = BinaryIndex.load(os.path.join(index_dir, old["index"]["file"]), IndexSpec.from_dict(old["index"]),
                               int(old["bits"]))
        d = idx if isinstance(idx, BucketIndex) else BucketIndex.build(store.codes())
        if old.get("deleted"):
            mask = np.zeros(store.count, bool)
            mask[np.asarray(old["deleted"], np.int64)] = True
            d.deleted = mask
        log(f"building the fine index of {index_dir}: {store.count} rows, {d.n_codes} distinct codes, "
            f"cell size {cell_size or 'auto'}, {storage}")
        fine = FineIndex.build(d, _RowSource(store), cell_size=cell_size, storage=storage, log=log)
        entry = api.save_fine_index(index_dir, fine, gen, old["index"])
        manifest["fine"] = entry
        api.commit_manifest(index_dir, manifest, old)
    size = os.path.getsize(os.path.join(index_dir, entry["file"]))
    return FineReport(index_dir, fine.cell_size, fine.n_lists, fine.rows, entry["file"], size, gen,
                      time.perf_counter() - t0, fine.storage)


def _verify_fine(index_dir: str, m: dict[str, Any], shard_codes: list) -> list[str]:
    """Problems of the fine index: file (present, size, sha256, readable), made for this code
    index and row count, its entries (each live row exactly once, ids in range) and each row
    in a list of its own code (when the shards' codes could be read)."""
    from .fine import FineIndex
    from .layout import fine_entry_problem
    from .model import file_sha256

    fe = m["fine"]
    name = fe["file"]
    path = os.path.join(index_dir, name)
    if not os.path.exists(path):
        return [f"fine index {name}: missing"]
    if "size" in fe and os.path.getsize(path) != fe["size"]:
        return [f"fine index {name}: {os.path.getsize(path)} bytes, the manifest recorded {fe['size']}"]
    if file_sha256(path) != fe.get("sha256"):
        return [f"fine index {name}: checksum mismatch (modified or truncated)"]
    try:
        fine = FineIndex.load(path)
    except DhfError as err:
        return [str(err)]
    problems = []
    stale = fine_entry_problem(m)
    if stale:
        problems.append(stale)
    count = int(m["count"])
    if fine.rows != count:
        problems.append(f"fine index {name}: covers {fine.rows} rows, the index {count}")
        return problems
    if fine.dim != int(m["feature_dim"]):
        problems.append(f"fine index {name}: {fine.dim}-d, the features {m['feature_dim']}-d")
    if fine.storage != fe.get("storage") or fine.cell_size != fe.get("cell_size"):
        problems.append(f"fine index {name}: storage/cell size differ from the manifest's")
    sizes, ids, _ = fine.export_lists()
    if len(ids) and (ids.min() < 0 or ids.max() >= count):
        return problems + [f"fine index {name}: ids outside 0..{count - 1}"]
    seen = np.bincount(ids, minlength=count)
    deleted = np.zeros(count, bool)
    if m.get("deleted"):
        deleted[np.asarray(m["deleted"], np.int64)] = True
    if (seen > 1).any():
        problems.append(f"fine index {name}: {int((seen > 1).sum())} row(s) in more than one list")
    lost = np.flatnonzero((seen == 0) & ~deleted)
    if len(lost):
        problems.append(f"fine index {name}: {len(lost)} live row(s) in no list (first: id {lost[0]})")
    if shard_codes and all(c is not None for c in shard_codes) and len(ids):
        rowcodes = np.concatenate(shard_codes)
        group_of_list = np.repeat(np.arange(len(fine.codes)), np.diff(fine.list_offsets))
        owner = np.repeat(np.arange(len(sizes)), sizes)
        wrong = np.flatnonzero((fine.codes[group_of_list[owner]] != rowcodes[ids]).any(axis=1))
        if len(wrong):
            problems.append(f"fine index {name}: {len(wrong)} row(s) in a list of another code "
                            f"(first: id {ids[wrong[0]]})")
    return problems


def verify(index_dir: str, check_model: bool = True) -> list[str]:
    """Check an index directory; returns one line per problem (empty: all good).

    Checks: the manifest (readable, known format and version, every field well formed:
    :func:`deephash_faiss.store.validate_manifest`), every shard's sha256, size and row
    counts (all five datasets), code width and feature dimension/dtype of every shard,
    each shard's ``ids`` = its ``start`` + 0..rows-1, labels within the class list, the code
    index (present, size and sha256 when recorded, readable, ntotal = count, bits, and its
    codes equal the shards' codes row by row, padding zero), deleted ids unique, the model
    file (present, size, sha256, loadable, same bits and feature size), the skip report
    (present, as many lines as the manifest's ``skipped``), the fine index when there is one
    (:func:`_verify_fine`).
    """
    import h5py

    from . import api
    from .index import BinaryIndex, IndexSpec
    from .model import file_sha256
    from .store import MANIFEST, read_manifest, validate_manifest, verify_shard_checksums

    try:
        m = read_manifest(index_dir)
    except DhfError as err:
        if "malformed manifest" in str(err):  # list every field problem, not just the first
            return _manifest_problems(os.path.join(index_dir, MANIFEST), validate_manifest) or [str(err)]
        return [str(err)]
    problems: list[str] = []
    bits, count, dim = m["bits"], m["count"], m["feature_dim"]
    dtype = np.dtype(m["feature_dtype"])
    nb = bits // 8
    shards, index_entry = m["shards"], m["index"]
    nclasses = len(m.get("classes") or [])
    shard_problems = verify_shard_checksums(index_dir, m)
    problems += shard_problems
    bad_files = {p.split(":", 1)[0].removeprefix("shard ") for p in shard_problems}
    shard_codes: list[np.ndarray | None] = []  # per shard, None when it could not be read
    starts = np.cumsum([0] + [s["rows"] for s in shards])
    for j, s in enumerate(shards):
        path = os.path.join(index_dir, "shards", s["file"])
        if "size" in s and os.path.exists(path) and os.path.getsize(path) != s["size"]:
            problems.append(f"shard {s['file']}: {os.path.getsize(path)} bytes, the manifest recorded {s['size']}")
        shard_codes.append(None)
        if s["file"] in bad_files:
            continue
        try:
            with h5py.File(path, "r") as f:
                cshape, fshape, fdtype = f["codes"].shape, f["features"].shape, f["features"].dtype
                codes, ids, labels = f["codes"][()], f["ids"][()], f["labels"][()]
        except (OSError, KeyError) as err:
            problems.append(f"shard {s['file']}: unreadable ({err})")
            continue
        if len(cshape) != 2 or cshape[1] != nb:
            problems.append(f"shard {s['file']}: codes are {cshape}, expected [n, {nb}] for {bits} bits")
        else:
            shard_codes[-1] = codes
        if len(fshape) != 2 or fshape[1] != dim:
            problems.append(f"shard {s['file']}: features are {fshape}, expected [n, {dim}]")
        if fdtype != dtype:
            problems.append(f"shard {s['file']}: features are {fdtype}, the manifest says {dtype}")
        start = int(starts[j])
        wrong = np.flatnonzero(np.asarray(ids, np.int64) != np.arange(start, start + len(ids)))
        if len(wrong):
            problems.append(f"shard {s['file']}: ids differ from its start {start} + row number at {len(wrong)} "
                            f"row(s) (first: row {wrong[0]} has id {ids[wrong[0]]})")
        labels = np.asarray(labels, np.int64)
        out = np.flatnonzero((labels < -1) | (labels >= nclasses))
        if len(out):
            problems.append(f"shard {s['file']}: {len(out)} label(s) outside -1..{nclasses - 1} (the class list has "
                            f"{nclasses}; first: {labels[out[0]]} at row {out[0]})")
    ipath = os.path.join(index_dir, index_entry["file"])
    if not os.path.exists(ipath):
        problems.append(f"code index {index_entry['file']}: missing")
    elif "size" in index_entry and os.path.getsize(ipath) != index_entry["size"]:
        problems.append(f"code index {index_entry['file']}: {os.path.getsize(ipath)} bytes, the manifest recorded "
                        f"{index_entry['size']}")
    elif index_entry.get("sha256") and file_sha256(ipath) != index_entry["sha256"]:
        problems.append(f"code index {index_entry['file']}: checksum mismatch (modified or truncated)")
    else:
        try:
            idx = BinaryIndex.load(ipath, IndexSpec.from_dict(index_entry), bits)
            from . import index as index_mod

            pad = index_mod.padded_nbytes(nb) * 8
            if idx.ntotal != count:
                problems.append(f"code index {index_entry['file']}: holds {idx.ntotal} codes, the manifest {count}")
            elif int(idx.index.d) not in (bits, pad):
                problems.append(f"code index {index_entry['file']}: {idx.index.d} bits, the manifest {bits}")
            elif all(c is not None for c in shard_codes):
                problems += _cross_check_codes(idx, shards, shard_codes, nb, index_entry["file"])
        except DhfError as err:
            problems.append(str(err))
    deleted = m.get("deleted") or []
    if len(set(deleted)) != len(deleted):
        problems.append("deleted ids repeat")
    mod = m["model"]
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
    if m.get("fine"):
        problems += _verify_fine(index_dir, m, shard_codes)
    sk = m.get("skipped_file")
    if sk and not os.path.exists(os.path.join(index_dir, sk)):
        problems.append(f"skip report {sk}: missing")
    elif sk and isinstance(m.get("skipped"), int) and len(api.read_skip_report(index_dir, m)) != m["skipped"]:
        problems.append(f"skip report {sk}: {len(api.read_skip_report(index_dir, m))} line(s), the manifest "
                        f"says {m['skipped']} skipped")
    return problems


def _manifest_problems(path: str, validate) -> list[str]:
    """All of :func:`validate_manifest`'s lines for a manifest that parses (else [])."""
    import json

    try:
        with open(path, "rb") as f:
            m = json.loads(f.read())
    except (OSError, ValueError):
        return []
    if not isinstance(m, dict) or m.get("format") != "dhf-index":
        return []
    return [f"manifest: {p}" for p in validate(m)]


def stored_codes(idx) -> np.ndarray | None:
    """The codes a code index holds, uint8 [ntotal, stored bytes] in id order (flat: its
    vectors; multihash: its flat storage; code dictionary: each row's dictionary code);
    None for a hash index (no storage).

    Raises:
        DhfError: a code dictionary whose posting lists are not a permutation of 0..n-1.
    """
    import faiss

    from .index import BucketIndex

    if isinstance(idx, BucketIndex):
        ids, n = np.asarray(idx.ids, np.int64), idx.ntotal
        if len(ids) != n or (n and (ids.min() < 0 or ids.max() >= n or np.bincount(ids, minlength=n).max() != 1)):
            raise DhfError("its posting lists do not hold each id 0..n-1 exactly once")
        return np.asarray(idx.dict_codes, np.uint8)[idx.bucket_of_rows()]
    fi = idx.index
    if isinstance(fi, faiss.IndexBinaryMultiHash):
        fi = fi.storage
    if not isinstance(fi, faiss.IndexBinaryFlat):
        return None
    return faiss.vector_to_array(fi.xb).reshape(-1, fi.code_size)[: fi.ntotal]


def _cross_check_codes(idx, shards, shard_codes: list[np.ndarray], nb: int, name: str) -> list[str]:
    """The code index's codes against the shards' codes, row by row (at most one line per shard)."""
    from .index import pad_codes

    problems = []
    starts = np.cumsum([0] + [s["rows"] for s in shards])
    try:
        stored = stored_codes(idx)
    except DhfError as err:
        return [f"code index {name}: {err}"]
    if stored is not None:
        for s, a, codes in zip(shards, starts.tolist(), shard_codes):
            diff = np.flatnonzero((stored[a:a + len(codes)] != pad_codes(codes, stored.shape[1])).any(axis=1))
            if len(diff):
                problems.append(f"code index {name}: {len(diff)} code(s) differ from shard {s['file']} "
                                f"(first: id {a + diff[0]})")
        return problems
    # hash index: look every distinct shard code up exactly (Hamming distance < 1); each id
    # must come back once, under its own code
    allc = np.concatenate(shard_codes) if shard_codes else np.zeros((0, nb), np.uint8)
    if len(allc) == 0:
        return problems
    keys = np.ascontiguousarray(allc).view(np.dtype((np.void, nb))).ravel()
    uniq_keys, first, inv = np.unique(keys, return_index=True, return_inverse=True)
    lims, _, ids = idx.index.range_search(pad_codes(allc[first], idx.stored_nbytes), 1)
    ids = np.asarray(ids, np.int64)
    owner = np.repeat(np.arange(len(uniq_keys)), np.diff(np.asarray(lims, np.int64)))
    seen = np.bincount(ids, minlength=len(allc))[: len(allc)]
    bad = np.zeros(len(allc), bool)
    bad[ids[owner != inv.ravel()[ids]]] = True
    bad |= seen != 1
    for s, a in zip(shards, starts.tolist()):
        r = int(s["rows"])
        k = np.flatnonzero(bad[a:a + r])
        if len(k):
            problems.append(f"code index {name}: {len(k)} code(s) differ from shard {s['file']} "
                            f"(first: id {a + k[0]})")
    return problems


def index_summary(index_dir: str) -> dict[str, Any]:
    from .store import read_manifest

    m = read_manifest(index_dir)
    return {"count": int(m["count"]), "deleted": len(m.get("deleted", [])), "generation": m.get("generation", 1),
            "shards": len(m["shards"])}
