"""Using a model bundle: evaluation on a labelled split, prediction on images.

The library behind ``featx evaluate`` and ``featx predict``. Probabilities
come from :func:`featx.bundle.bundle_probabilities`, so features go through
the cache under the bundle's spec: images seen before are not run through
the backbone again.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .bundle import Bundle, Predictions, bundle_probabilities
from .classify import evaluate, threshold_predictions
from .data import IMAGE_EXTENSIONS, Dataset, Sample, content_id
from .errors import ConfigError, DatasetError
from .text import text_table

__all__ = ["Evaluation", "check_classes", "collect_images", "evaluate_bundle", "format_metrics",
           "format_predictions", "predict_images", "write_evaluation"]

FORMATS = ("table", "csv", "json")


# --------------------------------------------------------------------------
# evaluate


def check_classes(bundle: Bundle, ds: Dataset) -> list[str]:
    """Notes about the dataset's classes; DatasetError when it has classes the model does not know."""
    known = set(bundle.classes)
    if any(c not in known for c in ds.classes):
        raise DatasetError(f"{ds.root}: classes differ from the model's: the dataset has {', '.join(ds.classes)}; "
                           f"{bundle.name} knows {', '.join(bundle.classes)}")
    absent = [c for c in bundle.classes if c not in set(ds.classes)]
    if absent:
        return [f"the dataset has no images of {', '.join(absent)} (the model knows {len(known)} classes)"]
    return []


@dataclass
class Evaluation:
    metrics: dict                        # evaluate(): accuracy, top-k, per class, confusion matrix, ...
    samples: list[Sample]                # the images evaluated (readable ones), in order
    y: np.ndarray                        # their labels, indices into the bundle's classes
    proba: np.ndarray                    # (n, n_classes)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def predicted(self) -> np.ndarray:
        return np.argmax(self.proba, axis=1) if len(self.proba) else np.zeros(0, np.int64)


def evaluate_bundle(bundle: Bundle, ds: Dataset, split: str | None = "test", *, top_k: int = 5,
                    **options) -> Evaluation:
    """Metrics of ``bundle`` on one split of ``ds`` (``"all"``: every image).

    ``options`` go to :func:`featx.bundle.bundle_probabilities` (cache,
    device, batch_size, workers, weights, progress, notify).
    """
    notes = check_classes(bundle, ds)
    samples = ds.subset(split)
    if not samples:
        raise DatasetError(f"{ds.root}: split {split!r} has no images")
    pred = bundle_probabilities(bundle, samples, **options)
    good = [i for i, e in enumerate(pred.errors) if e is None]
    skipped = [(str(samples[i].path), e) for i, e in enumerate(pred.errors) if e is not None]
    if not good:
        raise DatasetError(f"{ds.root}: none of the {len(samples)} images of split {split!r} could be read")
    index = {c: i for i, c in enumerate(bundle.classes)}
    kept = [samples[i] for i in good]
    y = np.array([index[s.label] for s in kept], dtype=np.int64)
    proba = pred.proba[good]
    metrics = evaluate(y, proba, bundle.classes, top_k=sorted({1, int(top_k)}))
    cal = calibration(y, proba)
    metrics = {"model": str(bundle.path), "dataset": ds.name, "dataset_id": ds.id,
               "split": split or "all", "skipped": len(skipped), **metrics, "ece": cal["ece"], "calibration": cal}
    return Evaluation(metrics, kept, y, proba, skipped, notes)


ECE_BINS = 15


def calibration(y, proba, bins: int = ECE_BINS) -> dict:
    """Reliability of the top-1 probability: the expected calibration error and its bins.

    The confidence of an image is the probability of its predicted class.
    ``bins`` equal-width intervals split [0, 1] (``(lo, hi]``, the first
    also holds 0); in each, ``accuracy`` is the share of its images
    predicted right and ``confidence`` their mean confidence. The ECE is
    ``sum(n_b / n * |accuracy_b - confidence_b|)`` (Guo et al., 2017): 0
    when, say, the images given 0.8 are right 80% of the time.

    >>> import numpy as np
    >>> c = calibration(np.array([0, 0, 1, 1]), np.array([[.9, .1], [.9, .1], [.3, .7], [.6, .4]]))
    >>> round(c["ece"], 4), [(b["n"], b["accuracy"]) for b in c["bins"] if b["n"]]
    (0.275, [(1, 0.0), (1, 1.0), (2, 1.0)])
    """
    y = np.asarray(y)
    proba = np.asarray(proba, dtype=np.float64)
    n = len(y)
    conf = proba.max(axis=1) if n else np.zeros(0)
    right = (proba.argmax(axis=1) == y) if n else np.zeros(0, bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    out, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        k = int(mask.sum())
        acc = float(right[mask].mean()) if k else None
        mean_conf = float(conf[mask].mean()) if k else None
        if k:
            ece += k / n * abs(acc - mean_conf)
        out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": k, "accuracy": acc,
                    "confidence": mean_conf})
    return {"ece": float(ece) if n else None, "n_bins": bins, "binning": "equal-width, top-1 confidence",
            "bins": out}


def format_metrics(m: dict) -> str:
    """The printed summary; every number formatted from ``m`` (the dict saved as metrics.json)."""
    lines = [f"images     {m['n']}" + (f" ({m['skipped']} unreadable, left out)" if m.get("skipped") else ""),
             f"accuracy   {m['accuracy']:.4f}"]
    for k, v in m["top_k_accuracy"].items():
        if k != "1":
            lines.append(f"top-{k} acc  {v:.4f}")
    lines.append(f"macro F1   {m['macro']['f1']:.4f}")
    if m.get("ece") is not None:
        lines.append(f"ECE        {m['ece']:.4f} ({(m.get('calibration') or {}).get('n_bins', ECE_BINS)} bins)")
    lines.append("")
    rows = [[c, f"{v['precision']:.4f}", f"{v['recall']:.4f}", f"{v['f1']:.4f}", str(v["support"])]
            for c, v in m["per_class"].items()]
    lines.append(text_table(rows, ["class", "precision", "recall", "F1", "support"], right={1, 2, 3, 4}))
    return "\n".join(lines)


def write_evaluation(ev: Evaluation, bundle: Bundle, out_dir) -> dict[str, Path]:
    """metrics.json, confusion_matrix.png, calibration.png, predictions.csv and report.html in ``out_dir``.

    The report's gallery shows each mistake with the probability of the
    true class beside the predicted one and the top 3, each thumbnail
    linking to the image; then the correct predictions given the lowest
    probability; the reliability diagram; what the model is (for a
    fine-tuned bundle: epochs, best epoch and its training curves); and,
    when the bundle's manifest records the comparison it won
    (``comparison``: a list of rows), that table.
    """
    from .files import atomic_write_text
    from .report import plot_confusion_matrix, plot_reliability_diagram, save_metrics_json, write_html_report
    out = Path(out_dir)
    classes = bundle.classes
    paths = {"metrics": out / "metrics.json", "confusion": out / "confusion_matrix.png",
             "calibration": out / "calibration.png", "predictions": out / "predictions.csv",
             "report": out / "report.html"}
    save_metrics_json(paths["metrics"], ev.metrics)
    title = f"{bundle.name} on {ev.metrics['dataset']} ({ev.metrics['split']})"
    plot_confusion_matrix(ev.metrics["confusion_matrix"], classes, paths["confusion"], title=title)
    plot_reliability_diagram(ev.metrics["calibration"], paths["calibration"], title=title)
    pred = ev.predicted
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "true", "predicted", "probability", "correct", "true_probability"])
    for s, t, p, row in zip(ev.samples, ev.y, pred, ev.proba):
        w.writerow([str(s.path), classes[t], classes[p], repr(float(row[p])), int(t == p), repr(float(row[t]))])
    atomic_write_text(paths["predictions"], buf.getvalue())
    k = min(3, len(classes))
    items = []
    for s, t, p, row in zip(ev.samples, ev.y, pred, ev.proba):
        top = np.argsort(-row, kind="stable")[:k]
        items.append({"path": str(s.path), "true": classes[t], "pred": classes[p], "prob": float(row[p]),
                      "true_prob": float(row[t]), "top_k": [(classes[j], float(row[j])) for j in top],
                      "correct": bool(t == p)})
    write_html_report(paths["report"], title=title, metrics=ev.metrics, classes=classes,
                      confusion_png=paths["confusion"], calibration_png=paths["calibration"],
                      misclassified=[m for m in items if not m["correct"]],
                      least_confident=[m for m in items if m["correct"]],
                      figures=_bundle_figures(bundle), extra_tables=_bundle_tables(ev, bundle))
    return paths


def _score(v) -> str | None:
    return None if v is None else f"{float(v):.4f}"


def _bundle_tables(ev: Evaluation, bundle: Bundle) -> dict[str, list]:
    """The report's "Model" table (and "Comparison" when the manifest records one)."""
    b = bundle.backbone
    skipped = ("images left out (unreadable)", ev.metrics.get("skipped", 0))
    if bundle.kind == "finetune":
        f = bundle.manifest.get("finetune") or {}
        started = b.get("started_from") or {}
        ran = f.get("epochs_run")
        stop = " (interrupted)" if f.get("interrupted") else " (early stop)" if f.get("stopped_early") else ""
        best = f.get("best_epoch")
        rows = [("bundle", str(bundle.path)), ("kind", "finetune: the whole backbone trained, new head"),
                ("backbone", b.get("name")), ("started from", started.get("identity") or started.get("spec")),
                ("epochs", None if ran is None else f"{ran} of {(f.get('config') or {}).get('epochs', ran)}{stop}"),
                ("best epoch", None if best is None else ("0 (the start itself)" if best == 0 else best)),
                ("best val accuracy", _score(f.get("best_val_acc"))),
                ("start val accuracy", _score(f.get("start_val_acc"))),
                ("batch norm", f.get("bn_rule")), ("trained on", f.get("device")), skipped]
    else:
        c = bundle.manifest.get("classifier", {})
        source, score = c.get("score_source"), c.get("score")
        chosen_by = None if source is None else f"{source} score {_score(score)}" if score is not None else source
        rows = [("bundle", str(bundle.path)), ("kind", bundle.kind), ("backbone", b.get("name")),
                ("weights", b.get("weights_identity")), ("layer", b.get("layer")), ("pool", b.get("pool")),
                ("classifier", c.get("name")), (c.get("param_name", "parameter"), c.get("chosen")),
                ("chosen by", chosen_by), skipped]
    tables = {"Model": [{"setting": k, "value": v} for k, v in rows]}
    comparison = bundle.manifest.get("comparison")
    if isinstance(comparison, list) and comparison and all(isinstance(r, dict) for r in comparison):
        tables["Comparison this model was chosen from"] = comparison
    return tables


def _bundle_figures(bundle: Bundle) -> dict[str, Path]:
    """PNGs a bundle carries: a fine-tuned one copies its training curves beside its weights."""
    curves = bundle.path / "training_curves.png"
    return {"Training curves": curves} if curves.is_file() else {}


# --------------------------------------------------------------------------
# predict


@dataclass
class ImageInput:
    shown: str                  # the path as the user will read it
    path: Path
    error: str | None = None


def collect_images(inputs: Sequence[str]) -> list[ImageInput]:
    """Files as given (any extension) and the images inside folders (recursive, sorted).

    A path that does not exist is a ConfigError (a typo, not an unreadable image)."""
    out = []
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                out.append(ImageInput(str(raw), p, "folder holds no images"))
            out += [ImageInput(str(Path(raw) / f.relative_to(p)), f) for f in found]
        elif p.is_file():
            out.append(ImageInput(str(raw), p))
        else:
            raise ConfigError(f"{raw}: no such file or folder; give image files or folders that exist")
    return out


def predict_images(bundle: Bundle, inputs: Sequence[str], *, threshold: float | None = None, top_k: int = 1,
                   **options) -> tuple[list[dict], Predictions]:
    """Label files and folders of images.

    Returns ``(rows, predictions)``: one dict per image, ``path``, ``label``
    (None when uncertain or on error), ``probability``, ``uncertain``,
    ``top_k`` [(label, p)] and ``error``; and the
    :class:`~featx.bundle.Predictions` behind them (how many features were
    cached, how many extracted). Unreadable images get an ``error`` and no
    label; they never stop the others.
    """
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"--threshold {threshold}: give a probability between 0 and 1")
    if top_k < 1:
        raise ConfigError(f"--top-k {top_k}: give an integer >= 1")
    items = collect_images(inputs)
    if not items:
        raise ConfigError("no images given")
    samples, where = [], []
    for i, item in enumerate(items):
        if item.error is None:
            try:
                samples.append(Sample(item.path, "", "", content_id(item.path)))
                where.append(i)
            except OSError as e:
                item.error = f"cannot read file ({e.strerror or e})"
    pred = bundle_probabilities(bundle, samples, **options)
    for i, e in zip(where, pred.errors):
        items[i].error = e
    ok = [j for j, e in enumerate(pred.errors) if e is None]
    decided = threshold_predictions(pred.proba[ok], bundle.classes, threshold, top_k) if ok else []
    by_item = {where[j]: d for j, d in zip(ok, decided)}
    rows = []
    for i, item in enumerate(items):
        d = by_item.get(i)
        if d is None:
            rows.append({"path": item.shown, "label": None, "probability": None, "uncertain": False,
                         "top_k": [], "error": item.error or "could not be read"})
        else:
            rows.append({"path": item.shown, "label": d["label"], "probability": d["probability"],
                         "uncertain": d["uncertain"], "top_k": d["top_k"], "error": None})
    return rows, pred


def _label_cell(row) -> str:
    if row["error"]:
        return "error"
    return "uncertain" if row["uncertain"] else row["label"]


def format_predictions(rows: list[dict], fmt: str = "table", *, top_k: int = 1,
                       threshold: float | None = None) -> str:
    """Rows from :func:`predict_images` as an aligned table, CSV or JSON."""
    if fmt == "json":
        out = [{"path": r["path"], "label": _label_cell(r) if not r["error"] else None,
                "probability": r["probability"], "uncertain": r["uncertain"],
                "top_k": [{"label": lab, "probability": p} for lab, p in r["top_k"]], "error": r["error"]}
               for r in rows]
        return json.dumps(out, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "label", "probability", "uncertain", "top_k", "error"])
        for r in rows:
            w.writerow([r["path"], "" if r["error"] else _label_cell(r),
                        "" if r["probability"] is None else repr(r["probability"]),
                        int(r["uncertain"]), ";".join(f"{lab}:{p!r}" for lab, p in r["top_k"]),
                        r["error"] or ""])
        return buf.getvalue().rstrip("\n")
    if fmt != "table":
        raise ConfigError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    header = ["image", "label", "probability"] + ([f"top-{top_k}"] if top_k > 1 else []) + ["note"]
    body = []
    for r in rows:
        prob = "-" if r["probability"] is None else f"{r['probability']:.4f}"
        cells = [r["path"], _label_cell(r), prob]
        if top_k > 1:
            cells.append(", ".join(f"{lab} {p:.4f}" for lab, p in r["top_k"]))
        if r["error"]:
            note = r["error"]
        elif r["uncertain"]:
            note = f"below {threshold:g}; best guess {r['top_k'][0][0]}"
        else:
            note = ""
        body.append(cells + [note])
    return text_table(body, header)
