"""``dhf``: the command line, a thin layer over :mod:`deephash_faiss.api`.

Conventions (docs/reliability.md, "CLI conventions"):

* Errors in input (missing files, bad images, incompatible models or indexes, bad
  arguments, usage errors) print one ``Error: ...`` line on stderr and exit with status 1;
  ``--debug`` (or ``DHF_DEBUG=1``) shows the traceback instead.
* ``DHF_TRACE=1``: a build prints its encoder's start-up events (warm-ups, first batches),
  timestamped and with the thread, on stderr (:func:`deephash_faiss.stream._trace`).
* Every command takes the index as ``--index DIR`` (default ``dhf-index``); ``info``,
  ``verify``, ``add``, ``remove``, ``compact`` and ``shard`` also take it as their first
  argument, as before.
* ``--json`` is a flag everywhere: JSON on stdout instead of the table.
* Output cut short by the reader (``dhf ... | head``) ends quietly with status 0.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback

import click
import numpy as np

from . import __version__
from .errors import DhfError
from .fine import SMALL_PROBE, SMALL_PROBE_ROWS, SMALL_REFINE_MAX_ROWS, FineParams

DEBUG_ENV = "DHF_DEBUG"
DEFAULT_INDEX = "dhf-index"

# module a command imports lazily -> the extra of pyproject.toml that installs it
_EXTRAS = {"fastapi": "serve", "uvicorn": "serve", "starlette": "serve", "multipart": "serve",
           "python_multipart": "serve", "ray": "ray"}


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())


def _missing_extra(err: ModuleNotFoundError) -> str | None:
    top = (err.name or "").split(".")[0]
    extra = _EXTRAS.get(top)
    if extra is None:
        return None
    return f'this needs the {extra} extra (module {top} is missing): pip install "deephash-faiss[{extra}]"'


def _require_extra(*modules: str) -> None:
    """Refuse, naming the extra that installs them, when ``modules`` cannot be imported."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            msg = _missing_extra(err) if (err.name or "").split(".")[0] in _EXTRAS else None
            raise DhfError(msg or f"{name} cannot be imported: {err}") from err


def _quiet_broken_pipe() -> None:
    """The reader went away (``| head``): send what is left to /dev/null, no message."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(devnull, stream.fileno())
        except (OSError, ValueError, AttributeError):  # not a real file (tests' CliRunner)
            pass
    os.close(devnull)


_NoArgsIsHelp = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


def _leave(code) -> None:
    """End the process as ``sys.exit(code)`` would, without the interpreter's teardown.

    After ``import torch`` that teardown (freeing every module's objects) took 0.7-1.1 s on the
    2-core machine, after the command's work was done and its output printed
    (``benchmarks/bench_exit.py``). What a normal exit does first is done here too: the
    threads are joined (``threading._shutdown``: non-daemon threads, executors' workers), the
    ``atexit`` handlers run (Ray's shutdown, logging, HDF5), the standard streams are flushed;
    then ``os._exit``. Nothing on disk depends on the teardown: the index is crash-safe, and
    every file is closed by the code that wrote it."""
    import atexit
    import threading

    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): the message on stderr, status 1
        print(code, file=sys.stderr)
        code = 1
    shutdown, run_exitfuncs = getattr(threading, "_shutdown", None), getattr(atexit, "_run_exitfuncs", None)
    if shutdown is None or run_exitfuncs is None:  # an interpreter without them: the normal exit
        sys.exit(code)
    shutdown()
    run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or the reader went away
            pass
    os._exit(code)


class _Group(click.Group):
    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """click's main, with every usage error as one ``Error: ...`` line and status 1.

        From the real command line (``args`` None, as the ``dhf`` script and
        ``python -m deephash_faiss.cli`` call it) with torch imported, the process ends by
        :func:`_leave`; called with ``args`` (tests, click's CliRunner) it raises ``SystemExit``."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            self._main(args, prog_name, complete_var, **extra)
        except SystemExit as done:
            if args is not None or "torch" not in sys.modules:
                raise
            _leave(done.code)

    def _main(self, args, prog_name, complete_var, **extra):
        args = _debug_anywhere(list(sys.argv[1:] if args is None else args))
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NoArgsIsHelp as err:  # bare `dhf` / `dhf GROUP`: the help
            click.echo(err.ctx.get_help() if err.ctx else err.format_message())
            sys.exit(0)
        except click.UsageError as err:
            hint = ""
            if err.ctx is not None:
                hint = f" (see '{err.ctx.command_path} --help')"
            click.echo(f"Error: {_one_line(err.format_message())}{hint}", err=True)
            sys.exit(1)
        except click.ClickException as err:
            click.echo(f"Error: {_one_line(err.format_message())}", err=True)
            sys.exit(1)
        except click.Abort:
            click.echo("Error: aborted", err=True)
            sys.exit(1)
        except BrokenPipeError:
            _quiet_broken_pipe()
            sys.exit(0)
        sys.exit(rv if isinstance(rv, int) else 0)  # click returns ctx.exit()'s status here

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except BrokenPipeError:
            _quiet_broken_pipe()
            ctx.exit(0)
        except DhfError as err:
            if _debug(ctx):
                traceback.print_exc()
            click.echo(f"Error: {_one_line(err)}", err=True)
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
            extra = _missing_extra(err) if isinstance(err, ModuleNotFoundError) else None
            if extra:
                click.echo(f"Error: {extra}", err=True)
                ctx.exit(1)
            msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
            click.echo(f"Error: unexpected {type(err).__name__}: {msg} (run with --debug for details)", err=True)
            ctx.exit(1)


def _debug_anywhere(args: list[str]) -> list[str]:
    """``dhf search ... --debug`` means ``dhf --debug search ...`` (the error lines say "run
    with --debug"; users add it at the end): moved before the subcommand, up to a ``--``."""
    end = args.index("--") if "--" in args else len(args)
    if "--debug" not in args[1:end]:
        return args
    rest = [a for a in args[:end] if a != "--debug"] + args[end:]
    return ["--debug", *rest]


def _debug(ctx) -> bool:
    root = ctx.find_root()
    return bool((root.params or {}).get("debug")) or os.environ.get(DEBUG_ENV) == "1"


def _log(msg: str) -> None:
    click.echo(msg, err=True)


def _plural(n: int, word: str, plural: str | None = None) -> str:
    """``1 image``, ``2 images``, ``0 images``."""
    return f"{n} {word if n == 1 else (plural or word + 's')}"


_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _cell(value) -> str:
    """A value for one table cell: ``-`` for None; control characters and undecodable
    bytes of a file name (surrogate escapes) written as ``\\n``, ``\\t``, ``\\xNN``."""
    if value is None:
        return "-"
    out = []
    for ch in str(value):
        o = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif o < 32 or o == 127:
            out.append(f"\\x{o:02x}")
        elif 0xDC80 <= o <= 0xDCFF:  # a byte that was not UTF-8 (os.fsdecode's surrogateescape)
            out.append(f"\\x{o - 0xDC00:02x}")
        elif 0xD800 <= o <= 0xDFFF:
            out.append(f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)


def _index_dir(index_pos: str | None, index_opt: str | None) -> str:
    """The index directory of a command that takes it as ``[INDEX_DIR]`` or ``--index``."""
    if index_pos is not None and index_opt is not None and index_pos != index_opt:
        raise click.UsageError(f"the index is given twice: {index_pos!r} and --index {index_opt!r}")
    return index_opt or index_pos or DEFAULT_INDEX


_INDEX_HELP = f"Index directory (default: {DEFAULT_INDEX})."


def _index_dir_options(positional: bool):
    """``--index DIR``; with ``positional``, the old first argument ``[INDEX_DIR]`` too."""
    def deco(f):
        f = click.option("--index", "index_opt", default=None, metavar="DIR",
                         help=_INDEX_HELP + (" May also be given as the first argument." if positional else ""))(f)
        if positional:
            f = click.argument("index_pos", required=False, metavar="[INDEX_DIR]")(f)
        return f
    return deco


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
      dhf fine-index dhf-index            (optional: HDS ranks inside pools with it)
      dhf search --query q.jpg --index dhf-index --mode hds -k 10

    \b
    Conventions:
      --index DIR     the index, in every command (default dhf-index); info, verify,
                      add, remove, compact, shard and fine-index also take it as first argument
      --json          JSON on stdout instead of the table (search, info, evaluate)
      errors          one "Error: ..." line on stderr, exit status 1 (--debug: traceback)
    """


# ---------------------------------------------------------------- shared options

def _train_options(f):
    opts = [
        click.option("--backbone", default="efficientnet_lite0", show_default=True,
                     help="alexnet, vgg16, resnet50, efficientnet_lite0/1/2 or smallcnn."),
        click.option("--bits", default=None, type=int,
                     help="Code length (multiple of 8); default 48, 128 for unsupervised codes."),
        click.option("--finetune", "m_finetune", is_flag=True,
                     help="Fine-tune the whole network (the paper's method; the default on a GPU)."),
        click.option("--frozen", "m_frozen", is_flag=True,
                     help="Keep the backbone frozen: fc7 computed once, H and the classifier trained on it "
                          "(the default on a CPU; minutes instead of hours)."),
        click.option("--unsupervised", "m_itq", is_flag=True,
                     help="Learn codes without labels: PCA + ITQ on the pretrained backbone's fc7 (the "
                          "default for a folder without class subfolders)."),
        click.option("--weights", default="default", show_default=True,
                     help="'default' (ImageNet; none for smallcnn), 'imagenet', 'none' or a local weights file."),
        click.option("--epochs", default=None, type=int,
                     help="Training epochs (default 10 fine-tuning, 30 with --frozen)."),
        click.option("--lr", default=0.01, show_default=True, type=float,
                     help="Base learning rate (H and classifier at 10x)."),
        click.option("--optimizer", default="sgd", show_default=True, type=click.Choice(["sgd", "adamw"]),
                     help="SGD (momentum 0.9, weight decay 5e-4, the paper's) or AdamW."),
        click.option("--schedule", default="cosine", show_default=True,
                     type=click.Choice(["cosine", "step", "constant"]), help="Learning-rate schedule over the epochs."),
        click.option("--input-size", type=int, default=None, help="Network input side (default: the backbone's)."),
        click.option("--load-size", type=int, default=None,
                     help="Side images are decoded to (default: their size, capped at the input size)."),
        click.option("--no-flip", is_flag=True, help="No horizontal-flip augmentation (digits, text)."),
        click.option("--mix", default="none", show_default=True, type=click.Choice(["none", "cutmix", "mixup"]),
                     help="Mix half the fine-tuning batches with CutMix or Mixup (a regulariser for "
                          "longer schedules; ignored by --frozen and --unsupervised)."),
        click.option("--ema-epochs", default=0.0, show_default=True, type=float,
                     help="Fine-tuning: end with a moving average of the weights over about this many "
                          "epochs (0: off; measured on CIFAR-10 it neither helped nor hurt, docs/results.md)."),
        click.option("--flip-average", is_flag=True,
                     help="Encode every image (database and queries) as the mean fc7 of it and its mirror: "
                          "twice the encoding work, +0.002-0.008 mAP on CIFAR-10 (docs/results.md)."),
        click.option("--val-fraction", default=0.1, show_default=True, type=float,
                     help="Share of the training images held out for validation accuracy."),
        click.option("--seed", default=0, show_default=True, type=int,
                     help="Seed of the split, the initialisation and the batch order."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


_TRAIN_PARAMS = ("backbone", "bits", "weights", "epochs", "lr", "optimizer", "schedule", "input_size", "load_size",
                 "no_flip", "mix", "ema_epochs", "flip_average", "val_fraction", "seed", "m_finetune", "m_frozen",
                 "m_itq")
_METHOD_FLAGS = {"m_finetune": ("--finetune", "finetune"), "m_frozen": ("--frozen", "frozen"),
                 "m_itq": ("--unsupervised", "itq")}


def _method(kw) -> str:
    """The training method of --finetune / --frozen / --unsupervised ("auto" for none); two is an error."""
    given = [flag for name, (flag, _) in _METHOD_FLAGS.items() if kw.pop(name)]
    if len(given) > 1:
        raise DhfError(f"{' and '.join(given)} exclude each other: give one")
    return next((m for flag, m in _METHOD_FLAGS.values() if flag in given), "auto")


def _collect_train(kw) -> dict:
    return dict(
        backbone=kw.pop("backbone"), bits=kw.pop("bits"), weights=kw.pop("weights"), epochs=kw.pop("epochs"),
        lr=kw.pop("lr"), optimizer=kw.pop("optimizer"), schedule=kw.pop("schedule"),
        input_size=kw.pop("input_size"), load_size=kw.pop("load_size"), hflip=not kw.pop("no_flip"),
        mix=kw.pop("mix"), ema_epochs=kw.pop("ema_epochs"), flip_average=kw.pop("flip_average"),
        val_fraction=kw.pop("val_fraction"), seed=kw.pop("seed"), method=_method(kw),
    )


def _given(ctx: click.Context, names) -> list[str]:
    """The options among ``names`` the user set (command line or environment), as ``--flags``."""
    from click.core import ParameterSource

    given = [n for n in names if ctx.get_parameter_source(n) not in (None, ParameterSource.DEFAULT,
                                                                     ParameterSource.DEFAULT_MAP)]
    return [_METHOD_FLAGS[n][0] if n in _METHOD_FLAGS else "--" + n.replace("_", "-") for n in given]


def _note_unused(ctx: click.Context, names, why: str) -> None:
    """A line on stderr for options among ``names`` the user gave that ``why`` makes unused
    (a note, not an error: the command still does what the rest asks)."""
    given = _given(ctx, names)
    if given:
        _log(f"note: {', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect with {why}")


_device_opt = click.option("--device", default="auto", show_default=True,
                           type=click.Choice(["auto", "cpu", "cuda"]), help="Where to run the network.")
_quiet_opt = click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
_batch_opt = click.option("--batch-size", default=128, show_default=True, type=int,
                          help="Images per forward pass (lower it on out-of-memory).")


# ---------------------------------------------------------------- train

@main.command()
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.option("-o", "--out", "out", default="model.pt", show_default=True, help="Checkpoint to write.")
@_train_options
@_batch_opt
@click.option("--resume", default=None, help="Continue an interrupted run from its checkpoint.")
@_device_opt
@_quiet_opt
def train(data_dir, out, batch_size, resume, device, quiet, **kw):
    """Train a hashing model on DATA_DIR (one subfolder per class, or none: no labels).

    Fine-tuning (the default on a GPU): SGD (momentum 0.9, weight decay 5e-4) with the new
    layers (H, classifier) at 10x the base learning rate, as in the paper. --frozen (the
    default on a CPU with a pretrained backbone): fc7 computed once, H and the classifier
    trained on it. --unsupervised (the default without class subfolders): PCA + ITQ codes.
    The checkpoint is saved after every epoch; --resume continues an interrupted run.
    """
    from . import api

    if resume:
        fixed = _given(click.get_current_context(), ("backbone", "bits", "weights", "input_size", "load_size",
                                                     "flip_average"))
        if fixed:
            raise DhfError(f"--resume continues the model in {resume}, which fixes {', '.join(fixed)}: drop "
                           f"{'it' if len(fixed) == 1 else 'them'}")
    opts = _collect_train(kw)
    t0 = time.perf_counter()
    model, history = api.train_model(data_dir, out, device=device, resume=resume, batch_size=batch_size,
                                     progress=not quiet, log=_log, **opts)
    last = history[-1] if history else {}
    if model.config.method == "itq":
        click.echo(f"saved {out}: {model.config.backbone}, {model.config.bits} bits, unsupervised (PCA + ITQ), "
                   f"{time.perf_counter() - t0:.1f} s")
        return
    click.echo(f"saved {out}: {model.config.backbone}, {model.config.bits} bits, "
               f"{_plural(model.config.num_classes, 'class', 'classes')}, {_plural(len(history), 'epoch')} "
               f"({model.config.method}), "
               + (f"val acc {last['val_acc']:.4f}" if "val_acc" in last else "no validation split")
               + f", {time.perf_counter() - t0:.1f} s")


# ---------------------------------------------------------------- build-index

_index_type_opts = [
    click.option("--index-type", default="auto", show_default=True,
                 type=click.Choice(["auto", "buckets", "flat", "hash", "multihash"]),
                 help="Code index: buckets (a code dictionary with posting lists, exact), exact flat, "
                      "IndexBinaryHash or IndexBinaryMultiHash; auto picks buckets when the codes are few "
                      "enough distinct ones for it to win (measured), else flat."),
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
              help="Checkpoint from `dhf train`. Without it one is trained first (with the training options "
                   "below, which a --model build refuses): on IMAGES/CLASS/... (fine-tuned on a GPU, frozen "
                   "backbone on a CPU), or without labels (PCA + ITQ).")
@click.option("-o", "--out", "--index", "out", default=DEFAULT_INDEX, show_default=True,
              help="Index directory to write (--index is the same option).")
@_index_options
@_batch_opt
@click.option("--shard-size", default=50_000, show_default=True, type=int, help="Images per HDF5 shard.")
@click.option("--feature-dtype", default="float32", show_default=True, type=click.Choice(["float32", "float16"]),
              help="How fc7 features are stored (float16 halves the shards).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Encode on Ray workers: a cluster at ADDRESS (HOST:PORT), or a local Ray without one "
                   "(needs the ray extra).")
@click.option("--workers", default=None, type=int,
              help="Ray workers (default: one per GPU with --device cuda, else one per CPU of the cluster).")
@click.option("--decoder", default="auto", show_default=True, type=click.Choice(["auto", "pil", "nvjpeg"]),
              help="Image decoder: pil (CPU workers) or nvjpeg (JPEGs on the GPU); auto = nvjpeg on CUDA "
                   "for 30,000+ photo-sized JPEGs, pil otherwise; recorded in the index, queries use the same.")
@_train_options
@_device_opt
@_quiet_opt
@click.pass_context
def build_index(ctx, images, model_path, out, index_type, hash_bits, nhash, nflip, batch_size, shard_size,
                feature_dtype, ray_address, workers, decoder, device, quiet, **kw):
    """Encode every image under IMAGES (recursively) into an index directory.

    Bad images are skipped and listed in OUT/skipped.tsv. An interrupted build resumes
    from its last complete shard when the same command is run again; an existing index
    in OUT stays searchable until the new one is complete.
    """
    from . import api
    from .index import IndexSpec

    if model_path is not None:
        ignored = _given(ctx, _TRAIN_PARAMS)
        if ignored:
            raise click.UsageError(f"{', '.join(ignored)} only {'applies' if len(ignored) == 1 else 'apply'} "
                                   f"when build-index trains a model; "
                                   f"--model {model_path} is used as it is (drop them, or drop --model)")
    train_opts = _collect_train(kw)
    if index_type not in ("hash", "multihash"):
        _note_unused(ctx, ("hash_bits", "nhash", "nflip"), f"--index-type {index_type}"
                     + (" (auto picks buckets or flat)" if index_type == "auto" else ""))
    spec = IndexSpec(kind=index_type, hash_bits=hash_bits, nhash=nhash, nflip=nflip)
    if ray_address is not None or workers is not None:
        _require_extra("ray")
        from .distributed import build_index_ray

        rep = build_index_ray(images, out, model_path, spec, batch_size, shard_size, feature_dtype,
                              address=None if ray_address in (None, "local") else ray_address, num_workers=workers,
                              num_gpus_per_worker=1 if device == "cuda" else 0, progress=not quiet, log=_log,
                              train_options=train_opts, decoder=decoder)
    else:
        rep = api.build_index(images, out, model_path, spec, batch_size, shard_size, feature_dtype, device,
                              progress=not quiet, log=_log, train_options=train_opts, decoder=decoder)
    click.echo(f"indexed {_plural(rep.count, 'image')} into {out} in {rep.seconds:.1f} s "
               f"({_plural(rep.shards_written, 'shard')} written, {rep.shards_reused} reused); "
               f"skipped {_plural(len(rep.skipped), 'bad file')}" + (f", see {out}/skipped.tsv" if rep.skipped else ""))
    if not quiet and rep.phases:
        click.echo("time: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in rep.phases.items()))


# ---------------------------------------------------------------- search

@main.command()
@click.option("--query", "queries", multiple=True, required=True,
              help="Query image or folder of images (repeatable).")
@_index_dir_options(positional=False)
@click.option("--mode", default="hds", show_default=True, type=click.Choice(["bcs", "hds", "es"]),
              help="bcs: Hamming ranking; hds: Hamming pool + fc7 L2 rerank; es: exhaustive fc7 L2.")
@click.option("-k", "k", default=10, show_default=True, type=int, help="Results per query.")
@click.option("--radius", default=3, show_default=True, type=int,
              help="HDS pools codes at Hamming distance < RADIUS (0 to bits + 1, which pools all); a pool "
                   "smaller than k is topped up with the nearest codes beyond it, so every query gets k results.")
@click.option("--max-candidates", default=10_000, show_default=True, type=int,
              help="HDS pool cap (nearest codes first).")
@click.option("--hds-mode", default="auto", show_default=True, type=click.Choice(["exact", "ivf", "auto"]),
              help="HDS ranking: exact ranks the whole pool by L2; ivf ranks inside it with the fine index "
                   "(`dhf fine-index`: the cells nearest the query, exact refine); auto = ivf when the index "
                   "has a fine index, else exact.")
@click.option("--nprobe", default=None, type=int,
              help="ivf: rows probed per query, in cells (nprobe x cell size rows, nearest cells first). "
                   f"Default by index size: {SMALL_PROBE[0]} up to {SMALL_PROBE_ROWS:,} images, growing with "
                   f"sqrt(images) to {FineParams.nprobe} (from ~700,000).")
@click.option("--refine", default=None, type=int,
              help="ivf: candidates re-ranked exactly on the stored features. Default by index size: "
                   f"{SMALL_PROBE[1]} up to {SMALL_REFINE_MAX_ROWS:,} images, else {FineParams.refine}.")
@click.option("--model", "model_path", default=None,
              help="Encode queries with this checkpoint; must be the index's model (same sha256).")
@click.option("--allow-other-model", is_flag=True,
              help="Accept a --model with other weights (same width): its codes are not comparable in general.")
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON instead of a table: always a list, one object per query.")
@_device_opt
@_quiet_opt
def search(queries, index_opt, mode, k, radius, max_candidates, hds_mode, nprobe, refine, model_path,
           allow_other_model, as_json, device, quiet):
    """Search the index with one or more query images.

    \b
    --json prints a list with one object per query, in input order:
      {"query", "mode", "results": [{"rank", "id", "path", "label", "hamming",
       "distance"}], "candidates", "truncated", "timing_ms", "encode_ms"}
    and in hds mode also "hds_mode" (the ranking that ran for this query: ivf, or exact
    for pools small enough to rank whole) and "examined" (ivf: rows scored).
    truncated: --max-candidates cut the pool (exact) or the rows examined (ivf).
    label is null for unlabelled images, distance null in bcs mode. A query file that
    cannot be decoded is skipped with a line on stderr and, in JSON, listed as
    {"query", "mode", "error", "results": []}; only all queries failing is an error.

    --device auto on a machine with a GPU searches fewer than 128 query images on the CPU
    (measured faster for a one-shot command: CUDA start-up costs more than it saves);
    --device cuda forces the GPU.
    """
    from . import api
    from .data import scan_inputs
    from .search import SearchParams, results_to_records

    index_dir = _index_dir(None, index_opt)
    paths = scan_inputs(queries)
    if device == "auto":
        import torch

        from .routing import oneshot_device

        device, why = oneshot_device(device, len(paths), torch.cuda.is_available())
        if why and not quiet:
            _log(why)
    if mode != "hds" or hds_mode == "exact":
        _note_unused(click.get_current_context(), ("nprobe", "refine"),
                     f"--mode {mode}" if mode != "hds" else "--hds-mode exact")
    s = api.open_index(index_dir, device=device)
    SearchParams(k, radius, max_candidates, mode, hds_mode, nprobe, refine).check(s.live_count(), s.bits)
    if mode == "hds" and hds_mode == "ivf" and s.fine_index() is None:
        raise DhfError(f"{index_dir} has no usable fine index"
                       + (f" ({s.fine_problem})" if s.fine_problem else "")
                       + f": build one with `dhf fine-index --index {index_dir}`, or use --hds-mode exact")
    if k > s.live_count():
        raise DhfError(f"-k {k} is larger than the index ({_plural(s.live_count(), 'image')})")
    if model_path:
        s.use_model_file(model_path, allow_other_model=allow_other_model)
    t0 = time.perf_counter()
    codes, feats, bad = s.encode(paths, skip_bad=True, progress=not quiet and len(paths) > 1)
    encode_ms = (time.perf_counter() - t0) * 1e3
    reasons = dict(bad)
    good = [p for i, p in enumerate(paths) if i not in reasons]
    for i, reason in bad:
        _log(f"skipped query {_cell(paths[i])}: {reason}")
    batch = s.search(mode, codes, feats, k, radius, max_candidates, hds_mode=hds_mode, nprobe=nprobe, refine=refine)
    if batch.extra.get("fine"):
        _log(f"fine index {batch.extra['fine']}; HDS ran exact")
    qmodes = iter(batch.extra.get("query_modes") or [])
    examined = iter(batch.extra.get("examined") or [])
    records = iter(results_to_records(batch, s))
    results = iter(batch.results)
    per_q_ms = batch.timing_ms / max(1, len(good))
    outs = []
    for i, p in enumerate(paths):
        if i in reasons:
            outs.append({"query": p, "mode": mode, "error": reasons[i], "results": []})
            continue
        r, res = next(records), next(results)
        o = {"query": p, "mode": mode,
             "results": [{kk: row[kk] for kk in ("rank", "id", "path", "label", "hamming", "distance")}
                         for row in r],
             "candidates": int(res.candidates), "truncated": bool(res.truncated),
             "timing_ms": round(per_q_ms, 3), "encode_ms": round(encode_ms / len(good), 3)}
        if mode == "hds":
            o["hds_mode"] = next(qmodes, "exact")
            ex = next(examined, None)
            o["examined"] = int(ex) if ex is not None and o["hds_mode"] == "ivf" else int(res.candidates)
        outs.append(o)
    if as_json:
        click.echo(json.dumps(outs, indent=2))
        return
    for o in outs:
        if "error" in o:
            continue
        click.echo(f"query {_cell(o['query'])}  mode {mode}"
                   + (f" ({o['hds_mode']})" if "hds_mode" in o else "")
                   + f"  {_plural(o['candidates'], 'candidate')}"
                   + (f", {o['examined']} examined" if o.get("hds_mode") == "ivf" else "")
                   + ("  (truncated at --max-candidates)" if o["truncated"] else "")
                   + f"  {o['timing_ms']:.2f} ms search, {o['encode_ms']:.1f} ms encode")
        click.echo(f"{'rank':>4}  {'ham':>3}  {'L2^2':>10}  {'label':<12}  path")
        for row in o["results"]:
            dist = "-" if row["distance"] is None else f"{row['distance']:.4g}"
            click.echo(f"{row['rank']:>4}  {row['hamming']:>3}  {dist:>10}  {_cell(row['label']):<12}  "
                       f"{_cell(row['path'])}")
    if bad:
        _log(f"skipped {_plural(len(bad), 'query file')} that could not be decoded")


# ---------------------------------------------------------------- shard

@main.command()
@_index_dir_options(positional=True)
@click.option("-n", "n", required=True, type=int, help="Number of shards.")
@click.option("-o", "--out", "out", required=True, help="Folder for OUT/shard-000 ... (must be new or empty).")
def shard(index_pos, index_opt, n, out):
    """Split the index (INDEX_DIR or --index) into N index directories of consecutive rows.

    Each shard is a complete index; its manifest's id_offset maps its ids to global ids.
    Search them together with deephash_faiss.distributed.ShardedSearcher (one Ray actor per
    shard, results merged to equal the unsharded index's).
    """
    from .distributed import split_index

    index_dir = _index_dir(index_pos, index_opt)
    t0 = time.perf_counter()
    dirs = split_index(index_dir, out, n, log=_log)
    click.echo(f"split {index_dir} into {_plural(len(dirs), 'shard')} under {out} in {time.perf_counter() - t0:.1f} s")


# ---------------------------------------------------------------- maintenance (maintain.py)

@main.command()
@click.argument("args", nargs=-1, metavar="[INDEX_DIR] IMAGES")
@click.option("--index", "index_opt", default=None, metavar="DIR",
              help=_INDEX_HELP + " May also be given as the first argument.")
@click.option("--model", "model_path", default=None,
              help="Must be the index's model (same sha256); default: the model stored in the index.")
@_batch_opt
@click.option("--shard-size", default=50_000, show_default=True, type=int, help="Images per new HDF5 shard.")
@_device_opt
@_quiet_opt
def add(args, index_opt, model_path, batch_size, shard_size, device, quiet):
    """Append the images under IMAGES to the index (INDEX_DIR or --index).

    Paths already in the index are not indexed again (listed as "already indexed" in the
    skip report). Searches running meanwhile see the old or the new index, never a mix.
    An interrupted add resumes when run again.
    """
    from .maintain import add_images

    if len(args) == 2:
        index_dir, images = _index_dir(args[0], index_opt), args[1]
    elif len(args) == 1:
        index_dir, images = _index_dir(None, index_opt), args[0]
    else:
        raise click.UsageError("give the images folder: dhf add [INDEX_DIR] IMAGES (or --index DIR IMAGES)")
    rep = add_images(index_dir, images, model_path, batch_size, shard_size, device, progress=not quiet, log=_log)
    click.echo(f"added {_plural(rep.added, 'image')} to {index_dir}, now {_plural(rep.count, 'row')} "
               f"({_plural(rep.shards_written, 'shard')} written, {rep.shards_reused} reused); "
               f"{len(rep.already)} already indexed; skipped {_plural(len(rep.skipped), 'bad file')}"
               + (f", see the skip report in {index_dir}" if rep.skipped else ""))


@main.command()
@_index_dir_options(positional=True)
@click.option("--paths", "paths", multiple=True, help="Image path as indexed (repeatable).")
@click.option("--ids", "ids", multiple=True, type=int, help="Row id (repeatable).")
def remove(index_pos, index_opt, paths, ids):
    """Mark rows of the index (INDEX_DIR or --index) deleted: no search returns them.

    Ids stay as they are; `dhf compact` drops the deleted rows.
    """
    from .maintain import remove as do_remove

    index_dir = _index_dir(index_pos, index_opt)
    rep = do_remove(index_dir, list(paths), list(ids))
    click.echo(f"removed {_plural(len(rep.removed), 'row')} from {index_dir}; {rep.live} live")


@main.command()
@_index_dir_options(positional=True)
def compact(index_pos, index_opt):
    """Rewrite the index (INDEX_DIR or --index) without deleted rows (ids are renumbered)."""
    from .maintain import compact as do_compact

    index_dir = _index_dir(index_pos, index_opt)
    rep = do_compact(index_dir, log=_log)
    click.echo(f"compacted {index_dir}: dropped {_plural(rep.dropped, 'deleted row')}, {_plural(rep.count, 'row')}")


@main.command("fine-index")
@_index_dir_options(positional=True)
@click.option("--cell-size", default=None, type=int,
              help="Target rows per list: codes holding more rows are split into k-means cells of fc7 "
                   "(default: by the index's rows, a power of two near sqrt(rows) / 16 between 64 and 1024).")
@click.option("--storage", default="auto", show_default=True, type=click.Choice(["auto", "pq4", "sq8", "fp16"]),
              help="Compressed features in the lists (pq4: 4-bit PQ, half a byte per dimension, "
                   "scanned with faiss fast-scan; sq8: 1 byte per dimension; fp16: 2; auto: pq4 up to "
                   "2e6 rows, sq8 above, where pq4's recall was measured too low).")
@click.option("--drop", is_flag=True, help="Remove the index's fine index instead of building one.")
def fine_index(index_pos, index_opt, cell_size, storage, drop):
    """Build the HDS fine index of the index (INDEX_DIR or --index) and save it with it.

    HDS then ranks inside each Hamming pool with inverted lists keyed by (code, k-means
    cell of fc7) holding compressed features, probes the cells nearest the query and
    re-ranks the best exactly (`dhf search --hds-mode auto|ivf --nprobe --refine`), instead
    of ranking (or cutting) the whole pool. `dhf add` puts new rows into it, `dhf compact`
    renumbers it, removed rows are filtered at search; `dhf verify` checks it. Building it
    again replaces it (after many adds, the cells of the old k-means are refreshed).
    """
    from .maintain import build_fine

    if drop:
        _note_unused(click.get_current_context(), ("cell_size", "storage"), "--drop")
    index_dir = _index_dir(index_pos, index_opt)
    rep = build_fine(index_dir, cell_size, storage, drop=drop, log=_log)
    if drop:
        click.echo(f"dropped the fine index of {index_dir}")
        return
    click.echo(f"built the fine index of {index_dir}: {_plural(rep.lists, 'list')} over "
               f"{_plural(rep.rows, 'row')}, {rep.storage}{' (auto)' if storage == 'auto' else ''}, "
               f"cell size {rep.cell_size}, {rep.bytes / 2**20:.1f} MiB "
               f"({rep.file}) in {rep.seconds:.1f} s")


@main.command()
@_index_dir_options(positional=True)
def verify(index_pos, index_opt):
    """Check the index (INDEX_DIR or --index): checksums, row counts, the code index, the model,
    the fine index.

    Prints OK, or one PROBLEM line each and exits with status 1.
    """
    from .maintain import verify as do_verify

    index_dir = _index_dir(index_pos, index_opt)
    problems = do_verify(index_dir)
    if problems:
        for p in problems:
            click.echo(f"PROBLEM: {_cell(p)}")
        click.echo(f"{_plural(len(problems), 'problem')} in {index_dir}", err=True)
        sys.exit(1)
    click.echo(f"OK: {index_dir}")


# ---------------------------------------------------------------- info

def _index_type_text(spec: dict) -> str:
    """``flat index (codes.index)``, ``hash index, hash_bits 16, nflip 2 (codes.index)``."""
    params = ", ".join(f"{k} {v}" for k, v in spec.items() if k not in ("type", "file", "sha256", "size"))
    return f"{spec.get('type', '?')} index" + (f", {params}" if params else "") + f" ({_cell(spec.get('file'))})"


def _fine_text(m: dict) -> str:
    """``sq8 lists, 11,248 lists, cell size 1024, 1000000 rows (fine.index)`` or ``none (...)``."""
    fe = m.get("fine")
    if not fe:
        return "none (HDS ranks whole pools; `dhf fine-index` builds one)"
    from .layout import fine_entry_problem

    problem = fine_entry_problem(m)
    return (f"{fe.get('storage')} lists, {fe.get('lists')} lists, cell size {fe.get('cell_size')}, "
            f"{fe.get('rows')} rows ({_cell(fe.get('file'))})" + (f"  NOT USED: {problem}" if problem else ""))


@main.command()
@_index_dir_options(positional=True)
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and file sizes as JSON.")
def info(index_pos, index_opt, as_json):
    """Show what the index (INDEX_DIR or --index) holds: images, model, codes, files."""
    from . import api

    index_dir = _index_dir(index_pos, index_opt)
    inf = api.index_info(index_dir)
    m = inf["manifest"]
    if as_json:
        click.echo(json.dumps(inf, indent=2))
        return
    model = m.get("model", {})
    classes = m.get("classes", [])
    rows = [
        ("index", f"{_cell(index_dir)}  (format {m.get('format')} v{m.get('version')}, created {m.get('created')})"),
        ("images", f"{m.get('count')} ({len(m.get('deleted', []))} deleted, {m.get('skipped', 0)} skipped at build)"),
        ("model", f"{_cell(model.get('backbone'))}  {_cell(model.get('file'))}  "
                  f"sha256 {(model.get('sha256') or '-')[:16]}…"
                  + ("  (flip-averaged encoding: each image with its mirror)" if model.get("flip_average") else "")),
        ("codes", f"{m.get('bits')} bits, {_index_type_text(m.get('index', {}))}"),
        ("features", f"{m.get('feature_dim')}-d {m.get('feature_dtype')} in "
                     f"{_plural(len(m.get('shards', [])), 'shard')}"),
        ("fine", _fine_text(m)),
        ("classes", f"{len(classes)}" + (": " + ", ".join(_cell(c) for c in classes[:10]) if classes else "")
                    + (" …" if len(classes) > 10 else "")),
        ("on disk", f"{inf['total_bytes'] / 2**20:.1f} MiB"),
    ]
    for key, value in rows:
        click.echo(f"{key:<10} {value}")
    for rel, size in inf["sizes"].items():
        click.echo(f"  {_cell(rel):<40} {'MISSING' if size is None else f'{size / 2**20:.2f} MiB'}")
    missing = [rel for rel, size in inf["sizes"].items() if size is None]
    if missing:
        _log(f"warning: {_plural(len(missing), 'file')} of the index missing ({_cell(missing[0])}"
             f"{' ...' if len(missing) > 1 else ''}): searches will refuse it; `dhf verify` checks everything")


# ---------------------------------------------------------------- evaluate

@main.command()
@_index_dir_options(positional=False)
@click.option("--queries", "query_dir", required=True, type=click.Path(file_okay=False),
              help="Labelled query images (one subfolder per class, names as in the index).")
@click.option("--mode", default="all", show_default=True, type=click.Choice(["bcs", "hds", "es", "all"]),
              help="Ranking(s) to measure.")
@click.option("--top-k", default=1000, show_default=True, type=int, help="K of mAP@K.")
@click.option("--radius", default=3, show_default=True, type=int,
              help="HDS pool: Hamming distance < RADIUS (topped up to k with the nearest codes beyond it).")
@click.option("--max-candidates", default=10_000, show_default=True, type=int, help="HDS pool cap.")
@click.option("--json", "json_arg", is_flag=False, flag_value="-", default=None, metavar="",
              help="Print all metrics as JSON on stdout (the summary goes to stderr). "
                   "The old form --json PATH still works, as --output PATH.")
@click.option("-o", "--output", "output", default=None, metavar="PATH",
              help="Write all metrics to this JSON file (plots beside it).")
@click.option("--no-plots", is_flag=True, help="Skip the matplotlib plots.")
@_device_opt
@_quiet_opt
def evaluate(index_opt, query_dir, mode, top_k, radius, max_candidates, json_arg, output, no_plots, device, quiet):
    """Measure retrieval quality: every query image against the whole index.

    Metrics as the paper's official code: mAP@K over a stable Hamming ranking (ties keep
    database order; AP divided by the relevant items found in the top K), P@k for
    k = 100..1000, full-database mAP, precision within Hamming radius 2; the same for
    the HDS and ES rankings; mean query time per mode.
    """
    from . import api
    from .data import scan_images
    from .evaluate import evaluate_arrays, time_modes, write_plots
    from .search import check_search_args

    index_dir = _index_dir(None, index_opt)
    as_json = json_arg == "-"
    if json_arg not in (None, "-"):
        if output is not None and output != json_arg:
            raise click.UsageError("give the JSON file once: --output PATH (--json PATH is its old name)")
        _log(f"warning: --json PATH is deprecated, use --output {json_arg} (--json alone prints JSON on stdout)")
        output = json_arg
    if top_k < 1:
        raise DhfError("--top-k must be at least 1")
    if output is not None:
        from .store import check_output_path

        check_output_path(output, "--output")  # before the evaluation, not after it
    modes = ["bcs", "hds", "es"] if mode == "all" else [mode]
    s = api.open_index(index_dir, device=device, features_in_memory=True)
    check_search_args(1, radius, max_candidates, s.live_count(), s.bits)
    q = scan_images(query_dir)
    if not q.labelled:
        raise DhfError(f"{query_dir} needs one subfolder per class to evaluate")
    names = s.manifest.get("classes", [])
    lut = np.array([names.index(c) if c in names else -1 for c in q.classes], dtype=np.int32)
    q_labels = lut[q.labels]
    if (q_labels < 0).all():
        raise DhfError(f"none of the query classes of {query_dir} is a class of the index")
    unknown = sorted({q.classes[c] for c in np.unique(q.labels[q_labels < 0])})
    if unknown:  # no relevant image in the database: an AP of 0 that says nothing about the codes
        _log(f"skipped {_plural(int((q_labels < 0).sum()), 'query', 'queries')} of "
             f"{_plural(len(unknown), 'class', 'classes')} the index does not have: {', '.join(unknown[:5])}"
             f"{' ...' if len(unknown) > 5 else ''}")
    keep = np.flatnonzero(q_labels >= 0)
    q_paths, q_labels = [q.paths[i] for i in keep], q_labels[keep]
    t0 = time.perf_counter()
    codes, feats, bad = s.encode(q_paths, progress=not quiet, skip_bad=True)
    enc = time.perf_counter() - t0
    if bad:  # as `dhf search` does: a bad file among the queries is reported, not fatal
        for i, reason in bad[:5]:
            _log(f"skipped query {_cell(q_paths[i])}: {reason}")
        if len(bad) > 5:
            _log(f"skipped {_plural(len(bad), 'query file')} that could not be decoded")
        q_labels = np.delete(q_labels, [i for i, _ in bad])
    t0 = time.perf_counter()
    ks = [k for k in range(100, 1001, 100) if k <= s.count] or [min(10, s.count)]
    res = evaluate_arrays(s.codes(), s.store.load_features(), s.store.labels(), codes, feats, q_labels, modes,
                          top_k=min(top_k, s.count), ks=ks, hds_radius=radius, max_candidates=max_candidates,
                          device=str(s.device), progress=not quiet)
    res["eval_seconds"] = round(time.perf_counter() - t0, 3)
    res["query_ms"] = time_modes(s, codes, feats, modes, k=min(100, s.count), radius=radius,
                                 max_candidates=max_candidates)
    res.update(index=index_dir, queries=query_dir, n_queries=len(codes), n_database=s.count, bits=s.bits,
               skipped_queries=len(q.paths) - len(codes),
               encode_seconds=round(enc, 3), top_k=min(top_k, s.count))
    say = _log if as_json else click.echo
    for m in modes:
        r = res[m]
        extra = f"  P@r2 {r['precision_radius']:.4f}" if "precision_radius" in r else ""
        full = f"  mAP(full) {r['map_full']:.4f}" if r.get("map_full") is not None else ""
        say(f"{m.upper():<4} mAP@{res['top_k']} {r['map_at_k']:.4f}{full}  "
            f"P@{ks[0]} {r['precision_at_k'][ks[0]]:.4f}{extra}  {res['query_ms'][m]:.3f} ms/query")
    say(f"{_plural(len(codes), 'query', 'queries')} x {_plural(s.count, 'image')}; "
        f"metrics in {res['eval_seconds']:.1f} s")
    text = json.dumps(res, indent=2, default=float)
    if output:
        from .store import atomic_write_bytes

        atomic_write_bytes(output, text.encode())
        files = []
        if not no_plots:
            files = write_plots(res, os.path.dirname(os.path.abspath(output)),
                                f"{os.path.basename(index_dir)}: {s.bits}-bit codes")
        say("wrote " + ", ".join([output] + files))
    if as_json:
        click.echo(text)


# ---------------------------------------------------------------- demo

@main.command()
@click.option("-o", "--out", "out", default="dhf-demo", show_default=True,
              help="Working folder (the digits as PNG folders, the model, the index).")
@click.option("--epochs", default=8, show_default=True, type=int, help="Training epochs of the small CNN.")
@click.option("--bits", default=48, show_default=True, type=int, help="Code length (multiple of 8).")
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
@_index_dir_options(positional=False)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="Port to listen on.")
@_device_opt
@click.option("--max-upload-mb", default=20.0, show_default=True, type=float, help="Largest query upload (413 above).")
@click.option("--timeout", "timeout_s", default=30.0, show_default=True, type=float,
              help="Seconds a search may take before the request gets 504.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]), help="uvicorn's log level.")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="Also answer requests for this Host name (repeatable; '*.example.org' for subdomains, '*' for "
                   "any). Loopback names and the --host address are always allowed; others get 400.")
@click.option("--max-pixels", default=25_000_000, show_default=True, type=click.IntRange(1),
              help="Largest upload in decoded pixels (after a JPEG's DCT reduction); 413 above, from the header.")
@click.option("--max-decodes", default=2, show_default=True, type=click.IntRange(1),
              help="Uploads and thumbnails decoded at once (bounds decode memory).")
@click.option("--max-uploads", default=8, show_default=True, type=click.IntRange(1),
              help="Upload bodies received at once; the others wait unread (bounds upload memory: about "
                   "3x the upload's size each).")
def serve(index_opt, host, port, device, max_upload_mb, timeout_s, log_level, allow_hosts, max_pixels, max_decodes,
          max_uploads):
    """Serve an index over HTTP: a search page at /, the JSON API at /search, docs at /docs.

    The model, codes and features load once at start; searches run one at a time on a
    dedicated thread. After `dhf add` / `remove` / `compact` the server reopens the index
    by itself. Needs the serve extra: pip install "deephash-faiss[serve]".
    """
    index_dir = _index_dir(None, index_opt)
    if not (math.isfinite(max_upload_mb) and max_upload_mb > 0):
        raise DhfError(f"--max-upload-mb must be a positive number, got {max_upload_mb}")
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise DhfError(f"--timeout must be a positive number of seconds, got {timeout_s}")
    _require_extra("fastapi", "uvicorn")
    from . import serve as serve_mod

    serve_mod.run(index_dir, host, port, device, int(max_upload_mb * 2**20), timeout_s, log_level, on_ready=_log,
                  allow_hosts=allow_hosts, max_pixels=max_pixels, max_decodes=max_decodes, max_uploads=max_uploads)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
