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
import os
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

__all__ = ["CompareResult", "FeatureSet", "FitStore", "TrainResult", "compare", "parse_features", "parse_grid",
           "parse_layers", "read_features", "train"]

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


# A feature request: the parts of one feature set, each (backbone, layer or
# None for its default layer); one part is a plain layer, several a fusion.
Request = tuple[tuple[str, "str | None"], ...]


def _parse_part(value: str, part: str, backbones: list[str]) -> tuple[str | None, str]:
    if not part.strip():
        raise ConfigError(f"--layer {value}: an empty part in a fusion (write A+B, each part LAYER or "
                          "BACKBONE:LAYER)")
    name, sep, layer = part.rpartition(":")
    if not sep:
        return None, part
    if not layer:
        raise ConfigError(f"--layer {value} names no layer in {part!r} (use BACKBONE:LAYER)")
    from .backbones import list_backbones
    if name not in backbones:
        known = name in list_backbones()
        raise ConfigError(f"--layer {value}: {name} is not one of the --backbone values ({', '.join(backbones)})"
                          + ("; add it with -b " + name if known else ""))
    return name, layer


def parse_features(backbones: Sequence[str], layers: Sequence[str]) -> list[Request]:
    """Feature sets from ``--layer`` values, fusions included.

    ``LAYER`` applies to every backbone and ``BACKBONE:LAYER`` to that one,
    as in :func:`parse_layers`. ``A+B`` fuses: the concatenation of the
    parts' cached features, rows aligned by image id. A fusion whose parts
    name no backbone applies to every backbone (each fuses its own layers);
    otherwise every part names one (or there is a single backbone). A
    backbone that no plain ``--layer`` names gets its default layer.

    >>> parse_features(["resnet18", "vgg16"], ["flatten", "resnet18:flatten+vgg16:classifier.1"])
    [(('resnet18', 'flatten'),), (('vgg16', 'flatten'),), (('resnet18', 'flatten'), ('vgg16', 'classifier.1'))]
    >>> parse_features(["resnet18"], ["layer3+flatten"])
    [(('resnet18', 'layer3'), ('resnet18', 'flatten'))]
    """
    backbones = list(dict.fromkeys(backbones))
    plain: dict[str, list[str]] = {b: [] for b in backbones}
    fused: list[Request] = []
    for value in layers:
        if "+" not in value:
            name, layer = _parse_part(value, value, backbones)
            for b in ([name] if name else backbones):
                plain[b].append(layer)
            continue
        parts = [_parse_part(value, part, backbones) for part in value.split("+")]
        named = [b for b, _ in parts if b]
        if not named:
            requests = [tuple((b, layer) for _, layer in parts) for b in backbones]
        elif len(named) == len(parts) or len(backbones) == 1:
            requests = [tuple((b or backbones[0], layer) for b, layer in parts)]
        else:
            raise ConfigError(f"--layer {value}: some parts name a backbone and some do not; "
                              "with several --backbone values write BACKBONE:LAYER for every part")
        for r in requests:
            if len(set(r)) != len(r):
                raise ConfigError(f"--layer {value}: a part is listed twice")
            fused.append(r)
    out: list[Request] = []
    for b in backbones:
        for layer in dict.fromkeys(plain[b] or [None]):
            out.append(((b, layer),))
    out += list(dict.fromkeys(fused))
    return out


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


@dataclass(frozen=True)
class FeatureSet:
    """One or more cache entries used side by side: a plain layer, or a
    fusion whose columns are the parts' columns concatenated in order, rows
    aligned by image id. Standardisation stays per column (the Pipeline's
    scaler), fitted on train only."""

    parts: tuple[FeatureSpec, ...]

    @classmethod
    def of(cls, spec) -> "FeatureSet":
        return spec if isinstance(spec, FeatureSet) else cls((spec,))

    @property
    def fused(self) -> bool:
        return len(self.parts) > 1

    @property
    def backbone(self) -> str:
        return "+".join(dict.fromkeys(p.backbone for p in self.parts))

    @property
    def layer(self) -> str:
        if len({p.backbone for p in self.parts}) > 1:
            return "+".join(f"{p.backbone}:{p.layer}" for p in self.parts)
        return "+".join(p.layer for p in self.parts)

    @property
    def key(self) -> str:
        return "+".join(p.key for p in self.parts)

    def canonical(self) -> str:
        if not self.fused:
            return self.parts[0].canonical()
        return json.dumps([json.loads(p.canonical()) for p in self.parts], sort_keys=True, separators=(",", ":"))

    def dims(self, cache: FeatureCache) -> int:
        return sum(cache.info(p.key).dim for p in self.parts)

    def __getattr__(self, name):
        # a plain feature set reads as its one FeatureSpec (pool, precision, weights, ...)
        if name.startswith("_") or name == "parts":
            raise AttributeError(name)
        if len(self.parts) == 1:
            return getattr(self.parts[0], name)
        raise AttributeError(f"a fused feature set has no single {name!r}; see .parts")


def read_features(cache: FeatureCache, fset, ids: list[str]) -> np.ndarray:
    """Features of ``ids`` (in that order) from every part, side by side."""
    fset = FeatureSet.of(fset)
    blocks = [cache.read(p.key, ids) for p in fset.parts]
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=1)


def iter_feature_chunks(cache: FeatureCache, fset, ids: list[str], rows_per_chunk: int):
    """``(positions, X)`` chunks of ``ids``, every part's columns side by side."""
    fset = FeatureSet.of(fset)
    if not fset.fused:
        yield from cache.iter_chunks(fset.parts[0].key, ids, rows_per_chunk)
        return
    for start in range(0, len(ids), rows_per_chunk):
        chunk = ids[start:start + rows_per_chunk]
        yield np.arange(start, start + len(chunk)), read_features(cache, fset, chunk)


@dataclass
class SplitFeatures:
    """One split of a dataset in one cache entry: content ids and labels
    (features are read when needed, so ``sgd`` can stream them)."""

    ids: list[str]
    y: np.ndarray
    missing: int = 0      # images of the split the cache does not hold (unreadable)
    source: str = ""      # the dataset split these rows are, when it differs from the key (val held out)

    def __len__(self):
        return len(self.ids)


def split_features(cache: FeatureCache, spec, ds: Dataset) -> dict[str, SplitFeatures]:
    """Per split, the images that have features (in every part of a fusion).

    Raises :class:`~featx.errors.CacheError` naming the image and the part
    when one part of a fusion holds an image that another lacks."""
    from .errors import CacheError
    fset = FeatureSet.of(spec)
    held = [set(cache.ids(p.key)) for p in fset.parts]
    have = set.intersection(*held)
    if fset.fused:
        for s in ds.samples:
            inside = [s.id in h for h in held]
            if any(inside) and not all(inside):
                lacking = fset.parts[inside.index(False)]
                raise CacheError(f"{s.path}: has features in {fset.parts[inside.index(True)].key} but not in "
                                 f"{lacking.key}, another part of the fusion {fset.layer}; extract it with "
                                 f"`featx extract {ds.root} -b {lacking.backbone} -l {lacking.layer}`")
    out = {}
    for split in ds.splits:
        samples = ds.subset(split)
        kept = [s for s in samples if s.id in have]
        out[split] = SplitFeatures([s.id for s in kept], ds.labels(kept), len(samples) - len(kept))
    if getattr(ds, "held_out", None) == "val" and "test" not in out and "val" in out:
        # val is the held-out split (--test-fraction 0): it scores the model, so it never chooses
        # C nor trains: selection is by CV on train, and the "test" numbers are val's
        out["test"] = dataclasses.replace(out.pop("val"), source="val")
    return out


def _proba_streamed(pipe, cache: FeatureCache, fset, ids: list[str], n_classes: int,
                    rows_per_chunk: int = 4096) -> np.ndarray:
    out = np.zeros((len(ids), n_classes))
    for pos, X in iter_feature_chunks(cache, fset, ids, rows_per_chunk):
        out[pos] = predict_proba(pipe, X, classes=n_classes)
    return out


def _predict_streamed(pipe, cache, fset, ids, rows_per_chunk=4096) -> np.ndarray:
    out = []
    for _, X in iter_feature_chunks(cache, fset, ids, rows_per_chunk):
        out.append(pipe.predict(X))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def _sgd_chunks(cache: FeatureCache, fset, data: SplitFeatures, rows_per_chunk: int):
    """``chunks_for(seed)``: a ``chunks()`` for fit_sgd_stream whose every call
    (pass) reads the rows in a new seeded order of blocks. One fit, one seed:
    the same alpha gives the same model wherever it stands in the grid."""
    row_of = {x: i for i, x in enumerate(cache.ids(FeatureSet.of(fset).parts[0].key))}   # storage order
    order = sorted(range(len(data.ids)), key=lambda i: row_of[data.ids[i]])   # storage order
    block = max(1, min(SGD_BLOCK_ROWS, rows_per_chunk))
    blocks = [order[s:s + block] for s in range(0, len(order), block)]

    def chunks_for(seed: int):
        rng = np.random.default_rng(seed)

        def chunks():
            positions = [i for b in rng.permutation(len(blocks)) for i in blocks[b]]
            ids = [data.ids[i] for i in positions]
            y = data.y[positions]
            for pos, X in iter_feature_chunks(cache, fset, ids, rows_per_chunk):
                yield X, y[pos]
        return chunks
    return chunks_for


def fit_sgd_streamed(cache: FeatureCache, fset, data: dict[str, SplitFeatures], *,
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
    chunks_for = _sgd_chunks(cache, fset, train, rows_per_chunk)
    val = data.get("val")
    t0 = time.perf_counter()
    search, val_score, source = [], None, "none"
    if val is not None and len(val) and len(values) > 1:
        fitted, scores = [], []
        for alpha in values:
            t = time.perf_counter()
            pipe = fit_sgd_stream(chunks_for(seed), classes, alpha=alpha, epochs=epochs, seed=seed)
            fitted.append((pipe, time.perf_counter() - t))
            scores.append(float(np.mean(_predict_streamed(pipe, cache, fset, val.ids, rows_per_chunk) == val.y)))
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
            predicted = _predict_streamed(pipe, cache, fset, val.ids, rows_per_chunk)
            val_score, source = float(np.mean(predicted == val.y)), "val"
    # the chosen fit is fit_seconds; the search is everything else
    return FitResult(pipe, "sgd", spec.param_name, chosen, search, source, val_score, None,
                     fit_seconds, max(0.0, time.perf_counter() - t0 - fit_seconds), notes)


def fit_on_cache(classifier: str, cache: FeatureCache, spec, data: dict[str, SplitFeatures], *,
                 classes: Sequence[str], grid=None, pca=None, cv: int = 5, jobs: int | None = None,
                 seed: int = 0, rows_per_chunk: int = 4096, final_fit: str = "train+val") -> FitResult:
    """Fit ``classifier`` on the train split of ``data`` (val split for selection when present).

    ``spec``: a FeatureSpec or a :class:`FeatureSet` (fusion). ``final_fit``:
    what the final model is fitted on once the parameter is chosen (see
    :func:`featx.classify.fit_classifier`; sgd always fits on train)."""
    get_classifier_spec(classifier)
    fset = FeatureSet.of(spec)
    if "train" not in data or not len(data["train"]):
        raise ConfigError("the dataset has no train images with features; nothing to fit")
    fitted = set(data["train"].y.tolist())
    if final_fit == "train+val" and classifier != "sgd" and data.get("val") is not None:
        fitted |= set(data["val"].y.tolist())
    absent = [c for i, c in enumerate(classes) if i not in fitted]
    if classifier == "sgd":
        if pca is not None:
            raise ConfigError("--pca does not apply to --classifier sgd (it streams features, PCA needs them all)")
        fit = fit_sgd_streamed(cache, fset, data, grid=grid, seed=seed, rows_per_chunk=rows_per_chunk,
                               n_classes=len(classes))
    else:
        tr = data["train"]
        X = read_features(cache, fset, tr.ids)
        val = data.get("val")
        Xv, yv = (read_features(cache, fset, val.ids), val.y) if val is not None and len(val) else (None, None)
        fit = fit_classifier(classifier, X, tr.y, X_val=Xv, y_val=yv, grid=grid, pca=pca, cv=cv,
                             n_jobs=jobs, seed=seed, class_names=list(classes), final_fit=final_fit)
    if absent:
        names = ", ".join(repr(c) for c in absent)
        fit.notes.append(f"class {names} has no train images: never predicted" if len(absent) == 1 else
                         f"classes {names} have no train images: never predicted")
    if data.get("test") is not None and data["test"].source == "val":
        fit.notes.append("val is the held-out split: chosen by CV on train, fitted on train, "
                         "the test columns are val's")
    return fit


def evaluate_test_split(fit: FitResult, cache: FeatureCache, spec, data: dict[str, SplitFeatures],
                        classes: Sequence[str], top_k=(1, 5)) -> dict | None:
    """:func:`featx.classify.evaluate` on the test split (None when there is none)."""
    test = data.get("test")
    if test is None or not len(test):
        return None
    proba = _proba_streamed(fit.pipeline, cache, spec, test.ids, len(classes))
    return evaluate(test.y, proba, classes, top_k=top_k)


# --------------------------------------------------------------------------
# extraction of feature requests


def _extract_requests(ds, requests: Sequence[Request], *, weights_for, cache: FeatureCache, seed: int,
                      progress: bool, notify, on_extract, extract_fn, **extract_options):
    """Extract every backbone of ``requests`` once (all its layers in one pass).

    Returns ``(feature sets in request order, reports per backbone)``.
    ``weights_for(backbone)`` is the --weights value of each backbone."""
    from .backbones import get_backbone
    layers: dict[str, list[str]] = {}
    for r in requests:
        for b, layer in r:
            layers.setdefault(b, []).append(layer or get_backbone(b).default_layer)
    from .extract import split_options
    spec_options, run_options = split_options(extract_options)
    # every backbone/layer/weights problem before hours of work; the weights are resolved here, once
    resolved = {b: feature_specs(b, weights_for(b), list(dict.fromkeys(ls)), seed=seed,
                                 device=extract_options.get("device", "auto"), **spec_options)
                for b, ls in layers.items()}
    specs: dict[tuple[str, str], FeatureSpec] = {}
    reports: dict[str, ExtractReport] = {}
    for b, ready in resolved.items():
        report = (extract_fn or extract)(ds, ready, cache=cache, progress=progress, notify=notify, **run_options)
        reports[b] = report
        if on_extract is not None:
            on_extract(b, report)
        for spec in report.specs:
            specs[(b, spec.layer)] = spec
    sets = [FeatureSet(tuple(specs[(b, layer or get_backbone(b).default_layer)] for b, layer in r))
            for r in requests]
    return sets, reports


def _extract_seconds(fset: FeatureSet, reports: dict[str, ExtractReport]) -> float:
    """The extraction passes behind a feature set (0 when all was cached)."""
    return float(sum(r.seconds for b, r in reports.items()
                     if r.n_extracted and any(p.backbone == b for p in fset.parts)))


# --------------------------------------------------------------------------
# the store of fitted results, shared by compare and run


class FitStore:
    """Fitted results kept beside the features, ``<cache>/results/<digest>/``:
    ``record.json`` (the comparison row, the search, the test metrics) and
    the fitted Pipeline in featx's code-free model format (see
    :mod:`featx.safemodel`). The digest covers everything that determines a
    fit: the feature spec(s), the image ids and labels of every split, the
    classifier and its settings, the grid, PCA, folds, seed, refit and the
    featx, scikit-learn and torch versions. ``featx compare`` and
    ``featx run`` both read and write it, so each reuses the other's fits.
    """

    def __init__(self, cache: FeatureCache):
        self.root = cache.root / "results"

    def digest(self, fset, data: dict[str, SplitFeatures], classifier: str, *, grid, pca, cv: int, seed: int,
               final_fit: str, rows_per_chunk: int) -> str:
        import sklearn
        import torch

        from . import __version__
        fset = FeatureSet.of(fset)
        rows = {s: hashlib.sha256("\n".join(f"{i}\t{int(v)}" for i, v in zip(d.ids, d.y)).encode()).hexdigest()
                for s, d in sorted(data.items())}
        registered = get_classifier_spec(classifier)
        estimator = sorted((k, repr(v)) for k, v in registered.build(seed).get_params(deep=False).items())
        what = {"features": fset.canonical(), "rows": rows, "classifier": classifier, "estimator": estimator,
                "grid": list(grid) if grid else "default", "pca": None if classifier == "sgd" else pca, "cv": cv,
                "seed": seed, "refit": final_fit if "val" in data and classifier != "sgd" else "train",
                "chunk_rows": rows_per_chunk if classifier == "sgd" else None,
                "featx": __version__, "scikit-learn": sklearn.__version__, "torch": torch.__version__.split("+")[0]}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]

    def path(self, digest: str) -> Path:
        return self.root / digest

    def get(self, digest: str) -> dict | None:
        """The record of an earlier identical fit, or None."""
        try:
            return json.loads((self.path(digest) / "record.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def model(self, digest: str):
        """The fitted Pipeline of a stored result (None when it was not kept)."""
        from . import safemodel
        folder = self.path(digest)
        if not (folder / safemodel.JSON_FILE).is_file():
            return None
        return safemodel.load(folder)

    def put(self, digest: str, record: dict, pipeline=None) -> Path:
        """Keep ``record`` (and ``pipeline``, when it can be stored without code), atomically."""
        import shutil
        import uuid

        from . import safemodel
        folder = self.path(digest)
        tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True)
        try:
            if pipeline is not None:
                try:
                    safemodel.save(pipeline, tmp)
                except safemodel.Unsupported:
                    pass                        # the row is kept; the model is fitted again when needed
            (tmp / "record.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
            if folder.exists():
                shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder


def fit_record(fit: FitResult, row: ComparisonRow, metrics: dict | None, fset, dims: int) -> dict:
    """What the store (and a pipeline's stage manifest) keeps of one fit."""
    fset = FeatureSet.of(fset)
    return {"row": dataclasses.asdict(row), "test": metrics, "dims": int(dims),
            "specs": [p.canonical() for p in fset.parts],
            "fit": {"name": fit.name, "param_name": fit.param_name, "chosen": fit.chosen,
                    "search": [list(x) for x in fit.search], "score_source": fit.score_source,
                    "val_score": fit.val_score, "cv_score": fit.cv_score, "fit_seconds": fit.fit_seconds,
                    "search_seconds": fit.search_seconds, "notes": list(fit.notes), "val_loss": fit.val_loss,
                    "fit_on": list(fit.fit_on)},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def fit_from_record(record: dict, pipeline) -> FitResult:
    """A :class:`FitResult` back from a stored record and its Pipeline."""
    f = record["fit"]
    return FitResult(pipeline, f["name"], f["param_name"], f["chosen"], [tuple(x) for x in f["search"]],
                     f["score_source"], f["val_score"], f["cv_score"], f["fit_seconds"], f["search_seconds"],
                     list(f["notes"]), f.get("val_loss"), tuple(f.get("fit_on") or ("train",)))


def fit_or_reuse(store: FitStore, cache: FeatureCache, fset, data: dict[str, SplitFeatures], classes, name: str, *,
                 grid=None, pca=None, cv: int = 5, jobs=None, seed: int = 0, rows_per_chunk: int = 4096,
                 final_fit: str = "train+val", threads: int | None = 1, reuse: bool = True,
                 extract_seconds: float | None = None, need_model: bool = False):
    """One comparison row: read back from ``store`` when an identical fit is
    there (``reuse``), else fitted, measured on test and stored.

    Returns ``(record, pipeline or None, reused)``. With ``need_model`` a
    stored record without a usable model is fitted again."""
    fset = FeatureSet.of(fset)
    pca = None if name == "sgd" else pca
    digest = store.digest(fset, data, name, grid=grid, pca=pca, cv=cv, seed=seed, final_fit=final_fit,
                          rows_per_chunk=rows_per_chunk)
    if reuse:
        record = store.get(digest)
        if record is not None:
            model = store.model(digest) if need_model else None
            if not need_model or model is not None:
                record["row"]["extract_seconds"] = extract_seconds
                return record, model, True
    with fit_threads(threads):
        fit = fit_on_cache(name, cache, fset, data, classes=classes, grid=grid, pca=pca, cv=cv, jobs=jobs, seed=seed,
                           rows_per_chunk=rows_per_chunk, final_fit=final_fit)
        metrics = evaluate_test_split(fit, cache, fset, data, classes)
    dims = fset.dims(cache)
    row = ComparisonRow.from_fit(fit, backbone=fset.backbone, layer=fset.layer, dims=dims, test_metrics=metrics,
                                 extract_seconds=extract_seconds)
    record = fit_record(fit, row, metrics, fset, dims)
    record["digest"] = digest
    store.put(digest, record, fit.pipeline)
    return record, fit.pipeline, False


# --------------------------------------------------------------------------
# train


@dataclass
class TrainResult:
    fit: FitResult
    spec: "FeatureSet"                   # what was trained on: one layer or a fusion
    resolved: object                     # ResolvedWeights of the (first) backbone
    weights_spec: str
    dims: int
    report: ExtractReport                # the (first) backbone's extraction
    counts: dict[str, int]               # images with features per split
    missing: int                         # images without (unreadable)
    test: dict | None                    # evaluate() on the test split
    pca: int | float | None = None
    seed: int = 0
    parts: list = field(default_factory=list)    # (FeatureSpec, ResolvedWeights, weights value) per part

    def manifest(self, ds: Dataset) -> dict:
        from .bundle import linear_manifest
        from .quantize import bundle_ranges
        return linear_manifest(classes=ds.classes, spec=self.spec, weights_spec=self.weights_spec,
                               resolved=self.resolved, seed=self.seed, dims=self.dims, fit=self.fit,
                               pca=self.pca, dataset=ds, test_metrics=self.test, parts=self.parts,
                               int8=bundle_ranges(self.report.cache_dir, self.spec.parts))


def _train_request(backbone: str, layer: str | None) -> Request:
    """The one feature set ``featx train -b BACKBONE -l LAYER`` means (a fusion's
    parts may name other backbones)."""
    if not layer:
        return ((backbone, None),)
    others = [part.rpartition(":")[0] for part in layer.split("+") if ":" in part]
    backbones = list(dict.fromkeys([backbone, *[o for o in others if o]]))
    if "+" in layer and len(backbones) > 1:
        # the parts that name no backbone are the -b one's
        layer = "+".join(part if ":" in part or not part.strip() else f"{backbone}:{part}" for part in layer.split("+"))
    requests = parse_features(backbones, [layer])
    return requests[-1] if "+" in layer else next(r for r in requests if r[0][0] == backbone)


def train(ds: Dataset, backbone: str, classifier: str, *, weights: str = "auto", layer: str | None = None,
          grid=None, pca=None, cv: int = 5, jobs: int | None = None, seed: int = 0, cache="cache",
          progress: bool = True, notify=None, on_extract=None, rows_per_chunk: int = 4096,
          threads: int | None = 1, final_fit: str = "train+val", extract_fn=None, drop_leaks: bool = False,
          **extract_options) -> TrainResult:
    """Extract what is missing, choose the parameter, fit, measure on test.

    ``layer`` may be a fusion, ``A+B`` (each part ``LAYER`` of ``backbone``
    or ``BACKBONE:LAYER``; other backbones run with their default weights).
    ``final_fit``: the final model's rows once the parameter is chosen,
    ``"train+val"`` (default) or ``"train"``.
    ``extract_options`` (pool, precision, storage, batch_size, device,
    workers, ...) go to :func:`featx.extract.extract`; ``on_extract(report)``
    is called when each backbone's features are ready; ``threads``: see
    :func:`fit_threads`. Write the result with
    ``save_bundle(path, result.manifest(ds), result.fit.pipeline)``.
    Exact copies shared by train and val/test are warned about in one line
    (``notify``); ``drop_leaks`` leaves them out of val and test
    (:func:`featx.audit.check_leaks`).
    """
    from .audit import check_leaks
    from .backbones import resolve_weights
    get_classifier_spec(classifier)
    ds = check_leaks(ds, drop_leaks, notify)
    cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    request = _train_request(backbone, layer)

    def weights_for(b):
        return weights if b == backbone else "auto"
    (fset,), reports = _extract_requests(
        ds, [request], weights_for=weights_for, cache=cache, seed=seed, progress=progress, notify=notify,
        on_extract=None if on_extract is None else (lambda b, report: on_extract(report)),
        extract_fn=extract_fn, **extract_options)
    parts = [(spec, resolve_weights(spec.backbone, weights_for(spec.backbone), seed=seed), weights_for(spec.backbone))
             for spec in fset.parts]
    data = split_features(cache, fset, ds)
    with fit_threads(threads):
        fit = fit_on_cache(classifier, cache, fset, data, classes=ds.classes, grid=grid, pca=pca, cv=cv,
                           jobs=jobs, seed=seed, rows_per_chunk=rows_per_chunk, final_fit=final_fit)
        metrics = evaluate_test_split(fit, cache, fset, data, ds.classes)
    return TrainResult(fit, fset, parts[0][1], weights, fset.dims(cache), reports[fset.parts[0].backbone],
                       {s: len(d) for s, d in data.items()}, sum(d.missing for d in data.values()),
                       metrics, pca, seed, parts)


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


def _requests_from(layers) -> list[Request]:
    """:func:`parse_features` requests from a list of them or a
    ``{backbone: [layer, ...] or None}`` mapping (layers may be fusions)."""
    if isinstance(layers, list):
        return layers
    out: list[Request] = []
    for b, ls in layers.items():
        for layer in ls or [None]:
            if layer and "+" in layer:
                out.append(_train_request(b, layer))
            else:
                out.append(((b, layer),))
    return list(dict.fromkeys(out))


def compare(ds: Dataset, layers, classifiers: Sequence[str], *,
            weights: str = "auto", grids: dict[str, list] | None = None, pca=None, cv: int = 5,
            jobs: int | None = None, seed: int = 0, cache="cache", progress: bool = True, notify=None,
            on_extract=None, on_row=None, rows_per_chunk: int = 4096, threads: int | None = 1,
            reuse: bool = True, extract_fn=None, final_fit: str = "train+val", drop_leaks: bool = False,
            **extract_options) -> CompareResult:
    """Every feature set x classifier, from cached features, ranked by val/CV score.

    ``layers``: the feature sets, as :func:`parse_features` gives them, or
    a mapping backbone -> its layers (None: the default layer; a layer may
    be a fusion ``A+B``), as :func:`parse_layers` gives it. Each backbone
    is extracted once, all its layers in one pass; ``extract_seconds`` of
    a row is the passes behind its feature set (0 when all was cached).
    ``grids``: classifier -> values of its parameter (a classifier not in
    it, or None: its own grid). ``on_extract(backbone, report)`` and
    ``on_row(row)`` are called as each extraction and each result is done.
    ``extract_options`` (pool, precision, storage, batch_size, device,
    workers, ...) go to :func:`featx.extract.extract`; ``threads``: see
    :func:`fit_threads`; ``final_fit``: see :func:`train`.

    Results are kept in the :class:`FitStore` beside the features
    (``<cache>/results/``), which ``featx run`` shares; with ``reuse`` an
    identical fit is read back, not redone, so a repeated comparison
    finishes in seconds. ``row.fit_seconds`` stays the time of the
    original fit (search, calibration and final fit). ``drop_leaks``: see
    :func:`train`.
    """
    from .audit import check_leaks
    from .classify import rank_rows
    for name in classifiers:
        get_classifier_spec(name)
    if not classifiers:
        raise ConfigError("give at least one --classifier")
    cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    ds = check_leaks(ds, drop_leaks, notify)
    requests = _requests_from(layers)
    sets, reports = _extract_requests(ds, requests, weights_for=lambda b: weights, cache=cache, seed=seed,
                                      progress=progress, notify=notify, on_extract=on_extract,
                                      extract_fn=extract_fn, **extract_options)
    store = FitStore(cache)
    rows: list[ComparisonRow] = []
    reused = 0
    for fset in sets:
        data = split_features(cache, fset, ds)
        for name in classifiers:
            record, _, was_reused = fit_or_reuse(
                store, cache, fset, data, ds.classes, name, grid=(grids or {}).get(name), pca=pca, cv=cv, jobs=jobs,
                seed=seed, rows_per_chunk=rows_per_chunk, final_fit=final_fit, threads=threads, reuse=reuse,
                extract_seconds=_extract_seconds(fset, reports))
            row = ComparisonRow(**{**record["row"], "notes": list(record["row"].get("notes") or [])})
            if name == "sgd" and pca is not None and not was_reused:
                row.notes.append("no PCA for sgd (it streams features)")
            reused += was_reused
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return CompareResult(rank_rows(rows), reports, reused)
