"""The whole job from Python: train, compare, evaluate, predict, load a bundle.

Thin wrappers over :mod:`featx.train`, :mod:`featx.evaluate` and
:mod:`featx.bundle`, the same code the ``featx`` command runs; each is
reachable as ``featx.NAME``. A ``dataset`` argument is a
:class:`~featx.data.Dataset` or anything :func:`featx.open_dataset` opens
(a folder, a CSV manifest); a ``model`` argument is a
:class:`~featx.bundle.Bundle` or the path of one.

The examples run as doctests (``tests/test_api.py``) in a folder holding
``photos/``, a tiny dataset of three colours in ``train/``,
``validation/`` and ``test/`` folders, with ``weights="none"`` (a
seeded random network: no download, and the colours still separate).

>>> import featx
>>> ds = featx.open_dataset("photos")
>>> ds
<Dataset 'photos': 33 images, 3 classes, split-folders layout; train 18, val 6, test 9; root '.../photos'>
>>> result = featx.train(ds, "resnet18", weights="none", out="model.featx", progress=False)
>>> result.test["accuracy"]
1.0
>>> ev = featx.evaluate("model.featx", ds, split="test", out="report", progress=False)
>>> print(f"{ev.metrics['accuracy']:.2f} on {ev.metrics['n']} images")
1.00 on 9 images
>>> [r["label"] for r in featx.predict("model.featx", ["photos/test/red/red0.jpg"], progress=False)]
['red']
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

__all__ = ["audit", "compare", "evaluate", "load_bundle", "predict", "train"]


def _dataset(dataset, cache, seed: int = 0):
    """A Dataset as given, or opened from a path (content hashes remembered in ``cache``)."""
    from .data import Dataset, open_dataset
    if isinstance(dataset, Dataset):
        return dataset
    from .cache import FeatureCache
    return open_dataset(dataset, seed=seed, hash_index=FeatureCache(cache).hash_index)


def _bundle(model):
    from .bundle import Bundle
    from .bundle import load_bundle as _load
    return model if isinstance(model, Bundle) else _load(model)


def _grid(classifier: str, grid):
    if grid is None:
        return None
    from .train import parse_grid
    values = [grid] if isinstance(grid, (str, int, float)) else list(grid)
    return parse_grid(classifier, [str(v) for v in values])


def load_bundle(path: str | os.PathLike):
    """Read a model bundle written by :func:`train`, ``featx train`` or ``featx finetune``.

    Parameters
    ----------
    path : str or path-like
        The bundle folder (``model.featx``).

    Returns
    -------
    featx.bundle.Bundle
        ``classes``, ``kind`` (``"linear"`` or ``"finetune"``), ``manifest``
        (what it was trained on, and how), ``payload`` (the fitted model).

    Raises
    ------
    featx.bundle.BundleError
        Not a bundle, a format this featx does not read, or damaged files.

    Examples
    --------
    >>> import featx
    >>> _ = featx.train("photos", "resnet18", weights="none", out="model.featx", progress=False)
    >>> bundle = featx.load_bundle("model.featx")
    >>> bundle.kind, bundle.classes
    ('linear', ['blue', 'green', 'red'])
    >>> bundle.backbone["name"], bundle.backbone["layer"]
    ('resnet18', 'flatten')
    """
    from .bundle import load_bundle as _load
    return _load(path)


def train(dataset, backbone: str = "mobilenet_v2", classifier: str = "logreg", *, out=None,
          layer: str | None = None, weights: str = "auto", grid=None, pca=None, cv: int = 5,
          jobs: int | None = None, seed: int = 0, cache="cache", progress: bool = True, notify=None,
          **extract_options):
    """Train a classifier on a dataset's cached features, like ``featx train``.

    Parameters
    ----------
    dataset : Dataset, str or path-like
        The images (a :class:`~featx.data.Dataset`, or a folder or CSV manifest).
    backbone : str, default "mobilenet_v2"
        See :func:`featx.list_backbones` (any case).
    classifier : str, default "logreg"
        ``logreg``, ``linear-svm``, ``sgd``, ``knn`` or ``rbf-svm``.
    out : str or path-like, optional
        Write the model bundle here (e.g. ``"model.featx"``).
    layer : str, optional
        Graph node to train on (default: the backbone's penultimate layer).
    weights : str, default "auto"
        As ``--weights``: ``auto``, a torchvision weights name, a .pth file or ``none``.
    grid : number or sequence of numbers, optional
        Values of the regularisation parameter to try (default: the classifier's grid).
    pca : int or float, optional
        PCA components, or the share of variance to keep.
    cv, jobs, seed
        Folds of cross-validation when there is no val split; parallel fits; seed.
    cache : str or path-like, default "cache"
        The feature cache folder: missing features are extracted into it first.
    progress : bool, default True
        Progress bars.
    notify : callable, optional
        Called with each message line (skipped images, notes).
    **extract_options
        ``pool``, ``precision``, ``storage``, ``batch_size``, ``device``,
        ``workers``, ... as for :func:`featx.extract`.

    Returns
    -------
    featx.train.TrainResult
        ``fit`` (the chosen parameter, scores, the scikit-learn pipeline),
        ``test`` (metrics on the test split, or None), ``counts``, ``spec``.

    Examples
    --------
    >>> import featx
    >>> result = featx.train("photos", "resnet18", "linear-svm", weights="none", grid=[0.01, 1],
    ...                      out="svm.featx", progress=False)
    >>> result.fit.param_name, result.fit.chosen in (0.01, 1.0), result.fit.score_source
    ('C', True, 'val')
    >>> result.counts
    {'train': 18, 'val': 6, 'test': 9}
    """
    from .bundle import check_destination, save_bundle
    from .train import train as _train
    if out is not None:
        check_destination(out)
    ds = _dataset(dataset, cache, seed)
    result = _train(ds, backbone, classifier, weights=weights, layer=layer, grid=_grid(classifier, grid), pca=pca,
                    cv=cv, jobs=jobs, seed=seed, cache=cache, progress=progress, notify=notify, **extract_options)
    if out is not None:
        save_bundle(out, result.manifest(ds), result.fit.pipeline)
    return result


def compare(dataset, backbones: str | Sequence[str] = ("mobilenet_v2",), classifiers: str | Sequence[str] = ("logreg",),
            *, layers: Sequence[str] | dict | None = None, weights: str = "auto", grid=None, pca=None, cv: int = 5,
            jobs: int | None = None, seed: int = 0, cache="cache", progress: bool = True, notify=None,
            reuse: bool = True, **extract_options) -> list:
    """Compare backbones x layers x classifiers, like ``featx compare``.

    Parameters
    ----------
    dataset : Dataset, str or path-like
        The images.
    backbones : str or sequence of str, default ("mobilenet_v2",)
        Backbones to compare.
    classifiers : str or sequence of str, default ("logreg",)
        Classifiers to compare.
    layers : sequence of str or dict, optional
        As ``--layer``: ``LAYER`` for every backbone, ``BACKBONE:LAYER`` for
        one; or a dict backbone -> list of layers. Default: penultimate layers.
    grid : number or sequence of numbers, optional
        Values of every classifier's parameter (default: each one's grid).
    reuse : bool, default True
        Read back the results of identical earlier fits instead of fitting again.
    weights, pca, cv, jobs, seed, cache, progress, notify, **extract_options
        As for :func:`train`.

    Returns
    -------
    list of featx.classify.ComparisonRow
        Ranked, best first: ``backbone``, ``layer``, ``classifier``,
        ``chosen``, ``val_or_cv_score``, ``test_accuracy``, ``macro_f1``, times.

    Examples
    --------
    >>> import featx
    >>> rows = featx.compare("photos", "resnet18", ["logreg", "knn"], weights="none", progress=False)
    >>> sorted(r.classifier for r in rows)
    ['knn', 'logreg']
    >>> [r.test_accuracy for r in rows]
    [1.0, 1.0]
    """
    from .train import compare as _compare
    from .train import parse_layers
    backbones = [backbones] if isinstance(backbones, str) else list(backbones)
    classifiers = [classifiers] if isinstance(classifiers, str) else list(classifiers)
    if isinstance(layers, dict):
        by_backbone = {b: (list(ls) if ls else None) for b, ls in layers.items()}
    else:
        by_backbone = parse_layers(backbones, [layers] if isinstance(layers, str) else list(layers or []))
    ds = _dataset(dataset, cache, seed)
    grids = {c: _grid(c, grid) for c in classifiers}
    result = _compare(ds, by_backbone, classifiers, weights=weights, grids=grids, pca=pca, cv=cv, jobs=jobs,
                      seed=seed, cache=cache, progress=progress, notify=notify, reuse=reuse, **extract_options)
    return result.rows


def evaluate(model, dataset, split: str | None = "test", *, top_k: int = 5, out=None, cache="cache",
             weights: str | None = None, progress: bool = True, notify=None, **options):
    """Evaluate a bundle on one split of a dataset, like ``featx evaluate``.

    Parameters
    ----------
    model : Bundle, str or path-like
        The model bundle.
    dataset : Dataset, str or path-like
        Labelled images; their classes must be among the model's.
    split : str, default "test"
        ``train``, ``val``, ``test``, or ``all`` (every image).
    top_k : int, default 5
        Also measure top-k accuracy.
    out : str or path-like, optional
        Write metrics.json, confusion_matrix.png, calibration.png,
        predictions.csv and report.html into this folder.
    cache : str or path-like, default "cache"
        Feature cache (images seen before are not run through the backbone).
    weights : str, optional
        Where the bundle's weights file is now (its sha256 must match).
    progress, notify, **options
        Progress bars, messages, and ``device``, ``batch_size``, ``workers``, ...

    Returns
    -------
    featx.evaluate.Evaluation
        ``metrics`` (what metrics.json holds: accuracy, top-k, per class,
        confusion matrix, ECE), ``samples``, ``y``, ``proba``, ``skipped``, ``notes``.

    Examples
    --------
    >>> import featx
    >>> _ = featx.train("photos", "resnet18", weights="none", out="model.featx", progress=False)
    >>> ev = featx.evaluate("model.featx", "photos", split="val", progress=False)
    >>> ev.metrics["n"], ev.metrics["accuracy"], sorted(ev.metrics["per_class"])
    (6, 1.0, ['blue', 'green', 'red'])
    >>> ev.proba.shape
    (6, 3)
    """
    from .evaluate import evaluate_bundle, write_evaluation
    bundle = _bundle(model)
    ds = _dataset(dataset, cache, _split_seed(bundle))
    ev = evaluate_bundle(bundle, ds, split, top_k=top_k, cache=cache, weights=weights, progress=progress,
                         notify=notify, **options)
    if out is not None:
        write_evaluation(ev, bundle, out)
    return ev


def _split_seed(bundle) -> int:
    """The seed the bundle's training split was made with (so a dataset without a split splits the same way)."""
    made = (bundle.manifest.get("training") or {}).get("split_made") or {}
    return int(made.get("seed", 0))


def predict(model, images: str | os.PathLike | Sequence, *, threshold: float | None = None, top_k: int = 1,
            cache="cache", weights: str | None = None, progress: bool = True, notify=None, **options) -> list[dict]:
    """Label image files and folders with a bundle, like ``featx predict``.

    Parameters
    ----------
    model : Bundle, str or path-like
        The model bundle.
    images : str, path-like or sequence of them
        Image files, and folders (searched recursively).
    threshold : float, optional
        Below this probability the label is None and ``uncertain`` True.
    top_k : int, default 1
        How many most likely classes each record lists.
    cache, weights, progress, notify, **options
        As for :func:`evaluate`.

    Returns
    -------
    list of dict
        One record per image, in order: ``path``, ``label``,
        ``probability``, ``uncertain``, ``top_k`` (list of (label,
        probability)) and ``error`` (None, or why the image could not be
        read: such records have no label).

    Raises
    ------
    featx.errors.ConfigError
        A path that does not exist (nothing is predicted then).

    Examples
    --------
    >>> import featx
    >>> _ = featx.train("photos", "resnet18", weights="none", out="model.featx", progress=False)
    >>> records = featx.predict("model.featx", "photos/test/blue", top_k=2, progress=False)
    >>> len(records), records[0]["path"], records[0]["label"]
    (3, 'photos/test/blue/blue0.jpg', 'blue')
    >>> [label for label, p in records[0]["top_k"]][0], records[0]["error"]
    ('blue', None)
    """
    from .evaluate import predict_images
    bundle = _bundle(model)
    inputs = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    rows, _ = predict_images(bundle, [str(Path(p)) if isinstance(p, os.PathLike) else p for p in inputs],
                             threshold=threshold, top_k=top_k, cache=cache, weights=weights, progress=progress,
                             notify=notify, **options)
    return rows


def audit(dataset, backbone: str = "mobilenet_v2", *, layer: str | None = None, weights: str = "auto", out=None,
          near_threshold: float | None = None, outlier_z: float | None = None, folds: int = 5, seed: int = 0,
          cache="cache", progress: bool = True, notify=None, **extract_options):
    """Duplicates, likely label errors and outliers of a dataset, like ``featx audit``.

    Parameters
    ----------
    dataset : Dataset, str or path-like
        Labelled images.
    backbone, layer, weights
        The features audited (missing ones are extracted into ``cache`` first).
    out : str or path-like, optional
        Write duplicates.csv, label_issues.csv, outliers.csv and audit.html here.
    near_threshold : float, optional
        Cosine similarity from which two files are near duplicates
        (default :data:`featx.audit.NEAR_THRESHOLD`, 0.95).
    outlier_z : float, optional
        Robust z-score of the kNN distance from which an image is an outlier (default 4).
    folds, seed, cache, progress, notify, **extract_options
        Folds of the out-of-fold probe; as for :func:`train`.

    Returns
    -------
    featx.audit.AuditResult
        ``duplicates``, ``label_issues``, ``outliers``: lists of records
        (dicts with the CSV columns, plus ``leak``, ``given_probability``
        and ``z``), ``settings``, ``seconds``.

    Examples
    --------
    >>> import featx
    >>> result = featx.audit("photos", "resnet18", weights="none", progress=False)
    >>> result.settings["backbone"], result.settings["layer"]
    ('resnet18', 'flatten')
    >>> {row["kind"] for row in result.duplicates} <= {"exact", "near"}
    True
    """
    from .audit import NEAR_THRESHOLD, OUTLIER_Z, run_audit, write_audit
    ds = _dataset(dataset, cache, seed)
    result = run_audit(ds, backbone, layer=layer, weights=weights, cache=cache,
                       near_threshold=NEAR_THRESHOLD if near_threshold is None else near_threshold,
                       outlier_z=OUTLIER_Z if outlier_z is None else outlier_z, folds=folds, seed=seed,
                       progress=progress, notify=notify, **extract_options)
    if out is not None:
        write_audit(result, out)
    return result
