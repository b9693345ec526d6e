"""Training and comparing classifiers on cached features: the library behind
``featx train`` and ``featx compare``.

Features always come from the cache; what is missing is extracted first
(every requested layer of a backbone in one pass). Selection of the
regularisation parameter, fitting and metrics are :mod:`featx.classify`'s;
this module wires them to datasets, the cache and bundles.

``sgd`` never holds the training features in memory: it streams them from
the HDF5 entry with :meth:`FeatureCache.iter_chunks` into
:func:`featx.classify.fit_sgd_stream`, in a new seeded order every pass
(blocks of rows contiguous on disk, so reads stay cheap, shuffled so each
chunk mixes classes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .cache import FeatureCache, FeatureSpec
from .classify import (ComparisonRow, FitResult, evaluate, fit_classifier, fit_sgd_stream,
                       get_classifier_spec, predict_proba)
from .data import Dataset
from .errors import ConfigError
from .extract import ExtractReport, extract, feature_specs
from .report import atomic_write_text

__all__ = ["CompareResult", "TrainResult", "compare", "parse_grid", "parse_layers", "train"]

# Rows of one contiguous block when streaming (several blocks make a chunk).
SGD_BLOCK_ROWS = 256


def fit_threads(threads: int | None):
    """BLAS/OpenMP threads of the fits run in this process (None: the libraries' default).

    One by default: the search gets its parallelism from joblib workers
    (``jobs``), and on a shared machine spinning BLAS/OpenMP threads make
    a fit many times slower (a 2-core box with other work on it: 12x)."""
    if threads is None:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits
    return threadpool_limits(limits=int(threads))


# --------------------------------------------------------------------------
# options


def parse_layers(backbones: Sequence[str], layers: Sequence[str]) -> dict[str, list[str] | None]:
    """Layers per backbone from ``--layer`` values.

    ``LAYER`` applies to every backbone, ``BACKBONE:LAYER`` to that one.
    A backbone with no layer gets ``None`` (its default layer).

    >>> parse_layers(["resnet18", "vgg16"], ["flatten", "vgg16:classifier.1"])
    {'resnet18': ['flatten'], 'vgg16': ['flatten', 'classifier.1']}
    """
    backbones = list(dict.fromkeys(backbones))
    out: dict[str, list[str]] = {b: [] for b in backbones}
    for value in layers:
        name, sep, layer = value.rpartition(":")
        if not sep:
            for b in backbones:
                out[b].append(layer)
            continue
        if name not in out:
            raise ConfigError(f"--layer {value}: {name} is not one of the --backbone values "
                              f"({', '.join(backbones)})")
        if not layer:
            raise ConfigError(f"--layer {value} names no layer (use BACKBONE:LAYER)")
        out[name].append(layer)
    return {b: list(dict.fromkeys(ls)) or None for b, ls in out.items()}


def parse_grid(classifier: str, values: Sequence[str]) -> list | None:
    """``--C`` values (repeated and/or comma-separated) as numbers for ``classifier``'s parameter."""
    spec = get_classifier_spec(classifier)
    out = []
    for raw in values:
        for text in str(raw).split(","):
            text = text.strip()
            if not text:
                continue
            try:
                v = float(text)
            except ValueError:
                raise ConfigError(f"--C {text}: not a number") from None
            if not v > 0:
                raise ConfigError(f"--C {text}: {spec.param_name} must be positive")
            if spec.param_name == "n_neighbors":
                if v != int(v):
                    raise ConfigError(f"--C {text}: {classifier} tunes n_neighbors, give whole numbers")
                v = int(v)
            out.append(v)
    return list(dict.fromkeys(out)) or None


# --------------------------------------------------------------------------
# features


@dataclass
class SplitFeatures:
    """One split of a dataset in one cache entry: content ids and labels
    (features are read when needed, so ``sgd`` can stream them)."""

    ids: list[str]
    y: np.ndarray
    missing: int = 0      # images of the split the cache does not hold (unreadable)

    def __len__(self):
        return len(self.ids)


def split_features(cache: FeatureCache, spec: FeatureSpec, ds: Dataset) -> dict[str, SplitFeatures]:
    have = set(cache.ids(spec.key))
    out = {}
    for split in ds.splits:
        samples = ds.subset(split)
        kept = [s for s in samples if s.id in have]
        out[split] = SplitFeatures([s.id for s in kept], ds.labels(kept), len(samples) - len(kept))
    return out


def _proba_streamed(pipe, cache: FeatureCache, key: str, ids: list[str], n_classes: int,
                    rows_per_chunk: int = 4096) -> np.ndarray:
    out = np.zeros((len(ids), n_classes))
    for pos, X in cache.iter_chunks(key, ids, rows_per_chunk):
        out[pos] = predict_proba(pipe, X, classes=n_classes)
    return out


def _predict_streamed(pipe, cache, key, ids, rows_per_chunk=4096) -> np.ndarray:
    out = []
    for _, X in cache.iter_chunks(key, ids, rows_per_chunk):
        out.append(pipe.predict(X))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def _sgd_chunks(cache: FeatureCache, key: str, data: SplitFeatures, rows_per_chunk: int):
    """``chunks_for(seed)``: a ``chunks()`` for fit_sgd_stream whose every call
    (pass) reads the rows in a new seeded order of blocks. One fit, one seed:
    the same alpha gives the same model wherever it stands in the grid."""
    row_of = {x: i for i, x in enumerate(cache.ids(key))}
    order = sorted(range(len(data.ids)), key=lambda i: row_of[data.ids[i]])   # storage order
    block = max(1, min(SGD_BLOCK_ROWS, rows_per_chunk))
    blocks = [order[s:s + block] for s in range(0, len(order), block)]

    def chunks_for(seed: int):
        rng = np.random.default_rng(seed)

        def chunks():
            positions = [i for b in rng.permutation(len(blocks)) for i in blocks[b]]
            ids = [data.ids[i] for i in positions]
            y = data.y[positions]
            for pos, X in cache.iter_chunks(key, ids, rows_per_chunk):
                yield X, y[pos]
        return chunks
    return chunks_for


def fit_sgd_streamed(cache: FeatureCache, key: str, data: dict[str, SplitFeatures], *,
                     grid: Sequence | None = None, seed: int = 0, epochs: int = 5,
                     rows_per_chunk: int = 4096, n_classes: int) -> FitResult:
    """SGD trained chunk by chunk from the cache; alpha chosen on the val split.

    Without a val split there is no search (streamed training does no CV):
    the default alpha (or the middle of ``grid``) is used and a note says so.
    """
    spec = get_classifier_spec("sgd")
    train = data["train"]
    classes = np.arange(n_classes)
    values = list(grid) if grid else list(spec.grid)
    default = spec.default if not grid else sorted(values)[(len(values) - 1) // 2]
    notes: list[str] = []
    chunks_for = _sgd_chunks(cache, key, train, rows_per_chunk)
    val = data.get("val")
    t0 = time.perf_counter()
    search, val_score, source = [], None, "none"
    if val is not None and len(val) and len(values) > 1:
        fitted, scores = [], []
        for alpha in values:
            t = time.perf_counter()
            pipe = fit_sgd_stream(chunks_for(seed), classes, alpha=alpha, epochs=epochs, seed=seed)
            fitted.append((pipe, time.perf_counter() - t))
            scores.append(float(np.mean(_predict_streamed(pipe, cache, key, val.ids, rows_per_chunk) == val.y)))
        best = max(scores)
        i = max(j for j, s in enumerate(scores) if s >= best - 1e-12)   # higher alpha = simpler
        pipe, fit_seconds = fitted[i]
        chosen, val_score, source = values[i], best, "val"
        search = [(v, s) for v, s in zip(values, scores)]
    else:
        chosen = default if len(values) > 1 else values[0]
        if len(values) > 1:
            notes.append(f"no val split: sgd streams its training data and does no CV, "
                         f"used alpha={chosen:g} without search")
        t = time.perf_counter()
        pipe = fit_sgd_stream(chunks_for(seed), classes, alpha=chosen, epochs=epochs, seed=seed)
        fit_seconds = time.perf_counter() - t
        if val is not None and len(val):
            predicted = _predict_streamed(pipe, cache, key, val.ids, rows_per_chunk)
            val_score, source = float(np.mean(predicted == val.y)), "val"
    return FitResult(pipe, "sgd", spec.param_name, chosen, search, source, val_score, None,
                     fit_seconds, time.perf_counter() - t0, notes)


def fit_on_cache(classifier: str, cache: FeatureCache, spec: FeatureSpec, data: dict[str, SplitFeatures], *,
                 classes: Sequence[str], grid=None, pca=None, cv: int = 5, jobs: int | None = None,
                 seed: int = 0, rows_per_chunk: int = 4096) -> FitResult:
    """Fit ``classifier`` on the train split of ``data`` (val split for selection when present)."""
    get_classifier_spec(classifier)
    if "train" not in data or not len(data["train"]):
        raise ConfigError("the dataset has no train images with features; nothing to fit")
    absent = [c for i, c in enumerate(classes) if i not in set(data["train"].y.tolist())]
    if classifier == "sgd":
        if pca is not None:
            raise ConfigError("--pca does not apply to --classifier sgd (it streams features, PCA needs them all)")
        fit = fit_sgd_streamed(cache, spec.key, data, grid=grid, seed=seed, rows_per_chunk=rows_per_chunk,
                               n_classes=len(classes))
    else:
        tr = data["train"]
        X = cache.read(spec.key, tr.ids)
        val = data.get("val")
        Xv, yv = (cache.read(spec.key, val.ids), val.y) if val is not None and len(val) else (None, None)
        fit = fit_classifier(classifier, X, tr.y, X_val=Xv, y_val=yv, grid=grid, pca=pca, cv=cv,
                             n_jobs=jobs, seed=seed, class_names=list(classes))
    if absent:
        names = ", ".join(repr(c) for c in absent)
        fit.notes.append(f"class {names} has no train images: never predicted" if len(absent) == 1 else
                         f"classes {names} have no train images: never predicted")
    return fit


def evaluate_test_split(fit: FitResult, cache: FeatureCache, spec: FeatureSpec, data: dict[str, SplitFeatures],
                        classes: Sequence[str], top_k=(1, 5)) -> dict | None:
    """:func:`featx.classify.evaluate` on the test split (None when there is none)."""
    test = data.get("test")
    if test is None or not len(test):
        return None
    proba = _proba_streamed(fit.pipeline, cache, spec.key, test.ids, len(classes))
    return evaluate(test.y, proba, classes, top_k=top_k)


# --------------------------------------------------------------------------
# train


@dataclass
class TrainResult:
    fit: FitResult
    spec: FeatureSpec
    resolved: object                     # ResolvedWeights
    weights_spec: str
    dims: int
    report: ExtractReport
    counts: dict[str, int]               # images with features per split
    missing: int                         # images without (unreadable)
    test: dict | None                    # evaluate() on the test split
    pca: int | float | None = None
    seed: int = 0

    def manifest(self, ds: Dataset) -> dict:
        from .bundle import linear_manifest
        return linear_manifest(classes=ds.classes, spec=self.spec, weights_spec=self.weights_spec,
                               resolved=self.resolved, seed=self.seed, dims=self.dims, fit=self.fit,
                               pca=self.pca, dataset=ds, test_metrics=self.test)


def train(ds: Dataset, backbone: str, classifier: str, *, weights: str = "auto", layer: str | None = None,
          grid=None, pca=None, cv: int = 5, jobs: int | None = None, seed: int = 0, cache="cache",
          progress: bool = True, notify=None, on_extract=None, rows_per_chunk: int = 4096,
          threads: int | None = 1, **extract_options) -> TrainResult:
    """Extract what is missing, choose the parameter, fit, measure on test.

    ``extract_options`` (pool, precision, storage, batch_size, device,
    workers, ...) go to :func:`featx.extract.extract`; ``on_extract(report)``
    is called when the features are ready; ``threads``: see
    :func:`fit_threads`. Write the result with
    ``save_bundle(path, result.manifest(ds), result.fit.pipeline)``.
    """
    from .backbones import resolve_weights
    get_classifier_spec(classifier)
    cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    rw = resolve_weights(backbone, weights, seed=seed)
    report = extract(ds, backbone, weights=weights, layers=[layer] if layer else None, cache=cache,
                     progress=progress, seed=seed, notify=notify, **extract_options)
    if on_extract is not None:
        on_extract(report)
    spec = report.specs[0]
    data = split_features(cache, spec, ds)
    with fit_threads(threads):
        fit = fit_on_cache(classifier, cache, spec, data, classes=ds.classes, grid=grid, pca=pca, cv=cv,
                           jobs=jobs, seed=seed, rows_per_chunk=rows_per_chunk)
        metrics = evaluate_test_split(fit, cache, spec, data, ds.classes)
    return TrainResult(fit, spec, rw, weights, cache.info(spec.key).dim, report,
                       {s: len(d) for s, d in data.items()}, sum(d.missing for d in data.values()),
                       metrics, pca, seed)


# --------------------------------------------------------------------------
# compare


@dataclass
class CompareResult:
    rows: list[ComparisonRow]                              # ranked, best first
    reports: dict[str, ExtractReport] = field(default_factory=dict)   # per backbone
    reused: int = 0                                        # rows read back from an identical earlier fit

    @property
    def n_extracted(self) -> int:
        return sum(r.n_extracted for r in self.reports.values())


def compare(ds: Dataset, layers: dict[str, list[str] | None], classifiers: Sequence[str], *,
            weights: str = "auto", grids: dict[str, list] | None = None, pca=None, cv: int = 5,
            jobs: int | None = None, seed: int = 0, cache="cache", progress: bool = True, notify=None,
            on_extract=None, on_row=None, rows_per_chunk: int = 4096, threads: int | None = 1,
            reuse: bool = True, extract_fn=None, **extract_options) -> CompareResult:
    """Every backbone x layer x classifier, from cached features.

    ``layers``: backbone -> its layers (None: the default layer), e.g. from
    :func:`parse_layers`. Each backbone is extracted once, all its layers in
    one pass; its ``extract_seconds`` (0 when everything was cached) is that
    pass, shared by its layers. ``grids``: classifier -> values of its
    parameter (a classifier not in it, or None: its own grid).
    ``on_extract(backbone, report)`` and ``on_row(row)`` are called as each
    extraction and each result is done. ``extract_options`` (pool,
    precision, storage, batch_size, device, workers, ...) go to
    :func:`featx.extract.extract`; ``threads``: see :func:`fit_threads`.

    Results are kept beside the features (``<cache>/results/``), keyed by
    everything that determines them (features spec, dataset id, the rows
    used, classifier, grid, PCA, folds, seed, featx and scikit-learn
    versions); with ``reuse`` an identical fit is read back, not redone,
    so a repeated comparison finishes in seconds. ``row.fit_seconds``
    stays the time of the original fit.
    """
    from .classify import rank_rows
    for name in classifiers:
        get_classifier_spec(name)
    if not classifiers:
        raise ConfigError("give at least one --classifier")
    cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    # every backbone/layer/weights problem is reported before hours of work
    spec_options = {k: v for k, v in extract_options.items() if k in ("pool", "precision", "storage", "device")}
    for backbone, ls in layers.items():
        feature_specs(backbone, weights, ls, seed=seed, **spec_options)
    rows: list[ComparisonRow] = []
    reports = {}
    reused = 0
    for backbone, ls in layers.items():
        report = (extract_fn or extract)(ds, backbone, weights=weights, layers=ls, cache=cache, progress=progress, seed=seed,
                         notify=notify, **extract_options)
        reports[backbone] = report
        if on_extract is not None:
            on_extract(backbone, report)
        extract_seconds = report.seconds if report.n_extracted else 0.0
        for spec in report.specs:
            data = split_features(cache, spec, ds)
            dims = cache.info(spec.key).dim
            for name in classifiers:
                grid = (grids or {}).get(name)
                stored = _stored_result(cache, spec, ds, data, name, grid, pca, cv, seed, rows_per_chunk)
                if reuse and stored.is_file():
                    row = ComparisonRow(**json.loads(stored.read_text()))
                    row.extract_seconds = extract_seconds
                    rows.append(row)
                    reused += 1
                    if on_row is not None:
                        on_row(row)
                    continue
                with fit_threads(threads):
                    fit = fit_on_cache(name, cache, spec, data, classes=ds.classes, grid=grid,
                                       pca=None if name == "sgd" else pca, cv=cv, jobs=jobs, seed=seed,
                                       rows_per_chunk=rows_per_chunk)
                    metrics = evaluate_test_split(fit, cache, spec, data, ds.classes)
                if name == "sgd" and pca is not None:
                    fit.notes.append("no PCA for sgd (it streams features)")
                row = ComparisonRow.from_fit(fit, backbone=backbone, layer=spec.layer, dims=dims,
                                             test_metrics=metrics, extract_seconds=extract_seconds)
                atomic_write_text(stored, json.dumps(dataclasses.asdict(row), indent=1))
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    return CompareResult(rank_rows(rows), reports, reused)


def _stored_result(cache: FeatureCache, spec: FeatureSpec, ds: Dataset, data: dict[str, SplitFeatures], name: str,
                   grid, pca, cv: int, seed: int, rows_per_chunk: int) -> Path:
    """Where the comparison row of exactly this fit is kept."""
    import sklearn

    from . import __version__
    rows = {s: hashlib.sha256("\n".join(d.ids).encode()).hexdigest() for s, d in data.items()}
    registered = get_classifier_spec(name)
    estimator = sorted((k, repr(v)) for k, v in registered.build(seed).get_params(deep=False).items())
    what = {"features": spec.canonical(), "dataset": ds.id, "rows": rows, "classifier": name,
            "estimator": estimator, "grid": list(grid) if grid else list(registered.grid),
            "pca": None if name == "sgd" else pca, "cv": cv, "seed": seed,
            "chunk_rows": rows_per_chunk if name == "sgd" else None,
            "featx": __version__, "scikit-learn": sklearn.__version__}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]
    return cache.root / "results" / f"{spec.key}-{name}-{digest}.json"
