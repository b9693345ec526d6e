"""featx.report: PNGs, the self-contained HTML page, metrics JSON (fast, no display)."""

from __future__ import annotations

import base64
import html
import io
import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from featx import files
from featx.classify import ComparisonRow, evaluate
from featx.report import (plot_confusion_matrix, plot_training_curves, save_metrics_json,
                          write_html_report)

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
        "track", "wbr"}


class StrictParser(HTMLParser):
    """html.parser plus what it does not check itself: every tag closed, in order."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.imgs, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(text):
    p = StrictParser()
    p.feed(text)
    p.close()
    assert p.errors == [] and p.stack == []
    return p


def _png_size(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        return im.size, len(np.unique(np.asarray(im.convert("L"))))


# --------------------------------------------------------------------------
# figures


def test_confusion_matrix_png(tmp_path):
    cm = [[5, 1, 0], [2, 7, 1], [0, 0, 0]]  # an empty row must not divide by zero
    out = plot_confusion_matrix(cm, ["cat", "dog", "a rather long class name"],
                                tmp_path / "sub" / "cm.png", title="test")
    assert out == tmp_path / "sub" / "cm.png"
    (w, h), shades = _png_size(out)
    assert 600 <= w <= 4000 and 300 <= h <= 3000 and w > h  # two panels side by side
    assert shades > 20  # something drawn, not a blank canvas
    (w_many, _), _ = _png_size(plot_confusion_matrix(np.eye(12, dtype=int) * 3,
                                                     [f"class_{i}" for i in range(12)],
                                                     tmp_path / "many.png"))
    assert w_many > w  # the figure grows with the number of classes
    with pytest.raises(ValueError):
        plot_confusion_matrix([[1, 2], [3, 4]], ["a", "b", "c"], tmp_path / "bad.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.png", "sub"]


def test_training_curves_png_with_missing_values(tmp_path):
    history = [
        {"epoch": 1, "train_loss": 1.2, "val_loss": 1.1, "train_acc": 0.5, "val_acc": 0.55},
        {"epoch": 2, "train_loss": 0.8, "val_loss": None, "train_acc": 0.7, "val_acc": 0.71},
        {"epoch": 3, "train_loss": 0.6, "train_acc": 0.8},
        {"epoch": 4, "train_loss": 0.5, "val_loss": 0.9, "train_acc": 0.85, "val_acc": 0.69},
    ]
    (w, h), shades = _png_size(plot_training_curves(history, tmp_path / "curves.png"))
    assert 600 <= w <= 3000 and 250 <= h <= 2000 and shades > 20
    _png_size(plot_training_curves([{"train_loss": 1.0}], tmp_path / "one.png"))
    with pytest.raises(ValueError):
        plot_training_curves([], tmp_path / "empty.png")


# --------------------------------------------------------------------------
# HTML

CLASSES = ["cat", "dog", "<b>fish & chips</b>"]


@pytest.fixture
def metrics():
    y = [0, 0, 1, 1, 2, 2]
    proba = [[.8, .1, .1], [.3, .6, .1], [.1, .8, .1], [.2, .7, .1], [.1, .1, .8], [.5, .2, .3]]
    return evaluate(y, proba, CLASSES, top_k=(1, 2))


def _images(tmp_path):
    paths = []
    for i, size in enumerate([(300, 200), (64, 400), (50, 50)]):
        p = tmp_path / f"img{i}.png"
        Image.new("RGB", size, (40 * i, 100, 200)).save(p)
        paths.append(p)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    return paths, broken


def test_html_report_is_self_contained_and_ordered(tmp_path, metrics):
    (a, b, c), broken = _images(tmp_path)
    cm_png = plot_confusion_matrix(metrics["confusion_matrix"], CLASSES, tmp_path / "cm.png")
    mistakes = [
        {"path": str(a), "true": 0, "pred": 1, "prob": 0.6},
        {"path": str(broken), "true": "dog", "pred": "cat", "prob": 0.95},
        {"path": str(b), "true": 2, "pred": 0, "prob": 0.5},
        {"path": str(tmp_path / "gone.jpg"), "true": 1, "pred": 2, "prob": 0.7},
        {"path": str(c), "true": 1, "pred": 0, "prob": 0.99},
    ]
    rows = [ComparisonRow("resnet18", "avgpool", 512, "logreg", "C", 0.1, 0.9, "cv5", 0.8)]
    out = write_html_report(tmp_path / "r" / "report.html", title="Run <1> & co",
                            metrics=metrics, classes=CLASSES, confusion_png=cm_png,
                            misclassified=mistakes, extra_tables={"Comparison": rows})
    text = out.read_text(encoding="utf-8")
    p = parse(text)
    visible = "".join(p.text)

    assert "Run <1> & co" in visible and "<1>" not in text  # escaped in the source
    for name in CLASSES:
        assert name in visible
    assert "<b>fish" not in text and html.escape("<b>fish & chips</b>") in text
    assert f"{metrics['accuracy']:.4f}" in visible
    assert f"{metrics['top_k_accuracy']['2']:.4f}" in visible and "top-2 accuracy" in visible
    assert f"{metrics['macro']['f1']:.4f}" in visible

    # everything embedded: no src that is not a data URI
    assert all(img["src"].startswith("data:image/") for img in p.imgs)
    cm_imgs = [i for i in p.imgs if i["src"].startswith("data:image/png")]
    assert len(cm_imgs) == 1
    assert base64.b64decode(cm_imgs[0]["src"].split(",", 1)[1]) == cm_png.read_bytes()

    # gallery: most confident mistake first; unreadable files shown by path only
    order = [str(c), str(broken), str(tmp_path / "gone.jpg"), str(a), str(b)]
    positions = [visible.index(path) for path in order]
    assert positions == sorted(positions)
    thumbs = [i for i in p.imgs if i["src"].startswith("data:image/jpeg")]
    assert [t["alt"] for t in thumbs] == ["img2.png", "img0.png", "img1.png"]
    for t in thumbs:
        with Image.open(io.BytesIO(base64.b64decode(t["src"].split(",", 1)[1]))) as im:
            assert max(im.size) <= 128
    assert visible.count("(image unreadable)") == 2
    # class indices are shown as names
    first = visible[visible.index(str(c)) - 200:visible.index(str(c))]
    assert re.search(r"true: dog\s*predicted: cat", first)
    assert "Comparison" in visible and "resnet18" in visible


def test_html_report_caps_the_gallery(tmp_path, metrics):
    mistakes = [{"path": f"/nowhere/{i}.jpg", "true": 0, "pred": 1, "prob": i / 10}
                for i in range(10)]
    text = write_html_report(tmp_path / "r.html", title="t", metrics=metrics, classes=CLASSES,
                             misclassified=mistakes, max_misclassified=3).read_text()
    visible = "".join(parse(text).text)
    assert "/nowhere/9.jpg" in visible and "/nowhere/7.jpg" in visible
    assert "/nowhere/6.jpg" not in visible
    assert "3 most confident mistakes of 10" in visible


# --------------------------------------------------------------------------
# JSON


def test_metrics_json_round_trips(tmp_path, metrics):
    path = tmp_path / "out" / "metrics.json"
    save_metrics_json(path, metrics)
    assert json.loads(path.read_text()) == metrics
    save_metrics_json(path, {"acc": np.float32(0.5), "n": np.int64(3), "cm": np.eye(2, dtype=int),
                             "nan": float("nan"), "pair": (1, 2)})
    assert json.loads(path.read_text()) == {"acc": 0.5, "n": 3, "cm": [[1, 0], [0, 1]],
                                            "nan": None, "pair": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temp files left


def test_interrupted_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    save_metrics_json(path, {"v": 1})

    def fail(f):
        f.write(b"{half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files._atomic_write(path, fail)
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
