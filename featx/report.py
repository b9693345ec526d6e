"""Reports: confusion-matrix and training-curve PNGs, a self-contained HTML page, metrics JSON.

Figures are drawn on :class:`matplotlib.figure.Figure` objects attached to
the Agg canvas directly, never through ``pyplot``: no display is needed, no
global backend is switched, and nothing is left open between calls.

Every file is written to a temporary name beside its destination and renamed
into place, so an interrupted run never leaves half a file under the real
name.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .files import _atomic_write, atomic_write_text

__all__ = [
    "html_table",
    "plot_confusion_matrix",
    "plot_training_curves",
    "save_metrics_json",
    "write_html_report",
]

THUMBNAIL_PX = 128
# Above this many classes the cell numbers would be unreadable; the colours stay.
MAX_ANNOTATED_CLASSES = 40


# --------------------------------------------------------------------------
# figures


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path) -> Path:
    return _atomic_write(path, lambda f: fig.savefig(f, format="png"))


def plot_confusion_matrix(cm, classes: Sequence[str], path, title: str | None = None) -> Path:
    """Save a PNG with the confusion matrix as counts and row-normalised.

    Parameters
    ----------
    cm : array-like of shape (n_classes, n_classes)
        Rows = true class, columns = predicted (as in :func:`featx.classify.evaluate`).
    classes : sequence of str
        Class names, in the order of ``cm``'s rows.
    path : str or Path
        Destination PNG (parent folders are created).
    title : str, optional
        Figure title.

    Returns
    -------
    Path
        ``path``.

    Notes
    -----
    Left panel: counts; right panel: each row divided by its total (the
    recall of each class on the diagonal; an empty row stays 0). Cells carry
    their numbers up to :data:`MAX_ANNOTATED_CLASSES` classes. The figure
    grows with the number of classes.
    """
    cm = np.asarray(cm, dtype=np.int64)
    classes = [str(c) for c in classes]
    n = len(classes)
    if cm.shape != (n, n):
        raise ValueError(f"confusion matrix has shape {cm.shape}, expected ({n}, {n}) "
                         "for the given classes")
    totals = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, totals, out=np.zeros(cm.shape, dtype=np.float64), where=totals > 0)

    panel = min(max(4.0, 0.42 * n + 2.0), 30.0)
    fig = _new_figure(2 * panel + 1.0, panel + 0.8)
    axes = fig.subplots(1, 2)
    font = max(4.0, min(10.0, 220.0 / max(n, 1)))
    panels = ((axes[0], cm, "counts", "d"), (axes[1], norm, "normalised by true class", ".2f"))
    for ax, values, name, fmt in panels:
        vmax = values.max() if values.size and values.max() > 0 else 1
        im = ax.imshow(values, cmap="Blues", vmin=0, vmax=vmax, interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(name)
        ax.set_xticks(range(n), labels=classes, rotation=45, ha="right",
                      rotation_mode="anchor", fontsize=font)
        ax.set_yticks(range(n), labels=classes, fontsize=font)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if n <= MAX_ANNOTATED_CLASSES:
            for i in range(n):
                for j in range(n):
                    v = values[i, j]
                    ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=font,
                            color="white" if v > vmax / 2 else "black")
    if title:
        fig.suptitle(title)
    return _save_png(fig, path)


def _series(history, key):
    xs, ys = [], []
    for i, row in enumerate(history):
        v = row.get(key)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        epoch = row.get("epoch")
        xs.append(i + 1 if epoch is None else epoch)
        ys.append(float(v))
    return xs, ys


def plot_training_curves(history: Sequence[Mapping], path) -> Path:
    """Save a PNG with loss and accuracy per epoch, best validation epoch marked.

    Parameters
    ----------
    history : sequence of mapping
        One dict per epoch with keys ``epoch``, ``train_loss``, ``val_loss``,
        ``train_acc``, ``val_acc``; a key may be missing or None (that point
        is not drawn). A missing ``epoch`` is the 1-based position.
    path : str or Path
        Destination PNG.

    Returns
    -------
    Path
        ``path``.
    """
    history = list(history)
    if not history:
        raise ValueError("training history is empty: nothing to plot")
    fig = _new_figure(11.0, 4.2)
    ax_loss, ax_acc = fig.subplots(1, 2)
    best = None
    vx, vy = _series(history, "val_acc")
    if vy:
        i = int(np.argmax(vy))  # first epoch reaching the best accuracy
        best = (vx[i], vy[i])
    for ax, metric, label in ((ax_loss, "loss", "loss"), (ax_acc, "acc", "accuracy")):
        drawn = False
        for split, style in (("train", "-o"), ("val", "-s")):
            xs, ys = _series(history, f"{split}_{metric}")
            if ys:
                ax.plot(xs, ys, style, markersize=3, label=split)
                drawn = True
        if best is not None:
            ax.axvline(best[0], color="tab:green", linestyle="--", linewidth=1,
                       label=f"best val acc (epoch {best[0]})")
        if drawn:
            ax.legend(loc="best", fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no {label} recorded", ha="center", va="center",
                    transform=ax.transAxes, color="grey")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(alpha=0.3)
    if best is not None:
        ax_acc.plot([best[0]], [best[1]], "*", color="tab:green", markersize=12)
        ax_acc.annotate(f"{best[1]:.3f}", best, textcoords="offset points", xytext=(6, -12),
                        fontsize=8, color="tab:green")
    return _save_png(fig, path)


def plot_reliability_diagram(calibration: Mapping, path, title: str | None = None) -> Path:
    """Save a PNG reliability diagram: accuracy against confidence per bin.

    Parameters
    ----------
    calibration : mapping
        As :func:`featx.evaluate.calibration` returns: ``ece`` and ``bins``,
        each ``{"lo", "hi", "n", "accuracy", "confidence"}``.
    path : str or Path
        Destination PNG.
    title : str, optional
        Figure title (the ECE is added to it).

    Returns
    -------
    Path
        ``path``.

    Notes
    -----
    Left: the accuracy of each non-empty bin as a bar over its interval,
    its mean confidence as a dot and the diagonal (perfect calibration);
    bars under the diagonal are over-confident. Right: images per bin.
    """
    bins = list(calibration.get("bins") or [])
    fig = _new_figure(9.0, 4.2)
    ax, ax_n = fig.subplots(1, 2, width_ratios=[3, 2])
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="perfect calibration")
    full = [b for b in bins if b.get("n")]
    if full:
        ax.bar([b["lo"] for b in full], [b["accuracy"] for b in full], width=[b["hi"] - b["lo"] for b in full],
               align="edge", color="tab:blue", alpha=0.7, edgecolor="tab:blue", label="accuracy")
        ax.plot([b["confidence"] for b in full], [b["accuracy"] for b in full], "o", color="tab:orange",
                markersize=4, label="mean confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (probability of the predicted class)")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    ax_n.bar([b["lo"] for b in bins], [b.get("n", 0) for b in bins], width=[b["hi"] - b["lo"] for b in bins],
             align="edge", color="tab:grey")
    ax_n.set_xlim(0, 1)
    ax_n.set_xlabel("confidence")
    ax_n.set_ylabel("images")
    ece = calibration.get("ece")
    head = f"ECE {ece:.4f} ({len(bins)} equal-width bins)" if ece is not None else "no images"
    fig.suptitle(f"{title}: {head}" if title else head)
    return _save_png(fig, path)


# --------------------------------------------------------------------------
# HTML


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th:first-child, td:first-child, td.text { text-align: left; }
th { background: #f3f3f3; }
.summary td { font-variant-numeric: tabular-nums; }
.gallery { display: flex; flex-wrap: wrap; gap: 1em; }
.gallery figure { margin: 0; width: 160px; font-size: 0.8em; word-break: break-all; }
.gallery img { display: block; max-width: 128px; max-height: 128px; }
.missing { color: #a00; }
img.cm { max-width: 100%; }
.gallery a { display: block; }
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, (float, np.floating)):
        return "-" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _thumbnail_uri(path) -> str | None:
    """A JPEG data URI of the image, or None when it cannot be read."""
    from PIL import Image

    from .data import load_image
    from .errors import FeatxError

    try:
        im = load_image(path, draft_size=THUMBNAIL_PX)
        im.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=80)
    except (FeatxError, OSError, ValueError):
        return None
    return _data_uri(buf.getvalue(), "image/jpeg")


def _cell_class(value) -> str:
    """Text is left-aligned, numbers right-aligned (so their digits line up)."""
    return ' class="text"' if isinstance(value, str) else ""


def _href(image, report) -> str:
    """A link from the report to the full image: relative to the report's folder where possible."""
    from urllib.parse import quote
    target = Path(str(image)).expanduser().absolute()
    try:
        return quote(Path(os.path.relpath(target, Path(report).absolute().parent)).as_posix())
    except ValueError:           # another drive (Windows): no relative path exists
        return target.as_uri()


def _figure(m: Mapping, classes, report) -> str:
    """One gallery entry: thumbnail linked to the image, true and predicted class with their probabilities, top-k."""
    true = _class_name(m.get("true"), classes)
    pred = _class_name(m.get("pred"), classes)
    path = m.get("path")
    uri = _thumbnail_uri(path) if path is not None else None
    img = (f'<img alt="{_e(Path(str(path)).name)}" src="{uri}">' if uri
           else '<span class="missing">(image unreadable)</span>')
    if path is not None:
        img = f'<a href="{_e(_href(path, report))}">{img}</a>'
    true_p = f' ({_e(_fmt(m["true_prob"]))})' if m.get("true_prob") is not None else ""
    top = m.get("top_k") or []
    top_line = (f'<br>top-{len(top)}: ' + ", ".join(f"{_e(_class_name(c, classes))} {_e(_fmt(p))}" for c, p in top)
                if top else "")
    kind = "mistake" if m.get("correct") is not True else "unsure"
    return (f'<figure class="{kind}">{img}<figcaption>'
            f'true: <b>{_e(true)}</b>{true_p}<br>predicted: <b>{_e(pred)}</b> '
            f'({_e(_fmt(m.get("prob")))}){top_line}<br><small>{_e(path)}</small>'
            f'</figcaption></figure>\n')


def _png(png, alt: str) -> str:
    try:
        data = Path(png).read_bytes()
    except OSError as err:
        return f'<p class="missing">{_e(alt)} image unreadable: {_e(png)} ({_e(err.strerror or err)})</p>\n'
    return f'<img class="cm" alt="{_e(alt)}" src="{_data_uri(data, "image/png")}">\n'


def html_table(headers: Sequence[str], rows: Iterable[Sequence], cls: str = "") -> str:
    """An HTML ``<table>`` of escaped, formatted cells (``cls``: its class)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td{_cell_class(c)}>{_e(_fmt(c))}</td>" for c in row) + "</tr>\n"
                   for row in rows)
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>\n"


def _rows_of(items) -> tuple[list[str], list[list]]:
    dicts = [dataclasses.asdict(r) if dataclasses.is_dataclass(r) else dict(r) for r in items]
    headers: list[str] = []
    for d in dicts:
        headers += [k for k in d if k not in headers]
    rows = []
    for d in dicts:
        row = []
        for h in headers:
            v = d.get(h)
            row.append("; ".join(map(str, v)) if isinstance(v, (list, tuple)) else v)
        rows.append(row)
    return headers, rows


def _class_name(label, classes):
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool) \
            and 0 <= label < len(classes):
        return classes[label]
    return label


def _summary_rows(metrics: Mapping) -> list[tuple[str, Any]]:
    """(metric, value) rows of the summary: images, accuracies, averages, ECE."""
    summary = [("images", metrics.get("n")), ("accuracy", metrics.get("accuracy"))]
    for k, v in (metrics.get("top_k_accuracy") or {}).items():
        if str(k) != "1":
            summary.append((f"top-{k} accuracy", v))
    for avg in ("macro", "weighted"):
        for name in ("precision", "recall", "f1"):
            v = (metrics.get(avg) or {}).get(name)
            if v is not None:
                summary.append((f"{avg} {name.replace('f1', 'F1')}", v))
    if metrics.get("ece") is not None:
        bins = (metrics.get("calibration") or {}).get("n_bins")
        summary.append((f"ECE ({bins} bins)" if bins else "ECE", metrics["ece"]))
    return summary


def _misclassified_html(misclassified, max_misclassified: int, classes, path) -> list[str]:
    """The gallery of mistakes, most confident first, at most ``max_misclassified``."""
    items = [dict(m) for m in misclassified]
    items.sort(key=lambda m: -(m.get("prob") if m.get("prob") is not None else -math.inf))
    shown = items[:max(0, max_misclassified)]
    parts = [f"<h2>Misclassified ({len(items)})</h2>\n"]
    if len(shown) < len(items):
        parts.append(f"<p>The {len(shown)} most confident mistakes of {len(items)}.</p>\n")
    if shown:
        parts += ['<div class="gallery">\n', *(_figure(m, classes, path) for m in shown), "</div>\n"]
    else:
        parts.append("<p>None.</p>\n")
    return parts


def _least_confident_html(least_confident, max_least_confident: int, classes, path) -> list[str]:
    """The gallery of correct predictions, least confident first (nothing when there are none)."""
    unsure = [{**m, "correct": True} for m in least_confident]
    if not unsure:
        return []
    unsure.sort(key=lambda m: m.get("prob") if m.get("prob") is not None else math.inf)
    kept = unsure[:max(0, max_least_confident)]
    return [f"<h2>Correct but least confident ({len(kept)} of {len(unsure)})</h2>\n",
            '<div class="gallery">\n', *(_figure(m, classes, path) for m in kept), "</div>\n"]


def write_html_report(path, *, title: str, metrics: Mapping, classes: Sequence[str],
                      confusion_png=None, misclassified: Iterable[Mapping] = (),
                      extra_tables: Mapping[str, Iterable] | None = None,
                      max_misclassified: int = 200, calibration_png=None,
                      least_confident: Iterable[Mapping] = (), max_least_confident: int = 24,
                      figures: Mapping[str, Any] | None = None) -> Path:
    """Write one self-contained HTML page (images embedded as data URIs).

    Parameters
    ----------
    path : str or Path
        Destination ``.html``.
    title : str
        Page title and heading.
    metrics : mapping
        As returned by :func:`featx.classify.evaluate`.
    classes : sequence of str
        Class names, in the order the per-class table lists them.
    confusion_png : str or Path, optional
        PNG from :func:`plot_confusion_matrix`, embedded.
    misclassified : iterable of mapping
        Each ``{"path", "true", "pred", "prob"}`` (labels as names or class
        indices; ``prob`` is the probability given to ``pred``), optionally
        ``"true_prob"`` (the probability of the true class, shown beside
        it) and ``"top_k"`` (a list of (label, probability)). Shown most
        confident mistake first, with a ~128 px thumbnail linking to the
        image (a path relative to the report's folder), or the path alone
        when the image cannot be read.
    extra_tables : mapping, optional
        Title -> rows (dicts or dataclasses such as
        :class:`featx.classify.ComparisonRow`), shown as tables.
    max_misclassified : int, default=200
        Gallery size cap (the most confident mistakes are kept); the page
        says how many were left out.
    calibration_png : str or Path, optional
        PNG from :func:`plot_reliability_diagram`, embedded; the summary
        shows ``metrics["ece"]`` when present.
    least_confident : iterable of mapping
        Correct predictions, as ``misclassified``: the
        ``max_least_confident`` given the lowest probability are shown,
        least confident first.
    figures : mapping, optional
        Title -> PNG path (e.g. a fine-tuned bundle's training curves), embedded.

    Returns
    -------
    Path
        ``path``.
    """
    classes = [str(c) for c in classes]
    parts = ["<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
             f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n",
             f"<h1>{_e(title)}</h1>\n"]

    parts += ["<h2>Summary</h2>\n", html_table(["metric", "value"], _summary_rows(metrics), "summary")]
    per_class = metrics.get("per_class") or {}
    rows = [[c, *(per_class.get(c, {}).get(k) for k in ("precision", "recall", "f1", "support"))]
            for c in classes]
    parts += ["<h2>Per class</h2>\n",
              html_table(["class", "precision", "recall", "F1", "support"], rows)]
    if confusion_png is not None:
        parts += ["<h2>Confusion matrix</h2>\n", _png(confusion_png, "confusion matrix")]
    parts += _misclassified_html(misclassified, max_misclassified, classes, path)
    parts += _least_confident_html(least_confident, max_least_confident, classes, path)
    if calibration_png is not None:
        parts += ["<h2>Reliability</h2>\n",
                  "<p>Accuracy against confidence (the probability of the predicted class) in "
                  f"{(metrics.get('calibration') or {}).get('n_bins', 15)} equal-width "
                  "bins; the expected calibration error (ECE) is the mean gap, weighted by images per bin.</p>\n",
                  _png(calibration_png, "reliability diagram")]
    for name, png in (figures or {}).items():
        parts += [f"<h2>{_e(name)}</h2>\n", _png(png, name)]
    for name, table_rows in (extra_tables or {}).items():
        headers, rows = _rows_of(table_rows)
        parts += [f"<h2>{_e(name)}</h2>\n", html_table(headers, rows)]
    parts.append("</body>\n</html>\n")
    return atomic_write_text(path, "".join(parts))


# --------------------------------------------------------------------------
# JSON


def _jsonable(obj):
    """numpy types to Python ones, NaN/inf to null (JSON has no NaN)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_metrics_json(path, metrics: Mapping) -> Path:
    """Write ``metrics`` as indented JSON, atomically.

    numpy scalars and arrays become plain numbers and lists; NaN and
    infinities become ``null``; tuples become lists.
    """
    text = json.dumps(_jsonable(metrics), indent=2, allow_nan=False)
    return atomic_write_text(path, text + "\n")
