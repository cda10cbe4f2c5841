"""``dhf``: the command line, a thin layer over :mod:`deephash_faiss.api`.

Errors in input (missing files, bad images, incompatible models or indexes, bad
arguments) print one ``Error: ...`` line and exit with status 1; ``--debug`` (or
``DHF_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import click
import numpy as np

from . import __version__
from .errors import DhfError

DEBUG_ENV = "DHF_DEBUG"


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except DhfError as err:
            if _debug(ctx):
                traceback.print_exc()
            click.echo(f"Error: {err}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)
        except MemoryError:
            click.echo("Error: out of memory (try a smaller --batch-size)", err=True)
            ctx.exit(1)
        except Exception as err:  # noqa: BLE001 - last line of defence: one line, no traceback
            if _debug(ctx):
                traceback.print_exc()
            msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
            click.echo(f"Error: unexpected {type(err).__name__}: {msg} (run with --debug for details)", err=True)
            ctx.exit(1)


def _debug(ctx) -> bool:
    root = ctx.find_root()
    return bool((root.params or {}).get("debug")) or os.environ.get(DEBUG_ENV) == "1"


def _log(msg: str) -> None:
    click.echo(msg, err=True)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(__version__, prog_name="dhf")
def main(debug: bool) -> None:
    """deephash-faiss: image retrieval with learned binary hash codes.

    Train a CNN with a latent hash layer (Lin et al., CVPRW 2015), encode an image
    collection into binary codes (FAISS binary index) and fc7 features (HDF5 shards),
    and search it with BCS (Hamming ranking), HDS (Hamming pool + L2 rerank) or ES
    (exhaustive L2).

    \b
    Typical use:
      dhf train images/ -o model.pt --backbone efficientnet_lite0 --bits 48
      dhf build-index images/ --model model.pt -o dhf-index
      dhf search --query q.jpg --index dhf-index --mode hds -k 10
    """


# ---------------------------------------------------------------- shared options

def _train_options(f):
    opts = [
        click.option("--backbone", default="efficientnet_lite0", show_default=True,
                     help="alexnet, vgg16, resnet50, efficientnet_lite0 or smallcnn."),
        click.option("--bits", default=48, show_default=True, type=int, help="Code length (multiple of 8)."),
        click.option("--weights", default="default", show_default=True,
                     help="'default' (ImageNet; none for smallcnn), 'imagenet', 'none' or a local weights file."),
        click.option("--epochs", default=10, show_default=True, type=int),
        click.option("--lr", default=0.01, show_default=True, type=float,
                     help="Base learning rate (H and classifier at 10x)."),
        click.option("--optimizer", default="sgd", show_default=True, type=click.Choice(["sgd", "adamw"])),
        click.option("--schedule", default="cosine", show_default=True,
                     type=click.Choice(["cosine", "step", "constant"])),
        click.option("--input-size", type=int, default=None, help="Network input side (default: the backbone's)."),
        click.option("--load-size", type=int, default=None,
                     help="Side images are decoded to (default: their size, capped at the input size)."),
        click.option("--no-flip", is_flag=True, help="No horizontal-flip augmentation (digits, text)."),
        click.option("--val-fraction", default=0.1, show_default=True, type=float,
                     help="Share of the training images held out for validation accuracy."),
        click.option("--seed", default=0, show_default=True, type=int),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _collect_train(kw) -> dict:
    return dict(
        backbone=kw.pop("backbone"), bits=kw.pop("bits"), weights=kw.pop("weights"), epochs=kw.pop("epochs"),
        lr=kw.pop("lr"), optimizer=kw.pop("optimizer"), schedule=kw.pop("schedule"),
        input_size=kw.pop("input_size"), load_size=kw.pop("load_size"), hflip=not kw.pop("no_flip"),
        val_fraction=kw.pop("val_fraction"), seed=kw.pop("seed"),
    )


_device_opt = click.option("--device", default="auto", show_default=True,
                           type=click.Choice(["auto", "cpu", "cuda"]), help="Where to run the network.")
_quiet_opt = click.option("-q", "--quiet", is_flag=True, help="No progress bars.")


# ---------------------------------------------------------------- train

@main.command()
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.option("-o", "--out", "out", default="model.pt", show_default=True, help="Checkpoint to write.")
@_train_options
@click.option("--batch-size", default=128, show_default=True, type=int)
@click.option("--resume", default=None, help="Continue an interrupted run from its checkpoint.")
@_device_opt
@_quiet_opt
def train(data_dir, out, batch_size, resume, device, quiet, **kw):
    """Fine-tune a hashing model on DATA_DIR (one subfolder per class).

    SGD (momentum 0.9, weight decay 5e-4) with the new layers (H, classifier) at 10x the
    base learning rate, as in the paper. The checkpoint is saved after every epoch.
    """
    from . import api

    opts = _collect_train(kw)
    t0 = time.perf_counter()
    model, history = api.train_model(data_dir, out, device=device, resume=resume, batch_size=batch_size,
                                     progress=not quiet, log=_log, **opts)
    last = history[-1] if history else {}
    click.echo(f"saved {out}: {model.config.backbone}, {model.config.bits} bits, "
               f"{model.config.num_classes} classes, {len(history)} epochs, "
               f"val acc {last.get('val_acc', float('nan')):.4f}, {time.perf_counter() - t0:.1f} s")


# ---------------------------------------------------------------- build-index

_index_type_opts = [
    click.option("--index-type", default="flat", show_default=True, type=click.Choice(["flat", "hash", "multihash"]),
                 help="FAISS binary index: exact flat, IndexBinaryHash or IndexBinaryMultiHash."),
    click.option("--hash-bits", default=None, type=int, help="Bits hashed per table (hash/multihash)."),
    click.option("--nhash", default=3, show_default=True, type=int, help="Tables (multihash)."),
    click.option("--nflip", default=2, show_default=True, type=int,
                 help="Bit flips probed per table (hash: exact for radius <= nflip + 1)."),
]


def _index_options(f):
    for o in reversed(_index_type_opts):
        f = o(f)
    return f


@main.command("build-index")
@click.argument("images", type=click.Path(file_okay=False))
@click.option("--model", "model_path", default=None,
              help="Checkpoint from `dhf train`. Without it, IMAGES/CLASS/... is used to train one first.")
@click.option("-o", "--out", "out", default="dhf-index", show_default=True, help="Index directory.")
@_index_options
@click.option("--batch-size", default=128, show_default=True, type=int)
@click.option("--shard-size", default=50_000, show_default=True, type=int, help="Images per HDF5 shard.")
@click.option("--feature-dtype", default="float32", show_default=True, type=click.Choice(["float32", "float16"]))
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Encode on Ray workers: a cluster at ADDRESS (HOST:PORT), or a local Ray without one.")
@click.option("--workers", default=None, type=int, help="Ray workers (default: one per CPU of the cluster).")
@_train_options
@_device_opt
@_quiet_opt
def build_index(images, model_path, out, index_type, hash_bits, nhash, nflip, batch_size, shard_size,
                feature_dtype, ray_address, workers, device, quiet, **kw):
    """Encode every image under IMAGES (recursively) into an index directory.

    Bad images are skipped and listed in OUT/skipped.tsv. An interrupted build resumes
    from its last complete shard when the same command is run again; an existing index
    in OUT stays searchable until the new one is complete.
    """
    from . import api
    from .index import IndexSpec

    train_opts = _collect_train(kw)
    spec = IndexSpec(kind=index_type, hash_bits=hash_bits, nhash=nhash, nflip=nflip)
    if ray_address is not None or workers is not None:
        from .distributed import build_index_ray

        rep = build_index_ray(images, out, model_path, spec, batch_size, shard_size, feature_dtype,
                              address=None if ray_address in (None, "local") else ray_address, num_workers=workers,
                              num_gpus_per_worker=1 if device == "cuda" else 0, progress=not quiet, log=_log,
                              train_options=train_opts)
    else:
        rep = api.build_index(images, out, model_path, spec, batch_size, shard_size, feature_dtype, device,
                              progress=not quiet, log=_log, train_options=train_opts)
    click.echo(f"indexed {rep.count} images into {out} in {rep.seconds:.1f} s "
               f"({rep.shards_written} shard(s) written, {rep.shards_reused} reused); "
               f"skipped {len(rep.skipped)} bad file(s)" + (f", see {out}/skipped.tsv" if rep.skipped else ""))


# ---------------------------------------------------------------- search

@main.command()
@click.option("--query", "queries", multiple=True, required=True,
              help="Query image or folder of images (repeatable).")
@click.option("--index", "index_dir", default="dhf-index", show_default=True, help="Index directory.")
@click.option("--mode", default="hds", show_default=True, type=click.Choice(["bcs", "hds", "es"]),
              help="bcs: Hamming ranking; hds: Hamming pool + fc7 L2 rerank; es: exhaustive fc7 L2.")
@click.option("-k", "k", default=10, show_default=True, type=int, help="Results per query.")
@click.option("--radius", default=3, show_default=True, type=int,
              help="HDS pools codes at Hamming distance < RADIUS.")
@click.option("--max-candidates", default=10_000, show_default=True, type=int,
              help="HDS pool cap (nearest codes first).")
@click.option("--model", "model_path", default=None, help="Encode queries with this model instead of the index's.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_device_opt
def search(queries, index_dir, mode, k, radius, max_candidates, model_path, as_json, device):
    """Search the index with one or more query images."""
    from . import api
    from .data import scan_inputs
    from .search import results_to_records

    if k < 1:
        raise DhfError("-k must be at least 1")
    if radius < 0:
        raise DhfError("--radius must be >= 0")
    if max_candidates < 1:
        raise DhfError("--max-candidates must be at least 1")
    paths = scan_inputs(queries)
    s = api.open_index(index_dir, device=device)
    if k > s.live_count():
        raise DhfError(f"-k {k} is larger than the index ({s.live_count()} images)")
    if model_path:
        from .model import load_model

        s.set_model(load_model(model_path))
    t0 = time.perf_counter()
    codes, feats, _ = s.encode(paths)
    encode_ms = (time.perf_counter() - t0) * 1e3
    batch = s.search(mode, codes, feats, k, radius, max_candidates)
    records = results_to_records(batch, s)
    per_q_ms = batch.timing_ms / max(1, len(paths))
    outs = []
    for p, r, res in zip(paths, records, batch.results):
        outs.append({"mode": mode, "query": p, "results": [{kk: row[kk] for kk in
                                                            ("rank", "id", "path", "label", "hamming", "distance")}
                                                           for row in r],
                     "timing_ms": round(per_q_ms, 3), "encode_ms": round(encode_ms / len(paths), 3),
                     "candidates": int(res.candidates), "truncated": bool(res.truncated)})
    if as_json:
        click.echo(json.dumps(outs[0] if len(outs) == 1 else outs, indent=2))
        return
    for o in outs:
        click.echo(f"query {o['query']}  mode {mode}  {o['candidates']} candidates"
                   + ("  (pool capped at --max-candidates)" if o["truncated"] else "")
                   + f"  {o['timing_ms']:.2f} ms search, {o['encode_ms']:.1f} ms encode")
        click.echo(f"{'rank':>4}  {'ham':>3}  {'L2^2':>10}  {'label':<12}  path")
        for row in o["results"]:
            dist = "-" if row["distance"] is None else f"{row['distance']:.4g}"
            click.echo(f"{row['rank']:>4}  {row['hamming']:>3}  {dist:>10}  {str(row['label']):<12}  {row['path']}")


# ---------------------------------------------------------------- shard

@main.command()
@click.argument("index_dir", type=click.Path())
@click.option("-n", "n", required=True, type=int, help="Number of shards.")
@click.option("-o", "--out", "out", required=True, help="Folder for OUT/shard-000 ... (must be new or empty).")
def shard(index_dir, n, out):
    """Split INDEX_DIR into N index directories of consecutive rows for sharded search.

    Each shard is a complete index; its manifest's id_offset maps its ids to global ids.
    Search them together with deephash_faiss.distributed.ShardedSearcher (one Ray actor per
    shard, results merged to equal the unsharded index's).
    """
    from .distributed import split_index

    t0 = time.perf_counter()
    dirs = split_index(index_dir, out, n, log=_log)
    click.echo(f"split {index_dir} into {len(dirs)} shard(s) under {out} in {time.perf_counter() - t0:.1f} s")


# ---------------------------------------------------------------- maintenance (maintain.py)

@main.command()
@click.argument("index_dir", type=click.Path())
@click.argument("images", type=click.Path(file_okay=False))
@click.option("--model", "model_path", default=None,
              help="Must be the index's model (same sha256); default: the model stored in the index.")
@click.option("--batch-size", default=128, show_default=True, type=int)
@click.option("--shard-size", default=50_000, show_default=True, type=int, help="Images per new HDF5 shard.")
@_device_opt
@_quiet_opt
def add(index_dir, images, model_path, batch_size, shard_size, device, quiet):
    """Append the images under IMAGES to the index in INDEX_DIR.

    Paths already in the index are not indexed again (listed as "already indexed" in the
    skip report). Searches running meanwhile see the old or the new index, never a mix.
    An interrupted add resumes when run again.
    """
    from .maintain import add_images

    rep = add_images(index_dir, images, model_path, batch_size, shard_size, device, progress=not quiet, log=_log)
    click.echo(f"added {rep.added} image(s) to {index_dir}, now {rep.count} rows "
               f"({rep.shards_written} shard(s) written, {rep.shards_reused} reused); "
               f"{len(rep.already)} already indexed; skipped {len(rep.skipped)} bad file(s)"
               + (f", see the skip report in {index_dir}" if rep.skipped else ""))


@main.command()
@click.argument("index_dir", type=click.Path())
@click.option("--paths", "paths", multiple=True, help="Image path as indexed (repeatable).")
@click.option("--ids", "ids", multiple=True, type=int, help="Row id (repeatable).")
def remove(index_dir, paths, ids):
    """Mark rows deleted: no search returns them (ids stay; `dhf compact` drops them)."""
    from .maintain import remove as do_remove

    rep = do_remove(index_dir, list(paths), list(ids))
    click.echo(f"removed {len(rep.removed)} row(s) from {index_dir}; {rep.live} live")


@main.command()
@click.argument("index_dir", type=click.Path())
def compact(index_dir):
    """Rewrite the index without deleted rows (ids are renumbered)."""
    from .maintain import compact as do_compact

    rep = do_compact(index_dir)
    click.echo(f"compacted {index_dir}: dropped {rep.dropped} deleted row(s), {rep.count} rows")


@main.command()
@click.argument("index_dir", type=click.Path())
def verify(index_dir):
    """Check checksums, row counts, the code index and the model; exit 1 on problems."""
    from .maintain import verify as do_verify

    problems = do_verify(index_dir)
    if problems:
        for p in problems:
            click.echo(f"PROBLEM: {p}")
        click.echo(f"{len(problems)} problem(s) in {index_dir}", err=True)
        sys.exit(1)
    click.echo(f"OK: {index_dir}")


# ---------------------------------------------------------------- info

@main.command()
@click.argument("index_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and sizes as JSON.")
def info(index_dir, as_json):
    """Show what an index directory holds."""
    from . import api

    inf = api.index_info(index_dir)
    m = inf["manifest"]
    if as_json:
        click.echo(json.dumps(inf, indent=2))
        return
    mb = inf["total_bytes"] / 2**20
    click.echo(f"index      {index_dir}  (format {m['format']} v{m['version']}, created {m['created']})")
    click.echo(f"images     {m['count']} ({len(m.get('deleted', []))} deleted, {m.get('skipped', 0)} skipped at build)")
    click.echo(f"model      {m['model'].get('backbone')}  {m['model'].get('file')}  "
               f"sha256 {(m['model'].get('sha256') or '-')[:16]}…")
    click.echo(f"codes      {m['bits']} bits, {m['index']['type']} index {m['index']}")
    click.echo(f"features   {m['feature_dim']}-d {m['feature_dtype']} in {len(m['shards'])} shard(s)")
    click.echo(f"classes    {len(m.get('classes', []))}: {', '.join(m.get('classes', [])[:10])}"
               + (" …" if len(m.get("classes", [])) > 10 else ""))
    click.echo(f"on disk    {mb:.1f} MiB")
    for rel, size in inf["sizes"].items():
        click.echo(f"  {rel:<40} {'MISSING' if size is None else f'{size / 2**20:.2f} MiB'}")


# ---------------------------------------------------------------- evaluate

@main.command()
@click.option("--index", "index_dir", default="dhf-index", show_default=True, help="Index directory (the database).")
@click.option("--queries", "query_dir", required=True, type=click.Path(file_okay=False),
              help="Labelled query images (one subfolder per class, names as in the index).")
@click.option("--mode", default="all", show_default=True, type=click.Choice(["bcs", "hds", "es", "all"]))
@click.option("--top-k", default=1000, show_default=True, type=int, help="K of mAP@K.")
@click.option("--radius", default=3, show_default=True, type=int, help="HDS pool: Hamming distance < RADIUS.")
@click.option("--max-candidates", default=10_000, show_default=True, type=int, help="HDS pool cap.")
@click.option("--json", "json_out", default=None, help="Write all metrics to this JSON file (plots beside it).")
@click.option("--no-plots", is_flag=True, help="Skip the matplotlib plots.")
@_device_opt
@_quiet_opt
def evaluate(index_dir, query_dir, mode, top_k, radius, max_candidates, json_out, no_plots, device, quiet):
    """Measure retrieval quality: every query image against the whole index.

    Metrics as the paper's official code: mAP@K over a stable Hamming ranking (ties keep
    database order; AP divided by the relevant items found in the top K), P@k for
    k = 100..1000, full-database mAP, precision within Hamming radius 2; the same for
    the HDS and ES rankings; mean query time per mode.
    """
    from . import api
    from .data import scan_images
    from .evaluate import evaluate_arrays, time_modes, write_plots

    if top_k < 1:
        raise DhfError("--top-k must be at least 1")
    modes = ["bcs", "hds", "es"] if mode == "all" else [mode]
    s = api.open_index(index_dir, device=device, features_in_memory=True)
    q = scan_images(query_dir)
    if not q.labelled:
        raise DhfError(f"{query_dir} needs one subfolder per class to evaluate")
    names = s.manifest.get("classes", [])
    lut = np.array([names.index(c) if c in names else -1 for c in q.classes], dtype=np.int32)
    q_labels = lut[q.labels]
    if (q_labels < 0).all():
        raise DhfError(f"none of the query classes of {query_dir} is a class of the index")
    t0 = time.perf_counter()
    codes, feats, _ = s.encode(q.paths)
    enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    ks = [k for k in range(100, 1001, 100) if k <= s.count] or [min(10, s.count)]
    res = evaluate_arrays(s.codes(), s.store.load_features(), s.store.labels(), codes, feats, q_labels, modes,
                          top_k=min(top_k, s.count), ks=ks, hds_radius=radius, max_candidates=max_candidates,
                          device=str(s.device), progress=not quiet)
    res["eval_seconds"] = round(time.perf_counter() - t0, 3)
    res["query_ms"] = time_modes(s, codes, feats, modes, k=min(100, s.count), radius=radius,
                                 max_candidates=max_candidates)
    res.update(index=index_dir, queries=query_dir, n_queries=len(codes), n_database=s.count, bits=s.bits,
               encode_seconds=round(enc, 3), top_k=min(top_k, s.count))
    for m in modes:
        r = res[m]
        extra = f"  P@r2 {r['precision_radius']:.4f}" if "precision_radius" in r else ""
        full = f"  mAP(full) {r['map_full']:.4f}" if r.get("map_full") is not None else ""
        click.echo(f"{m.upper():<4} mAP@{res['top_k']} {r['map_at_k']:.4f}{full}  "
                   f"P@{ks[0]} {r['precision_at_k'][ks[0]]:.4f}{extra}  {res['query_ms'][m]:.3f} ms/query")
    click.echo(f"{len(codes)} queries x {s.count} images; metrics in {res['eval_seconds']:.1f} s")
    if json_out:
        import os

        from .store import atomic_write_bytes

        atomic_write_bytes(json_out, json.dumps(res, indent=2, default=float).encode())
        if not no_plots:
            files = write_plots(res, os.path.join(os.path.dirname(os.path.abspath(json_out))),
                                f"{os.path.basename(index_dir)}: {s.bits}-bit codes")
            click.echo("wrote " + ", ".join([json_out] + files))


# ---------------------------------------------------------------- demo

@main.command()
@click.option("-o", "--out", "out", default="dhf-demo", show_default=True, help="Working folder.")
@click.option("--epochs", default=8, show_default=True, type=int)
@click.option("--bits", default=48, show_default=True, type=int)
@_device_opt
@_quiet_opt
def demo(out, epochs, bits, device, quiet):
    """Run the whole method on embedded data (scikit-learn's handwritten digits).

    Writes the 1,797 digits as PNG folders (train/test), trains a small CNN with a
    latent hash layer, builds the index of the train split, searches a few test images
    in each mode and prints mAP of the test split against the index.
    """
    from .demo import run_demo

    run_demo(out, epochs=epochs, bits=bits, device=device, progress=not quiet, echo=click.echo)


# ---------------------------------------------------------------- serve

@main.command()
@click.option("--index", "index_dir", default="dhf-index", show_default=True, help="Index directory.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@_device_opt
@click.option("--max-upload-mb", default=20.0, show_default=True, type=float, help="Largest query upload (413 above).")
@click.option("--timeout", "timeout_s", default=30.0, show_default=True, type=float,
              help="Seconds a search may take before the request gets 504.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
def serve(index_dir, host, port, device, max_upload_mb, timeout_s, log_level):
    """Serve an index over HTTP: a search page at /, the JSON API at /search, docs at /docs.

    The model, codes and features load once at start; searches run one at a time on a
    dedicated thread. Needs the serve extra: pip install 'deephash-faiss[serve]'.
    """
    from . import serve as serve_mod

    if max_upload_mb <= 0:
        raise DhfError("--max-upload-mb must be positive")
    if timeout_s <= 0:
        raise DhfError("--timeout must be positive")
    serve_mod.run(index_dir, host, port, device, int(max_upload_mb * 2**20), timeout_s, log_level, on_ready=_log)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
