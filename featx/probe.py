"""Linear probes searched in seconds: every fold of a C grid fitted at once in torch.

Choosing C for logistic regression or a linear SVM is the expensive half of
a linear probe: a wide grid (the linear-probe protocol of SimCLR and
Kornblith et al. uses 1e-6..1e5) times 5 CV folds is hundreds of
scikit-learn fits. :func:`search_linear` fits the same objectives that
scikit-learn's estimators minimise, for all folds of one C together
(batched tensors), walking the C path from strong to weak regularisation
with warm starts, so each C costs a few L-BFGS iterations instead of a cold
solve:

* ``logreg``: ``C * sum(log-loss) + 1/2 ||W||^2``, intercept not penalised
  (multinomial for 3+ classes, binomial for 2), as
  :class:`~sklearn.linear_model.LogisticRegression`;
* ``linear-svm``: ``C * sum(squared hinge) + 1/2 (||w||^2 + b^2)`` per class,
  one-vs-rest, intercept penalised, as
  :class:`~sklearn.svm.LinearSVC` with its defaults.

Each fold standardises with the mean and standard deviation of its own
training rows, as the ``StandardScaler`` inside the fitted Pipeline does.

The grid: C = 10^-6 .. 10^5. The walk goes up in decades from 10^-4,
stopping once the held-out loss has risen past its minimum (or the
accuracy has clearly fallen, or the solutions have saturated); down
towards 10^-6 only while the smallest C tried is the best; then
quarter-decades around the best decade. The choice: the best mean accuracy, except that every C within one
standard error of it counts as tied, and among the tied the one with the
lowest held-out loss wins (log-loss for ``logreg``, squared hinge for
``linear-svm``), so the model kept gives usable probabilities rather than the
flattest ones. :func:`solve_final` fits the final model at the chosen C with
the same solver (warm from the search, calibration folds in the same batch);
:func:`featx.classify.fit_classifier` puts the numbers into real
scikit-learn estimators.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

__all__ = ["COARSE_GRID", "PathResult", "search_linear", "wide_grid"]

KINDS = ("logreg", "linear-svm")
COARSE_GRID = tuple(float(10.0 ** e) for e in range(-6, 6))     # 1e-6 .. 1e5
START = 1e-4          # where the coarse walk begins (it goes down from there only when needed)
# L-BFGS iterations per C (warm-started from the previous C)
MAX_ITER = 100
# L-BFGS stops when the largest gradient entry is below this (the objective is a
# mean over rows, so this is a tolerance per row), or the objective stops moving
TOL_GRAD = 1e-6
TOL_CHANGE = 1e-10
HISTORY = 10          # L-BFGS corrections kept


def wide_grid() -> tuple:
    """Every value :func:`search_linear` may try by default: quarter-decades in 1e-6..1e5."""
    return tuple(float(10.0 ** (e / 4)) for e in range(-24, 21))


@dataclass
class PathResult:
    """What the search tried and chose.

    ``values`` in the order tried; ``scores`` (mean held-out accuracy),
    ``errors`` (its standard error), ``losses`` (mean held-out loss) aligned
    with ``values``; ``unconverged``: values whose L-BFGS hit its iteration
    cap; ``seconds``: the whole search.
    """

    values: list[float]
    scores: list[float]
    errors: list[float]
    losses: list[float]
    chosen: float
    best: float
    loss_name: str
    unconverged: list[float] = field(default_factory=list)
    seconds: float = 0.0
    evaluations: int = 0       # objective evaluations of the whole search
    state: Any = None          # (W, b) solved at the chosen C: where a final solve starts

    def table(self) -> list[tuple[float, float]]:
        """``(value, score)`` sorted by value."""
        return sorted(zip(self.values, self.scores))


def _standardise(X_tr, X_ev):
    mean = X_tr.mean(axis=0)
    std = X_tr.std(axis=0)
    std[std < 1e-12 * max(1.0, float(np.abs(mean).max(initial=0.0)))] = 1.0
    return (X_tr - mean) / std, (X_ev - mean) / std


class _Problem:
    """All folds of one search as padded tensors, and the objective."""

    def __init__(self, torch, kind, X, y, splits, n_classes, standardise=True):
        self.torch = torch
        self.kind = kind
        F = len(splits)
        n_tr = max(len(tr) for tr, _ in splits)
        n_ev = max(len(ev) for _, ev in splits)
        d = X.shape[1]
        Xtr = np.zeros((F, n_tr, d), np.float32)
        Xev = np.zeros((F, n_ev, d), np.float32)
        ytr = np.zeros((F, n_tr), np.int64)
        yev = np.zeros((F, n_ev), np.int64)
        mtr = np.zeros((F, n_tr), np.float32)
        mev = np.zeros((F, n_ev), np.float32)
        for f, (tr, ev) in enumerate(splits):
            a, b = (_standardise(X[tr].astype(np.float64), X[ev].astype(np.float64)) if standardise
                    else (X[tr], X[ev]))
            Xtr[f, :len(tr)], Xev[f, :len(ev)] = a, b
            ytr[f, :len(tr)], yev[f, :len(ev)] = y[tr], y[ev]
            mtr[f, :len(tr)], mev[f, :len(ev)] = 1.0, 1.0
        t = torch.from_numpy
        self.Xtr, self.Xev, self.ytr, self.yev = t(Xtr), t(Xev), t(ytr), t(yev)
        self.mtr, self.mev = t(mtr), t(mev)
        self.n_f = self.mtr.sum(1)                       # training rows per fold
        self.n_ev_f = self.mev.sum(1).clamp(min=1)
        self.K = n_classes
        self.cols = 1 if n_classes == 2 else n_classes
        self.Ttr = self._targets(self.ytr)
        # held-out rows of a class the training rows lack (label -1): always wrong, no loss
        self.known_ev = (self.yev >= 0).float() * self.mev
        self.yev_safe = self.yev.clamp(min=0)
        self.Tev = self._targets(self.yev_safe)
        self.evals = 0                                   # objective evaluations, all C together
        self.W = torch.zeros((F, d, self.cols), dtype=torch.float32, requires_grad=True)
        self.b = torch.zeros((F, 1, self.cols), dtype=torch.float32, requires_grad=True)

    def _targets(self, y):
        torch = self.torch
        if self.cols == 1:
            return (y == 1).float().unsqueeze(-1) * 2 - 1                     # (F, n, 1) in {-1, 1}
        return torch.nn.functional.one_hot(y, self.K).float() * 2 - 1          # (F, n, K)

    def _row_loss(self, Z, y, T):
        torch = self.torch
        if self.kind == "logreg":
            if self.cols == 1:
                return torch.nn.functional.softplus(-T[..., 0] * Z[..., 0])
            return torch.logsumexp(Z, dim=-1) - Z.gather(-1, y.unsqueeze(-1))[..., 0]
        return (torch.clamp(1 - T * Z, min=0) ** 2).sum(-1)

    def objective(self, C):
        """Sum over folds of (mean training loss + ||W||^2 / (2 C n_f)): the
        scikit-learn objective of each fold divided by C * n_f."""
        Z = self.Xtr @ self.W + self.b
        data = (self._row_loss(Z, self.ytr, self.Ttr) * self.mtr).sum(1) / self.n_f
        reg = (self.W ** 2).sum((1, 2))
        if self.kind == "linear-svm":                     # liblinear penalises the bias too
            reg = reg + (self.b ** 2).sum((1, 2))
        return (data + reg / (2 * C * self.n_f)).sum()

    def held_out(self):
        """Per-fold accuracy and mean loss on the evaluation rows."""
        torch = self.torch
        with torch.no_grad():
            Z = self.Xev @ self.W + self.b
            pred = (Z[..., 0] > 0).long() if self.cols == 1 else Z.argmax(-1)
            acc = ((pred == self.yev).float() * self.mev).sum(1) / self.n_ev_f
            loss = (self._row_loss(Z, self.yev_safe, self.Tev) * self.known_ev).sum(1) \
                / self.known_ev.sum(1).clamp(min=1)
        return acc.numpy().astype(np.float64), loss.numpy().astype(np.float64)

    def solve(self, C, max_iter=MAX_ITER) -> bool:
        """L-BFGS from the current W, b; True when it converged before the cap."""
        torch = self.torch
        opt = torch.optim.LBFGS([self.W, self.b], lr=1, max_iter=max_iter, history_size=HISTORY,
                                tolerance_grad=TOL_GRAD, tolerance_change=TOL_CHANGE, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = self.objective(C)
            loss.backward()
            self.evals += 1
            return loss
        opt.step(closure)
        state = opt.state[opt._params[0]]
        return int(state.get("n_iter", 0)) < max_iter

    def state(self):
        return self.W.detach().clone(), self.b.detach().clone()

    def restore(self, state):
        with self.torch.no_grad():
            self.W.copy_(state[0])
            self.b.copy_(state[1])


def _past_the_best(tried: dict) -> bool:
    """Whether walking on to larger C is pointless: the last 2 values both
    score below the best accuracy so far and have a higher held-out loss
    than the lowest so far (the loss has a minimum in C and has risen past
    it); or the last 3 values are all more than 2 standard errors below the
    best; or the held-out accuracy has not moved and the loss has changed by
    under 0.1% for the last 3 values (the solutions have saturated)."""
    vals = sorted(tried)
    if len(vals) < 4:
        return False
    scores = [tried[v][0] for v in vals]
    b = max(range(len(vals)), key=lambda i: scores[i])
    lowest = min(range(len(vals)), key=lambda i: tried[vals[i]][2])
    if max(b, lowest) < len(vals) - 2 and all(
            tried[v][0] < scores[b] and tried[v][2] > tried[vals[lowest]][2] for v in vals[-2:]):
        return True
    floor = scores[b] - 2 * tried[vals[b]][1]
    last = vals[-3:]
    if b < len(vals) - 3 and all(tried[v][0] < floor for v in last):
        return True
    ref = tried[vals[-4]]
    return all(tried[v][0] == ref[0] and abs(tried[v][2] - ref[2]) <= 1e-3 * max(abs(ref[2]), 1e-12)
               for v in last)


def _choose(values, scores, errors, losses):
    """Index of the choice: within one SE of the best accuracy, the lowest loss;
    then the more regularised (smaller C)."""
    best = max(range(len(values)), key=lambda i: (scores[i], -losses[i], -values[i]))
    tied = [i for i in range(len(values)) if scores[i] >= scores[best] - errors[best] - 1e-12]
    return min(tied, key=lambda i: (losses[i], values[i]))


def _consecutive_labels(y, y_val):
    """``(y, y_val, K)`` with labels 0..K-1; a held-out label not in ``y`` becomes -1."""
    classes = np.unique(y)
    if not np.array_equal(classes, np.arange(len(classes))):
        index = {c: i for i, c in enumerate(classes.tolist())}
        y = np.array([index[c] for c in y.tolist()])
        if y_val is not None:
            y_val = np.array([index.get(c, -1) for c in np.asarray(y_val).tolist()])
    return y, y_val, len(classes)


def _search_rows(X, y, splits, X_val, y_val):
    """``(X, y, folds)`` a search runs on: the CV splits, or the validation
    rows appended after the training rows as one fold."""
    if X_val is not None:
        Xa = np.concatenate([X, np.asarray(X_val)])
        ya = np.concatenate([y, np.asarray(y_val).astype(np.int64)])
        return Xa, ya, [(np.arange(len(X)), np.arange(len(X), len(Xa)))]
    if not splits:
        raise ValueError("search_linear: give splits or X_val/y_val")
    return X, y, list(splits)


def search_linear(kind: str, X, y, *, splits: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
                  X_val=None, y_val=None, values: Sequence[float] | None = None,
                  threads: int | None = None) -> PathResult:
    """Choose C for ``logreg`` or ``linear-svm`` on held-out rows.

    Parameters
    ----------
    kind : {"logreg", "linear-svm"}
    X, y : arrays
        Training features ``(n, d)`` and integer labels ``0..K-1``.
    splits : list of (train_idx, eval_idx), optional
        CV folds over ``X`` (scores are means over folds, the standard
        error is their spread / sqrt(folds)).
    X_val, y_val : arrays, optional
        A validation split instead (standard error sqrt(p(1-p)/n_val)).
    values : sequence of float, optional
        The C values to try (all of them, in increasing order). Default:
        decades 1e-6..1e5, then quarter-decades around the best decade.
    threads : int, optional
        torch intra-op threads for the search (default: torch's own).

    Returns
    -------
    PathResult

    Examples
    --------
    >>> from sklearn.datasets import make_blobs
    >>> X, y = make_blobs(90, n_features=5, centers=3, random_state=0)
    >>> r = search_linear("logreg", X[:60], y[:60], X_val=X[60:], y_val=y[60:])
    >>> r.best
    1.0
    """
    import torch
    if kind not in KINDS:
        raise ValueError(f"search_linear: kind must be one of {KINDS}, got {kind!r}")
    X = np.asarray(X)
    y, y_val, n_classes = _consecutive_labels(np.asarray(y).astype(np.int64), y_val)
    t0 = time.perf_counter()
    Xa, ya, folds = _search_rows(X, y, splits, X_val, y_val)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        with torch.enable_grad():
            result = _walk(torch, kind, Xa, ya, folds, n_classes, values, X_val is not None)
    finally:
        torch.set_num_threads(old_threads)
    result.seconds = time.perf_counter() - t0
    return result


def _walk(torch, kind, X, y, folds, n_classes, values, single) -> PathResult:
    prob = _Problem(torch, kind, X, y, folds, n_classes)
    n_eval = float(prob.n_ev_f.sum())
    tried: dict[float, tuple[float, float, float]] = {}
    states: dict[float, tuple] = {}
    unconverged = []

    def run(path, stop_early=False):
        for C in path:
            if C in tried:
                continue
            if stop_early and _past_the_best(tried):
                break
            if states:                       # warm: the nearest C solved so far
                prob.restore(states[min(states, key=lambda v: abs(math.log(v / C)))])
            if not prob.solve(C):
                unconverged.append(C)
            states[C] = prob.state()
            acc, loss = prob.held_out()
            score = float(acc.mean())
            if single:
                err = math.sqrt(max(score * (1 - score), 0.0) / max(n_eval, 1.0))
            else:
                err = float(acc.std(ddof=1) / math.sqrt(len(acc))) if len(acc) > 1 else 0.0
            tried[C] = (score, err, float(loss.mean()))

    if values is not None:
        run(sorted(float(v) for v in values))
    else:
        # up from 1e-4 (useful C on standardised CNN features sits well above it),
        # then down towards 1e-6 only while the smallest C tried is the best
        run([c for c in COARSE_GRID if c >= START], stop_early=True)
        for C in sorted((c for c in COARSE_GRID if c < START), reverse=True):
            vals = sorted(tried)
            if _choose(vals, *[[tried[v][j] for v in vals] for j in range(3)]) != 0:
                break
            run([C])
        vals = sorted(tried)
        i = _choose(vals, *[[tried[v][j] for v in vals] for j in range(3)])
        e = round(math.log10(vals[i]) * 4)
        fine = [float(10.0 ** (k / 4)) for k in range(e - 2, e + 3) if -24 <= k <= 20]
        run(fine)
    vals = sorted(tried)
    scores = [tried[v][0] for v in vals]
    errors = [tried[v][1] for v in vals]
    losses = [tried[v][2] for v in vals]
    i = _choose(vals, scores, errors, losses)
    return PathResult(vals, scores, errors, losses, vals[i], scores[i],
                      "log-loss" if kind == "logreg" else "squared hinge", sorted(set(unconverged)),
                      evaluations=prob.evals, state=states[vals[i]])


def solve_final(kind: str, Z, y, C: float, *, folds: Sequence[tuple[np.ndarray, np.ndarray]] = (),
                threads: int | None = None, warm=None):
    """The final model at one C, and out-of-fold decision values for calibration.

    ``Z``: features already standardised (by the Pipeline's fitted scaler),
    ``y``: labels ``0..K-1``. Solves the full problem and each of ``folds``
    (the calibration folds) in one batch. Returns ``(W, b, oof)``: ``W``
    ``(d, K)`` (``(d, 1)`` for 2 classes), ``b`` ``(K,)``, and ``oof`` the
    decision values of every row from the fold that held it out (None
    without folds). Same objective as :func:`search_linear`. ``warm``: a
    :attr:`PathResult.state` to start every problem from (the search's
    solution at this C: the final solve then takes a few iterations).
    """
    import torch
    Z = np.asarray(Z, dtype=np.float32)
    y = np.asarray(y).astype(np.int64)
    n_classes = int(y.max()) + 1
    everything = np.arange(len(Z))
    splits = [(everything, everything[:0])] + [(np.asarray(tr), np.asarray(ev)) for tr, ev in folds]
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        with torch.enable_grad():
            prob = _Problem(torch, kind, Z, y, splits, n_classes, standardise=False)
            if warm is not None and tuple(warm[0].shape[1:]) == tuple(prob.W.shape[1:]):
                with torch.no_grad():
                    prob.W.copy_(warm[0].mean(0, keepdim=True).expand_as(prob.W))
                    prob.b.copy_(warm[1].mean(0, keepdim=True).expand_as(prob.b))
            prob.solve(C, max_iter=4 * MAX_ITER)
        W = prob.W.detach().numpy().astype(np.float64)
        b = prob.b.detach().numpy().astype(np.float64)[:, 0, :]
    finally:
        torch.set_num_threads(old_threads)
    oof = None
    if folds:
        oof = np.zeros((len(Z), W.shape[2]))
        for f, (_, ev) in enumerate(folds, start=1):
            oof[ev] = Z[ev].astype(np.float64) @ W[f] + b[f]
    return W[0], b[0], oof
