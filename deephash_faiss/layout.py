"""The on-disk contract of an index directory, in one place.

Everything that creates, commits or deletes files of an index lives here: the target-folder
check, the writer lock, job keys and partial directories, generations, publishing shards,
the code index and the model, the skip report, the manifest commit, garbage collection and
the crash points the crash tests kill at. :mod:`deephash_faiss.pipeline` (build / add, local
or Ray) and :mod:`deephash_faiss.maintain` (add / remove / compact) only call these.

Layout::

    INDEX/manifest.json            the commit (renamed into place last)
    INDEX/.dhf-files               the ledger: every file this index wrote, one relative path
                                   a line (appended, fsynced, before the file is created)
    INDEX/.lock                    the writer lock (flock)
    INDEX/.partial-<key16>/        a resumable encoding job: part-NNNNN.h5 + part-NNNNN.skip.json
                                   (+ part-NNNNN.sha256.json, the h5's hash)
    INDEX/.partial-add-<key16>/    the same for `dhf add`
    INDEX/model[-<sha12>].pt, codes[-gN].index, skipped[-gN].tsv, shards/part-NNNNN[-gN].h5
    INDEX/fine[-gN].index          optional: the HDS fine index (manifest key ``fine``,
                                   :mod:`deephash_faiss.fine`; written by ``dhf fine-index``,
                                   updated by ``dhf add`` / ``compact``)

Rules:

* Files of an index generation are never overwritten: every commit takes a generation above
  any found in the folder and names its new files with it (generation 1 keeps the plain names).
* The partial directory is only read by a finalize (shards are copied or hard-linked, never
  moved or modified, and a published shard is never opened for writing), so a crash
  anywhere before the manifest rename leaves the old index intact and the partial shards
  reusable; the rerun finalizes again.
* Garbage collection (after each commit, under the writer lock) deletes only files the index
  wrote -- those in the ledger, or named by a manifest it replaced -- that neither the new nor
  the previous manifest names (readers of the previous generation keep working), ``.tmp-*``
  leftovers of its atomic writes, and ``.partial-*`` folders of other (stale) jobs. A user's
  ``model_v2_best.pt`` next to the index is never touched.
* A build refuses a non-empty folder that is not a dhf index.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable

import numpy as np

from .errors import DhfError
from .store import (FORMAT, FORMAT_VERSION, MANIFEST, ShardFile, atomic_write_bytes, now_iso, read_manifest,
                    write_manifest)

LEDGER = ".dhf-files"
LOCK = ".lock"
PARTIAL_PREFIX = ".partial-"
CRASH_ENV = "DHF_TEST_CRASH_AT"
INTERRUPT_ENV = "DHF_TEST_INTERRUPT_AT"
_GEN_RE = re.compile(r"-g(\d+)\.(?:h5|index|tsv)$")
# leftovers a killed dhf may leave in a folder before it has a manifest or ledger
_LEFTOVER_RE = re.compile(r"^(?:\.lock|\.partial-.*|\.train-.*|\.tmp-.*|\.trained-model\.pt)$")


# ---------------------------------------------------------------- crash points

def crash_point(name: str) -> None:
    """Test hook: ``DHF_TEST_CRASH_AT=<name>`` SIGKILLs this process here (like ``kill -9``).

    Points: ``shard-<s>`` (shard s written to the partial dir), ``mid-shard-<s>`` (its skip
    list written, its HDF5 file not yet), ``finalize-shard-<s>`` (shard s copied into the
    index), ``before-manifest`` (all files written, manifest not yet renamed),
    ``after-manifest`` (committed, before garbage collection and partial-dir cleanup).
    ``split-part-<i>`` (``dhf shard``: part i written in the temporary folder).
    """
    if os.environ.get(CRASH_ENV) == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(INTERRUPT_ENV) == name:  # Ctrl-C at this point (tests of the commit's deferral)
        import signal

        os.kill(os.getpid(), signal.SIGINT)


@contextlib.contextmanager
def interrupts_deferred(note: str):
    """Ctrl-C (SIGINT) inside the block waits for the block to finish, then is dropped with
    ``note`` on stderr: the block's work (a commit) is then complete, so the command ends
    as it would have, exit 0, instead of reporting an interruption of a change it made.
    Only in the main thread (elsewhere signals cannot be handled; the block just runs)."""
    import signal
    import sys
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    try:
        old = signal.signal(signal.SIGINT, lambda *_: got.append(1))
    except (ValueError, OSError):  # pragma: no cover - no signal handling here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if got:
            sys.stderr.write(note + "\n")


# ---------------------------------------------------------------- the target folder and the lock

def prepare_target(index_dir: str) -> None:
    """Create ``index_dir`` for a build, or check that an existing one is a dhf index.

    A non-empty folder that has neither a manifest nor a ledger (and holds more than the
    leftovers of a killed dhf: ``.lock``, ``.partial-*``, ``.train-*``, ``.tmp-*``, an empty ``shards/``)
    is refused: a build never writes into (or collects garbage in) someone else's folder.
    """
    if not str(index_dir).strip():
        raise DhfError("-o is empty; give a folder path")
    if os.path.exists(index_dir) and not os.path.isdir(index_dir):
        raise DhfError(f"{index_dir} exists and is not a folder")
    try:
        os.makedirs(index_dir, exist_ok=True)
    except OSError as err:  # a parent is a file, not writable, ...
        raise DhfError(f"cannot create the index folder {index_dir}: {err.strerror or err}") from None
    names = os.listdir(index_dir)
    if MANIFEST in names or LEDGER in names:
        return
    foreign = [n for n in names if not _LEFTOVER_RE.match(n)
               and not (n == "shards" and os.path.isdir(os.path.join(index_dir, n))
                        and not os.listdir(os.path.join(index_dir, n)))]
    if foreign:
        raise DhfError(f"{index_dir} is not empty and is not a dhf index (it holds {foreign[0]!r}"
                       f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); "
                       f"choose a new or empty folder")
    _ledger_write(index_dir, [])


@contextlib.contextmanager
def removed_if_unused_on_failure(index_dir: str):
    """Around a build: if ``index_dir`` did not exist before and the build fails (any
    exception, an interrupt too), remove it when it holds only what :func:`prepare_target`
    and the lock made (an empty ledger, ``.lock``, an empty ``shards/``). A folder with any
    written work (a partial dir, a shard, a ledger entry) stays, to resume; so does one whose
    lock another writer holds."""
    created = not os.path.lexists(index_dir)
    try:
        yield
    except BaseException:
        if created:
            _remove_if_unused(index_dir)
        raise


def _remove_if_unused(index_dir: str) -> None:
    try:
        with IndexLock(index_dir):
            names = set(os.listdir(index_dir))
            shards = os.path.join(index_dir, "shards")
            if (not names <= {LOCK, LEDGER, "shards"} or owned_files(index_dir)
                    or ("shards" in names and (not os.path.isdir(shards) or os.listdir(shards)))):
                return
            shutil.rmtree(index_dir, ignore_errors=True)
    except (OSError, DhfError):
        return


class IndexLock:
    """An exclusive writer lock on ``INDEX/.lock`` (flock; released by the OS if the process dies).

    With ``probe`` (default) it also checks, before any work, that the folder and its
    ``shards/`` can take new files (a read-only mount, an immutable folder): DhfError
    "cannot write ..." instead of a failure after the encoding."""

    def __init__(self, index_dir: str, probe: bool = True):
        self.path = os.path.join(index_dir, LOCK)
        self.fd: int | None = None
        self.probe = probe

    def __enter__(self) -> "IndexLock":
        index_dir = os.path.dirname(self.path)
        try:
            os.makedirs(index_dir, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            if not self.probe:
                raise
            raise DhfError(f"cannot write {index_dir}: {(err.strerror or str(err)).lower()}") from None
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
        if self.probe:
            try:
                _probe_writable(index_dir)
            except DhfError:
                self.__exit__()
                raise
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None


def _probe_writable(index_dir: str) -> None:
    """DhfError unless a file can be created (and removed) in ``index_dir`` and in its ``shards/``."""
    for d in (index_dir, os.path.join(index_dir, "shards")):
        if not os.path.isdir(d):
            continue
        probe = os.path.join(d, f".tmp-writable-{os.getpid()}")
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            os.unlink(probe)
        except FileExistsError:
            with contextlib.suppress(OSError):
                os.unlink(probe)
        except OSError as err:
            raise DhfError(f"cannot write {d}: {(err.strerror or str(err)).lower()}") from None


# ---------------------------------------------------------------- the ledger

def _ledger_path(index_dir: str) -> str:
    return os.path.join(index_dir, LEDGER)


def _ledger_write(index_dir: str, rels: Iterable[str]) -> None:
    atomic_write_bytes(_ledger_path(index_dir),
                       "".join(f"{r}\n" for r in sorted(set(rels))).encode("utf-8", "surrogateescape"))


def owned_files(index_dir: str) -> set[str]:
    """Relative paths recorded in the ledger (empty when there is none)."""
    try:
        with open(_ledger_path(index_dir), encoding="utf-8", errors="surrogateescape") as f:
            return {ln for ln in f.read().split("\n") if ln}
    except FileNotFoundError:
        return set()


def own(index_dir: str, rels: Iterable[str]) -> None:
    """Record files (relative paths) in the ledger *before* creating them, so that the
    orphans of a crashed attempt are collected later. Call with the writer lock held."""
    rels = [r for r in rels if "\n" not in r]
    if not os.path.exists(_ledger_path(index_dir)):
        # an index written before the ledger existed: what its manifest names is its own
        old = current_manifest(index_dir)
        _ledger_write(index_dir, manifest_files(old) if old else [])
    if not rels:
        return
    with open(_ledger_path(index_dir), "a", encoding="utf-8", errors="surrogateescape") as f:
        f.write("".join(f"{r}\n" for r in rels))
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------- jobs and partial directories

def job_key(model_sha: str, paths: list[str], shard_size: int, feature_dtype: str, extra: str = "") -> str:
    """Identifies a resumable encoding job; ``extra`` adds e.g. the decoder or the base generation.

    The pipeline always adds :func:`file_stamps` of the paths: a partial shard is never
    reused once one of its images changed.
    """
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


def partial_dir(index_dir: str, key: str, kind: str = "") -> str:
    """``INDEX/.partial-[kind-]<key16>`` (absolute: Ray workers may run elsewhere)."""
    return os.path.abspath(os.path.join(index_dir, f"{PARTIAL_PREFIX}{kind + '-' if kind else ''}{key[:16]}"))


def part_files(part_dir: str, s: int) -> tuple[str, str]:
    """(HDF5 shard, skip list) of partial shard ``s``."""
    return os.path.join(part_dir, f"part-{s:05d}.h5"), os.path.join(part_dir, f"part-{s:05d}.skip.json")


def part_complete(part_dir: str, s: int) -> bool:
    """Whether partial shard ``s`` is complete (both files are only ever renamed into place)."""
    h5, skip = part_files(part_dir, s)
    return os.path.exists(h5) and os.path.exists(skip)


def open_part(part_dir: str, s: int, rows: int, code_bytes: int, dim: int, dtype) -> ShardFile:
    """A :class:`deephash_faiss.store.ShardFile` for partial shard ``s`` of at most ``rows`` rows:
    the build appends each batch to it as the batch comes back, :func:`commit_part` finishes it."""
    os.makedirs(part_dir, exist_ok=True)
    return ShardFile(part_files(part_dir, s)[0], rows, code_bytes, dim, dtype)


def commit_part(part_dir: str, s: int, shard: ShardFile, pos: np.ndarray, paths: list[str], labels: np.ndarray,
                bad: list[tuple[int, str]]) -> None:
    """Finish partial shard ``s`` (its rows appended to ``shard`` in the order of ``pos``, int64
    positions in ``paths``): its skip list (``[[path, reason]]``), then its HDF5 file (ids =
    positions in ``paths``, renumbered by :func:`publish_shards`), then a note of the HDF5 file's
    sha256, size and mtime (``part-NNNNN.sha256.json``) that lets :func:`publish_shards` link the
    file instead of copying and hashing it again."""
    h5, skip = part_files(part_dir, s)
    try:
        atomic_write_bytes(skip, json.dumps([[paths[i], r] for i, r in bad]).encode("utf-8", "surrogateescape"))
        crash_point(f"mid-shard-{s}")
    except BaseException:
        shard.abort()
        raise
    info = shard.commit(pos, [paths[i] for i in pos], labels[pos])
    st = os.stat(h5)
    atomic_write_bytes(_sha_note(h5), json.dumps({"sha256": info["sha256"], "size": st.st_size,
                                                  "mtime_ns": st.st_mtime_ns}).encode())
    crash_point(f"shard-{s}")


def write_part(part_dir: str, s: int, codes: np.ndarray, feats: np.ndarray, pos: np.ndarray, paths: list[str],
               labels: np.ndarray, bad: list[tuple[int, str]]) -> None:
    """:func:`open_part` + one append of every row + :func:`commit_part`: codes uint8 [n, B],
    features [n, D], pos int64 [n]."""
    shard = open_part(part_dir, s, len(codes), codes.shape[1], feats.shape[1], feats.dtype)
    try:
        shard.append(codes, feats)
    except BaseException:
        shard.abort()
        raise
    commit_part(part_dir, s, shard, pos, paths, labels, bad)


def _sha_note(h5: str) -> str:
    return h5[:-3] + ".sha256.json"


def _noted_sha256(h5: str) -> str | None:
    """The sha256 :func:`write_part` noted for ``h5``, or None when there is no note or the file's
    size or mtime changed since (a crash between the two writes, a file replaced by hand)."""
    try:
        with open(_sha_note(h5), encoding="utf-8") as f:
            note = json.load(f)
        st = os.stat(h5)
    except (OSError, ValueError):
        return None
    if not isinstance(note, dict) or note.get("size") != st.st_size or note.get("mtime_ns") != st.st_mtime_ns:
        return None
    sha = note.get("sha256")
    return sha if isinstance(sha, str) else None


def read_part_skips(part_dir: str, s: int) -> list[tuple[str, str]]:
    with open(part_files(part_dir, s)[1], encoding="utf-8", errors="surrogateescape") as f:
        return [(p, r) for p, r in json.load(f)]


# ---------------------------------------------------------------- generations and files

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


def fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def manifest_files(m: dict[str, Any]) -> set[str]:
    """Files (relative to the index dir) that a manifest refers to."""
    files = {m["index"]["file"], m.get("skipped_file", "skipped.tsv")}
    if m["model"].get("file"):
        files.add(m["model"]["file"])
    files |= {os.path.join("shards", s["file"]) for s in m["shards"]}
    if isinstance(m.get("fine"), dict) and m["fine"].get("file"):
        files.add(m["fine"]["file"])
    return files


# ---------------------------------------------------------------- the skip report

def tsv_field(text: str) -> str:
    """A path or reason as one TSV field: backslash, tab and newline escaped."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _untsv(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"t": "\t", "n": "\n", "r": "\r"}.get(m.group(1), m.group(1)), text)


def read_skip_report(index_dir: str, manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """[(path, reason)] from the manifest's skip report (escapes undone). The one reader."""
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


def write_skip_report(index_dir: str, name: str, skipped: list[tuple[str, str]]) -> None:
    from .data import one_line

    own(index_dir, [name])
    atomic_write_bytes(os.path.join(index_dir, name), "".join(
        f"{tsv_field(p)}\t{tsv_field(one_line(r))}\n" for p, r in skipped).encode("utf-8", "surrogateescape"))


# ---------------------------------------------------------------- publishing a generation

def _publish_one(src: str, tmp: str, start: int, rows: int) -> tuple[np.ndarray, str]:
    """Make ``tmp`` a copy of partial shard ``src`` (``rows`` rows) whose ids are ``start, ...,
    start + rows - 1``, fsynced; ``src`` itself is never modified.

    When ``src``'s ids are those already and :func:`write_part` noted its hash, ``tmp`` is a
    hard link to it (nothing copied or hashed; a published shard is never opened for writing,
    so the two names can share the file); otherwise (ids to renumber, no note, or a file system
    without hard links) the file is copied, renumbered, fsynced and hashed.

    Returns (codes uint8 [rows, B], sha256 of ``tmp``)."""
    import h5py

    from .model import file_sha256

    with h5py.File(src, "r") as f:
        codes = f["codes"][()]
        in_place = bool(np.array_equal(f["ids"][()], np.arange(start, start + rows, dtype=np.int64)))
    sha = _noted_sha256(src) if in_place else None
    if sha is not None:
        try:
            os.link(src, tmp)
            return codes, sha
        except OSError:  # no hard links here (or across devices): copy
            pass
    shutil.copyfile(src, tmp)
    if not in_place:
        with h5py.File(tmp, "r+") as f:
            f["ids"][...] = np.arange(start, start + rows, dtype=np.int64)
    fsync_file(tmp)
    return codes, file_sha256(tmp)


PUBLISH_WORKERS = 8  # shards copied, fsynced and hashed at once (I/O and hashing release the GIL)


def publish_shards(index_dir: str, part_dir: str, shard_numbers, start: int, gen: int, name_offset: int = 0,
                   workers: int | None = None):
    """Copy partial shards into ``index_dir/shards`` under generation-``gen`` names with
    global row ids from ``start``. The partial shards are not modified (a shard whose ids are
    already final is hard-linked instead of copied: :func:`_publish_one`).

    The copies (copy, renumber, fsync, sha256) run in up to ``workers`` threads (default
    :data:`PUBLISH_WORKERS`, at most the CPU count) as ``.tmp-*`` files; they are renamed into
    place in shard order, each followed by its crash point, as one at a time did. Row counts
    are read from the partial shards first, so every copy knows its ``start``.

    Returns (shard entries, list of code arrays uint8 [rows, B], skipped [(path, reason)], next start).
    """
    import h5py

    shard_dir = os.path.join(index_dir, "shards")
    os.makedirs(shard_dir, exist_ok=True)
    shard_numbers = list(shard_numbers)
    names = [gen_name(f"part-{s + name_offset:05d}", ".h5", gen) for s in shard_numbers]
    own(index_dir, [os.path.join("shards", n) for n in names])
    srcs, starts, counts, skipped = [], [], [], []
    for s in shard_numbers:
        src = part_files(part_dir, s)[0]
        skipped.extend(read_part_skips(part_dir, s))
        with h5py.File(src, "r") as f:
            counts.append(len(f["codes"]))
        srcs.append(src)
        starts.append(start)
        start += counts[-1]
    tmps = [os.path.join(shard_dir, f".tmp-{n}") for n in names]
    workers = max(1, min(workers or PUBLISH_WORKERS, os.cpu_count() or 1, len(srcs) or 1))
    with ThreadPoolExecutor(workers, thread_name_prefix="dhf-publish") as pool:
        done = list(pool.map(_publish_one, srcs, tmps, starts, counts))
    shards, codes = [], []
    for s, name, tmp, st, rows, (c, sha) in zip(shard_numbers, names, tmps, starts, counts, done):
        os.replace(tmp, os.path.join(shard_dir, name))
        crash_point(f"finalize-shard-{s}")
        shards.append({"file": name, "rows": rows, "start": st, "sha256": sha})
        codes.append(c)
    return shards, codes, skipped, start


def save_code_index(index_dir: str, index, gen: int) -> dict[str, str]:
    """Write the FAISS code index (a :class:`deephash_faiss.index.BinaryIndex`) under a
    generation name; returns {"file", "sha256"}."""
    name, sha = _write_owned(index_dir, gen_name("codes", ".index", gen), index.save)
    return {"file": name, "sha256": sha}


def _write_owned(index_dir: str, name: str, save) -> tuple[str, str]:
    """Record ``name`` in the ledger, ``save(tmp)``, fsync, hash, rename: (name, sha256)."""
    from .model import file_sha256

    own(index_dir, [name])
    tmp = os.path.join(index_dir, f".tmp-{name}")
    save(tmp)
    fsync_file(tmp)
    sha = file_sha256(tmp)
    os.replace(tmp, os.path.join(index_dir, name))
    return name, sha


def save_fine_index(index_dir: str, fine, gen: int, index_entry: dict[str, Any]) -> dict[str, Any]:
    """Write the HDS fine index (:class:`deephash_faiss.fine.FineIndex`) under a generation
    name; returns its manifest entry {"file", "sha256", "storage", "cell_size", "lists",
    "rows", "index_sha256"} (``index_sha256``: the code index it was made for, so a reader
    can tell a fine index that no longer matches; the size is stamped at the commit)."""
    name, sha = _write_owned(index_dir, gen_name("fine", ".index", gen), fine.save)
    return {"file": name, "sha256": sha, "storage": fine.storage, "cell_size": fine.cell_size,
            "lists": fine.n_lists, "rows": fine.rows, "index_sha256": index_entry.get("sha256")}


def fine_entry_problem(manifest: dict[str, Any]) -> str | None:
    """Why the manifest's fine index does not belong to its code index (None: it does, or
    there is none): another row count or another code index than the one it was made for."""
    fe = manifest.get("fine")
    if not fe:
        return None
    if int(fe.get("rows", -1)) != int(manifest["count"]):
        return f"fine index {fe['file']} covers {fe.get('rows')} rows, the index holds {manifest['count']}"
    want = (manifest.get("index") or {}).get("sha256")
    if fe.get("index_sha256") and want and fe["index_sha256"] != want:
        return f"fine index {fe['file']} was made for another code index (sha256 {fe['index_sha256'][:12]}…)"
    return None


def store_model(index_dir: str, model_path: str) -> tuple[str, str]:
    """Copy the model into the index (content-addressed; reused when present). Returns (file, sha256).

    ``model.pt`` is reused only when the index owns it (a user's file of that name is not
    the index's model and is never overwritten).
    """
    from .model import file_sha256

    model_sha = file_sha256(model_path)
    own(index_dir, [])
    mine = owned_files(index_dir) if os.path.exists(_ledger_path(index_dir)) else set()
    cur = current_manifest(index_dir)
    mine |= manifest_files(cur) if cur else set()
    for name in ("model.pt", f"model-{model_sha[:12]}.pt"):
        mp = os.path.join(index_dir, name)
        if name in mine and os.path.exists(mp) and file_sha256(mp) == model_sha:
            own(index_dir, [name])
            return name, model_sha
    name = "model.pt" if not os.path.exists(os.path.join(index_dir, "model.pt")) else f"model-{model_sha[:12]}.pt"
    own(index_dir, [name])
    tmp = os.path.join(index_dir, f".tmp-{name}")
    shutil.copyfile(model_path, tmp)
    fsync_file(tmp)
    os.replace(tmp, os.path.join(index_dir, name))
    return name, model_sha


def commit_manifest(index_dir: str, manifest: dict[str, Any], old: dict[str, Any] | None,
                    keep_partial: str | None = None) -> None:
    """The one atomic step: rename the new manifest into place, then collect garbage.
    Call with the writer lock held. Ctrl-C from the rename on waits until garbage is
    collected and is then ignored (:func:`interrupts_deferred`): the change is made."""
    own(index_dir, sorted(manifest_files(manifest) - owned_files(index_dir)))
    crash_point("before-manifest")
    with interrupts_deferred("interrupted after the commit: the change is saved; finishing normally"):
        write_manifest(index_dir, manifest)
        crash_point("after-manifest")
        collect_garbage(index_dir, manifest, old, keep_partial)


def collect_garbage(index_dir: str, new: dict[str, Any], old: dict[str, Any] | None,
                    keep_partial: str | None = None) -> list[str]:
    """Delete files the index wrote that neither ``new`` nor ``old`` names (readers that
    opened ``old`` keep working), ``.tmp-*`` leftovers of its atomic writes, and
    ``.partial-*`` folders other than ``keep_partial`` (stale jobs). Files the index did
    not write are never touched. Call with the writer lock held. Returns what was removed."""
    keep = manifest_files(new) | (manifest_files(old) if old else set()) | {MANIFEST}
    removed, left = [], []
    for rel in owned_files(index_dir) | (manifest_files(old) if old else set()):
        if rel in keep:
            continue
        p = os.path.join(index_dir, rel)
        try:
            if os.path.isfile(p):
                os.unlink(p)
                removed.append(rel)
        except OSError:
            left.append(rel)
    shard_dir = os.path.join(index_dir, "shards")
    for d, prefix in ((index_dir, ""), (shard_dir, "shards")):
        for name in (os.listdir(d) if os.path.isdir(d) else []):
            p = os.path.join(d, name)
            if name.startswith(".tmp-") and os.path.isfile(p):
                try:
                    os.unlink(p)
                    removed.append(os.path.join(prefix, name))
                except OSError:
                    pass
    keep_part = os.path.basename(os.path.normpath(keep_partial)) if keep_partial else None
    for name in os.listdir(index_dir):
        p = os.path.join(index_dir, name)
        if name.startswith(PARTIAL_PREFIX) and name != keep_part and os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(name)
    _ledger_write(index_dir, keep | set(left) - {MANIFEST})
    return removed


def build_manifest(*, gen: int, source: str, model_name: str, model_sha: str, model_cfg, spec, feature_dtype: str,
                   count: int, classes: list[str], shards: list[dict], index_entry: dict, skipped: int,
                   skipped_file: str, decoder: str = "pil") -> dict[str, Any]:
    """The manifest of a freshly built index (``decoder``: which image decoder encoded it)."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "generation": gen,
        "created": now_iso(),
        "source": os.path.abspath(source),
        "model": {"file": model_name, "sha256": model_sha, "backbone": model_cfg.backbone,
                  "input_size": model_cfg.input_size, "load_size": model_cfg.load_size,
                  "flip_average": bool(model_cfg.flip_average)},
        "bits": model_cfg.bits,
        "bit_order": "little (faiss): bit j in byte j//8 at position j%8",
        "feature_dim": model_cfg.feature_dim,
        "feature_dtype": feature_dtype,
        "decoder": decoder,
        "count": count,
        "classes": classes,
        "shards": shards,
        "index": {**spec.to_dict(model_cfg.bits), **index_entry},
        "skipped": skipped,
        "skipped_file": skipped_file,
        "deleted": [],
    }


def finalize_build(
    index_dir: str,
    part_dir: str,
    nshards: int,
    model_path: str,
    model_cfg,
    spec,
    feature_dtype: str,
    classes: list[str],
    source: str,
    scan_skipped: list[tuple[str, str]],
    tag: str = "",
    decoder: str = "pil",
) -> dict[str, Any]:
    """Number the rows, copy shards and model into ``index_dir``, build the code index,
    and commit by writing the manifest (the one atomic step). Returns the manifest.

    Crash-safe: the partial shards are copied or linked, never moved or modified, and new files get
    names of a fresh generation, so a crash anywhere leaves the previous index intact and
    a rerun finalizes again from the same partial shards. ``tag`` is unused (kept for
    callers of the earlier signature).
    """
    from .index import BinaryIndex

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
    manifest = build_manifest(gen=gen, source=source, model_name=model_name, model_sha=model_sha,
                              model_cfg=model_cfg, spec=spec, feature_dtype=feature_dtype, count=count,
                              classes=classes, shards=shards, index_entry=index_entry, skipped=len(skipped),
                              skipped_file=skip_name, decoder=decoder)
    commit_manifest(index_dir, manifest, old, keep_partial=part_dir)
    return manifest
