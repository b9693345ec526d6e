"""Classifiers on cached features: registry, selection, evaluation, comparison.

Everything here works on plain numpy arrays: ``X`` of shape
``(n_samples, n_features)`` and labels ``y`` (integer class indices, as
:meth:`featx.data.Dataset.labels` gives them, or any hashable labels).

Every model is a scikit-learn :class:`~sklearn.pipeline.Pipeline`
``StandardScaler -> [PCA] -> classifier``: the scaler (and PCA) are fitted on
the training rows only, inside each CV fold as well, so nothing leaks from the
rows a score is measured on.

Probabilities are real probabilities for every registered classifier: the
SVMs (``linear-svm``, ``rbf-svm``) are wrapped in
:class:`~sklearn.calibration.CalibratedClassifierCV` (Platt scaling, fitted on
out-of-fold decision values), never a softmax of ``decision_function``.
"""

from __future__ import annotations

import csv
import io
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from joblib import Parallel, delayed
from sklearn.calibration import CalibratedClassifierCV
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC

from .errors import ConfigError, DatasetError
from .files import atomic_write_text
from .text import text_table

__all__ = [
    "CLASSIFIERS",
    "ClassifierSpec",
    "ComparisonRow",
    "FitResult",
    "evaluate",
    "fit_classifier",
    "fit_sgd_stream",
    "format_table",
    "get_classifier_spec",
    "make_pipeline_for",
    "predict_proba",
    "rank_rows",
    "selection_note",
    "threshold_predictions",
    "write_table",
]

# Folds of the out-of-fold decision values Platt scaling is fitted on.
CALIBRATION_FOLDS = 3


# --------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class ClassifierSpec:
    """How to build one kind of classifier and which parameter to tune.

    Attributes
    ----------
    name : str
        Registry name (``"logreg"``, ``"linear-svm"``, ...).
    summary : str
        One line for ``--help`` and listings.
    param_name : str
        The regularisation parameter that selection tunes (``"C"``,
        ``"alpha"``, ``"n_neighbors"``).
    grid : tuple
        Default values tried for ``param_name``.
    default : float or int
        Value used when no search is possible.
    simpler : {"low", "high"}
        Which end of the grid is the more regularised model; on a tie of
        scores the more regularised value wins.
    calibrated : bool
        True when probabilities come from Platt scaling
        (:class:`~sklearn.calibration.CalibratedClassifierCV`) rather than the
        model itself.
    build : callable
        ``build(seed) -> estimator`` with every setting but ``param_name``.
    """

    name: str
    summary: str
    param_name: str
    grid: tuple
    default: float | int
    simpler: str
    calibrated: bool
    build: Callable[[int], Any]

    @property
    def probability(self) -> str:
        """How :func:`predict_proba` gets its numbers, in words."""
        return "Platt-calibrated (CV)" if self.calibrated else "native"


def _linear_grid() -> tuple:
    # The linear-probe protocol's range, quarter-decades 1e-6..1e5; searched
    # adaptively (decades, then around the best) by featx.probe.
    from .probe import wide_grid
    return wide_grid()


# Classifiers whose C search runs batched in torch (featx.probe) rather than
# as one scikit-learn fit per value and fold.
PROBE_SEARCHED = ("logreg", "linear-svm")
# Order of "simpler model" when ranking rows whose scores tie.
SIMPLICITY = ("logreg", "linear-svm", "sgd", "knn", "rbf-svm", "finetune")


CLASSIFIERS: dict[str, ClassifierSpec] = {
    spec.name: spec
    for spec in (
        ClassifierSpec(
            "logreg", "multinomial logistic regression (softmax classifier)",
            "C", _linear_grid(), 1.0, "low", False,
            lambda seed: LogisticRegression(max_iter=2000, random_state=seed)),
        ClassifierSpec(
            "linear-svm", "linear SVM (LinearSVC), probabilities by Platt calibration",
            "C", _linear_grid(), 1.0, "low", True,
            lambda seed: LinearSVC(dual=True, max_iter=5000, random_state=seed)),
        ClassifierSpec(
            "sgd", "logistic loss by SGD (one-vs-rest); also trains out of core",
            "alpha", tuple(float(a) for a in np.logspace(-6, 0, 7)), 1e-4, "high", False,
            lambda seed: SGDClassifier(loss="log_loss", max_iter=1000, tol=1e-3,
                                       random_state=seed)),
        ClassifierSpec(
            "knn", "k nearest neighbours (reference)",
            "n_neighbors", (1, 3, 5, 7, 11, 15, 21), 5, "high", False,
            lambda seed: KNeighborsClassifier()),
        ClassifierSpec(
            "rbf-svm", "RBF-kernel SVM (reference), probabilities by Platt calibration",
            "C", tuple(float(c) for c in np.logspace(-2, 3, 6)), 1.0, "low", True,
            lambda seed: SVC(kernel="rbf", gamma="scale", random_state=seed)),
    )
}


def get_classifier_spec(name: str) -> ClassifierSpec:
    """The registry entry for ``name``; :class:`ConfigError` listing the known ones."""
    try:
        return CLASSIFIERS[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown classifier {name!r}; known: {', '.join(CLASSIFIERS)}") from None


class _Resubstitution:
    """One 'split' whose train and test parts are both all rows.

    Used to calibrate when a class has a single training row, so no CV fold
    can hold it out and still train on it. Probabilities calibrated this way
    are over-confident; :func:`fit_classifier` says so in its notes.
    """

    def split(self, X, y=None, groups=None):
        idx = np.arange(len(X))
        yield idx, idx

    def get_n_splits(self, X=None, y=None, groups=None):
        return 1


def _check_pca(pca):
    if pca is None:
        return None
    if isinstance(pca, (bool, np.bool_)):
        raise ConfigError(f"pca={pca!r}: give a number of components (int >= 1) "
                          "or a fraction of variance to keep (0 < float < 1)")
    if isinstance(pca, (int, np.integer)):
        if pca < 1:
            raise ConfigError(f"pca={pca}: the number of components must be >= 1")
        return int(pca)
    if isinstance(pca, (float, np.floating)):
        if not 0.0 < pca < 1.0:
            raise ConfigError(f"pca={pca}: a variance fraction must be between 0 and 1 "
                              "(exclusive); give an int for a number of components")
        return float(pca)
    raise ConfigError(f"pca={pca!r}: give an int (components) or a float in (0, 1) (variance)")


def make_pipeline_for(name: str, params: Mapping[str, Any] | None = None,
                      pca: int | float | None = None, seed: int = 0,
                      probability: bool = True) -> Pipeline:
    """An unfitted ``StandardScaler -> [PCA] -> classifier`` pipeline.

    Parameters
    ----------
    name : str
        A key of :data:`CLASSIFIERS`.
    params : mapping, optional
        Settings of the classifier, e.g. ``{"C": 0.1}``. For the calibrated
        SVMs they apply to the SVM inside the calibration.
    pca : int or float, optional
        Number of PCA components (int) or fraction of variance to keep
        (float in (0, 1)); ``None``: no PCA. Not whitened.
    seed : int, default=0
        Seeds every random part (solver, PCA, calibration folds).
    probability : bool, default=True
        For ``linear-svm`` and ``rbf-svm``: wrap the SVM in a Platt
        calibration so the pipeline has ``predict_proba``. False gives the
        bare SVM (faster; ``predict`` only). Other classifiers ignore it.

    Returns
    -------
    sklearn.pipeline.Pipeline
        Steps ``"scale"``, optionally ``"pca"``, and ``"clf"``.

    Raises
    ------
    ConfigError
        Unknown classifier, parameter or PCA setting.

    Examples
    --------
    >>> pipe = make_pipeline_for("logreg", {"C": 0.1}, pca=16)
    >>> [name for name, _ in pipe.steps]
    ['scale', 'pca', 'clf']
    >>> pipe.named_steps["clf"].C
    0.1
    """
    spec = get_classifier_spec(name)
    pca = _check_pca(pca)
    clf = spec.build(seed)
    if params:
        valid = clf.get_params(deep=False)
        unknown = [k for k in params if k not in valid]
        if unknown:
            raise ConfigError(
                f"classifier {name!r} has no parameter {unknown[0]!r}; "
                f"it has {', '.join(sorted(valid))}")
        clf.set_params(**params)
    if probability and spec.calibrated:
        clf = CalibratedClassifierCV(
            clf, method="sigmoid", ensemble=False,
            cv=StratifiedKFold(CALIBRATION_FOLDS, shuffle=True, random_state=seed))
    steps = [("scale", StandardScaler())]
    if pca is not None:
        steps.append(("pca", PCA(n_components=pca, whiten=False, random_state=seed)))
    steps.append(("clf", clf))
    return Pipeline(steps)


# --------------------------------------------------------------------------
# fitting with selection


@dataclass
class FitResult:
    """A fitted pipeline and how its parameter was chosen.

    Attributes
    ----------
    pipeline : Pipeline
        Fitted on all training rows with the chosen parameter.
    name : str
        Classifier registry name.
    param_name : str
        The tuned parameter.
    chosen : float or int
        Its chosen value.
    search : list of (value, score)
        Mean accuracy of every value tried, in grid order (empty when no
        search was possible).
    score_source : str
        ``"val"`` (validation split), ``"cv5"`` (5-fold CV on train, or
        ``"cvK"`` with fewer folds) or ``"none"`` (no search).
    val_score, cv_score : float or None
        Accuracy of the chosen value on the validation split / in CV.
    fit_seconds : float
        Wall time of the final fit on all training rows.
    search_seconds : float
        Wall time of the selection (all grid values, all folds).
    notes : list of str
        Everything the user should know about what was done (fallbacks,
        convergence, clamped settings).
    val_loss : float or None
        Held-out loss of the chosen value in the search (log-loss for
        ``logreg``, squared hinge for ``linear-svm``), used to break ties.
    fit_on : tuple of str
        The splits the final model was fitted on (``("train",)`` or
        ``("train", "val")``).
    path : featx.probe.PathResult or None
        The batched search's full record (standard errors, losses), for
        ``logreg`` and ``linear-svm``.
    """

    pipeline: Pipeline
    name: str
    param_name: str
    chosen: float | int
    search: list[tuple[float | int, float]]
    score_source: str
    val_score: float | None
    cv_score: float | None
    fit_seconds: float
    search_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    val_loss: float | None = None
    fit_on: tuple = ("train",)
    path: Any = None          # featx.probe.PathResult of a batched search: errors and losses too

    @property
    def score(self) -> float | None:
        """The selection score: validation accuracy, else CV accuracy."""
        return self.val_score if self.val_score is not None else self.cv_score

    @property
    def total_seconds(self) -> float:
        """The whole cost of the row: search, calibration and final fit."""
        return float(self.search_seconds) + float(self.fit_seconds)


def _as_xy(X, y, what):
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim != 2:
        raise ValueError(f"{what}: X must be 2-D (n_samples, n_features), got shape {X.shape}")
    if y.ndim != 1 or len(y) != len(X):
        raise ValueError(f"{what}: y must be 1-D with one label per row of X "
                         f"({len(X)}), got shape {y.shape}")
    return X, y


def _plain(v):
    """numpy scalars to Python ones, so results print and serialise cleanly."""
    return v.item() if isinstance(v, np.generic) else v


def _fmt_value(v) -> str:
    """``1.0``, ``0.0001``, ``1e-06``, ``5``: short, and a float still looks like one."""
    if isinstance(v, (float, np.floating)):
        s = f"{float(v):g}"
        return s + ".0" if s.lstrip("-").isdigit() else s
    return str(v)


def _label_name(label, class_names):
    if class_names is not None and isinstance(label, (int, np.integer)) \
            and 0 <= label < len(class_names):
        return str(class_names[label])
    return str(_plain(label))


def _fit_quietly(pipe, X, y):
    """Fit; return ConvergenceWarning messages instead of printing them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        pipe.fit(X, y)
    messages = []
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            messages.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return messages


def _score_setting(name, params, pca, seed, X, y, train_idx, X_eval, y_eval):
    pipe = make_pipeline_for(name, params, pca=pca, seed=seed, probability=False)
    X_fit, y_fit = (X, y) if train_idx is None else (X[train_idx], y[train_idx])
    messages = _fit_quietly(pipe, X_fit, y_fit)
    score = float(np.mean(pipe.predict(X_eval) == y_eval))
    return score, bool(messages)


FINAL_FITS = ("train", "train+val")


def _fit_linear_batched(pipe, name, C, X, y, threads, warm=None) -> bool:
    """Fit a logreg or calibrated linear-svm Pipeline with featx.probe's solver
    (the objective scikit-learn's estimators minimise), filling in the very
    attributes their ``fit`` sets; for linear-svm the calibration folds are
    solved in the same batch and Platt scaling is fitted on their
    out-of-fold decision values, as ``CalibratedClassifierCV(ensemble=False)``
    does. False (nothing changed) when this scikit-learn's internals differ
    from what it expects: the caller then fits with scikit-learn."""
    import inspect

    from sklearn.base import clone

    from .probe import solve_final
    try:
        from sklearn.calibration import _fit_calibrator
    except ImportError:
        return False
    classes = np.unique(y)
    yi = _as_index_labels(y, classes)
    scaler = pipe.named_steps["scale"]
    clf = pipe.named_steps["clf"]
    try:
        Z = scaler.fit(X).transform(X)
        if name == "logreg":
            W, b, _ = solve_final("logreg", Z, yi, float(C), threads=threads, warm=warm)
            clf.coef_, clf.intercept_ = W.T.copy(), b.copy()
            clf.classes_, clf.n_features_in_, clf.n_iter_ = classes, Z.shape[1], np.array([0], dtype=np.int32)
            return True
        folds = list(clf.cv.split(Z, yi))
        W, b, oof = solve_final("linear-svm", Z, yi, float(C), folds=folds, threads=threads, warm=warm)
        svc = clone(clf.estimator)
        svc.coef_, svc.intercept_ = W.T.copy(), b.copy()
        svc.classes_, svc.n_features_in_, svc.n_iter_ = classes, Z.shape[1], 0
        extra = {}
        if "xp" in inspect.signature(_fit_calibrator).parameters:
            from sklearn.utils._array_api import get_namespace
            extra["xp"] = get_namespace(oof)[0]
        clf.classes_ = classes
        clf.calibrated_classifiers_ = [_fit_calibrator(svc, oof, y, classes, "sigmoid", **extra)]
        clf.n_features_in_ = Z.shape[1]
        return True
    except (TypeError, AttributeError, ValueError):
        return False


def _as_index_labels(y, labels):
    """Labels as indices into the sorted training labels (-1: not among them)."""
    index = {_plain(c): i for i, c in enumerate(labels)}
    return np.array([index.get(_plain(v), -1) for v in np.asarray(y)], dtype=np.int64)


def _search_threads(n_jobs) -> int:
    """torch threads of a batched search: what ``n_jobs`` would give joblib (-1: every core)."""
    from joblib import effective_n_jobs
    return max(1, int(effective_n_jobs(n_jobs)))


# Below this many multiply-adds in all search fits together, worker processes
# cost more to start (seconds) than they save.
PARALLEL_MIN_WORK = 2e9


def _workers_for(n_jobs, n, d, tasks, name):
    """joblib workers for a search: none for small problems (starting processes
    costs seconds), else what was asked."""
    if n_jobs is None:
        return None          # joblib's own default: one process, or every worker of a dask backend
    if n_jobs == 1 or tasks < 2:
        return 1
    work = float(n) * d * tasks * (n if name in ("knn", "rbf-svm") else 10)
    return n_jobs if work >= PARALLEL_MIN_WORK else 1


def _pick(spec, values, scores):
    """Best score; on a tie the more regularised value (see ``ClassifierSpec.simpler``)."""
    best = max(scores)
    tied = [v for v, s in zip(values, scores) if s >= best - 1e-12]
    return (min(tied) if spec.simpler == "low" else max(tied)), best


@dataclass
class _Splits:
    """Where a search scores each value: ``(train indices or None, X_eval, y_eval)`` per split."""

    splits: list
    score_source: str                 # "val", "cvK" or "none"
    min_fit_rows: int                 # the fewest rows one search fit trains on
    cv_folds: list | None = None      # (train, held-out) indices of the CV folds


def _training_rows(X_train, y_train, class_names):
    """``(X, y, labels, counts)`` of the training split; DatasetError below two classes."""
    X, y = _as_xy(X_train, y_train, "training split")
    labels, counts = np.unique(y, return_counts=True)
    if len(labels) == 0:
        raise DatasetError("the training split is empty: nothing to fit")
    if len(labels) < 2:
        raise DatasetError(
            f"the training split has a single class ({_label_name(labels[0], class_names)!r}): "
            "a classifier needs at least 2 classes")
    return X, y, labels, counts


def _grid_values(spec, name, grid):
    """The values to search, and the one used without a search (the registry
    default, or the middle of ``grid``)."""
    if grid is None:
        return list(spec.grid), spec.default
    values = [_plain(v) for v in grid]
    if not values:
        raise ConfigError(f"the grid of {spec.param_name} for {name} is empty")
    ordered = sorted(values)
    return values, ordered[(len(ordered) - 1) // 2]


def _selection_splits(X, y, X_val, y_val, cv, seed, smallest, small_names, pn, default,
                      notes) -> _Splits:
    """The validation split; else stratified K-fold CV (fewer folds for a small
    class); else none, with a note, when a class has a single row."""
    n, d = X.shape
    if X_val is not None:
        Xv, yv = _as_xy(X_val, y_val, "validation split")
        if Xv.shape[1] != d:
            raise ValueError(f"validation features have {Xv.shape[1]} dims, training {d}")
        return _Splits([(None, Xv, yv)], "val", n)
    if smallest < 2:
        who = (f"class {small_names[0]!r} has" if len(small_names) == 1 else
               f"classes {', '.join(repr(s) for s in small_names[:5])}"
               f"{' ...' if len(small_names) > 5 else ''} have")
        notes.append(f"{who} 1 train image{'' if len(small_names) == 1 else ' each'}: "
                     "fewer than 2 CV folds possible, "
                     f"used {pn}={_fmt_value(default)} without search")
        return _Splits([], "none", n)
    folds = min(int(cv), smallest)
    if folds < cv:
        notes.append(f"class {small_names[0]!r} has {smallest} train images: "
                     f"used {folds}-fold CV instead of {cv}-fold")
    cv_folds = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, y))
    splits = [(tr, X[te], y[te]) for tr, te in cv_folds]
    return _Splits(splits, f"cv{folds}", min(len(tr) for tr, _, _ in splits), cv_folds)


def _fit_within_rows(pca, values, default, pn, min_fit_rows, d, notes):
    """``(pca, values, default)`` lowered, with notes, to what a fit on
    ``min_fit_rows`` rows of ``d`` dims allows (PCA components, n_neighbors)."""
    max_components = min(min_fit_rows, d)
    if isinstance(pca, int) and pca > max_components:
        why = (f"the features have {d} dims" if d <= min_fit_rows
               else f"a fit sees only {min_fit_rows} training rows")
        notes.append(f"pca={pca} is more components than possible ({why}): "
                     f"used pca={max_components}")
        pca = max_components
    if pn == "n_neighbors":
        too_big = [v for v in values if v > min_fit_rows]
        if too_big:
            values = [v for v in values if v <= min_fit_rows] or [min_fit_rows]
            notes.append(f"n_neighbors {', '.join(map(str, too_big))} dropped: "
                         f"a fit sees only {min_fit_rows} training rows")
            if default > min_fit_rows:
                default = values[(len(values) - 1) // 2]
    return pca, values, default


def _search_batched(name, X, y, labels, plan, values, grid, n_jobs, pn, notes):
    """:func:`featx.probe.search_linear` over the plan's splits:
    ``(chosen, best, search, val_loss, path)``, with a note when the best is
    at an end of the grid."""
    from .probe import search_linear
    folds = None if plan.score_source == "val" else plan.cv_folds
    path = search_linear(name, X, _as_index_labels(y, labels),
                         splits=folds, X_val=plan.splits[0][1] if folds is None else None,
                         y_val=_as_index_labels(plan.splits[0][2], labels) if folds is None else None,
                         values=None if grid is None else values,
                         threads=_search_threads(n_jobs))
    chosen = path.chosen
    low, high = min(values), max(values)
    if chosen <= low or chosen >= high:
        side = "smallest" if chosen <= low else "largest"
        notes.append(f"{pn}={_fmt_value(chosen)} is the {side} value of the grid: the best may lie "
                     f"beyond it (give wider values with --C)")
    return (chosen, path.best, [(_plain(v), s) for v, s in path.table()],
            path.losses[path.values.index(chosen)], path)


def _search_each(spec, name, X, y, plan, values, pca, seed, n_jobs, notes):
    """One scikit-learn fit per value and split, with joblib: ``(chosen, best,
    search)``, with a note on fits that did not converge."""
    n, d = X.shape
    pn = spec.param_name
    splits = plan.splits
    tasks = [(vi, si) for vi in range(len(values)) for si in range(len(splits))]
    results = Parallel(n_jobs=_workers_for(n_jobs, n, d, len(tasks), name))(
        delayed(_score_setting)(name, {pn: values[vi]}, pca, seed, X, y,
                                splits[si][0], splits[si][1], splits[si][2])
        for vi, si in tasks)
    per_value = [[] for _ in values]
    unconverged = {}
    for (vi, _), (score, warned) in zip(tasks, results):
        per_value[vi].append(score)
        if warned:
            unconverged[values[vi]] = unconverged.get(values[vi], 0) + 1
    means = [float(np.mean(s)) for s in per_value]
    chosen, best = _pick(spec, values, means)
    if unconverged:
        notes.append(
            f"solver did not converge in {sum(unconverged.values())} search fit(s) "
            f"({pn}={', '.join(_fmt_value(v) for v in unconverged)}); "
            "their scores may be pessimistic")
    return chosen, best, [(_plain(v), m) for v, m in zip(values, means)]


def _final_pipeline(name, spec, chosen, pca, seed, probability, smallest, small_names, notes):
    """The unfitted final pipeline; its calibration folds fit the smallest
    class (the training rows themselves, with a note, for a class of one row)."""
    pipe = make_pipeline_for(name, {spec.param_name: chosen}, pca=pca, seed=seed,
                             probability=probability)
    if probability and spec.calibrated:
        if smallest >= 2:
            pipe.set_params(clf__cv=StratifiedKFold(min(CALIBRATION_FOLDS, smallest),
                                                    shuffle=True, random_state=seed))
        else:
            pipe.set_params(clf__cv=_Resubstitution())
            notes.append(f"{name} probabilities calibrated on the training rows themselves "
                         f"(class {small_names[0]!r} has 1 train image, no held-out fold "
                         "possible): they are over-confident")
    return pipe


def _fit_final(pipe, name, chosen, pca, smallest, X_fit, y_fit, n_jobs, warm):
    """Fit the final pipeline, by the batched solver where it applies (logreg,
    calibrated linear-svm, no PCA), else scikit-learn; its ConvergenceWarning messages."""
    final = pipe.named_steps["clf"]
    batched = (name == "logreg" or (name == "linear-svm" and isinstance(final, CalibratedClassifierCV)
                                    and isinstance(final.cv, StratifiedKFold)))
    fitted = False
    if batched and pca is None and smallest >= 2:
        fitted = _fit_linear_batched(pipe, name, chosen, X_fit, y_fit, _search_threads(n_jobs), warm)
    return [] if fitted else _fit_quietly(pipe, X_fit, y_fit)


def fit_classifier(name: str, X_train, y_train, *, X_val=None, y_val=None,
                   grid: Sequence | None = None, pca: int | float | None = None,
                   cv: int = 5, n_jobs: int | None = None, seed: int = 0,
                   probability: bool = True,
                   class_names: Sequence[str] | None = None,
                   final_fit: str = "train") -> FitResult:
    """Choose the regularisation parameter, then fit on all training rows.

    Selection is by accuracy: on ``(X_val, y_val)`` when given, else by
    stratified, shuffled, seeded K-fold CV on the training rows. For
    ``logreg`` and ``linear-svm`` (without PCA) the search is
    :func:`featx.probe.search_linear`: every fold of a wide C grid fitted
    batched in torch, near-ties (within one standard error) going to the
    lower held-out loss. Other classifiers fit each grid value and fold
    with scikit-learn, in parallel with joblib when the problem is large
    enough to pay for worker processes. The final pipeline is refitted on
    all of ``X_train`` (and the validation rows too when
    ``final_fit="train+val"``): by the batched solver for ``logreg`` and
    ``linear-svm`` (its numbers set into the scikit-learn estimators), by
    scikit-learn for the others.

    Small classes: CV uses ``min(cv, smallest class count)`` folds. When
    the smallest class has a single training row no CV is possible; the
    search is skipped, ``param_name`` gets the default value (the registry
    default, or the middle of ``grid``) and a note says so.

    Parameters
    ----------
    name : str
        A key of :data:`CLASSIFIERS`.
    X_train, y_train : array-like
        Training features ``(n, d)`` and labels ``(n,)``.
    X_val, y_val : array-like, optional
        Validation split used for selection instead of CV.
    grid : sequence, optional
        Values of the classifier's parameter to try (default: the registry
        grid). A single value means no search.
    pca : int or float, optional
        See :func:`make_pipeline_for`. An int larger than the rows a fold
        trains on is lowered to that, with a note.
    cv : int, default=5
        Folds of the CV (when no validation split), at least 2.
    n_jobs : int, optional
        joblib workers for the search; ``None``: one, ``-1``: all cores.
    seed : int, default=0
        Seeds the folds and every model: same inputs, same seed, same result.
    probability : bool, default=True
        Make the final SVM pipelines calibrated (``predict_proba``).
    class_names : sequence of str, optional
        Names of integer labels, used in notes only.
    final_fit : {"train", "train+val"}, default="train"
        What the final model is fitted on once the parameter is chosen.
        ``"train+val"`` (the linear-probe protocol) adds the validation
        rows; it changes nothing when there is no validation split.

    Returns
    -------
    FitResult

    Raises
    ------
    ConfigError
        Unknown classifier, empty grid, ``cv < 2``, bad ``pca``.
    DatasetError
        Fewer than two classes in the training rows.

    Examples
    --------
    >>> from sklearn.datasets import make_blobs
    >>> X, y = make_blobs(60, n_features=4, centers=3, random_state=0)
    >>> res = fit_classifier("logreg", X, y, grid=[0.1, 1.0], cv=3)
    >>> res.score_source, res.chosen in (0.1, 1.0), len(res.search)
    ('cv3', True, 2)
    """
    spec = get_classifier_spec(name)
    pca = _check_pca(pca)
    X, y, labels, counts = _training_rows(X_train, y_train, class_names)
    values, default = _grid_values(spec, name, grid)
    if isinstance(cv, bool) or not isinstance(cv, (int, np.integer)) or cv < 2:
        raise ConfigError(f"cv={cv!r}: cross-validation needs an integer number of folds >= 2")
    if final_fit not in FINAL_FITS:
        raise ConfigError(f"final_fit={final_fit!r}: choose from {', '.join(FINAL_FITS)}")
    notes: list[str] = []
    pn = spec.param_name
    smallest = int(counts.min())
    small_names = [_label_name(lab, class_names) for lab, c in zip(labels, counts) if c == smallest]
    plan = _selection_splits(X, y, X_val, y_val, cv, seed, smallest, small_names, pn, default, notes)
    if not plan.splits:
        values = [default]
    pca, values, default = _fit_within_rows(pca, values, default, pn, plan.min_fit_rows,
                                            X.shape[1], notes)

    t0 = time.perf_counter()
    search, best, val_loss, path = [], None, None, None
    if (name in PROBE_SEARCHED and pca is None and plan.splits and len(values) > 1
            and np.issubdtype(X.dtype, np.number)):
        chosen, best, search, val_loss, path = _search_batched(
            name, X, y, labels, plan, values, grid, n_jobs, pn, notes)
    elif plan.splits and len(values) >= 1:
        chosen, best, search = _search_each(spec, name, X, y, plan, values, pca, seed, n_jobs, notes)
    else:
        chosen = default
    search_seconds = time.perf_counter() - t0
    val_score, cv_score = (best, None) if plan.score_source == "val" else (None, best)

    pipe = _final_pipeline(name, spec, chosen, pca, seed, probability, smallest, small_names, notes)
    X_fit, y_fit, fit_on = X, y, ("train",)
    if final_fit == "train+val" and plan.score_source == "val":
        X_fit, y_fit = np.concatenate([X, plan.splits[0][1]]), np.concatenate([y, plan.splits[0][2]])
        fit_on = ("train", "val")
    t1 = time.perf_counter()
    messages = _fit_final(pipe, name, chosen, pca, smallest, X_fit, y_fit, n_jobs,
                          getattr(path, "state", None))
    fit_seconds = time.perf_counter() - t1
    if messages:
        notes.append(f"final fit ({pn}={_fmt_value(chosen)}) did not converge: {messages[0]}")
    return FitResult(pipeline=pipe, name=name, param_name=pn, chosen=_plain(chosen),
                     search=search, score_source=plan.score_source, val_score=val_score,
                     cv_score=cv_score, fit_seconds=fit_seconds,
                     search_seconds=search_seconds, notes=notes, val_loss=val_loss, fit_on=fit_on,
                     path=path)


# --------------------------------------------------------------------------
# out of core


def _read_chunks(chunks) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One pass over ``chunks()``: its non-empty ``(X, y)`` chunks, checked."""
    for Xc, yc in chunks():
        Xc, yc = _as_xy(Xc, yc, "chunk")
        if len(yc):
            yield Xc, yc


def _stream_scaler(chunks, known) -> StandardScaler:
    """A StandardScaler fitted over one pass of ``chunks()``, whose labels must all be ``known``."""
    scaler = StandardScaler()
    rows = 0
    for Xc, yc in _read_chunks(chunks):
        unknown = set(np.unique(yc).tolist()) - known
        if unknown:
            raise ValueError(f"chunk has labels {sorted(unknown)[:5]} not in classes")
        scaler.partial_fit(Xc)
        rows += len(Xc)
    if rows == 0:
        raise ValueError("chunks() yielded no rows")
    return scaler


def fit_sgd_stream(chunks: Callable[[], Iterable[tuple[Any, Any]]], classes, *,
                   alpha: float = 1e-4, epochs: int = 5, seed: int = 0) -> Pipeline:
    """Train ``StandardScaler -> SGDClassifier(log_loss)`` one chunk at a time.

    Memory holds one chunk, never the whole feature set. The first pass over
    the chunks fits the scaler (:meth:`~StandardScaler.partial_fit`); then
    each epoch passes over them again, shuffling the rows within each chunk
    (seeded) and calling :meth:`~SGDClassifier.partial_fit`.

    Parameters
    ----------
    chunks : callable
        ``chunks()`` returns a fresh iterator of ``(X_chunk, y_chunk)``; it is
        called ``epochs + 1`` times. Rows are shuffled within a chunk but the
        chunk order is the caller's: if the rows are stored sorted by class,
        yield the chunks in a random order (or make chunks that mix classes),
        or SGD forgets the early classes.
    classes : array-like
        Every label that can occur (``partial_fit`` needs them up front).
    alpha : float, default=1e-4
        L2 regularisation strength of the SGD.
    epochs : int, default=5
        Passes over the data.
    seed : int, default=0
        Seeds the SGD and the in-chunk shuffles.

    Returns
    -------
    sklearn.pipeline.Pipeline
        Fitted, steps ``"scale"`` and ``"clf"``: ``predict`` and
        ``predict_proba`` work as for :func:`fit_classifier`'s pipelines.

    Examples
    --------
    >>> from sklearn.datasets import make_blobs
    >>> X, y = make_blobs(200, n_features=5, centers=2, random_state=0)
    >>> chunks = lambda: ((X[i:i + 50], y[i:i + 50]) for i in range(0, 200, 50))
    >>> model = fit_sgd_stream(chunks, classes=[0, 1], epochs=3)
    >>> float(np.mean(model.predict(X) == y)) > 0.9
    True
    """
    if not callable(chunks):
        raise TypeError("chunks must be a callable returning an iterator of (X, y) chunks")
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise ConfigError(f"epochs={epochs!r}: give an integer >= 1")
    classes = np.asarray(classes)
    scaler = _stream_scaler(chunks, set(classes.tolist()))
    sgd = SGDClassifier(loss="log_loss", alpha=alpha, random_state=seed)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        for Xc, yc in _read_chunks(chunks):
            order = rng.permutation(len(Xc))
            sgd.partial_fit(scaler.transform(Xc[order]), yc[order], classes=classes)
    return Pipeline([("scale", scaler), ("clf", sgd)])


# --------------------------------------------------------------------------
# prediction and evaluation


def predict_proba(pipeline, X, *, classes: Sequence | int | None = None) -> np.ndarray:
    """Class probabilities ``(n, n_classes)`` from any fitted pipeline here.

    Parameters
    ----------
    pipeline : fitted estimator
        From :func:`fit_classifier`, :func:`make_pipeline_for` (fitted) or
        :func:`fit_sgd_stream`.
    X : array-like of shape (n, d)
    classes : sequence or int, optional
        Column order wanted: all labels (an int ``K`` means ``range(K)``).
        Labels the model never saw in training get probability 0. Default:
        the model's own ``classes_`` (sorted labels seen in training).

    Returns
    -------
    ndarray of shape (n, n_classes)

    Raises
    ------
    ConfigError
        The model has no probabilities (an SVM built with
        ``probability=False``).
    """
    if not hasattr(pipeline, "predict_proba"):
        raise ConfigError(
            "this model has no probabilities (an SVM fitted with probability=False); "
            "refit it with probability=True to get calibrated ones")
    proba = np.asarray(pipeline.predict_proba(X), dtype=np.float64)
    if classes is None:
        return proba
    if isinstance(classes, (int, np.integer)):
        classes = range(int(classes))
    index = {_plain(c): i for i, c in enumerate(classes)}
    out = np.zeros((proba.shape[0], len(index)))
    for j, c in enumerate(pipeline.classes_):
        c = _plain(c)
        if c not in index:
            raise ValueError(f"the model predicts label {c!r}, which is not in classes")
        out[:, index[c]] = proba[:, j]
    return out


def _label_indices(y_true, classes) -> np.ndarray:
    y = np.asarray(y_true)
    if y.dtype.kind in "iu":
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            raise ValueError(f"label index out of range 0..{len(classes) - 1}")
        return y.astype(np.int64)
    index = {str(c): i for i, c in enumerate(classes)}
    try:
        return np.array([index[str(v)] for v in y], dtype=np.int64)
    except KeyError as e:
        raise ValueError(f"label {e.args[0]!r} is not one of the classes") from None


def _ranking(proba: np.ndarray) -> np.ndarray:
    """Columns by decreasing probability; ties go to the lower index, as argmax does."""
    return np.argsort(-proba, axis=1, kind="stable")


def _top_k_accuracy(ranking, y, top_k, k_classes) -> dict:
    """``{"k": accuracy}`` for each k of ``top_k`` below ``k_classes``."""
    top = {}
    for k in top_k:
        k = int(k)
        if k < 1:
            raise ValueError(f"top_k values must be >= 1, got {k}")
        if k < k_classes:
            hit = (ranking[:, :k] == y[:, None]).any(axis=1) if len(y) else np.zeros(0)
            top[str(k)] = float(hit.mean()) if len(y) else 0.0
    return top


def _precision_recall_f1(y, pred, classes):
    """``({"macro": ..., "weighted": ...}, {class: {..., "support"}})`` of
    precision, recall and F1; 0 for a class never predicted."""
    labels = np.arange(len(classes))
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    averages = {}
    for avg in ("macro", "weighted"):
        ap, ar, af, _ = precision_recall_fscore_support(y, pred, labels=labels,
                                                        average=avg, zero_division=0)
        averages[avg] = {"precision": float(ap), "recall": float(ar), "f1": float(af)}
    per_class = {
        c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
            "support": int(s[i])}
        for i, c in enumerate(classes)
    }
    return averages, per_class


def evaluate(y_true, proba, classes: Sequence[str], top_k: Sequence[int] = (1, 5)) -> dict:
    """Metrics of probabilistic predictions, as plain JSON-ready numbers.

    The prediction of a row is the class of highest probability (the lower
    index on a tie).

    Parameters
    ----------
    y_true : array-like of shape (n,)
        Class indices into ``classes``, or the class names themselves.
    proba : array-like of shape (n, n_classes)
        Columns in the order of ``classes``.
    classes : sequence of str
        Class names.
    top_k : sequence of int, default=(1, 5)
        Top-k accuracies to report; a k not below ``n_classes`` is left out
        (it would be 1.0 by construction).

    Returns
    -------
    dict
        ``n``, ``n_classes``, ``classes``, ``accuracy``, ``top_k_accuracy``
        (``{"5": ...}``, string keys), ``macro`` and ``weighted``
        (``{"precision", "recall", "f1"}``), ``per_class``
        (``{name: {"precision", "recall", "f1", "support"}}`` in class
        order) and ``confusion_matrix`` (list of lists, rows = true class,
        columns = predicted). Precision of a class never predicted is 0.

    Examples
    --------
    >>> m = evaluate([0, 1, 1], [[.9, .1], [.2, .8], [.6, .4]], ["cat", "dog"])
    >>> round(m["accuracy"], 3), m["confusion_matrix"]
    (0.667, [[1, 0], [1, 1]])
    """
    classes = [str(c) for c in classes]
    k_classes = len(classes)
    proba = np.asarray(proba, dtype=np.float64)
    y = _label_indices(y_true, classes)
    if proba.ndim != 2 or proba.shape != (len(y), k_classes):
        raise ValueError(f"proba must have shape ({len(y)}, {k_classes}), got {proba.shape}")
    labels = np.arange(k_classes)
    ranking = _ranking(proba)
    pred = ranking[:, 0] if len(y) else np.zeros(0, dtype=np.int64)
    top = _top_k_accuracy(ranking, y, top_k, k_classes)
    averages, per_class = _precision_recall_f1(y, pred, classes)
    cm = confusion_matrix(y, pred, labels=labels) if len(y) else np.zeros((k_classes,) * 2, int)
    return {
        "n": int(len(y)),
        "n_classes": k_classes,
        "classes": classes,
        "accuracy": float(np.mean(pred == y)) if len(y) else 0.0,
        "top_k_accuracy": top,
        "macro": averages["macro"],
        "weighted": averages["weighted"],
        "per_class": per_class,
        "confusion_matrix": [[int(v) for v in row] for row in cm],
    }


def threshold_predictions(proba, classes: Sequence[str], threshold: float | None = None,
                          top_k: int = 1) -> list[dict]:
    """Per-row predictions that may abstain.

    Parameters
    ----------
    proba : array-like of shape (n, n_classes)
    classes : sequence of str
        Names of the columns.
    threshold : float, optional
        A row whose highest probability is below it is *uncertain*: its
        ``label`` is None. ``None``: never uncertain.
    top_k : int, default=1
        Length of each row's ``top_k`` list (at most ``n_classes``).

    Returns
    -------
    list of dict
        One per row: ``label`` (str, or None when uncertain),
        ``probability`` (the highest probability, float), ``top_k`` (list
        of ``(label, probability)``, most probable first) and ``uncertain``
        (bool).

    Examples
    --------
    >>> threshold_predictions([[0.55, 0.45]], ["cat", "dog"], threshold=0.6, top_k=2)
    [{'label': None, 'probability': 0.55, 'top_k': [('cat', 0.55), ('dog', 0.45)], 'uncertain': True}]
    """
    classes = [str(c) for c in classes]
    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim != 2 or proba.shape[1] != len(classes):
        raise ValueError(f"proba must have shape (n, {len(classes)}), got {proba.shape}")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"threshold={threshold}: give a probability between 0 and 1")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ConfigError(f"top_k={top_k!r}: give an integer >= 1")
    k = min(int(top_k), len(classes))
    out = []
    for row, order in zip(proba, _ranking(proba)):
        best = float(row[order[0]])
        uncertain = threshold is not None and best < threshold
        out.append({
            "label": None if uncertain else classes[order[0]],
            "probability": best,
            "top_k": [(classes[j], float(row[j])) for j in order[:k]],
            "uncertain": bool(uncertain),
        })
    return out


# --------------------------------------------------------------------------
# comparison table


@dataclass
class ComparisonRow:
    """One (backbone, layer, classifier) result in a comparison.

    ``val_or_cv_score`` is the selection score (see ``score_source``) and
    the only thing :func:`rank_rows` ranks by; ``test_accuracy`` and
    ``macro_f1`` are on the test split (None when there is none) and are
    shown, never used to choose. ``fit_seconds`` is the whole cost of the
    row (search, calibration and final fit); ``search_seconds`` the search
    alone. ``val_loss``: held-out loss of the chosen parameter (ties).
    """

    backbone: str
    layer: str
    dims: int
    classifier: str
    param_name: str
    chosen: float | int | None
    val_or_cv_score: float | None
    score_source: str
    test_accuracy: float | None = None
    macro_f1: float | None = None
    fit_seconds: float | None = None
    extract_seconds: float | None = None
    notes: list[str] = field(default_factory=list)
    val_loss: float | None = None
    search_seconds: float | None = None

    @classmethod
    def from_fit(cls, result: FitResult, *, backbone: str, layer: str, dims: int,
                 test_metrics: Mapping | None = None,
                 extract_seconds: float | None = None) -> "ComparisonRow":
        """A row from a :class:`FitResult` and, optionally, :func:`evaluate`'s test metrics."""
        return cls(backbone=backbone, layer=layer, dims=int(dims), classifier=result.name,
                   param_name=result.param_name, chosen=result.chosen,
                   val_or_cv_score=result.score, score_source=result.score_source,
                   test_accuracy=None if test_metrics is None else test_metrics["accuracy"],
                   macro_f1=None if test_metrics is None else test_metrics["macro"]["f1"],
                   fit_seconds=result.total_seconds, extract_seconds=extract_seconds,
                   notes=list(result.notes), val_loss=result.val_loss,
                   search_seconds=result.search_seconds)


def _known(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _rank_key(row: ComparisonRow):
    score = row.val_or_cv_score
    group, primary = (0, -score) if _known(score) else (1, 0.0)
    # held-out losses compare only as log-losses (linear-svm's squared hinge is on another scale)
    loss = row.val_loss if row.classifier == "logreg" and _known(row.val_loss) else math.inf
    simpler = SIMPLICITY.index(row.classifier) if row.classifier in SIMPLICITY else len(SIMPLICITY)
    fit = row.fit_seconds if _known(row.fit_seconds) else math.inf
    return group, primary, loss, row.dims or 0, simpler, fit


def rank_rows(rows: Iterable[ComparisonRow]) -> list[ComparisonRow]:
    """Rows best first, by the val/CV score alone: the test split never chooses.

    Ties go to the lower held-out log-loss (rows that have one: logreg),
    then the simpler model (fewer dimensions, then logreg < linear-svm <
    sgd < knn < rbf-svm), then the shorter fit; rows with no score come last; otherwise the input order is
    kept. ``compare``, ``run`` and the reports all rank with this.

    Examples
    --------
    >>> rows = [ComparisonRow("r", "a", 512, "logreg", "C", 0.1, 0.80, "val", test_accuracy=0.95),
    ...         ComparisonRow("r", "b", 512, "logreg", "C", 0.1, 0.90, "val", test_accuracy=0.85)]
    >>> [r.layer for r in rank_rows(rows)]
    ['b', 'a']
    """
    return sorted(rows, key=_rank_key)


def selection_note(rows: Iterable[ComparisonRow]) -> str:
    """How the winner was chosen, in words, for a table's footnote."""
    sources = {r.score_source for r in rows if _known(r.val_or_cv_score)}
    if sources == {"val"}:
        how = "by val accuracy"
    elif len(sources) == 1 and next(iter(sources)).startswith("cv"):
        how = f"by {next(iter(sources))[2:]}-fold CV accuracy on train"
    elif sources:
        how = "by each row's val or CV accuracy"
    else:
        return "no row has a val/CV score: nothing was chosen"
    return (f"* winner chosen {how} (ties: lower held-out log-loss, then the simpler model); "
            "test accuracy is shown, never used to choose")


_COLUMNS = ("backbone", "layer", "dims", "classifier", "param", "val/cv", "test acc",
            "macro-F1", "fit s", "extract s", "notes")


def _num(v, fmt):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _display_cells(row: ComparisonRow) -> list[str]:
    chosen = "-" if row.chosen is None else _fmt_value(row.chosen)
    score = _num(row.val_or_cv_score, ".4f")
    if row.val_or_cv_score is not None and row.score_source:
        score += f" ({row.score_source})"
    return [row.backbone, row.layer, str(row.dims), row.classifier,
            f"{row.param_name}={chosen}", score, _num(row.test_accuracy, ".4f"),
            _num(row.macro_f1, ".4f"), _num(row.fit_seconds, ".2f"),
            _num(row.extract_seconds, ".1f"), "; ".join(row.notes)]


def format_table(rows: Iterable[ComparisonRow]) -> str:
    """An aligned text table, best row first and marked with ``*``.

    Examples
    --------
    >>> rows = [ComparisonRow("resnet18", "avgpool", 512, "logreg", "C", 0.1, 0.9, "cv5", 0.91),
    ...         ComparisonRow("resnet18", "avgpool", 512, "knn", "n_neighbors", 5, 0.8, "cv5", 0.85)]
    >>> print(format_table(rows).splitlines()[2][:37])
    *  1  resnet18  avgpool   512  logreg
    >>> print(format_table(rows).splitlines()[-1][:46])
    * winner chosen by 5-fold CV accuracy on train
    """
    ranked = rank_rows(rows)
    body = [["*" if i == 0 else " ", str(i + 1), *_display_cells(r)]
            for i, r in enumerate(ranked)]
    numeric = {1, 4, 7, 8, 9, 10, 11}
    return text_table(body, [" ", "#", *_COLUMNS], right=numeric) + "\n" + selection_note(ranked)


CSV_FIELDS = ("rank", "winner", "backbone", "layer", "dims", "classifier", "param_name",
              "chosen", "val_or_cv_score", "score_source", "val_loss", "test_accuracy", "macro_f1",
              "fit_seconds", "search_seconds", "extract_seconds", "notes")


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def write_table(rows: Iterable[ComparisonRow], csv_path=None, md_path=None) -> list[ComparisonRow]:
    """Write the ranked comparison as CSV and/or Markdown (each atomically).

    The CSV has full-precision numbers, empty cells for missing values, a
    ``rank`` column and ``winner`` = ``*`` on the best row; notes are joined
    with ``"; "``. The Markdown table has the same rows formatted as in
    :func:`format_table`, the best one marked ``*`` in the first column.
    Either path may be None to skip that file.

    Returns
    -------
    list of ComparisonRow
        The rows, ranked.
    """
    ranked = rank_rows(rows)
    if csv_path is not None:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(CSV_FIELDS)
        for i, r in enumerate(ranked):
            values = {**r.__dict__, "notes": "; ".join(r.notes)}
            writer.writerow([i + 1, "*" if i == 0 else ""] +
                            ["" if values[f] is None else values[f] for f in CSV_FIELDS[2:]])
        atomic_write_text(csv_path, buf.getvalue())
    if md_path is not None:
        header = ["", "#", *_COLUMNS]
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join(":-:" if j == 0 else "---" for j in range(len(header))) + "|"]
        for i, r in enumerate(ranked):
            cells = ["*" if i == 0 else "", str(i + 1), *_display_cells(r)]
            lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
        lines.append("")
        lines.append(selection_note(ranked).replace("* winner", "`*` winner", 1) + "; "
                     "`fit s` is the whole cost of a row: search, calibration and final fit.")
        atomic_write_text(md_path, "\n".join(lines) + "\n")
    return ranked
