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
@_train_options
@_device_opt
@_quiet_opt
def build_index(images, model_path, out, index_type, hash_bits, nhash, nflip, batch_size, shard_size,
                feature_dtype, device, quiet, **kw):
    """Encode every image under IMAGES (recursively) into an index directory.

    Bad images are skipped and listed in OUT/skipped.tsv. An interrupted build resumes
    from its last complete shard when the same command is run again; an existing index
    in OUT stays searchable until the new one is complete.
    """
    from . import api
    from .index import IndexSpec

    train_opts = _collect_train(kw)
    spec = IndexSpec(kind=index_type, hash_bits=hash_bits, nhash=nhash, nflip=nflip)
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
