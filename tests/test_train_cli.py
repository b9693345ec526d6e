"""train, compare, evaluate and predict as a user meets them: exact output, valid report files, one-line errors.

One small dataset (3 colours; train 6 / val 2 / test 3 per class) is extracted once
with a random-init resnet18 and shared by every test; other datasets are made of
copies of its files, so their features are already cached (content ids).
"""

import csv
import json
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from featx.classify import CLASSIFIERS, _fmt_value
from featx.cli import cli

from .conftest import COLOURS, make_image, make_split_dataset

FAST = ["-b", "resnet18", "-w", "none", "--batch-size", "8", "-q", "-j", "1"]
LOGREG = CLASSIFIERS["logreg"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = root / "colours"
    make_split_dataset(data, file_name="{name}{i}.jpg")
    return {"root": root, "data": data, "cache": root / "cache", "model": root / "model.featx"}


@pytest.fixture(scope="module")
def run():
    runner = CliRunner()

    def _run(*args):
        return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return _run


@pytest.fixture(scope="module")
def trained(work, run):
    r = run("train", work["data"], *FAST, "-c", "logreg", "--cache", work["cache"], "-o", work["model"])
    assert r.exit_code == 0, r.output
    return r


def test_train_prints_choice_scores_and_writes_the_bundle(trained, work):
    search = json.loads((work["model"] / "manifest.json").read_text())["classifier"]["search"]
    chosen = json.loads((work["model"] / "manifest.json").read_text())["classifier"]["chosen"]
    n_tried = len(search)
    assert trained.stdout.splitlines() == [
        "resnet18: extracted 33 images in " + trained.stdout.split("extracted 33 images in ")[1].split(" s")[0]
        + " s (1 layer, one pass); 0 were cached",
        "features: resnet18 flatten, 512 dims; train 18, val 6, test 9",
        # many C separate the colours: the tie goes to the lowest val log-loss, not the flattest model
        f"logreg: chose C={_fmt_value(chosen)} from {n_tried} values on val (accuracy 1.0000)",
        "test accuracy 1.0000, macro-F1 1.0000 (9 images)",
        f"wrote {work['model']}",
    ]
    manifest = json.loads((work["model"] / "manifest.json").read_text())
    assert manifest["kind"] == "linear" and manifest["classes"] == ["blue", "green", "red"]
    assert manifest["classifier"]["chosen"] > min(LOGREG.grid) and manifest["classifier"]["score_source"] == "val"
    assert all(score == 1.0 for _, score in manifest["classifier"]["search"] if _ >= chosen)
    assert manifest["training"]["counts"]["train"] == {"blue": 6, "green": 6, "red": 6}


def test_train_again_reads_the_cache_and_replaces_the_bundle(trained, work, run):
    r = run("train", work["data"], *FAST, "-c", "linear-svm", "--C", "0.01,1", "--cache", work["cache"],
            "-o", work["root"] / "svm.featx")
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[0] == "resnet18: nothing to extract, all 33 images cached (1 layer)"
    # both C separate the colours: the tie goes to the lower val squared hinge
    assert r.stdout.splitlines()[2] == "linear-svm: chose C=1.0 from 2 values on val (accuracy 1.0000)"
    r = run("train", work["data"], *FAST, "-c", "knn", "--C", "3", "--cache", work["cache"], "-o", work["root"] / "svm.featx")
    assert "knn: n_neighbors=3, accuracy on val 1.0000" in r.stdout
    assert json.loads((work["root"] / "svm.featx" / "manifest.json").read_text())["classifier"]["name"] == "knn"
    assert not [p for p in work["root"].iterdir() if p.name.startswith(".svm.featx")]


def test_small_classes_fall_back_and_say_so(trained, work, run, tmp_path):
    # no val split, 3 train images of 'red': 5-fold CV is impossible
    data = tmp_path / "small"
    for split, per_class in {"train": {"blue": 6, "green": 6, "red": 3}, "test": {"blue": 1, "green": 1, "red": 1}}.items():
        for name, n in per_class.items():
            for i in range(n):
                src = work["data"] / ("train" if split == "train" else "test") / name / f"{name}{i}.jpg"
                (data / split / name).mkdir(parents=True, exist_ok=True)
                shutil.copy(src, data / split / name / src.name)
    r = run("train", data, *FAST, "--C", "0.1,1", "--cache", work["cache"], "-o", tmp_path / "m.featx")
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[2:4] == [
        "logreg: chose C=1.0 from 2 values by 3-fold CV (accuracy 1.0000)",   # the tie: lower CV log-loss
        "note: class 'red' has 3 train images: used 3-fold CV instead of 5-fold",
    ]


def test_sgd_trains_streamed_over_chunks(trained, work, run, tmp_path):
    r = run("train", work["data"], *FAST, "-c", "sgd", "--chunk-rows", "4", "--cache", work["cache"],
            "-o", tmp_path / "sgd.featx")
    assert r.exit_code == 0, r.output
    assert "sgd: chose alpha=" in r.stdout and "test accuracy 1.0000" in r.stdout


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.captions, self.images, self._in_caption = [], [], 0, False

    def handle_starttag(self, tag, attrs):
        if tag not in ("img", "meta", "br", "link"):
            self.stack.append(tag)
        if tag == "img":
            self.images += 1
        if tag == "figcaption":
            self._in_caption = True
            self.captions.append("")

    def handle_endtag(self, tag):
        assert self.stack.pop() == tag
        if tag == "figcaption":
            self._in_caption = False

    def handle_data(self, data):
        if self._in_caption:
            self.captions[-1] += data


def test_evaluate_prints_what_metrics_json_holds_and_writes_a_valid_report(trained, work, run, tmp_path):
    # a folder dataset of test images, two reds filed under 'green': two mistakes
    data = tmp_path / "eval"
    for name in COLOURS:
        for i in range(3):
            dest = "green" if (name, i) in {("red", 0), ("red", 1)} else name
            (data / dest).mkdir(parents=True, exist_ok=True)
            shutil.copy(work["data"] / "test" / name / f"{name}{i}.jpg", data / dest / f"{name}{i}.jpg")
    out = tmp_path / "report"
    r = run("evaluate", work["model"], data, "--split", "all", "--top-k", "2", "--cache", work["cache"], "-q",
            "--out", out)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    acc, top2, f1 = m["accuracy"], m["top_k_accuracy"]["2"], m["macro"]["f1"]
    assert (m["n"], m["split"], round(acc, 4)) == (9, "all", 0.7778)
    lines = r.stdout.splitlines()
    assert lines[:6] == [f"{work['model'].name} on eval, split all", "images     9", f"accuracy   {acc:.4f}",
                         f"top-2 acc  {top2:.4f}", f"macro F1   {f1:.4f}", f"ECE        {m['ece']:.4f} (15 bins)"]
    table = {line.split()[0]: line.split()[1:] for line in lines[9:12]}
    for name, v in m["per_class"].items():
        assert table[name] == [f"{v['precision']:.4f}", f"{v['recall']:.4f}", f"{v['f1']:.4f}", str(v["support"])]
    assert table["green"][3] == "5" and table["red"][1] == "1.0000"
    assert lines[-1] == (f"wrote {out / 'metrics.json'}, {out / 'confusion_matrix.png'}, {out / 'calibration.png'}, "
                         f"{out / 'predictions.csv'}, {out / 'report.html'}")
    with Image.open(out / "confusion_matrix.png") as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 100
    page = _Page()
    page.feed((out / "report.html").read_text())
    page.close()
    # confusion matrix + 2 mistakes + 7 correct but least confident + reliability diagram
    assert page.stack == [] and page.images == 1 + 2 + 7 + 1
    with open(out / "predictions.csv") as f:
        preds = list(csv.DictReader(f))
    wrong = sorted((r for r in preds if r["correct"] == "0"), key=lambda r: -float(r["probability"]))
    assert [w["path"].rsplit("/", 1)[1] for w in wrong] == [c.split()[-1].rsplit("/", 1)[1] for c in page.captions[:2]]
    assert all("true: green" in c and "predicted: red" in c for c in page.captions[:2])


def test_predict_marks_uncertain_reports_bad_images_and_reuses_cached_features(trained, work, run, tmp_path):
    good = work["data"] / "test" / "red" / "red0.jpg"
    bad = tmp_path / "bad.jpg"
    bad.write_text("not a jpeg")
    new = make_image(tmp_path / "new" / "n.png", COLOURS["blue"], seed=4242)
    r = run("predict", work["model"], good, bad, tmp_path / "new", "--cache", work["cache"], "-q")
    assert r.exit_code == 1   # a row failed (a missing path is refused up front: tests/test_newuser_predict.py)
    assert r.stderr.splitlines()[-2:] == ["features: 1 cached, 1 extracted",
                                          "error: 1 of 3 images could not be read (exit status 1)"]
    rows = [line.split(None, 3) for line in r.stdout.splitlines()[2:]]
    assert [row[:2] for row in rows] == [[str(good), "red"], [str(bad), "error"], [str(tmp_path / "new" / "n.png"), "blue"]]
    assert rows[1][3] == "not an image (unknown format)"

    r = run("predict", work["model"], good, new, "--cache", work["cache"], "-q", "--format", "json", "--top-k", "3")
    assert r.stderr.splitlines()[-1] == "features: 2 cached, 0 extracted"
    got = json.loads(r.stdout)
    assert [g["label"] for g in got] == ["red", "blue"] and len(got[0]["top_k"]) == 3
    assert sum(t["probability"] for t in got[0]["top_k"]) == pytest.approx(1.0)

    # exactly at the threshold is certain, just above it is not
    # (one image per run: BLAS may round the last bit differently for other batch shapes;
    # a strongly regularised model, so that the probability is below 1)
    soft = tmp_path / "soft.featx"
    assert run("train", work["data"], *FAST, "--C", "0.001", "--cache", work["cache"], "-o", soft).exit_code == 0
    r = run("predict", soft, good, "--cache", work["cache"], "-q", "--format", "json")
    p_red = json.loads(r.stdout)[0]["probability"]
    assert p_red < 1.0
    r = run("predict", soft, good, "--cache", work["cache"], "-q", "--format", "csv", "-t", repr(p_red))
    assert r.stdout.splitlines()[1].split(",")[1:4] == ["red", repr(p_red), "0"]
    t = float(np.nextafter(p_red, 1.0))
    r = run("predict", soft, good, "--cache", work["cache"], "-q", "--format", "csv", "-t", repr(t))
    assert r.stdout.splitlines()[1].split(",")[1:4] == ["uncertain", repr(p_red), "1"]
    r = run("predict", soft, good, "--cache", work["cache"], "-q", "-t", repr(t))
    assert r.stdout.splitlines()[2] == f"{good}  uncertain  {p_red:.4f}       below {t:g}; best guess red"


def test_compare_ranks_the_grid_and_a_second_run_extracts_nothing(trained, work, run, tmp_path):
    args = ["compare", work["data"], "-b", "resnet18", "-b", "squeezenet1_1", "-w", "none", "-l", "resnet18:flatten",
            "-l", "resnet18:layer3", "-c", "logreg", "-c", "knn", "--C", "3", "--batch-size", "8", "-q", "-j", "1",
            "--cache", work["cache"], "--out", tmp_path / "cmp"]
    r = run(*args)
    assert r.exit_code == 0, r.output
    # layer3 is new: one pass computes both layers of resnet18
    assert r.stdout.splitlines()[0].startswith("resnet18: extracted 33 images in ")
    assert r.stdout.splitlines()[0].endswith(" s (2 layers, one pass); 0 were cached")
    assert r.stdout.splitlines()[1].startswith("squeezenet1_1: extracted 33 images in ")
    with open(tmp_path / "cmp" / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and [r["rank"] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    assert [r["winner"] for r in rows] == ["*", "", "", "", "", ""]
    assert sorted((r["backbone"], r["layer"], r["dims"], r["classifier"]) for r in rows) == [
        ("resnet18", "flatten", "512", "knn"), ("resnet18", "flatten", "512", "logreg"),
        ("resnet18", "layer3", "256", "knn"), ("resnet18", "layer3", "256", "logreg"),
        ("squeezenet1_1", "features.12", "512", "knn"), ("squeezenet1_1", "features.12", "512", "logreg")]
    # ranked by the val score alone (ties: lower val loss, fewer dims, the simpler classifier)
    simpler = {"logreg": 0, "knn": 3}
    keys = [(-float(r["val_or_cv_score"]), float(r["val_loss"] or "inf"), int(r["dims"]), simpler[r["classifier"]])
            for r in rows]
    assert keys == sorted(keys)
    assert len({r["extract_seconds"] for r in rows if r["backbone"] == "resnet18"}) == 1
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert md.splitlines()[2].startswith("| * | 1 | ") and sum(line.startswith("| ") for line in md.splitlines()) == 1 + 6

    r = run(*args)
    assert r.stdout.splitlines()[:3] == ["resnet18: nothing to extract, all 33 images cached (2 layers)",
                                         "squeezenet1_1: nothing to extract, all 33 images cached (1 layer)",
                                         "reused 6 of 6 results of identical earlier fits (--refit fits again)"]
    with open(tmp_path / "cmp" / "compare.csv") as f:
        again = list(csv.DictReader(f))
    assert {r["extract_seconds"] for r in again} == {"0.0"}
    assert [{k: v for k, v in r.items() if k != "extract_seconds"} for r in again] == [
        {k: v for k, v in r.items() if k != "extract_seconds"} for r in rows]
    r = run(*args, "--refit")
    assert not [line for line in r.stdout.splitlines() if line.startswith("reused")]
    assert len(r.stdout.splitlines()) == 2 + 2 + 6 + 1 + 1      # extraction, header, rows, footnote, wrote
    assert r.stdout.splitlines()[-2].startswith("* winner chosen by val accuracy")


def test_errors_are_one_clear_line(trained, work, run, tmp_path):
    def error(*args):
        r = run(*args)
        assert r.exit_code == 1, r.output
        return r.output.splitlines()[-1]

    model, cache = work["model"], work["cache"]
    # weights other than the bundle's
    other = tmp_path / "other.pth"
    other.write_bytes(b"other weights")
    import hashlib
    sha = hashlib.sha256(b"other weights").hexdigest()
    assert error("predict", model, work["data"] / "test", "--weights", other, "--cache", cache) == (
        f"Error: {model}: made with resnet18 none:seed=0, but the weights here are weights file with sha256 "
        f"{sha[:16]}; give the original weights with --weights FILE or train again")
    # classes that differ
    data = tmp_path / "purple"
    shutil.copytree(work["data"] / "test", data)
    make_image(data / "purple" / "p.png", (128, 0, 128))
    assert error("evaluate", model, data, "--split", "all", "--cache", cache) == (
        f"Error: {data}: classes differ from the model's: the dataset has blue, green, purple, red; "
        "model.featx knows blue, green, red")
    # a split that does not exist
    two = tmp_path / "two"
    shutil.copytree(work["data"] / "train", two / "train")
    shutil.copytree(work["data"] / "test", two / "test")
    assert error("evaluate", model, two, "--split", "val", "--cache", cache) == (
        f"Error: {two}: no split 'val'; this dataset has train, test")
    # not a bundle, unknown format, unknown kind, damaged payload (the image exists: a missing one is refused first)
    img = next(iter(sorted(work["data"].rglob("*.jpg"))))
    assert error("predict", tmp_path, img) == (
        f"Error: {tmp_path}: not a featx model bundle (no manifest.json; make one with `featx train`)")
    copy = tmp_path / "copy.featx"
    shutil.copytree(model, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "kind": "hologram"}))
    assert error("predict", copy, img) == (
        f"Error: {copy}: unknown bundle kind 'hologram'; this featx reads: linear, finetune")
    (copy / "manifest.json").write_text(json.dumps({**manifest, "featx_bundle": 3}))
    assert error("predict", copy, img) == (
        f"Error: {copy}: bundle format 3 is unknown to featx 0.1.0, which reads formats 1 and 2; upgrade featx")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with open(copy / "model.safetensors", "ab") as f:
        f.write(b"x")
    assert error("predict", copy, img) == (
        f"Error: {copy / 'model.safetensors'}: does not match the sha256 in manifest.json (changed or damaged); "
        "restore the bundle or train again")
    # options
    assert error("train", work["data"], *FAST, "--C", "abc", "-o", tmp_path / "m.featx") == "Error: --C abc: not a number"
    assert error("train", work["data"], *FAST, "-c", "tree", "-o", tmp_path / "m.featx") == (
        "Error: unknown classifier 'tree'; known: logreg, linear-svm, sgd, knn, rbf-svm")
    assert error("train", work["data"], *FAST, "--cache", cache, "-o", tmp_path) == (
        f"Error: {tmp_path}: exists and is not a featx bundle; choose another --out")
    assert error("compare", work["data"], "-b", "resnet18", "-l", "vgg16:features.3", "--cache", cache) == (
        "Error: --layer vgg16:features.3: vgg16 is not one of the --backbone values (resnet18); add it with -b vgg16")
