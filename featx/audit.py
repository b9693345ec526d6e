"""Auditing a labelled dataset on its cached features: ``featx audit``.

With a few hundred labelled images every bad example matters. From the
features of one backbone layer (extracted first when missing) this finds:

duplicates
    ``exact``: samples that share a content id (the same bytes, under
    several names); ``near``: different files whose features have a cosine
    similarity of at least ``near_threshold`` (resized, re-encoded,
    slightly cropped or flipped copies). Groups that span two splits are
    *leaks* (the same photo in train and test inflates the test score) and
    come first.
label issues
    out-of-fold predictions of a linear probe (``logreg`` on standardised
    features whitened on their top 256 principal axes, stratified folds that
    keep each duplicate group in one fold)
    that disagree with the given label, ranked by *self-confidence*: the
    out-of-fold probability of the given label, lowest (most likely wrong)
    first.
outliers
    images far from everything: the mean cosine distance to their
    ``OUTLIER_K`` nearest other images, listed when its robust z-score
    (median and MAD over the dataset) is at least ``outlier_z``.

:func:`run_audit` returns the three tables as lists of records;
:func:`write_audit` writes ``duplicates.csv``, ``label_issues.csv``,
``outliers.csv`` and a self-contained ``audit.html``.

The exact-copy check between splits (:func:`split_leaks`) needs no
features: ``featx train``, ``compare`` and ``run`` warn with it, and drop
the copies from the evaluation splits on request (:func:`check_leaks`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import shlex
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import Dataset, Sample
from .errors import ConfigError, DatasetError

__all__ = ["AuditResult", "check_leaks", "fix_commands", "run_audit", "split_leaks", "summary_lines",
           "without_leaks", "write_audit"]

# Cosine similarity (L2-normalised features, not centred) at or above which two
# different files are near duplicates. Measured on clothing-small with
# MobileNetV2 `flatten` (benchmarks/results/audit_clothing.md): distinct photos
# reach 0.953 at most among 3781 images (7 million pairs), copies resized to
# 70%, cropped 5% and re-encoded at JPEG 75 have a median of 0.972, flipped
# copies 0.978.
NEAR_THRESHOLD = 0.95
OUTLIER_K = 10
OUTLIER_Z = 4.0
C_GRID = (0.003, 0.01, 0.03, 0.1)
PROBE_DIMS = 256
FOLDS = 5
DUPLICATE_COLUMNS = ["group", "path", "split", "label", "kind", "similarity"]
LABEL_COLUMNS = ["path", "split", "label", "suggested", "confidence", "rank"]
OUTLIER_COLUMNS = ["path", "split", "label", "score", "rank"]
HTML_MAX_PER_SECTION = 100
_HELD_OUT = ("val", "test")


# --------------------------------------------------------------------------
# exact copies across splits (no features needed)


def split_leaks(ds: Dataset) -> list[Sample]:
    """Samples of an evaluation split whose content is also in a split the model learns from.

    A val image whose content id is also in train; a test image whose
    content id is also in train or val (val is refitted on by default).
    Splits featx makes itself never leak: they depend on the content id."""
    seen = {"train": set(), "val": set()}
    for s in ds.samples:
        if s.split in seen:
            seen[s.split].add(s.id)
    out = []
    for s in ds.samples:
        if s.split == "val" and s.id in seen["train"]:
            out.append(s)
        elif s.split == "test" and (s.id in seen["train"] or s.id in seen["val"]):
            out.append(s)
    return out


def without_leaks(ds: Dataset) -> Dataset:
    """The dataset without the samples :func:`split_leaks` names (a copy;
    its ``leaks_dropped`` lists them)."""
    leaks = split_leaks(ds)
    gone = {id(s) for s in leaks}
    out = dataclasses.replace(ds, samples=[s for s in ds.samples if id(s) not in gone])
    out.leaks_dropped = leaks
    return out


def leak_message(leaks: list[Sample], dataset: str, option: str = "--drop-leaks", dropped: bool = False) -> str:
    """The one line about exact copies shared between splits."""
    per = ", ".join(f"{n} in {split}" for split in _HELD_OUT
                    if (n := sum(1 for s in leaks if s.split == split)))
    if dropped:
        return (f"dropped {len(leaks)} evaluation images that are exact copies of training images ({per}; {option}); "
                f"`featx audit {shlex.quote(dataset)}` lists them")
    return (f"warning: {len(leaks)} evaluation images are exact copies of training images ({per}): their scores are "
            f"inflated; `featx audit {shlex.quote(dataset)}` lists them, {option} leaves them out")


def check_leaks(ds: Dataset, drop: bool = False, notify=None, option: str = "--drop-leaks") -> Dataset:
    """Warn in one line (``notify``, else :func:`warnings.warn`) when evaluation
    splits share exact copies with training splits; with ``drop`` return the
    dataset without them, else ``ds`` itself."""
    leaks = split_leaks(ds)
    if not leaks:
        return ds
    message = leak_message(leaks, str(ds.root), option, dropped=drop)
    if notify is not None:
        notify(message)
    else:
        warnings.warn(message, stacklevel=3)
    return without_leaks(ds) if drop else ds


# --------------------------------------------------------------------------
# the audit


@dataclass
class AuditResult:
    dataset: Dataset
    spec: object                                   # the FeatureSpec audited
    duplicates: list[dict] = field(default_factory=list)
    label_issues: list[dict] = field(default_factory=list)
    outliers: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    missing: int = 0                               # samples without features (unreadable)
    seconds: dict = field(default_factory=dict)    # extract, duplicates, labels, outliers

    @property
    def leak_groups(self) -> list[int]:
        return sorted({r["group"] for r in self.duplicates if r["leak"]})

    @property
    def n_groups(self) -> dict[str, int]:
        kinds: dict[int, set] = {}
        for r in self.duplicates:
            kinds.setdefault(r["group"], set()).add(r["kind"])
        return {"exact": sum(1 for k in kinds.values() if k == {"exact"}),
                "near": sum(1 for k in kinds.values() if "near" in k)}


def _normalise(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norms > 0, norms, 1.0)


def _similar_pairs_and_knn(Z: np.ndarray, threshold: float, k: int, block: int = 2048):
    """Pairs (i < j) with cosine >= threshold, and the mean cosine distance of
    each row to its ``k`` nearest other rows; the similarity matrix is made
    ``block`` rows at a time."""
    n = len(Z)
    pairs: list[tuple[int, int, float]] = []
    knn = np.zeros(n)
    k = max(1, min(k, n - 1))
    for start in range(0, n, block):
        S = Z[start:start + block] @ Z.T
        rows = np.arange(len(S))
        S[rows, start + rows] = -np.inf
        i, j = np.nonzero(S >= threshold)
        keep = start + i < j
        pairs += [(int(a), int(b), float(S[r, b])) for a, b, r in zip(start + i[keep], j[keep], i[keep])]
        if n > 1:
            top = np.partition(S, n - k, axis=1)[:, n - k:] if k < n else S
            knn[start:start + len(S)] = 1.0 - top.mean(axis=1)
    return pairs, knn


class _Groups:
    """Union-find over row indices."""

    def __init__(self, n):
        self.parent = list(range(n))

    def find(self, a):
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a, b):
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def _duplicates(samples: list[Sample], uid_row: dict[str, int], pairs) -> tuple[list[dict], np.ndarray]:
    """Duplicate rows, leaks first, and each unique row's group (for the folds)."""
    n = len(uid_row)
    groups = _Groups(n)
    best = np.zeros(n)
    for a, b, sim in pairs:
        groups.union(a, b)
        best[a], best[b] = max(best[a], sim), max(best[b], sim)
    members: dict[int, list[Sample]] = {}
    for s in samples:
        members.setdefault(groups.find(uid_row[s.id]), []).append(s)
    fold_group = np.array([groups.find(r) for r in range(n)])
    found = []
    for root, ss in members.items():
        if len(ss) < 2:
            continue
        counts: dict[str, int] = {}
        for s in ss:
            counts[s.id] = counts.get(s.id, 0) + 1
        leak = len({s.split for s in ss}) > 1
        found.append((not leak, min(str(s.path) for s in ss), leak, ss, counts))
    found.sort(key=lambda g: (g[0], g[1]))
    rows = []
    for number, (_, _, leak, ss, counts) in enumerate(found, 1):
        order = sorted(ss, key=lambda s: (("train", "val", "test").index(s.split) if s.split in ("train", "val", "test")
                                          else 3, str(s.path)))
        for s in order:
            exact = counts[s.id] > 1
            rows.append({"group": number, "path": str(s.path), "split": s.split, "label": s.label,
                         "kind": "exact" if exact else "near",
                         "similarity": 1.0 if exact else round(float(best[uid_row[s.id]]), 4), "leak": leak})
    return rows, fold_group


def _folds(y: np.ndarray, groups: np.ndarray, folds: int, seed: int):
    from sklearn.model_selection import StratifiedGroupKFold
    smallest = int(np.bincount(y).min()) if len(y) else 0
    n = max(2, min(folds, smallest, len(np.unique(groups))))
    return list(StratifiedGroupKFold(n_splits=n, shuffle=True, random_state=seed).split(np.zeros(len(y)), y, groups))


def _oof_proba(Z, y, splits, C: float, n_classes: int) -> np.ndarray:
    """Out-of-fold probabilities of ``logreg`` at ``C`` (the objective of
    scikit-learn's LogisticRegression), every fold solved in one torch batch
    by :func:`featx.probe.solve_final`."""
    from .probe import solve_final
    _, _, oof = solve_final("logreg", Z, y, float(C), folds=splits, threads=os.cpu_count())
    if n_classes == 2:                         # binomial: one logit per row
        p1 = 1.0 / (1.0 + np.exp(-oof[:, 0]))
        return np.stack([1.0 - p1, p1], axis=1)
    oof = oof - oof.max(axis=1, keepdims=True)
    e = np.exp(oof)
    return e / e.sum(axis=1, keepdims=True)


def _whitened(X: np.ndarray) -> np.ndarray:
    """Standardised features projected on their top ``PROBE_DIMS`` principal
    axes, each scaled to unit variance (no labels are used). The probe then
    solves in a fraction of a second instead of 8 s per C on 3781 x 1280
    (2 cores); out-of-fold accuracy on clothing-small 0.83 against 0.85."""
    std = X.std(axis=0)
    Z = (X - X.mean(axis=0)) / np.where(std > 0, std, 1.0)
    d = min(PROBE_DIMS, Z.shape[1], max(1, len(Z) - 1))
    Z = Z.astype(np.float64)
    _, vectors = np.linalg.eigh(Z.T @ Z)          # d x d: much cheaper than an SVD of n x d
    P = Z @ vectors[:, ::-1][:, :d]
    scale = P.std(axis=0)
    return (P / np.where(scale > 0, scale, 1.0)).astype(np.float32)


def _label_issues(samples, X, classes, fold_group, C, folds, seed):
    """Out-of-fold probabilities, the C chosen (lowest out-of-fold log-loss), the issue rows."""
    classes = [c for c in classes if any(s.label == c for s in samples)]     # those with readable images
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[s.label] for s in samples])
    if len(classes) < 2 or np.bincount(y).max() < 2 or len(np.unique(fold_group)) < 2:
        # one duplicate group holding everything leaves nothing to hold out
        return None, None, []
    splits = _folds(y, fold_group, folds, seed)
    Z = _whitened(X)
    grid = C_GRID if C in (None, "auto") else (float(C),)
    best = None
    for c in grid:
        proba = _oof_proba(Z, y, splits, c, len(classes))
        loss = float(-np.mean(np.log(np.clip(proba[np.arange(len(y)), y], 1e-12, None))))
        if best is None or loss < best[0]:
            best = (loss, c, proba)
    _, chosen, proba = best
    pred = proba.argmax(axis=1)
    wrong = np.nonzero(pred != y)[0]
    self_conf = proba[wrong, y[wrong]]
    order = wrong[np.argsort(self_conf, kind="stable")]
    rows = [{"path": str(samples[i].path), "split": samples[i].split, "label": samples[i].label,
             "suggested": classes[pred[i]], "confidence": round(float(proba[i, pred[i]]), 4),
             "given_probability": round(float(proba[i, y[i]]), 4), "rank": r}
            for r, i in enumerate(order, 1)]
    return proba, chosen, rows


def _outliers(samples, uid_row, knn, z_min):
    score = knn[[uid_row[s.id] for s in samples]]
    med = float(np.median(score))
    mad = float(np.median(np.abs(score - med))) * 1.4826
    z = (score - med) / (mad if mad > 0 else (float(np.std(score)) or 1.0))
    order = np.argsort(-score, kind="stable")
    rows = []
    for i in order:
        if z[i] < z_min:
            break
        s = samples[i]
        rows.append({"path": str(s.path), "split": s.split, "label": s.label, "score": round(float(score[i]), 4),
                     "z": round(float(z[i]), 2), "rank": len(rows) + 1})
    return rows


def run_audit(ds: Dataset, backbone: str = "mobilenet_v2", *, layer: str | None = None, weights: str = "auto",
              cache="cache", near_threshold: float = NEAR_THRESHOLD, outlier_z: float = OUTLIER_Z,
              C: float | str | None = "auto", folds: int = FOLDS, seed: int = 0, progress: bool = True,
              notify=None, extract_fn=None, **extract_options) -> AuditResult:
    """Duplicates, label issues and outliers of ``ds`` from one layer's features.

    Features are read from ``cache``; what is missing is extracted first
    (``extract_options`` go to :func:`featx.extract.extract`). ``C``: the
    probe's regularisation, or ``"auto"`` (the one of ``C_GRID`` with the
    lowest out-of-fold log-loss)."""
    from .cache import FeatureCache
    from .extract import extract
    if not ds.labelled:
        raise DatasetError(f"{ds.root}: the audit needs labels (a folder per class, or a CSV with a label column)")
    if not 0 < near_threshold <= 1:
        raise ConfigError(f"--near-threshold {near_threshold}: give a cosine similarity in (0, 1]")
    if folds < 2:
        raise ConfigError(f"--folds {folds}: give 2 or more")
    cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    t0 = time.perf_counter()
    report = (extract_fn or extract)(ds, backbone, weights=weights, layers=[layer] if layer else None, cache=cache,
                                     progress=progress, seed=seed, notify=notify, **extract_options)
    spec = report.specs[0]
    have = set(cache.ids(spec.key))
    samples = [s for s in ds.samples if s.id in have]
    if len(samples) < 2:
        raise DatasetError(f"{ds.root}: {len(samples)} readable images; the audit needs at least 2")
    uids = list(dict.fromkeys(s.id for s in samples))
    uid_row = {u: i for i, u in enumerate(uids)}
    Z = _normalise(cache.read(spec.key, uids))
    t1 = time.perf_counter()
    pairs, knn = _similar_pairs_and_knn(Z, near_threshold, OUTLIER_K)
    duplicates, fold_group = _duplicates(samples, uid_row, pairs)
    t2 = time.perf_counter()
    X = Z[[uid_row[s.id] for s in samples]]
    groups = fold_group[[uid_row[s.id] for s in samples]]
    _, chosen, label_issues = _label_issues(samples, X, ds.classes, groups, C, folds, seed)
    t3 = time.perf_counter()
    outliers = _outliers(samples, uid_row, knn, outlier_z)
    t4 = time.perf_counter()
    settings = {"backbone": spec.backbone, "layer": spec.layer, "key": spec.key, "near_threshold": near_threshold,
                "outlier_k": OUTLIER_K, "outlier_z": outlier_z, "C": chosen, "folds": folds, "seed": seed,
                "ranking": "self-confidence (out-of-fold probability of the given label)"}
    return AuditResult(ds, spec, duplicates, label_issues, outliers, settings, len(ds.samples) - len(samples),
                       {"extract": t1 - t0, "duplicates": t2 - t1, "labels": t3 - t2, "outliers": t4 - t3})


# --------------------------------------------------------------------------
# fixes, summary


def _q(path) -> str:
    return shlex.quote(str(path))


def _move_target(ds: Dataset, path: str, label: str) -> str | None:
    """Where a file goes to carry ``label``, for layouts whose labels are folders."""
    p = Path(path)
    if ds.layout in ("split-folders", "folders") and p.parent.name != label:
        return str(p.parent.parent / label)
    return None


def fix_commands(result: AuditResult) -> dict[str, str]:
    """Per kind of finding, what fixes the first one (a shell command where the layout allows)."""
    ds, out = result.dataset, {}
    if result.duplicates:
        first = result.duplicates[0]["group"]
        rows = [r for r in result.duplicates if r["group"] == first]
        if len(rows) > max(2, len(ds) // 4):
            # a "group" of a quarter of the dataset is features that cannot tell images apart
            # (random weights, a layer too early), not copies: no rm to paste
            out["duplicates"] = (f"none: one group holds {len(rows)} of {len(ds)} images, so these features do not "
                                 "tell the images apart; audit with pretrained weights (-w auto) or raise "
                                 "--near-threshold")
        elif rows[0]["leak"]:
            keep = rows[0]["split"]
            drop = [r["path"] for r in rows if r["split"] != keep]
            out["duplicates"] = f"rm {' '.join(_q(p) for p in drop)}   # keep the {keep} copy"
        else:
            out["duplicates"] = f"rm {' '.join(_q(r['path']) for r in rows[1:])}   # keep {_q(rows[0]['path'])}"
    if result.label_issues:
        r = result.label_issues[0]
        target = _move_target(ds, r["path"], r["suggested"])
        out["label_issues"] = (f"mkdir -p {_q(target)} && mv {_q(r['path'])} {_q(target)}/" if target else
                               f"give {r['path']} the label {r['suggested']!r} in {ds.root}")
        out["label_issues"] += "   # if the suggestion is right"
    if result.outliers:
        out["outliers"] = f"rm {_q(result.outliers[0]['path'])}   # if it is not a photo of its class"
    return out


def summary_lines(result: AuditResult, written: dict | None = None) -> list[str]:
    s = result.settings
    n_groups = result.n_groups
    leaks = result.leak_groups
    lines = [f"audit of {result.dataset.name}: {len(result.dataset)} images, {s['backbone']} {s['layer']} features"
             + (f" ({result.missing} unreadable, left out)" if result.missing else "")]
    leak_images = sum(1 for r in result.duplicates if r["leak"])
    lines.append(f"duplicates: {n_groups['exact']} exact and {n_groups['near']} near groups "
                 f"(cosine >= {s['near_threshold']}); {len(leaks)} span splits (leaks, {leak_images} images)")
    c = "-" if s["C"] is None else f"{s['C']:g}"
    lines.append(f"label issues: {len(result.label_issues)} (out-of-fold logreg C={c}, {s['folds']} folds; "
                 "ranked by self-confidence)")
    lines.append(f"outliers: {len(result.outliers)} (mean cosine distance to {s['outlier_k']} nearest images, "
                 f"robust z >= {s['outlier_z']:g})")
    fixes = fix_commands(result)
    for kind, word in (("duplicates", "first leak" if leaks else "first duplicate group"),
                       ("label_issues", "first label issue"), ("outliers", "first outlier")):
        if kind in fixes:
            lines.append(f"fix the {word}: {fixes[kind]}")
    if written:
        lines.append(f"wrote {', '.join(str(p) for p in written.values())}")
    return lines


# --------------------------------------------------------------------------
# files


def _csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([r[c] for c in columns])
    return buf.getvalue()


def _fig(path, lines: list[str], report, cls: str = "") -> str:
    from .report import _e, _href, _thumbnail_uri
    uri = _thumbnail_uri(path)
    img = (f'<img alt="{_e(Path(str(path)).name)}" src="{uri}">' if uri
           else '<span class="missing">(image unreadable)</span>')
    caption = "<br>".join(lines)            # each line is escaped by the caller
    attr = f' class="{cls}"' if cls else ""
    return (f'<figure{attr}><a href="{_e(_href(path, report))}">{img}</a><figcaption>{caption}'
            f'<br><small>{_e(path)}</small></figcaption></figure>\n')


def _capped(items: list, what: str) -> tuple[list, str]:
    shown = items[:HTML_MAX_PER_SECTION]
    note = f"<p>The first {len(shown)} {what} of {len(items)}; the CSV lists them all.</p>\n" if len(shown) < len(items) else ""
    return shown, note


def _gallery_section(heading: str, intro: str, items: list[dict], what: str, caption, report,
                     cls: str = "") -> list[str]:
    """An HTML section: ``heading`` and count, ``intro``, a capped gallery of
    ``items`` captioned by ``caption(item)`` (escaped lines), or "None."."""
    parts = [f"<h2>{heading} ({len(items)})</h2>\n", intro]
    shown, note = _capped(items, what)
    parts.append(note)
    if shown:
        parts.append('<div class="gallery">\n')
        parts += [_fig(r["path"], caption(r), report, cls) for r in shown]
        parts.append("</div>\n")
    else:
        parts.append("<p>None.</p>\n")
    return parts


def _duplicates_html(result: AuditResult, report) -> list[str]:
    """Two sections of duplicate groups: those spanning splits (leaks), then those within one."""
    from .report import _e
    groups: dict[int, list[dict]] = {}
    for r in result.duplicates:
        groups.setdefault(r["group"], []).append(r)
    parts = []
    for leak, heading in ((True, "Leaks: duplicates across splits"), (False, "Duplicates within a split")):
        chosen = [g for g in groups.values() if g[0]["leak"] == leak]
        parts.append(f"<h2>{_e(heading)} ({len(chosen)})</h2>\n")
        if not chosen:
            parts.append("<p>None.</p>\n")
            continue
        shown, note = _capped(chosen, "groups")
        parts.append(note)
        for g in shown:
            parts.append(f'<div class="group"><h3>group {g[0]["group"]}</h3>\n<div class="gallery">\n')
            for r in g:
                similarity = f"{r['similarity']:.4f}"
                lines = [f"<b>{_e(r['split'])}</b>: {_e(r['label'])}", f"{_e(r['kind'])}, similarity {similarity}"]
                parts.append(_fig(r["path"], lines, report, "leak" if leak else ""))
            parts.append("</div></div>\n")
    return parts


def write_html(result: AuditResult, path) -> Path:
    """audit.html: a summary, then duplicates and leaks, label issues and outliers with thumbnails."""
    from .files import atomic_write_text
    from .report import _CSS, _e, html_table
    s = result.settings
    title = f"Audit of {result.dataset.name}"
    css = _CSS + ".group { border-top: 1px solid #ccc; padding-top: 0.5em; }\n.leak { background: #fdecea; }\n"
    parts = ['<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n',
             f"<title>{_e(title)}</title>\n<style>{css}</style>\n</head>\n<body>\n", f"<h1>{_e(title)}</h1>\n"]
    n_groups = result.n_groups
    summary = [("images", len(result.dataset)), ("features", f"{s['backbone']} {s['layer']}"),
               ("leaks (groups spanning splits)", len(result.leak_groups)),
               ("exact duplicate groups", n_groups["exact"]),
               (f"near duplicate groups (cosine >= {s['near_threshold']})", n_groups["near"]),
               ("label issues", len(result.label_issues)), ("outliers", len(result.outliers))]
    parts += ["<h2>Summary</h2>\n", html_table(["finding", "value"], summary, "summary")]
    parts += _duplicates_html(result, path)
    parts += _gallery_section(
        "Label issues", "<p>Out-of-fold predictions of a linear probe that disagree with the given label, the lowest "
        "probability of the given label first.</p>\n", result.label_issues, "label issues",
        lambda r: [f"#{r['rank']} {_e(r['split'])}", f"given: <b>{_e(r['label'])}</b> ({r['given_probability']:.2f})",
                   f"suggested: <b>{_e(r['suggested'])}</b> ({r['confidence']:.2f})"], path, "mistake")
    parts += _gallery_section(
        "Outliers", f"<p>Mean cosine distance to the {s['outlier_k']} nearest other images, robust z-score at least "
        f"{_e(s['outlier_z'])}.</p>\n", result.outliers, "outliers",
        lambda r: [f"#{r['rank']} {_e(r['split'])}: <b>{_e(r['label'])}</b>",
                   f"score {r['score']:.4f} (z {r['z']:.1f})"], path)
    parts.append("</body>\n</html>\n")
    return atomic_write_text(path, "".join(parts))


def write_audit(result: AuditResult, out_dir) -> dict[str, Path]:
    """duplicates.csv, label_issues.csv, outliers.csv and audit.html in ``out_dir``."""
    from .files import atomic_write_text
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot create the folder ({err.strerror or err}); give another one") from None
    paths = {"duplicates": out / "duplicates.csv", "label_issues": out / "label_issues.csv",
             "outliers": out / "outliers.csv", "html": out / "audit.html"}
    atomic_write_text(paths["duplicates"], _csv(result.duplicates, DUPLICATE_COLUMNS))
    atomic_write_text(paths["label_issues"], _csv(result.label_issues, LABEL_COLUMNS))
    atomic_write_text(paths["outliers"], _csv(result.outliers, OUTLIER_COLUMNS))
    write_html(result, paths["html"])
    return paths
