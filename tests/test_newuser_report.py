"""Issue 19, items 8, 9 and 11: evaluate's report.html and the files beside it.

The Evaluation and the Bundle are made by hand (no network, no backbone):
write_evaluation only reads what they hold.
"""

import base64
import doctest
import importlib
import json
import os
import re
import stat
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from featx.bundle import Bundle
from featx.data import Sample
from featx.evaluate import Evaluation, calibration, write_evaluation
from featx.report import plot_training_curves

CLASSES = ["cat", "dog", "<b>fish & chips</b>"]


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.imgs, self.links, self.h2, self.cells, self.text = [], [], [], [], [], []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag not in ("img", "meta", "br"):
            self.stack.append(tag)
        if tag == "img":
            self.imgs.append(attrs)
        if tag == "a":
            self.links.append(attrs["href"])
        if tag == "td":
            self._cell = [attrs.get("class"), ""]

    def handle_endtag(self, tag):
        assert self.stack.pop() == tag
        if tag == "td":
            self.cells.append(tuple(self._cell))
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self.stack and self.stack[-1] == "h2":
            self.h2.append(data)
        if self._cell is not None:
            self._cell[1] += data


def parse(text):
    p = _Page()
    p.feed(text)
    p.close()
    assert p.stack == []
    return p


@pytest.fixture
def case(tmp_path):
    """6 images: 2 mistakes (one with the odd class name), 4 right."""
    files = []
    for i in range(6):
        f = tmp_path / "data" / f"im {i}.png"     # a space: the link must be quoted
        f.parent.mkdir(exist_ok=True)
        Image.new("RGB", (40, 30), (40 * i, 90, 200)).save(f)
        files.append(f)
    y = np.array([0, 0, 1, 1, 2, 2])
    proba = np.array([[.9, .05, .05], [.55, .40, .05], [.2, .7, .1], [.6, .3, .1], [.1, .1, .8], [.5, .1, .4]])
    samples = [Sample(f, CLASSES[t], "test", f"id{i}") for i, (f, t) in enumerate(zip(files, y))]
    from featx.classify import evaluate
    cal = calibration(y, proba)
    metrics = {"model": "m.featx", "dataset": "data", "dataset_id": "x", "split": "test", "skipped": 0,
               **evaluate(y, proba, CLASSES, top_k=(1, 2)), "ece": cal["ece"], "calibration": cal}
    return Evaluation(metrics, samples, y, proba), tmp_path


def linear_bundle(tmp_path, **extra):
    manifest = {"kind": "linear", "classes": CLASSES,
                "backbone": {"name": "resnet18", "weights_identity": "none:seed=0", "layer": "flatten", "pool": "avg"},
                "classifier": {"name": "logreg", "param_name": "C", "chosen": 0.01, "score_source": "val",
                               "score": 0.9607843137254902}, **extra}
    (tmp_path / "m.featx").mkdir(exist_ok=True)
    return Bundle(tmp_path / "m.featx", manifest, None)


def test_ece_is_15_equal_width_bins_of_top1_confidence(case):
    ev, _ = case
    conf, right = ev.proba.max(1), ev.proba.argmax(1) == ev.y
    which = np.minimum((np.ceil(conf * 15) - 1).astype(int), 14)
    expected = sum((which == b).sum() / 6 * abs(right[which == b].mean() - conf[which == b].mean())
                   for b in range(15) if (which == b).any())
    cal = ev.metrics["calibration"]
    assert cal["n_bins"] == 15 and len(cal["bins"]) == 15
    assert ev.metrics["ece"] == pytest.approx(expected)
    assert sum(b["n"] for b in cal["bins"]) == 6
    perfect = calibration(np.array([0, 1]), np.array([[1.0, 0.0], [0.0, 1.0]]))
    assert perfect["ece"] == 0.0 and perfect["bins"][-1]["n"] == 2
    # calibration's example (import_module: `featx.evaluate` is the API function, the module is in sys.modules)
    assert doctest.testmod(importlib.import_module("featx.evaluate")).failed == 0


def test_gallery_shows_true_probability_top_k_links_and_least_confident(case):
    ev, tmp = case
    out = tmp / "runs" / "ev"
    paths = write_evaluation(ev, linear_bundle(tmp), out)
    assert list(paths) == ["metrics", "confusion", "calibration", "predictions", "report"]
    m = json.loads(paths["metrics"].read_text())
    assert m["ece"] == pytest.approx(ev.metrics["ece"]) and m["calibration"]["binning"] == "equal-width, top-1 confidence"
    text = paths["report"].read_text()
    page = parse(text)
    visible = "".join(page.text)

    # mistakes, most confident first: image 3 (dog as cat, 0.6), image 5 (fish as cat, 0.5)
    assert page.h2[page.h2.index("Misclassified (2)") + 1] == "Correct but least confident (4 of 4)"
    first = visible.index("true: dog (0.3000)")
    second = visible.index("true: <b>fish & chips</b> (0.4000)")
    assert first < second
    assert "predicted: cat (0.6000)top-3: cat 0.6000, dog 0.3000, <b>fish & chips</b> 0.1000" in visible
    # correct ones, least confident first: 1 (0.55), 2 (0.7), 4 (0.8), 0 (0.9)
    unsure = visible[visible.index("Correct but least confident"):]
    order = [unsure.index(f"im {i}.png") for i in (1, 2, 4, 0)]
    assert order == sorted(order)
    # every thumbnail links to its image, relative to the report's folder, quoted
    assert page.links == ["../../data/im%203.png", "../../data/im%205.png", "../../data/im%201.png",
                          "../../data/im%202.png", "../../data/im%204.png", "../../data/im%200.png"]
    for href in page.links:
        assert (out / href.replace("%20", " ")).resolve().is_file()
    # the reliability diagram is embedded; ECE in the summary
    pngs = [i for i in page.imgs if i["src"].startswith("data:image/png")]
    assert [i["alt"] for i in pngs] == ["confusion matrix", "reliability diagram"]
    assert base64.b64decode(pngs[1]["src"].split(",", 1)[1]) == paths["calibration"].read_bytes()
    assert ("text", "ECE (15 bins)") in page.cells and (None, f"{m['ece']:.4f}") in page.cells
    # escaped everywhere: the class name never appears as markup
    assert "<b>fish" not in text and "&lt;b&gt;fish &amp; chips&lt;/b&gt;" in text
    # the score is rounded; text cells are left-aligned, numbers not
    assert ("text", "val score 0.9608") in page.cells and "0.96078" not in visible
    assert ("text", "resnet18") in page.cells and (None, "0.0100") in page.cells
    with open(paths["predictions"]) as f:
        header, row = f.readline().strip(), f.readline().strip()
    assert header == "path,true,predicted,probability,correct,true_probability"
    assert row.endswith(",cat,cat,0.9,1,0.9")


def test_the_comparison_a_bundle_came_from_is_in_its_report(case):
    ev, tmp = case
    rows = [{"rank": 1, "backbone": "resnet18", "layer": "flatten", "classifier": "logreg", "test_accuracy": 1.0},
            {"rank": 2, "backbone": "<vgg>", "layer": "classifier.4", "classifier": "knn", "test_accuracy": 0.5}]
    paths = write_evaluation(ev, linear_bundle(tmp, comparison=rows), tmp / "out")
    page = parse(paths["report"].read_text())
    assert "Comparison this model was chosen from" in page.h2
    assert ("text", "<vgg>") in page.cells and (None, "0.5000") in page.cells
    paths = write_evaluation(ev, linear_bundle(tmp), tmp / "out2")
    assert not [h for h in parse(paths["report"].read_text()).h2 if h.startswith("Comparison")]


def test_a_fine_tuned_bundle_says_what_it_is_and_shows_its_curves(case):
    ev, tmp = case
    folder = tmp / "ft.featx"
    folder.mkdir()
    history = [{"epoch": 0, "val_acc": 0.5, "val_loss": 1.0}, {"epoch": 1, "train_loss": 0.9, "train_acc": 0.6,
                                                               "val_acc": 0.8, "val_loss": 0.7}]
    plot_training_curves(history, folder / "training_curves.png")
    manifest = {"kind": "finetune", "classes": CLASSES,
                "backbone": {"name": "mobilenet_v2", "layer": None, "pool": None,
                             "started_from": {"identity": "torchvision:mobilenet_v2.IMAGENET1K_V1:x.pth"}},
                "finetune": {"config": {"epochs": 5}, "best_epoch": 1, "best_val_acc": 0.8, "start_val_acc": 0.5,
                             "epochs_run": 2, "stopped_early": True, "bn_rule": "BatchNorm: frozen", "device": "cpu",
                             "history": history}}
    paths = write_evaluation(ev, Bundle(folder, manifest, None), tmp / "ft")
    page = parse(paths["report"].read_text())
    cells = [c for _, c in page.cells]
    model = dict(zip(cells[cells.index("bundle"):][::2], cells[cells.index("bundle"):][1::2]))
    assert model["kind"] == "finetune: the whole backbone trained, new head"
    assert model["started from"] == "torchvision:mobilenet_v2.IMAGENET1K_V1:x.pth"
    assert model["epochs"] == "2 of 5 (early stop)" and model["best epoch"] == "1"
    assert model["best val accuracy"] == "0.8000" and "layer" not in model and "classifier" not in model
    assert "-" not in model.values()
    assert "Training curves" in page.h2
    curves = [i for i in page.imgs if i["alt"] == "Training curves"]
    assert len(curves) == 1
    assert base64.b64decode(curves[0]["src"].split(",", 1)[1]) == (folder / "training_curves.png").read_bytes()


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_report_files_honour_the_umask(case, mask, mode):
    ev, tmp = case
    old = os.umask(mask)
    try:
        paths = write_evaluation(ev, linear_bundle(tmp), tmp / f"perm{mask:o}")
    finally:
        os.umask(old)
    got = {p.name: stat.S_IMODE(p.stat().st_mode) for p in paths.values()}
    assert got == {name: mode for name in ("metrics.json", "confusion_matrix.png", "calibration.png",
                                           "predictions.csv", "report.html")}
    assert not [p for p in (tmp / f"perm{mask:o}").iterdir() if p.name.startswith(".")]   # no temp files left


def test_dataset_repr_is_one_line(tmp_path):
    from featx.data import open_dataset

    from .conftest import make_split_dataset
    ds = open_dataset(make_split_dataset(tmp_path / "photos"))
    text = repr(ds)
    assert "\n" not in text and len(text) < 200
    assert re.fullmatch(r"<Dataset 'photos': 33 images, 3 classes, split-folders layout; "
                        r"train 18, val 6, test 9; root '.*photos'>", text)
